"""Fused MoE experts in the plan (mpq.models.experts, mpq.models.layout.describe_layers): one
layer per expert and projection, matched by the Linear class target, quantized whole or kept
whole; the router protected by default and targetable by its exact name."""
from __future__ import annotations

import pytest

from mpq.config.plan import Plan
from mpq.config.recipe import parse_recipe
from mpq.engine.spec import as_recipe, plan_model
from mpq.errors import RecipeError
from mpq.models.coverage import account
from mpq.models.experts import fused_experts, split_slice, unsupported_layout
from mpq.models.source import build_skeleton
from tests.tiny_models import MOE_ARCHITECTURES, tiny_config, tiny_model


def recipe(text: str):
    return parse_recipe("mpq_recipe: 1\nrules:\n" + text, "test.yaml")


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_each_expert_and_projection_is_a_layer_of_the_plan(arch):
    model = build_skeleton(tiny_config(arch))
    config = tiny_config(arch)
    _, plan = plan_model(model, as_recipe("w4a16"))
    experts = [l for l in plan.layers if l.expert is not None]
    assert len(experts) == config.num_hidden_layers * 2 * 8
    hidden, inner = config.hidden_size, model.model.layers[0].mlp.experts.down_proj.shape[-1]
    first = plan.get("model.layers.0.mlp.experts.gate_up_proj.3")
    assert first.expert == 3 and first.shape == (2 * inner, hidden) and first.block == 0
    assert first.scheme is not None and first.reason == "rule 0 (Linear)"
    assert first.weight_key == "model.layers.0.mlp.experts.gate_up_proj"
    down = plan.get("model.layers.1.mlp.experts.down_proj.7")
    assert down.shape == (hidden, inner) and down.block == 1
    assert split_slice(down.name) == ("model.layers.1.mlp.experts", "down_proj", 7)
    router = plan.get("model.layers.0.mlp.gate")
    assert router.scheme is None and router.reason.startswith("protected")
    # the plan round-trips through its dict, the expert index included
    assert Plan.from_dict(plan.to_dict()) == plan


def test_dense_layers_carry_no_expert_key():
    _, plan = plan_model(tiny_model("llama"), as_recipe("w4a16"))
    assert all("expert" not in layer for layer in plan.to_dict()["layers"])


def test_the_experts_class_name_targets_them_and_a_router_is_quantized_by_name():
    model = build_skeleton(tiny_config("qwen3_moe"))
    _, plan = plan_model(model, recipe(
        "  - targets: [model.layers.0.mlp.gate]\n    weights: {bits: 8, granularity: channel}\n"
        "  - targets: [Qwen3MoeExperts]\n    weights: {bits: 4, group_size: 32}\n"))
    assert plan.get("model.layers.0.mlp.gate").scheme.weights.bits == 8
    assert plan.get("model.layers.1.mlp.gate").scheme is None
    assert plan.get("model.layers.0.self_attn.q_proj").scheme is None
    quantized = [l for l in plan.quantized() if l.expert is not None]
    assert len(quantized) == 32 and all(l.scheme.weights.group_size == 32 for l in quantized)
    coverage = {e.name: e.category for e in account(model, plan).entries}
    assert coverage["model.layers.0.mlp.gate.weight"] == "quantized"
    assert coverage["model.layers.1.mlp.gate.weight"] == "router"
    assert coverage["model.layers.0.mlp.experts.down_proj"] == "quantized"


def test_a_regex_rule_reaches_the_router_only_by_its_exact_name():
    model = build_skeleton(tiny_config("mixtral"))
    with pytest.raises(RecipeError, match="match no layer") as error:
        plan_model(model, recipe("  - targets: ['re:.*mlp\\.gate']\n    weights: {bits: 8}\n"))
    assert "protected" in error.value.hint


def test_a_fused_parameter_is_quantized_whole_or_kept_whole():
    model = build_skeleton(tiny_config("qwen3_moe"))
    with pytest.raises(RecipeError, match="partly quantized") as error:
        plan_model(model, recipe(
            "  - targets: ['re:.*experts\\.gate_up_proj\\.[0-3]$']\n"
            "    weights: {bits: 4, group_size: 64}\n"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in error.value.message
    # different schemes per expert, and down kept while gate_up is quantized, are fine
    _, plan = plan_model(model, recipe(
        "  - targets: ['re:.*experts\\.gate_up_proj\\.[0-3]$']\n    weights: {bits: 8, granularity: channel}\n"
        "  - targets: ['re:.*experts\\.gate_up_proj\\.\\d+$']\n"
        "    weights: {bits: 4, group_size: 64}\n"))
    bits = [plan.get(f"model.layers.0.mlp.experts.gate_up_proj.{e}").scheme.weights.bits
            for e in range(8)]
    assert bits == [8] * 4 + [4] * 4
    assert plan.get("model.layers.0.mlp.experts.down_proj.0").scheme is None


@pytest.mark.parametrize("attribute, reason", [("is_transposed", "transposed"),
                                               ("has_bias", "biases")])
def test_other_fused_layouts_are_not_planned(attribute, reason):
    model = build_skeleton(tiny_config("mixtral"))
    experts = model.model.layers[0].mlp.experts
    assert unsupported_layout(experts) is None
    setattr(experts, attribute, True)
    assert reason in unsupported_layout(experts)
    assert [f.name for f in fused_experts(model)] == ["model.layers.1.mlp.experts"]
