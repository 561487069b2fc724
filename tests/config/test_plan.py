"""Rule resolution on a fake Llama-shaped layer list (no model, no weights)."""
from __future__ import annotations

import json
import textwrap

import pytest

from mpq.errors import ArtifactError, RecipeError
from mpq.config.plan import LayerInfo, LayerPlan, Plan, resolve
from mpq.config.run_log import RunLog, plan_record, read_plan_record
from mpq.config.recipe import Recipe, list_presets, load_recipe, parse_recipe
from mpq.numerics.args import WeightArgs

HIDDEN, KV, FFN, VOCAB = 576, 192, 1536, 1000  # SmolLM2-like: 576 is not divisible by 128
OTHER = {"model.embed_tokens": "Embedding", "model.norm": "LlamaRMSNorm",
         "model.layers.0.input_layernorm": "LlamaRMSNorm"}


def llama_layers(blocks: int = 2) -> list[LayerInfo]:
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN),
              "self_attn.v_proj": (KV, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN),
              "mlp.down_proj": (HIDDEN, FFN)}
    layers = [LayerInfo(f"model.layers.{b}.{suffix}", "Linear", shape, b)
              for b in range(blocks) for suffix, shape in shapes.items()]
    return layers + [LayerInfo("lm_head", "Linear", (VOCAB, HIDDEN), None, protected=True)]


def recipe(text: str) -> Recipe:
    return parse_recipe(textwrap.dedent(text), "recipe.yaml")


def resolve_error(text: str, layers=None) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        resolve(recipe(text), layers or llama_layers(), OTHER)
    return info.value


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_every_preset_resolves_on_a_llama(name):
    plan = resolve(load_recipe(name), llama_layers(), OTHER)
    head = plan.get("lm_head")
    assert plan.recipe_name == name
    if name.endswith("-compact") or name.startswith("gguf-"):
        # the whole model: the head int8 per row (GGUF: q8_0), by its exact name
        assert len(plan.quantized()) == 15
        assert head.scheme.algorithm == "rtn" and head.scheme.weights.bits == 8
        assert head.scheme.weights.granularity == ("group" if name.startswith("gguf-")
                                                   else "channel")
        if name == "gguf-q4_k_m-gptq":  # q4_k/q6_k where 256 divides the inputs (down_proj)
            formats = {p.name.split(".")[-1]: p.scheme.weights.format for p in plan.quantized()}
            assert formats == {"q_proj": "q5_0", "k_proj": "q5_0", "v_proj": "q8_0",
                               "o_proj": "q5_0", "gate_proj": "q5_0", "up_proj": "q5_0",
                               "down_proj": "q6_k", "lm_head": "q8_0"}
            return
        if name == "gguf-q3_k_m-gptq":  # as llama.cpp's Q3_K_M of SmolLM2 (576 inputs)
            formats = {p.name: p.scheme.weights.format for p in plan.quantized()}
            assert formats.pop("lm_head") == "q8_0"
            assert formats.pop("model.layers.0.mlp.down_proj") == "q5_k"
            assert formats.pop("model.layers.1.mlp.down_proj") == "q4_k"
            assert formats.pop("model.layers.0.self_attn.v_proj") == "q5_1"
            assert formats.pop("model.layers.1.self_attn.v_proj") == "q5_1"
            assert {n.split(".", 3)[-1]: f for n, f in formats.items()} == {
                "self_attn.q_proj": "q4_0", "self_attn.k_proj": "q4_0",
                "self_attn.o_proj": "q5_0", "mlp.gate_proj": "q4_0", "mlp.up_proj": "q4_0"}
            assert {p.scheme.algorithm for p in plan.quantized() if p.name != "lm_head"} == {
                "gptq"}
            return
        assert {p.reason for p in plan.quantized() if p.name != "lm_head"} == {
            "rule 1 (Linear)"}
        return
    assert len(plan.quantized()) == 14
    assert head.scheme is None and head.rule is None
    assert head.reason == "protected (name it exactly to quantize)"
    assert {p.reason for p in plan.quantized()} == {"rule 0 (Linear)"}


def test_first_match_wins_skip_regex_and_exact_head():
    plan = resolve(recipe("""
        mpq_recipe: 1
        defaults: {weights: {group_size: 64}}
        rules:
          - targets: ["re:.*mlp\\\\.down_proj"]
            weights: {bits: 8, granularity: channel}
          - targets: model.layers.1.self_attn.v_proj
            skip: true
          - targets: [re:.*v_proj, lm_head]
            weights: {bits: 6}
          - targets: Linear
    """), llama_layers(), OTHER)
    down = plan.get("model.layers.0.mlp.down_proj")
    assert down.rule == 0 and down.scheme.weights.describe() == "int8 sym channel"
    assert down.reason == "rule 0 (re:.*mlp\\.down_proj)"
    v1 = plan.get("model.layers.1.self_attn.v_proj")
    assert v1.scheme is None and v1.rule == 1 and v1.reason == "skip by rule 1"
    v0 = plan.get("model.layers.0.self_attn.v_proj")
    assert v0.rule == 2 and v0.scheme.weights.bits == 6
    head = plan.get("lm_head")  # protected, but named exactly
    assert head.rule == 2 and head.reason == "rule 2 (lm_head)" and head.shape == (VOCAB, HIDDEN)
    q = plan.get("model.layers.1.self_attn.q_proj")
    assert q.rule == 3 and q.scheme.weights == WeightArgs(group_size=64) and q.block == 1
    assert plan.get("model.embed_tokens") is None
    assert len(plan.quantized()) == 14  # 15 layers − the skipped v_proj of block 1


def test_class_targets_and_unmatched_layers():
    layers = [LayerInfo("transformer.h.0.attn.c_attn", "Conv1D", (3 * 64, 64), 0),
              LayerInfo("transformer.h.0.mlp.c_fc", "Conv1D", (256, 64), 0),
              LayerInfo("transformer.h.0.extra", "Linear", (64, 64), 0),
              LayerInfo("lm_head", "Linear", (100, 64), None, protected=True)]
    plan = resolve(recipe("mpq_recipe: 1\nrules: [{targets: Conv1D, weights: {group_size: 32}}]"),
                   layers)
    assert [p.rule for p in plan.layers] == [0, 0, None, None]
    assert plan.get("transformer.h.0.extra").reason == "no rule matched"
    assert plan.get("lm_head").reason.startswith("protected")


def test_regex_and_class_targets_never_match_the_protected_head():
    plan = resolve(recipe("mpq_recipe: 1\nrules: [{targets: ['re:.*', Linear], "
                                  "weights: {bits: 8, granularity: channel}}]"), llama_layers())
    assert plan.get("lm_head").scheme is None and len(plan.quantized()) == 14


def test_summary_groups_by_scheme_label():
    plan = resolve(recipe("""
        mpq_recipe: 1
        rules:
          - {targets: "re:.*down_proj", weights: {bits: 8, granularity: channel}}
          - {targets: Linear, weights: {group_size: 64}}
    """), llama_layers(), OTHER)
    rows, kept = plan.summary()
    assert kept == 1
    assert rows == [("rtn int4 sym g64", 12, 2 * (2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN
                                                  + 2 * FFN * HIDDEN)),
                    ("rtn int8 sym channel", 2, 2 * HIDDEN * FFN)]
    assert rows[1].layers == 2


def test_plan_round_trips_through_json():
    plan = resolve(recipe("""
        mpq_recipe: 1
        rules:
          - {targets: model.layers.0.mlp.up_proj, skip: true}
          - {targets: Linear, algorithm: gptq, options: {damp: 0.01, act_order: true},
             weights: {format: nf4, double_quant: true}}
        precision_policy: {kv_cache: fp8_e4m3}
    """), llama_layers(), OTHER)
    log = RunLog.for_plan(plan)
    log.result("model.layers.0.mlp.down_proj")["error"] = 0.125
    again, again_log = read_plan_record(json.loads(json.dumps(plan_record(plan, log))))
    assert again == plan and again_log == log
    assert again.precision_policy["kv_cache"] == "fp8_e4m3"
    assert isinstance(again.layers[0].shape, tuple)


def test_plan_from_malformed_dict_is_an_artifact_error():
    with pytest.raises(ArtifactError, match="malformed plan"):
        Plan.from_dict({"recipe_name": "x", "precision_policy": {}, "layers": [{"name": "a"}]})


# --- errors --------------------------------------------------------------------------------------

def test_rule_matching_nothing_suggests_a_name():
    err = resolve_error("""
        mpq_recipe: 1
        rules:
          - targets: Linear
          - targets: [model.layers.0.mlp.down_prj]
    """)
    assert str(err).startswith("recipe.yaml: rules[1] targets ['model.layers.0.mlp.down_prj'] "
                               "match no layer")
    assert err.hint == "did you mean 'model.layers.0.mlp.down_proj'?"
    err = resolve_error("mpq_recipe: 1\nrules: [{targets: Linaer}]")
    assert err.hint == "did you mean 'Linear'?"


def test_rule_matching_only_other_modules_explains_why():
    err = resolve_error("mpq_recipe: 1\nrules: [{targets: model.embed_tokens}]")
    assert "rules[0]" in str(err) and "match no layer" in str(err)
    assert err.hint == ("'model.embed_tokens' is an Embedding; only Linear/Conv1D layers and "
                        "the input embedding can be quantized")
    err = resolve_error("mpq_recipe: 1\nrules: [{targets: 're:.*norm'}]")
    assert err.hint.startswith("'model.norm' is a LlamaRMSNorm")


def test_rule_matching_only_the_protected_head():
    err = resolve_error("mpq_recipe: 1\nrules: [{targets: Linear}, {targets: 're:lm_.*'}]")
    assert "rules[1]" in str(err) and "'lm_head' is protected" in err.hint


def test_rule_matching_nothing_shows_example_names():
    err = resolve_error("mpq_recipe: 1\nrules: [{targets: 're:transformer\\.h\\..*'}]")
    assert "model.layers.0.self_attn.q_proj" in err.hint and "layer names look like" in err.hint


def test_shadowed_rule_is_not_an_error(caplog):
    plan = resolve(recipe("mpq_recipe: 1\nrules: [{targets: Linear, weights: {group_size: 64}},"
                          " {targets: 're:.*q_proj'}]"), llama_layers())
    assert all(p.rule == 0 for p in plan.quantized())
    assert "shadowed" in caplog.text


def test_group_size_not_dividing_k_suggests_one():
    err = resolve_error("mpq_recipe: 1\nrules: [{targets: Linear}]")  # default group 128, K=576
    assert str(err).startswith("recipe.yaml: model.layers.0.self_attn.q_proj (rules[0]): "
                               "group_size 128 does not divide the input dimension 576")
    assert "(and 11 more layers)" in str(err)  # down_proj has K=1536 = 12·128
    assert err.hint == "use group_size 64"


def test_fallback_weights_take_the_layers_the_rule_cannot():
    plan = resolve(recipe("""
        mpq_recipe: 1
        rules:
          - targets: Linear
            algorithm: gptq
            weights: {format: q4_k}
            fallback: {format: q5_0}
    """), llama_layers())
    for layer in plan.quantized():
        assert layer.rule == 0 and layer.scheme.algorithm == "gptq"
        if layer.name.endswith("down_proj"):  # 1536 = 6·256 inputs
            assert layer.scheme.weights.format == "q4_k" and layer.reason == "rule 0 (Linear)"
        else:  # 576 inputs
            assert layer.scheme.weights.format == "q5_0"
            assert layer.scheme.weights.group_size == 32
            assert layer.reason == ("rule 0 (Linear) fallback: group_size 256 does not divide "
                                    "the input dimension 576")
    # a fallback that does not fit either is the usual shape error, naming the layer
    err = resolve_error("""
        mpq_recipe: 1
        rules:
          - targets: Linear
            weights: {format: q6_k}
            fallback: {format: int, group_size: 128}
    """)
    assert str(err).startswith("recipe.yaml: model.layers.0.self_attn.q_proj (rules[0]): "
                               "group_size 128 does not divide the input dimension 576")


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get more bits."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def test_q4_k_m_preset_picks_llama_cpps_q6_k_layers_for_30_blocks():
    plan = resolve(load_recipe("gguf-q4_k_m-gptq"), llama_layers(30), OTHER)
    wide = {layer.block for layer in plan.quantized()
            if layer.name.endswith("down_proj") and layer.scheme.weights.format == "q6_k"}
    assert wide == {i for i in range(30) if _use_more_bits(i, 30)}
    narrow = {layer.block for layer in plan.quantized()
              if layer.name.endswith("down_proj") and layer.scheme.weights.format == "q4_k"}
    assert narrow == set(range(30)) - wide
    v_proj = {layer.block for layer in plan.quantized()  # 576 inputs: q6_k falls back to q8_0
              if layer.name.endswith("v_proj") and layer.scheme.weights.format == "q8_0"}
    assert v_proj == wide


def test_q3_k_m_preset_is_llama_cpps_mix_for_30_blocks():
    """The types llama.cpp's own Q3_K_M gives SmolLM2-135M
    (benchmarks/results/llama_cpp_q3_k_m_types.md)."""
    plan = resolve(load_recipe("gguf-q3_k_m-gptq"), llama_layers(30), OTHER)
    types: dict[tuple[str, str], set[int]] = {}
    for layer in plan.quantized():
        if layer.block is not None:
            kind = layer.name.rsplit(".", 1)[1]
            types.setdefault((kind, layer.scheme.weights.format), set()).add(layer.block)
    every = set(range(30))
    assert types == {("q_proj", "q4_0"): every, ("k_proj", "q4_0"): every,
                     ("gate_proj", "q4_0"): every, ("up_proj", "q4_0"): every,
                     ("o_proj", "q5_0"): every, ("v_proj", "q5_1"): {0, 1},
                     ("v_proj", "q5_0"): every - {0, 1}, ("down_proj", "q5_k"): {0},
                     ("down_proj", "q4_k"): every - {0}}
    assert plan.get("lm_head").scheme.weights.format == "q8_0"


def test_layer_plan_defaults():
    plan = LayerPlan("a", "Linear", (4, 4), None, None, None, "no rule matched")
    assert plan.to_dict()["scheme"] is None


def test_a_pattern_that_overruns_its_time_limit_is_a_recipe_error(monkeypatch):
    import regex

    def too_slow(*args, **kwargs):
        raise TimeoutError("regex timed out")

    monkeypatch.setattr(regex, "match", too_slow)
    with pytest.raises(RecipeError, match="catastrophic backtracking"):
        resolve(recipe("mpq_recipe: 1\nrules:\n  - targets: ['re:(.*.*)*x']\n"),
                llama_layers(), OTHER)
