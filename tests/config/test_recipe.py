"""Recipe YAML parsing: merging, presets, precision policy and every error path."""
from __future__ import annotations

import json
import textwrap

import pytest

from mpq.errors import RecipeError, SchemeError
from mpq.config.recipe import PrecisionPolicy, Recipe, list_presets, load_recipe, parse_recipe
from mpq.numerics.args import WeightArgs

PRESETS = ("w8a16", "w4a16", "w4a16-asym", "w4a16-channel", "w3a16", "fp8-weights", "nf4",
           "nf4-dq", "w4a16-gptq", "w4a16-channel-gptq", "w3a16-gptq", "w8a8-int8", "w8a8-fp8",
           "w4a16-awq", "w4a16-gptq-compact", "w4a16-gptq-g32-compact", "w5a16-gptq-compact",
           "w4a16-tuned", "w3a16-tuned", "gguf-q4_0-gptq", "gguf-q4_k_m-gptq",
           "gguf-q3_k_m-gptq")


def parse(text: str, **kwargs) -> Recipe:
    return parse_recipe(textwrap.dedent(text), "recipe.yaml", **kwargs)


def error_of(text: str, **kwargs) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        parse(text, **kwargs)
    return info.value


# --- valid recipes -------------------------------------------------------------------------------

def test_full_example_merges_defaults_under_rules():
    recipe = parse("""
        mpq_recipe: 1
        name: my-recipe
        description: free text
        defaults:
          algorithm: rtn
          weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 64}
          options: {damp: 0.01}
        rules:
          - targets: ["re:.*mlp\\\\.down_proj"]
            weights: {bits: 8, granularity: channel}
            options: {extra: true}
          - targets: lm_head
            skip: true
          - targets: Linear
    """)
    assert (recipe.version, recipe.name, recipe.description) == (1, "my-recipe", "free text")
    down, head, linear = recipe.rules
    assert down.targets == ("re:.*mlp\\.down_proj",) and down.source == "rules[0]"
    assert down.scheme.weights == WeightArgs(bits=8, granularity="channel", group_size=None)
    assert dict(down.scheme.options) == {"damp": 0.01, "extra": True}
    assert head.scheme is None and head.targets == ("lm_head",) and head.index == 1
    assert linear.scheme.weights == WeightArgs(bits=4, group_size=64)
    assert linear.scheme.algorithm == "rtn" and dict(linear.scheme.options) == {"damp": 0.01}
    assert recipe.precision_policy == PrecisionPolicy()
    assert "free text" in recipe.text and recipe.source == "recipe.yaml"


def test_minimal_recipe_uses_weight_args_defaults_and_file_stem():
    recipe = parse_recipe("mpq_recipe: 1\nrules: [{targets: Linear}]\n", "dir/mine.yaml")
    assert recipe.name == "mine" and recipe.description == ""
    assert recipe.rules[0].scheme.weights == WeightArgs()


@pytest.mark.parametrize("weights, expected", [
    ("{format: fp8_e4m3}", WeightArgs("fp8_e4m3", 8, granularity="channel", group_size=None)),
    ("{format: fp8_e5m2, granularity: tensor}",
     WeightArgs("fp8_e5m2", 8, granularity="tensor", group_size=None)),
    ("{format: nf4}", WeightArgs("nf4", 4, group_size=64)),
    ("{format: nf4, double_quant: true}", WeightArgs("nf4", 4, group_size=64, double_quant=True)),
    ("{format: mxfp4}", WeightArgs("mxfp4", 4, group_size=32)),
    ("{format: mxfp8}", WeightArgs("mxfp8", 8, group_size=32)),
    ("{format: nvfp4}", WeightArgs("nvfp4", 4, group_size=16)),
    ("{format: fp8_e4m3, granularity: block}",
     WeightArgs("fp8_e4m3", 8, granularity="block", group_size=None)),
    ("{bits: 3, granularity: tensor, group_size: 32}",
     WeightArgs(bits=3, granularity="tensor", group_size=None)),
])
def test_format_implies_bits_and_layout(weights, expected):
    recipe = parse(f"""
        mpq_recipe: 1
        defaults: {{weights: {{symmetric: false, bits: 6}}}}
        rules: [{{targets: Linear, weights: {weights}}}]
    """)
    got = recipe.rules[0].scheme.weights
    if expected.format == "int":  # int keeps the defaults' symmetric: false
        expected = WeightArgs(**{**expected.to_dict(), "symmetric": False})
    assert got == expected


def test_format_does_not_override_explicit_fields():
    err = error_of("""
        mpq_recipe: 1
        rules: [{targets: Linear, weights: {format: nf4, group_size: 128}}]
    """)
    assert "rules[0].weights: nf4 uses blocks of 64" in str(err) and "group_size: 64" in err.hint


@pytest.mark.parametrize("weights, message, hint", [
    ("{format: nvfp4, group_size: 32}", "nvfp4 uses blocks of 16", "group_size: 16"),
    ("{format: mxfp4, bits: 8}", "mxfp4 has 4 bits", "bits: 4"),
    ("{format: fp8_e5m2, granularity: block}", "granularity 'block'", "channel"),
])
def test_microscaled_format_errors(weights, message, hint):
    err = error_of(f"""
        mpq_recipe: 1
        rules: [{{targets: Linear, weights: {weights}}}]
    """)
    assert f"rules[0].weights: {message}" in str(err) and hint in err.hint


def test_microscaled_format_over_other_defaults():
    recipe = parse("""
        mpq_recipe: 1
        defaults: {weights: {format: fp8_e4m3, granularity: block}}
        rules:
          - {targets: "re:.*down_proj", weights: {format: nvfp4}}
          - {targets: Linear}
    """)
    assert recipe.rules[0].scheme.weights == WeightArgs("nvfp4", 4, group_size=16)
    assert recipe.rules[0].scheme.describe() == "nvfp4"
    assert recipe.rules[1].scheme.describe() == "fp8_e4m3 block128"


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.source == f"preset:{name}"
    body = recipe.rules[-1]
    if name.endswith("-compact") or name.startswith("gguf-"):
        # the input embedding and the head (int8 per row, GGUF q8_0 or q6_k) by RTN first;
        # llama.cpp's Q4_K_M mix has a q6_k rule for some v_proj and down_proj in between,
        # its Q3_K_M mix a q5_k and a q4_k rule
        assert len(recipe.rules) == {"gguf-q4_k_m-gptq": 3, "gguf-q3_k_m-gptq": 4}.get(name, 2)
        assert recipe.rules[0].targets == ("Embedding", "lm_head")
        assert recipe.rules[0].scheme.algorithm == "rtn"
        if name.endswith("-compact"):
            assert body.scheme.weights.scale_dtype == "fp16"
    else:
        assert len(recipe.rules) == 1
    assert body.targets == ("Linear", "Conv1D")
    expected = "gptq" if "-gptq" in name or "-tuned" in name else "rtn"
    assert body.scheme.algorithm == expected and recipe.description


def test_preset_schemes_and_descriptions():
    labels = {name: load_recipe(name).rules[-1].scheme.describe() for name in PRESETS}
    assert labels == {"w8a16": "int8 sym channel", "w4a16": "int4 sym g64",
                      "w4a16-asym": "int4 asym g64", "w4a16-channel": "int4 sym channel",
                      "w3a16": "int3 sym g64", "fp8-weights": "fp8_e4m3 channel",
                      "nf4": "nf4 g64", "nf4-dq": "nf4 g64 dq", "w4a16-gptq": "int4 sym g64",
                      "w4a16-channel-gptq": "int4 sym channel", "w3a16-gptq": "int3 sym g64",
                      "w8a8-int8": "int8 sym channel, inputs int8 dynamic token",
                      "w8a8-fp8": "fp8_e4m3 channel, inputs fp8_e4m3 dynamic token",
                      "w4a16-awq": "int4 asym g64",
                      "w4a16-gptq-compact": "int4 sym g64",
                      "w4a16-gptq-g32-compact": "int4 asym g32",
                      "w5a16-gptq-compact": "int5 sym g64",
                      "w4a16-tuned": "int4 sym full-range g64", "w3a16-tuned": "int3 sym full-range g64",
                      "gguf-q4_0-gptq": "int4 sym g32", "gguf-q4_k_m-gptq": "q4_k",
                      "gguf-q3_k_m-gptq": "q3_k"}
    presets = list_presets()
    assert set(presets) == set(PRESETS)
    assert "128" in presets["w4a16"] and "576" in presets["w4a16"]


def test_load_recipe_prefers_an_existing_file(tmp_path):
    path = tmp_path / "w4a16"
    path.write_text("mpq_recipe: 1\nrules: [{targets: Linear, weights: {bits: 2}}]\n")
    recipe = load_recipe(str(path))
    assert recipe.source == str(path) and recipe.rules[0].scheme.weights.bits == 2


def test_load_recipe_unknown_name_lists_presets():
    with pytest.raises(RecipeError) as info:
        load_recipe("w4a61")
    assert "no recipe file or preset named 'w4a61'" in str(info.value)
    assert "did you mean 'w4a16'?" in info.value.hint and "nf4-dq" in info.value.hint


def test_to_dict_is_json_and_parses_back():
    for name in PRESETS + ("__custom__",):
        recipe = load_recipe(name) if name != "__custom__" else parse("""
            mpq_recipe: 1
            description: x
            rules:
              - {targets: [lm_head], skip: true}
              - {targets: Linear, algorithm: gptq, options: {damp: 0.1}}
            precision_policy: {kv_cache: fp8_e4m3}
        """)
        again = parse_recipe(json.dumps(recipe.to_dict()), recipe.source)
        assert again.rules == recipe.rules and again.precision_policy == recipe.precision_policy
        assert again.name == recipe.name and again.description == recipe.description


def test_precision_policy_defaults_and_overrides():
    assert PrecisionPolicy().to_dict() == {"norms": "fp32", "softmax": "fp32", "residual": "fp32",
                                           "rope": "fp32", "activations": "bf16",
                                           "kv_cache": "bf16"}
    recipe = parse("""
        mpq_recipe: 1
        rules: [{targets: Linear}]
        precision_policy: {norms: bf16, activations: fp16, kv_cache: fp8_e5m2}
    """)
    assert recipe.precision_policy == PrecisionPolicy(norms="bf16", activations="fp16",
                                                      kv_cache="fp8_e5m2")


def test_known_algorithms_hook():
    text = "mpq_recipe: 1\nrules: [{targets: Linear, algorithm: gtpq}]\n"
    assert parse(text).rules[0].scheme.algorithm == "gtpq"  # not checked without the hook
    err = error_of(text, known_algorithms={"rtn", "gptq", "awq"})
    assert "rules[0].algorithm: unknown algorithm 'gtpq'" in str(err)
    assert err.hint == "did you mean 'gptq'?"


# --- errors: each names the YAML path and says how to fix it -------------------------------------

@pytest.mark.parametrize("text, where, hint", [
    ("mpq_recipe: 1\nrules: [{targets: Linear, weights: {bitz: 4}}]",
     "recipe.yaml: rules[0].weights.bitz: unknown key", "did you mean 'bits'?"),
    ("mpq_recipe: 1\nrules: [{targets: Linear}]\nrulez: []",
     "recipe.yaml: rulez: unknown key", "did you mean 'rules'?"),
    ("mpq_recipe: 1\ndefaults: {algoritm: rtn}\nrules: [{targets: Linear}]",
     "defaults.algoritm: unknown key", "did you mean 'algorithm'?"),
    ("mpq_recipe: 1\nrules: [{targets: Linear}]\nprecision_policy: {kv_cashe: fp16}",
     "precision_policy.kv_cashe: unknown key", "did you mean 'kv_cache'?"),
    ("mpq_recipe: 1\nrules: [{targets: Linear}, {targets: Conv1D, skipp: true}]",
     "rules[1].skipp: unknown key", "did you mean 'skip'?"),
])
def test_unknown_keys(text, where, hint):
    err = error_of(text)
    assert where in str(err) and hint in err.hint


def test_unknown_key_deep_in_a_list():
    err = error_of("""
        mpq_recipe: 1
        rules:
          - targets: lm_head
            skip: true
          - targets: Conv1D
          - targets: Linear
            weights: {bitz: 8}
    """)
    assert str(err).startswith("recipe.yaml: rules[2].weights.bitz: unknown key")


@pytest.mark.parametrize("text, where, expected", [
    ("rules: [{targets: Linear, weights: {bits: four}}]", "rules[0].weights.bits", "an integer"),
    ("rules: [{targets: 5}]", "rules[0].targets", "a string or a list"),
    ("rules: [{targets: [Linear, 7]}]", "rules[0].targets[1]", "a string"),
    ("rules: [{targets: Linear, skip: 'yes'}]", "rules[0].skip", "a boolean"),
    ("rules: [{targets: Linear, weights: {symmetric: 1}}]", "rules[0].weights.symmetric",
     "a boolean"),
    ("rules: [{targets: Linear, weights: {bits: true}}]", "rules[0].weights.bits", "an integer"),
    ("rules: [{targets: Linear, weights: 4}]", "rules[0].weights", "a mapping"),
    ("rules: [{targets: Linear, options: {a: [1]}}]", "rules[0].options.a", "a scalar"),
    ("rules: {targets: Linear}", "rules", "a list"),
    ("rules: [Linear]", "rules[0]", "a mapping"),
    ("name: 3\nrules: [{targets: Linear}]", "name", "a string"),
    ("rules: [{targets: Linear}]\nprecision_policy: {norms: 32}", "precision_policy.norms",
     "a string"),
])
def test_wrong_types(text, where, expected):
    err = error_of("mpq_recipe: 1\n" + text)
    assert f"recipe.yaml: {where}: expected {expected}" in str(err)


def test_bad_regex_names_the_target():
    err = error_of('mpq_recipe: 1\nrules: [{targets: [Linear, "re:model.(q_proj"]}]')
    assert "rules[0].targets[1]: invalid regex in target 're:model.(q_proj'" in str(err)
    assert "missing )" in str(err)


@pytest.mark.parametrize("version", ["2", "'1'", "1.0", "true", "null"])
def test_unsupported_version(version):
    err = error_of(f"mpq_recipe: {version}\nrules: [{{targets: Linear}}]")
    assert "mpq_recipe: unsupported recipe version" in str(err)
    assert err.hint == "this mpq reads version 1"


def test_missing_version_and_rules():
    assert "missing required key 'mpq_recipe'" in str(error_of("rules: [{targets: Linear}]"))
    assert "missing required key 'rules'" in str(error_of("mpq_recipe: 1"))
    assert "rules: needs at least one rule" in str(error_of("mpq_recipe: 1\nrules: []"))
    assert "rules[0]: missing required key 'targets'" in str(
        error_of("mpq_recipe: 1\nrules: [{skip: true}]"))
    assert "a recipe must be a YAML mapping" in str(error_of("- 1"))


def test_scheme_error_gets_the_yaml_path():
    err = error_of("mpq_recipe: 1\nrules: [{targets: Linear}, "
                   "{targets: Conv1D, weights: {group_size: 0}}]")
    assert str(err).startswith("recipe.yaml: rules[1].weights: group_size must be a positive")
    err = error_of("mpq_recipe: 1\ndefaults: {weights: {bits: 12}}\nrules: [{targets: Linear}]")
    assert "defaults.weights (used by rules[0]): int bits must be 2..8, got 12" in str(err)
    err = error_of("mpq_recipe: 1\nrules: [{targets: Linear, weights: {format: int4}}]")
    assert "rules[0].weights: unknown number format 'int4'" in str(err) and "nf4" in err.hint


def test_skip_excludes_scheme_keys():
    err = error_of("mpq_recipe: 1\nrules: [{targets: lm_head, skip: true, weights: {bits: 8}}]")
    assert "rules[0]: skip: true cannot be combined with weights" in str(err)
    err = error_of("mpq_recipe: 1\nrules: [{targets: lm_head, skip: true, "
                   "fallback: {bits: 8}}]")
    assert "rules[0]: skip: true cannot be combined with fallback" in str(err)


def test_fallback_overlays_the_rules_weights_and_reads_back():
    recipe = parse("""
        mpq_recipe: 1
        defaults: {weights: {scale_dtype: fp16}}
        rules:
          - targets: Linear
            algorithm: gptq
            options: {damp: 0.1}
            weights: {bits: 4, group_size: 256}
            fallback: {bits: 8, granularity: channel}
          - targets: lm_head
            weights: {format: q6_k}
            fallback: {format: q8_0}
    """)
    rule, head = recipe.rules
    assert rule.fallback.weights == WeightArgs(bits=8, granularity="channel", group_size=None,
                                               scale_dtype="fp16")
    assert rule.fallback.algorithm == "gptq" and rule.fallback.options == (("damp", 0.1),)
    assert head.fallback.weights.describe() == "q8_0" and head.scheme.weights.describe() == "q6_k"
    again = parse_recipe(json.dumps(recipe.to_dict()), "again.yaml")
    assert again.rules == recipe.rules
    plain = parse("mpq_recipe: 1\nrules: [{targets: Linear}]")
    assert "fallback" not in plain.to_dict()["rules"][0]
    err = error_of("mpq_recipe: 1\nrules: [{targets: Linear, weights: {format: q4_k}, "
                   "fallback: {format: q4_0, symmetric: false}}]")
    assert "rules[0].fallback: q4_0 is symmetric only" in str(err)
    err = error_of("mpq_recipe: 1\nrules: [{targets: Linear, fallback: {bitz: 8}}]")
    assert "rules[0].fallback" in str(err) and "bitz" in str(err)


def test_yaml_syntax_error_has_file_and_line():
    err = error_of("""
        mpq_recipe: 1
        rules:
          - targets: [Linear
          - targets: Conv1D
    """)
    assert str(err).startswith("recipe.yaml:5:") and "invalid YAML" in str(err)


def test_duplicate_yaml_key_is_an_error():
    err = error_of("mpq_recipe: 1\nrules: [{targets: Linear}]\nrules: [{targets: Conv1D}]\n")
    assert "recipe.yaml:3:" in str(err) and "duplicate key 'rules'" in str(err)


def test_bad_precision_value():
    err = error_of("mpq_recipe: 1\nrules: [{targets: Linear}]\nprecision_policy: {kv_cache: int3}")
    assert "recipe.yaml: precision_policy.kv_cache: unknown dtype 'int3'" in str(err)
    assert "fp8_e4m3" in err.hint
    err = error_of("mpq_recipe: 1\nrules: [{targets: Linear}]\nprecision_policy: {kv_cache: int4}")
    assert "precision_policy.kv_cache: an int4 KV cache needs the kv_cache section" in str(err)
    assert "format: int4" in err.hint
    err = error_of("mpq_recipe: 1\nrules: [{targets: Linear}]\n"
                   "precision_policy: {norms: fp8_e4m3}")
    assert "precision_policy.norms: unknown dtype 'fp8_e4m3'" in str(err)
    assert "fp8" not in err.hint
    with pytest.raises(SchemeError, match="unknown dtype 'fp64' for rope"):
        PrecisionPolicy(rope="fp64")
