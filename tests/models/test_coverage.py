"""The parameter account (mpq.models.coverage): every tensor of every tiny family is quantized
or kept with a category, the bytes add up to the model's, and the kept share is what an
independent count of embeddings, norms, head, biases (and MoE experts and routers) gives."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mpq.models.coverage import STRICT_DEFAULT, account, name_pattern
from mpq.config.recipe import parse_recipe
from mpq.engine.spec import RunOptions, plan_model
from mpq.errors import RecipeError
from mpq.models.source import build_skeleton
from tests.tiny_models import (ARCHITECTURES, MOE_ARCHITECTURES, RECORD_ARCHITECTURES,
                               tiny_config, tiny_model)

DENSE = ARCHITECTURES + RECORD_ARCHITECTURES
# every Linear-like layer but the protected head (a class target would miss FalconLinear)
ALL_LAYERS = """\
mpq_recipe: 1
defaults: {algorithm: rtn}
rules:
  - targets: ["re:.*"]
    weights: {format: int, bits: 8, symmetric: true, granularity: channel}
"""


def recipe(text: str = ALL_LAYERS):
    return parse_recipe(text, "test.yaml")


def unique_bytes(params) -> int:
    """Bytes of distinct tensors (a tied tensor once)."""
    seen = {id(p): p for p in params}
    return sum(p.numel() * p.element_size() for p in seen.values())


def expected_kept(model: nn.Module) -> dict[str, int]:
    """Kept bytes per category, counted on the real model (ties are real there), without the
    account's code: embeddings, norms, the head (unless tied), every Linear's bias, and the
    MoE routers (fused experts are planned per expert, so quantized)."""
    head = model.get_output_embeddings()
    embedding_params = [p for m in model.modules() if isinstance(m, nn.Embedding)
                        for p in m.parameters()]
    norm_params = [p for m in model.modules() if "norm" in type(m).__name__.lower()
                   for p in m.parameters(recurse=False)]
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, Conv1D))]
    bias_params = [m.bias for m in linears if m is not head and m.bias is not None]
    tied = head.weight is model.get_input_embeddings().weight
    head_params = [] if tied else list(head.parameters())
    routers = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    return {"embedding": unique_bytes(embedding_params), "norm": unique_bytes(norm_params),
            "bias": unique_bytes(bias_params), "head": unique_bytes(head_params),
            "router": unique_bytes(routers)}


def planned(arch: str, text: str = ALL_LAYERS, dtype=None):
    skeleton = build_skeleton(tiny_config(arch), dtype=dtype)
    _, plan = plan_model(skeleton, recipe(text))
    return skeleton, plan, account(skeleton, plan)


@pytest.mark.parametrize("arch", DENSE + MOE_ARCHITECTURES)
def test_account_adds_up_and_matches_an_independent_count(arch):
    real = tiny_model(arch)
    _, plan, coverage = planned(arch)
    total = unique_bytes(real.parameters())
    assert coverage.total_bytes == total  # every tensor once, none forgotten
    names = [n for e in coverage.entries for n in (e.name, *e.tied)]
    assert sorted(names) == sorted(n for n, _ in real.named_parameters(remove_duplicate=False))
    by_category: dict[str, int] = {}
    for entry in coverage.kept():
        by_category[entry.category] = by_category.get(entry.category, 0) + entry.bytes
    expected = {k: v for k, v in expected_kept(real).items() if v}
    assert by_category == expected
    quantized = sum(e.bytes for e in coverage.entries if not e.kept)
    planned_weights = sum(l.shape[0] * l.shape[1] * 4 for l in plan.quantized())  # fp32
    assert quantized == planned_weights
    assert coverage.unquantized_share == pytest.approx(sum(expected.values()) / total)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_fused_experts_count_as_quantized_and_pass_the_strict_default(arch):
    _, plan, coverage = planned(arch)
    fused = [e for e in coverage.entries if e.name.endswith(("experts.gate_up_proj",
                                                             "experts.down_proj"))]
    assert len(fused) == 2 * tiny_config(arch).num_hidden_layers
    assert all(e.category == "quantized" for e in fused)
    experts = [l for l in plan.quantized() if l.expert is not None]
    assert len(experts) == 2 * 8 * tiny_config(arch).num_hidden_layers  # E=8, 2 projections
    groups = {g.category: g for g in coverage.groups()}
    assert "moe-experts" not in groups
    assert groups["router"].patterns == ("model.layers.*.mlp.gate.weight",)
    assert coverage.unquantized_share < STRICT_DEFAULT
    coverage.check(*RunOptions(strict=True).unquantized_limit())


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_unsupported_expert_layouts_are_kept_by_name_and_fail_the_strict_default(arch):
    skeleton = build_skeleton(tiny_config(arch))
    for layer in skeleton.model.layers:  # a layout mpq does not plan (as GPT-OSS's)
        layer.mlp.experts.is_transposed = True
    _, plan = plan_model(skeleton, recipe())
    coverage = account(skeleton, plan)
    assert not any(l.expert is not None for l in plan.layers)
    experts = {g.category: g for g in coverage.groups()}["moe-experts"]
    assert experts.patterns == ("model.layers.*.mlp.experts.gate_up_proj",
                                "model.layers.*.mlp.experts.down_proj")
    assert "cannot quantize" in experts.reason
    assert coverage.groups()[0].category == "moe-experts"
    with pytest.raises(RecipeError, match=r"moe-experts \d+\.\d%") as error:
        coverage.check(*RunOptions(strict=True).unquantized_limit())
    assert "--strict" in error.value.message and "--max-unquantized" in error.value.hint


def test_dense_models_pass_the_strict_default():
    for arch in DENSE:
        _, _, coverage = planned(arch)
        assert coverage.unquantized_share < STRICT_DEFAULT, arch
        coverage.check(*RunOptions(strict=True).unquantized_limit())


def test_kept_linears_say_which_rule_or_none():
    text = """\
mpq_recipe: 1
defaults: {algorithm: rtn}
rules:
  - targets: ["re:.*mlp.*"]
    skip: true
  - targets: ["re:.*self_attn.q_proj"]
    weights: {format: int, bits: 8, symmetric: true, granularity: channel}
"""
    _, _, coverage = planned("llama", text)
    entries = {e.name: e for e in coverage.entries}
    down = entries["model.layers.1.mlp.down_proj.weight"]
    assert (down.category, down.reason) == ("skipped", "skip by rule 0")
    k_proj = entries["model.layers.0.self_attn.k_proj.weight"]
    assert (k_proj.category, k_proj.reason) == ("no-rule", "no rule matched")
    assert not entries["model.layers.0.self_attn.q_proj.weight"].kept
    head = entries["lm_head.weight"]
    assert head.category == "head" and "protected" in head.reason
    with pytest.raises(RecipeError) as error:
        coverage.check(0.2)
    assert "narrow the skip by rule 0 that keeps model.layers.*.mlp" in error.value.hint


def test_a_quantized_tied_head_counts_the_embedding_it_unties_from():
    text = ALL_LAYERS + """\
  - targets: [lm_head]
    weights: {format: int, bits: 8, symmetric: true, granularity: channel}
"""
    real = tiny_model("llama_tied")
    _, _, coverage = planned("llama_tied", text)
    embed_bytes = real.model.embed_tokens.weight.numel() * 4
    assert coverage.total_bytes == unique_bytes(real.parameters()) + embed_bytes
    entries = {e.name: e for e in coverage.entries}
    assert not entries["lm_head.weight"].kept
    assert entries["model.embed_tokens.weight"].category == "embedding"
    # not quantized, the tied pair is one tensor, listed under the embedding with its tie
    _, _, kept = planned("llama_tied")
    embedding = next(e for e in kept.entries if e.name == "model.embed_tokens.weight")
    assert embedding.tied == ("lm_head.weight",)


def test_bytes_follow_the_source_dtype():
    _, _, coverage = planned("llama", dtype=torch.bfloat16)
    real = tiny_model("llama")
    assert coverage.total_bytes == sum(p.numel() for p in real.parameters()) * 2


def test_name_pattern_replaces_indices():
    assert name_pattern("model.layers.12.mlp.experts.3.w1.weight") == \
        "model.layers.*.mlp.experts.*.w1.weight"
    assert name_pattern("lm_head.weight") == "lm_head.weight"


EMBEDDING = """\
mpq_recipe: 1
defaults: {algorithm: rtn}
rules:
  - targets: [Embedding]
    weights: {format: int, bits: 8, symmetric: true, granularity: channel}
"""
HEAD_INT4 = """\
  - targets: [lm_head]
    weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 32}
"""
LINEARS = """\
  - targets: [Linear]
    weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 32}
"""


def test_a_targeted_embedding_counts_as_quantized():
    _, _, coverage = planned("llama", EMBEDDING + LINEARS)
    entries = {e.name: e for e in coverage.entries}
    embedding = entries["model.embed_tokens.weight"]
    assert not embedding.kept and embedding.layer == "model.embed_tokens"
    assert coverage.tying is None and "tying" not in coverage.summary()


@pytest.mark.parametrize("rules, shared, untied", [
    (EMBEDDING.replace("[Embedding]", "[Embedding, lm_head]") + LINEARS, True, 0),
    (EMBEDDING + LINEARS, False, 256 * 64 * 4),  # the head keeps a float copy
    (EMBEDDING + HEAD_INT4 + LINEARS, False, 256 * 64 * 4),  # both quantized, apart
])
def test_tied_pair_is_one_entry_when_shared_else_two(rules, shared, untied):
    real = tiny_model("llama_tied")
    _, _, coverage = planned("llama_tied", rules)
    embed_bytes = real.model.embed_tokens.weight.numel() * 4
    assert coverage.total_bytes == unique_bytes(real.parameters()) + untied
    assert coverage.untie_bytes == untied
    summary = coverage.summary()["tying"]
    assert summary["shared"] is shared and summary["untied_bytes"] == untied
    entries = {e.name: e for e in coverage.entries}
    assert not entries["model.embed_tokens.weight"].kept
    if shared:
        assert entries["model.embed_tokens.weight"].tied == ("lm_head.weight",)
        assert "lm_head.weight" not in entries
    else:
        head = entries["lm_head.weight"]
        assert "untied from model.embed_tokens.weight" in head.reason
        assert head.kept == (rules.count("lm_head") == 0) and head.bytes == embed_bytes
