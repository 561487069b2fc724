"""Candidate names for sensitivity / mixed precision: presets, shorthands and the ladder."""
from __future__ import annotations

import json

import pytest

from mpq.analysis.candidates import expand, ladder, load_candidates, shorthand_recipe
from mpq.errors import RecipeError
from tests.tiny_models import tiny_model


def test_shorthands_are_symmetric_int_weights():
    grouped = shorthand_recipe("int5-g64").rules[0].scheme.weights
    assert (grouped.format, grouped.bits, grouped.symmetric, grouped.granularity,
            grouped.group_size) == ("int", 5, True, "group", 64)
    channel = shorthand_recipe("int8").rules[0].scheme.weights
    assert (channel.bits, channel.granularity) == (8, "channel")
    assert shorthand_recipe("w4a16") is None and shorthand_recipe("int9") is None


def test_unknown_candidates_and_an_unexpanded_ladder_are_refused():
    with pytest.raises(RecipeError, match="candidate 'int9'"):
        load_candidates("w8a16,int9")
    with pytest.raises(RecipeError, match="depend on the model"):
        load_candidates("ladder")


def test_ladder_takes_the_group_sizes_the_model_takes():
    model = tiny_model("llama")  # inputs 64 and 128: no group of 128 or more fits both
    assert ladder(model) == ["int8", "int6-g64", "int5-g64", "int4-g32", "int4-g64", "int3-g32",
                             "int3-g64", "int2-g64"]
    assert expand("w8a16,ladder,int8", model) == ["w8a16", *ladder(model)]
    assert [c.name for c in load_candidates(expand("ladder", model))] == ladder(model)


def test_sensitivity_measures_the_ladder_by_default(tmp_path):
    from tests.helpers import WORDS, run_cli
    from tests.helpers import byte_tokenizer
    from tests.tiny_models import save_tiny_model

    save_tiny_model("llama", tmp_path / "src")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    (tmp_path / "calib.txt").write_text(" ".join(WORDS * 200))
    result = run_cli("sensitivity", tmp_path / "src", "--calib", tmp_path / "calib.txt",
                    "--num-samples", 2, "--seq-len", 32, "--json")
    assert result.exit_code == 0, result.output
    assert f'"candidates": {json.dumps(ladder(tiny_model("llama")))}' in result.stdout


def test_a_gptq_base_quantizes_every_chosen_grid_with_gptq_and_its_scale_dtype():
    from mpq.analysis.candidates import on_base
    from mpq.analysis.sensitivity import target_layers
    from mpq.engine.spec import as_recipe

    model = tiny_model("llama_tied")
    base = as_recipe("w4a16-gptq-compact")  # GPTQ g64 fp16 scales; embedding/head int8 RTN
    layers = target_layers(model, load_candidates("int8,int3-g32"), base)
    body = next(layer for layer in layers if layer.block is not None)
    base_scheme = base.rules[1].scheme
    for name, scheme in body.schemes.items():
        assert scheme.algorithm == "gptq" and scheme.weights.scale_dtype == "fp16"
        assert dict(scheme.options)["damp"] == dict(base_scheme.options)["damp"]
    assert "static_groups" not in dict(body.schemes["int8"].options)  # per channel: no groups
    assert dict(body.schemes["int3-g32"].options)["static_groups"] is True
    (edge,) = [layer for layer in layers if layer.block is None]
    assert edge.schemes["int3-g32"].algorithm == "rtn"  # the embedding's base rule is RTN
    assert edge.schemes["int3-g32"].weights.scale_dtype == "fp16"
    assert on_base(body.schemes["int8"], None) is body.schemes["int8"]


def test_a_full_range_base_gives_its_scales_to_symmetric_int_grids_only():
    from mpq.analysis.candidates import on_base
    from mpq.config.recipe import parse_recipe
    from mpq.engine.spec import as_recipe

    tuned = as_recipe("w3a16-tuned").rules[0].scheme
    assert tuned.weights.full_range
    for name in ("int8", "int5-g64", "w4a16"):  # symmetric int: full-range scales, under GPTQ
        chosen = on_base(load_candidates(name)[0].recipe.rules[0].scheme, tuned)
        assert chosen.weights.full_range and chosen.algorithm == "gptq", name
    rtn = parse_recipe("mpq_recipe: 1\ndefaults: {algorithm: rtn}\nrules:\n  - targets: [Linear]\n"
                       "    weights: {bits: 3, group_size: 64, full_range: true}\n", "base")
    for name in ("w4a16-asym", "nf4", "fp8-weights"):  # a zero point, or a format's own scales
        candidate = load_candidates(name)[0].recipe.rules[0].scheme
        assert not on_base(candidate, rtn.rules[0].scheme).weights.full_range, name
