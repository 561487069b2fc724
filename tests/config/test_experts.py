"""The recipe's ``experts:`` section (mpq.config.experts): parsed strictly, carried by the plan
and the artifact's plan record, refused on a model without fused experts."""
from __future__ import annotations

import pytest
import yaml

from mpq.config.experts import DEFAULT_MIN_TOKENS, ExpertArgs
from mpq.config.plan import Plan
from mpq.config.recipe import parse_recipe
from mpq.engine.spec import plan_model
from mpq.errors import RecipeError
from mpq.models.source import build_skeleton
from tests.tiny_models import tiny_config

BODY = "rules:\n  - targets: [Linear]\n    weights: {bits: 4, group_size: 32}\n"


def recipe(section: str):
    return parse_recipe(f"mpq_recipe: 1\n{section}{BODY}", "e.yaml")


def test_the_section_reaches_the_plan_and_round_trips():
    parsed = recipe("experts: {min_tokens: 8}\n")
    assert parsed.experts == ExpertArgs(8) and parsed.to_dict()["experts"] == {"min_tokens": 8}
    assert parse_recipe(yaml.safe_dump(parsed.to_dict()), "again.yaml").experts == ExpertArgs(8)
    _, plan = plan_model(build_skeleton(tiny_config("mixtral")), parsed)
    assert plan.min_expert_tokens == 8 and plan.to_dict()["experts"] == {"min_tokens": 8}
    assert Plan.from_dict(plan.to_dict()) == plan


def test_without_the_section_nothing_changes():
    parsed = recipe("")
    assert parsed.experts is None and "experts" not in parsed.to_dict()
    _, plan = plan_model(build_skeleton(tiny_config("qwen3_moe")), parsed)
    assert "experts" not in plan.to_dict() and plan.min_expert_tokens == DEFAULT_MIN_TOKENS == 32


@pytest.mark.parametrize("section, message", [
    ("experts: {min_tokens: -1}\n", "experts: experts min_tokens must be an integer ≥ 0"),
    ("experts: {min_tokens: true}\n", "min_tokens must be an integer"),
    ("experts: {min_tokens: '8'}\n", "min_tokens must be an integer"),
    ("experts: {min_token: 8}\n", "did you mean"),
    ("experts: 8\n", "experts"),
])
def test_bad_sections_are_refused_with_their_path(section, message):
    with pytest.raises(RecipeError) as error:
        recipe(section)
    assert message in str(error.value)


def test_a_dense_model_refuses_the_section():
    with pytest.raises(RecipeError, match="has no fused mixture-of-experts experts") as error:
        plan_model(build_skeleton(tiny_config("llama")), recipe("experts: {min_tokens: 8}\n"))
    assert "remove the experts: section" in error.value.hint
