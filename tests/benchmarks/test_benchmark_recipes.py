"""The recipe files the benchmarks name (benchmarks/recipes/) stay valid recipes."""
from __future__ import annotations

import pytest

from mpq.config.recipe import parse_recipe
from tests.helpers import REPO

RECIPES = sorted((REPO / "benchmarks" / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses(path):
    recipe = parse_recipe(path.read_text(), str(path))
    assert recipe.name == path.stem
    assert recipe.rules
