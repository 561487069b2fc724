"""Recipe keys added for activation quantization and transforms: input_activations, transforms."""
from __future__ import annotations

import pytest

from mpq.errors import RecipeError
from mpq.config.recipe import load_recipe, parse_recipe
from mpq.numerics.args import ActivationArgs


def parse(body: str):
    return parse_recipe("mpq_recipe: 1\n" + body, "r.yaml")


def test_defaults_overlay_and_null():
    r = parse("defaults:\n  input_activations: {format: int, bits: 8}\nrules:\n"
              "  - {targets: ['re:.*down'], input_activations: null}\n"
              "  - {targets: ['re:.*o_proj'], input_activations: {dynamic: false}}\n"
              "  - {targets: ['re:.*up'], input_activations: {format: fp8_e4m3}}\n"
              "  - {targets: Linear}\n")
    acts = [rule.scheme.input_activations for rule in r.rules]
    assert acts[0] is None
    assert acts[1] == ActivationArgs(dynamic=False, granularity="tensor")  # static → per tensor
    assert acts[2] == ActivationArgs(format="fp8_e4m3", bits=8)
    assert acts[3] == ActivationArgs()
    again = parse_recipe(__import__("yaml").safe_dump(r.to_dict()), "again.yaml")
    assert again.rules == r.rules


def test_no_activations_by_default():
    r = parse("rules: [{targets: Linear}]\n")
    assert r.rules[0].scheme.input_activations is None
    assert "input_activations" not in r.rules[0].scheme.to_dict()


@pytest.mark.parametrize("body,where,match", [
    ("defaults: {input_activations: {bitz: 8}}\nrules: [{targets: Linear}]\n",
     "defaults.input_activations.bitz", "unknown key"),
    ("rules: [{targets: Linear, input_activations: {bits: '8'}}]\n",
     "rules[0].input_activations.bits", "expected an integer"),
    ("rules: [{targets: Linear, input_activations: {granularity: token, dynamic: false}}]\n",
     "rules[0].input_activations", "static activation scales are per tensor"),
    ("defaults: {input_activations: {format: nf4}}\nrules: [{targets: Linear}]\n",
     "defaults.input_activations (used by rules[0])", "unknown activation format"),
    ("rules: [{targets: Linear, input_activations: [8]}]\n",
     "rules[0].input_activations", "expected a mapping"),
    ("transforms: {type: smoothquant}\nrules: [{targets: Linear}]\n", "transforms",
     "expected a list"),
    ("transforms: [{alpha: 0.5}]\nrules: [{targets: Linear}]\n", "transforms[0]",
     "missing required key 'type'"),
    ("transforms: [{type: smoothquant, alpha: [1]}]\nrules: [{targets: Linear}]\n",
     "transforms[0].alpha", "expected a scalar"),
])
def test_errors_name_the_yaml_path(body, where, match):
    with pytest.raises(RecipeError, match=match) as exc:
        parse(body)
    assert f"r.yaml: {where}:" in exc.value.message


def test_transforms_round_trip():
    r = parse("transforms:\n  - {type: smoothquant, alpha: 0.6, pairs: true}\n"
              "rules: [{targets: Linear}]\n")
    assert r.transforms == (("smoothquant", (("alpha", 0.6), ("pairs", True))),)
    assert r.to_dict()["transforms"] == [{"type": "smoothquant", "alpha": 0.6, "pairs": True}]


@pytest.mark.parametrize("name", ["w8a8-int8", "w8a8-fp8"])
def test_w8a8_presets(name):
    r = load_recipe(name)
    acts = r.rules[0].scheme.input_activations
    assert acts is not None and acts.dynamic and acts.granularity == "token"
    assert r.rules[0].scheme.weights.granularity == "channel"
