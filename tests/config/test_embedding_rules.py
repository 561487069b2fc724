"""Rules for the input embedding (mpq.config.plan, mpq.engine.spec.check_embedding_schemes) and
the tie record of a tied embedding/head pair (mpq.config.tying), on tiny model skeletons."""
from __future__ import annotations

import pytest

from mpq.config.plan import Plan
from mpq.config.recipe import parse_recipe
from mpq.engine.spec import plan_model
from mpq.errors import RecipeError
from mpq.models.source import build_skeleton
from tests.tiny_models import tiny_config

INT8_ROW = "{format: int, bits: 8, symmetric: true, granularity: channel}"
INT4_G32 = "{format: int, bits: 4, symmetric: false, granularity: group, group_size: 32}"


def plan_of(arch: str, rules: str, algorithm: str = "rtn") -> Plan:
    text = f"mpq_recipe: 1\ndefaults: {{algorithm: {algorithm}}}\nrules:\n{rules}"
    return plan_model(build_skeleton(tiny_config(arch)), parse_recipe(text, "r.yaml"))[1]


def rule(targets: str, weights: str = INT8_ROW, extra: str = "") -> str:
    return f"  - targets: {targets}\n    weights: {weights}\n{extra}"


@pytest.mark.parametrize("target", ["Embedding", "model.embed_tokens"])
def test_class_or_exact_name_targets_the_embedding(target):
    plan = plan_of("llama", rule(f"[{target}]") + rule("[Linear]"))
    embedding = plan.get("model.embed_tokens")
    assert embedding.embedding and embedding.scheme.weights.bits == 8
    assert embedding.shape == (256, 64) and embedding.block is None
    assert plan.to_dict()["layers"][0]["embedding"] is True
    assert Plan.from_dict(plan.to_dict()) == plan


def test_gemma_scaled_embedding_matches_by_base_class_and_own_name():
    for target in ("Embedding", "GemmaTextScaledWordEmbedding"):
        plan = plan_of("gemma", rule(f"[{target}]") + rule("[Linear]"))
        assert plan.get("model.embed_tokens").class_name == "GemmaTextScaledWordEmbedding"


@pytest.mark.parametrize("targets", ["[Linear]", "['re:.*']", "['re:model\\..*']"])
def test_linear_rules_and_broad_regexes_never_catch_it(targets):
    plan = plan_of("llama", rule(targets))
    assert plan.get("model.embed_tokens") is None  # kept by policy, outside the plan
    assert all(not layer.embedding for layer in plan.layers)


def test_a_regex_meant_for_the_embedding_says_how_to_target_it():
    with pytest.raises(RecipeError, match="match no layer") as info:
        plan_of("llama", rule("['re:model\\.embed.*']") + rule("[Linear]"))
    assert "only its exact name or the class target Embedding" in info.value.hint


@pytest.mark.parametrize("algorithm", ["gptq"])
def test_statistics_algorithms_are_refused_naming_the_rule(algorithm):
    rules = rule("[Embedding]", extra=f"    algorithm: {algorithm}\n") + rule("[Linear]")
    with pytest.raises(RecipeError) as info:
        plan_of("llama", rules)
    message = str(info.value)
    assert "rules[0] (model.embed_tokens)" in message and algorithm in message
    assert "activation statistics" in message and "algorithm: rtn" in info.value.hint
    assert info.value.exit_code == 3


@pytest.mark.parametrize("weights, extra, match", [
    ("{format: nf4}", "", "nf4 weights per group"),
    ("{format: fp8_e4m3, granularity: tensor}", "", "fp8_e4m3 weights per tensor"),
    (INT8_ROW, "    input_activations: {format: int, bits: 8, dynamic: true, "
               "granularity: token}\n", "no input activations"),
])
def test_schemes_an_embedding_cannot_take_are_refused(weights, extra, match):
    with pytest.raises(RecipeError, match=match):
        plan_of("llama", rule("[Embedding]", weights, extra) + rule("[Linear]"))


@pytest.mark.parametrize("weights", [INT8_ROW, INT4_G32, "{format: fp8_e4m3}",
                                     "{format: int, bits: 6, granularity: channel}"])
def test_allowed_embedding_schemes(weights):
    plan = plan_of("llama", rule("[Embedding]", weights) + rule("[Linear]"))
    assert plan.get("model.embed_tokens").scheme is not None


def test_untied_model_has_no_tie_record():
    plan = plan_of("llama", rule("[Embedding]") + rule("[lm_head]", INT4_G32) + rule("[Linear]"))
    assert plan.tying is None and "tying" not in plan.to_dict()


def test_no_tie_record_when_neither_side_is_quantized():
    plan = plan_of("llama_tied", rule("[Linear]"))
    assert plan.tying is None


@pytest.mark.parametrize("rules, shared, reason", [
    (rule("[Embedding, lm_head]") + rule("[Linear]"), True, "stored once"),
    (rule("[Embedding]") + rule("[lm_head]") + rule("[Linear]"), True, "stored once"),
    (rule("[Embedding]") + rule("[lm_head]", INT4_G32) + rule("[Linear]"), False,
     "different schemes"),
    (rule("[Embedding]") + rule("[Linear]"), False, "only model.embed_tokens is quantized"),
    (rule("[lm_head]") + rule("[Linear]"), False, "only lm_head is quantized"),
])
def test_tie_record(rules, shared, reason):
    plan = plan_of("llama_tied", rules)
    assert (plan.tying.embedding, plan.tying.head) == ("model.embed_tokens", "lm_head")
    assert plan.tying.shared is shared and reason in plan.tying.reason
    assert plan.shared_with("lm_head") == ("model.embed_tokens" if shared else None)
    assert plan.shared_with("model.embed_tokens") is None
    assert Plan.from_dict(plan.to_dict()).tying == plan.tying


def test_a_head_solved_with_statistics_unties():
    rules = (rule("[Embedding]", extra="    algorithm: rtn\n") + rule("[lm_head]")
             + rule("[Linear]"))
    plan = plan_of("llama_tied", rules, algorithm="gptq")
    assert not plan.tying.shared and "gptq" in plan.tying.reason
