"""Serving targets (mpq.checkpoint.serving): the plan checks, --target on quantize/plan/convert,
and --target-bits choosing within a target (one scheme per fused group, kernel schemes only)."""
from __future__ import annotations

import json

import pytest

from mpq.checkpoint.serving import (TARGETS, check_target, fused_layer_groups, serving_target,
                                    target_problems)
from mpq.config.plan import Plan
from mpq.config.recipe import parse_recipe
from mpq.engine.spec import plan_model
from mpq.errors import FormatError, OptionError
from tests.helpers import run_cli, tiny_folder
from tests.tiny_models import tiny_model

WORDS = "the of and to in a is that for it as was with be by on not he this are or".split()
QKV = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
       "model.layers.0.self_attn.v_proj")


def _recipe(rules: str):
    return parse_recipe(f"mpq_recipe: 1\nname: t\nrules:\n{rules}", "t.yaml")


UNIFORM = "  - targets: [Linear]\n    weights: {format: int, bits: 4, group_size: 64}\n"
SPLIT_QKV = ("  - targets: ['re:.*q_proj']\n    weights: {format: int, bits: 8, "
             "granularity: channel}\n" + UNIFORM)


def _plan(rules: str) -> Plan:
    return plan_model(tiny_model("llama"), _recipe(rules))[1]


def test_fused_groups_come_from_the_family_record():
    names = [f"model.layers.{b}.{local}" for b in (0, 1) for local in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    groups = fused_layer_groups(names, "llama")
    assert QKV in groups and ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj") \
        in groups and len(groups) == 4
    assert fused_layer_groups(names, "no-such-family") == []


def test_vllm_refuses_a_split_fused_group_that_other_targets_take():
    plan = _plan(SPLIT_QKV)
    problems = target_problems(TARGETS["vllm"], plan, "llama")
    assert len(problems) == 2  # q/k/v of each block; gate/up share a scheme
    assert all("fused group" in p and "q_proj" in p and "2 schemes" in p for p in problems)
    for name in ("any", "transformers"):
        assert target_problems(TARGETS[name], plan, "llama") == []
    assert target_problems(TARGETS["vllm"], _plan(UNIFORM), "llama") == []
    with pytest.raises(FormatError, match="--target vllm: 2 problem"):
        check_target(TARGETS["vllm"], plan, "llama")


@pytest.mark.parametrize("weights, why", [
    ("{format: int, bits: 3, group_size: 64}", "3-bit weights"),
    ("{format: int, bits: 4, symmetric: false, group_size: 64}", "asymmetric"),
    ("{format: int, bits: 4, group_size: 16}", "scale granularity"),
])
def test_vllm_refuses_schemes_its_int_kernels_do_not_take(weights, why):
    plan = _plan(f"  - targets: [Linear]\n    weights: {weights}\n")
    problems = target_problems(TARGETS["vllm"], plan, "llama")
    assert len(problems) == 14 and all(why in p for p in problems)


def test_vllm_refuses_activation_quantization_over_4_bit_weights():
    plan = _plan("  - targets: [Linear]\n    weights: {format: int, bits: 4, group_size: 64}\n"
                 "    input_activations: {format: int, bits: 8, dynamic: true, "
                 "granularity: token}\n")
    assert all("W8A8" in p for p in target_problems(TARGETS["vllm"], plan, "llama"))


def test_llama_cpp_takes_only_what_gguf_expresses():
    rtn = _plan(UNIFORM)  # fp32 scales in groups of 64: no GGUF type
    assert len(target_problems(TARGETS["llama.cpp"], rtn, "llama")) == 14
    q4_0 = _plan("  - targets: [Linear]\n    weights: {format: q4_0}\n")
    assert target_problems(TARGETS["llama.cpp"], q4_0, "llama") == []


def test_unknown_target_is_one_clear_error():
    with pytest.raises(OptionError, match="unknown serving target 'vlm'") as err:
        serving_target("vlm")
    assert "vllm" in err.value.hint


def test_plan_records_the_target_and_reads_it_back():
    plan = _plan(UNIFORM)
    assert "serving_target" not in plan.to_dict()
    from dataclasses import replace

    marked = replace(plan, serving_target="vllm")
    assert Plan.from_dict(marked.to_dict()).serving_target == "vllm"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tiny_folder(tmp_path_factory.mktemp("serving"))
    (root / "split.yaml").write_text(f"mpq_recipe: 1\nname: split\nrules:\n{SPLIT_QKV}")
    return root


def test_quantize_refuses_a_plan_the_target_cannot_run_before_any_work(tiny):
    out = tiny / "refused"
    result = run_cli("quantize", tiny / "src", "-r", tiny / "split.yaml", "-o", out,
                     "--target", "vllm")
    assert result.exit_code == 9, result.output
    assert "fused group" in result.output and not out.exists()
    assert run_cli("plan", tiny / "src", "-r", tiny / "split.yaml", "--target",
                   "vllm").exit_code == 9
    assert run_cli("quantize", tiny / "src", "-r", "w4a16", "-o", out, "--target",
                   "vlm").exit_code == 2


def test_target_bits_for_vllm_keeps_fused_groups_on_one_kernel_scheme(tiny):
    out = tiny / "mixed"
    result = run_cli("quantize", tiny / "src", "-r", "w4a16", "-o", out, "--target-bits", 5.0,
                     "--calib", tiny / "calib.txt", "--seq-len", 32, "--sensitivity-samples", 2,
                     "--candidates", "int8,int4-g32,int4-g64,int3-g64", "--target", "vllm",
                     "--json")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    chosen = next(e for e in events if e["event"] == "mixed_precision")
    assert "int3-g64" not in chosen["counts"] and len(chosen["counts"]) > 1
    from mpq.checkpoint.native import open_artifact

    plan = open_artifact(out).plan
    assert plan.serving_target == "vllm"
    assert target_problems(TARGETS["vllm"], plan, "llama") == []
    by_name = {layer.name: layer.scheme for layer in plan.layers}
    for group in fused_layer_groups(by_name, "llama"):
        assert len({by_name[name] for name in group}) == 1
    # the stored plan is checked again for a target
    assert run_cli("plan", out, "--target", "vllm").exit_code == 0
    assert run_cli("plan", out, "--target", "llama.cpp").exit_code == 9


def test_convert_checks_a_given_target_before_writing(tiny):
    src = tiny / "w4"
    assert run_cli("quantize", tiny / "src", "-r", "w4a16", "-o", src, "--target",
                   "vllm").exit_code == 0
    assert run_cli("convert", src, "-o", tiny / "w4-ct", "--format",
                   "compressed-tensors").exit_code == 0
    out = tiny / "w4-ct2"
    result = run_cli("convert", src, "-o", out, "--format", "compressed-tensors", "--target",
                     "llama.cpp")
    assert result.exit_code == 9 and "--target llama.cpp" in result.output
    assert not out.exists()
