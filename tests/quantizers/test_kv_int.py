"""int8/int4 asymmetric KV caches: recipes that quantize only the cache, static (calibrated) and
dynamic (per token) ranges per head or per group, stored, applied by mpq.load in generation."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mpq
from mpq.calibration import CalibrationOptions
from mpq.config.recipe import parse_recipe
from mpq.engine.spec import RunOptions
from mpq.errors import CalibrationError, FormatError, RecipeError, SchemeError
from mpq.models.attention import tap_kv
from mpq.numerics import kv_int
from mpq.quantize import quantize
from tests.helpers import byte_tokenizer
from tests.tiny_models import save_tiny_model

HEADS, HEAD_DIM = 2, 16  # the tiny llama/qwen2/mistral: 2 kv heads of 16 channels


def kv_recipe(kv: str, linears: str = "    skip: true\n"):
    """A recipe whose only quantization is the KV cache (every Linear kept) unless ``linears``."""
    return parse_recipe("mpq_recipe: 1\nname: kv-only\n"
                        f"kv_cache: {kv}\nrules:\n  - targets: [Linear]\n" + linears, "kv.yaml")


def options(calib_text, **kw):
    return RunOptions(calibration=CalibrationOptions(source=str(calib_text), num_samples=4,
                                                     seq_len=32), **kw)


def attention_layers(model):
    return [layer.self_attn for layer in model.model.layers]


def record_raw_kv(model):
    """Tap each attention outside mpq's own tap: the K/V *before* quantization, per layer."""
    seen = {i: [] for i in range(len(model.model.layers))}
    handles = [tap_kv(attn, lambda k, v, i=i: (seen[i].append((k.clone(), v.clone())), (k, v))[1])
               for i, attn in enumerate(attention_layers(model))]
    return seen, handles


def reference_static(attn, which, args, x):
    return kv_int.fake_quantize_static(x, getattr(attn, f"{which}_scale"),
                                       getattr(attn, f"{which}_zero"), args.bits,
                                       args.group_of(x.shape[-1]))


SCHEMES = {
    "int8-head": "{format: int8}",
    "int4-head": "{format: int4, granularity: head}",
    "int4-g8": "{format: int4, granularity: group, group_size: 8}",
    "int8-dyn": "{format: int8, dynamic: true}",
    "int4-g4-dyn": "{format: int4, granularity: group, group_size: 4, dynamic: true}",
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_logits_match_k_v_quantized_directly(arch, name, tmp_path, calib_text):
    """quantize → load → logits equal a forward whose K/V are fake-quantized with the pure
    functions; the stored tensors have the documented names and shapes."""
    save_tiny_model(arch, tmp_path / "src")
    recipe = kv_recipe(SCHEMES[name])
    args = recipe.kv_cache
    quantize(tmp_path / "src", recipe, tmp_path / "kv", options(calib_text))
    tensors = load_file(tmp_path / "kv" / "model.safetensors")
    kv_keys = sorted(k for k in tensors if k.endswith(("_scale", "_zero")))
    if args.dynamic:
        assert kv_keys == []
    else:
        groups = HEAD_DIM // args.group_of(HEAD_DIM)
        assert kv_keys == sorted(f"model.layers.{i}.self_attn.{n}" for i in range(2)
                                 for n in ("k_scale", "k_zero", "v_scale", "v_zero"))
        assert all(tuple(tensors[k].shape) == (HEADS, 1, groups)
                   and tensors[k].dtype == torch.float32 for k in kv_keys)
    model = mpq.load(tmp_path / "kv")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    seen, handles = record_raw_kv(model)
    with torch.no_grad():
        logits = model(ids).logits
    for handle in handles:
        handle.remove()
    # reference: a plain model whose attention gets the pure functions' K/V
    plain = mpq.load(tmp_path / "kv")
    for attn in attention_layers(plain):
        attn._forward_pre_hooks.clear()
    for attn, quantized in zip(attention_layers(plain), attention_layers(model)):
        if args.dynamic:
            fn = (lambda k, v: (kv_int.fake_quantize_dynamic(k, args.bits, args.group_of(16)),
                                kv_int.fake_quantize_dynamic(v, args.bits, args.group_of(16))))
        else:
            fn = (lambda k, v, a=quantized: (reference_static(a, "k", args, k),
                                             reference_static(a, "v", args, v)))
        tap_kv(attn, fn)
    with torch.no_grad():
        expected = plain(ids).logits
        for attn in attention_layers(plain):
            attn._forward_pre_hooks.clear()
        unquantized = plain(ids).logits
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0)
    assert not torch.equal(logits, unquantized)  # the quantization really runs
    assert len(seen[0]) == 1 and len(seen[1]) == 1


def kv_error(tmp_path, calib_text, kv: str, tag: str) -> float:
    quantize(tmp_path / "src", kv_recipe(kv), tmp_path / tag, options(calib_text))
    model = mpq.load(tmp_path / tag)
    plain = mpq.load(tmp_path / tag)
    for attn in attention_layers(plain):
        attn._forward_pre_hooks.clear()
    # text like the calibration's (random ids would leave the calibrated ranges)
    ids = byte_tokenizer()(calib_text.read_text()[5000:5064], return_tensors="pt").input_ids
    with torch.no_grad():
        return float((model(ids).logits - plain(ids).logits).pow(2).mean())


@pytest.mark.parametrize("dynamic", [False, True])
def test_int8_error_is_much_smaller_than_int4(dynamic, tmp_path, calib_text):
    save_tiny_model("mistral", tmp_path / "src")
    dyn = f", dynamic: {str(dynamic).lower()}"
    int8 = kv_error(tmp_path, calib_text, "{format: int8" + dyn + "}", "i8")
    int4 = kv_error(tmp_path, calib_text, "{format: int4" + dyn + "}", "i4")
    int4_g4 = kv_error(tmp_path, calib_text,
                       "{format: int4, granularity: group, group_size: 4" + dyn + "}", "g4")
    assert 0 < int8 < int4 / 50  # 16× finer steps: ~256× smaller squared error
    assert int4_g4 < int4  # smaller groups, tighter ranges


@pytest.mark.parametrize("kv", ["{format: int4, granularity: group, group_size: 8}",
                                "{format: int4, granularity: group, group_size: 4, "
                                "dynamic: true}"])
def test_generate_keeps_a_quantized_cache(kv, tmp_path, calib_text):
    """generate() with a DynamicCache: every cached K/V row (prefill and decode steps) is the
    direct quantization of the raw row, and static rows re-quantize to themselves."""
    save_tiny_model("llama", tmp_path / "src")
    recipe = kv_recipe(kv)
    args = recipe.kv_cache
    quantize(tmp_path / "src", recipe, tmp_path / "kv", options(calib_text))
    model = mpq.load(tmp_path / "kv")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    seen, handles = record_raw_kv(model)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    for handle in handles:
        handle.remove()
    assert out.sequences.shape == (1, 13)
    cache = out.past_key_values
    for i, attn in enumerate(attention_layers(model)):
        assert len(seen[i]) == 5  # one prefill and four decode steps
        raw_k = torch.cat([k for k, _ in seen[i]], dim=2)
        raw_v = torch.cat([v for _, v in seen[i]], dim=2)
        keys, values = cache.layers[i].keys, cache.layers[i].values
        assert keys.shape == (1, HEADS, 12, HEAD_DIM)
        assert not torch.equal(keys, raw_k)
        group = args.group_of(HEAD_DIM)
        if args.dynamic:
            assert torch.equal(keys, kv_int.fake_quantize_dynamic(raw_k, args.bits, group))
            assert torch.equal(values, kv_int.fake_quantize_dynamic(raw_v, args.bits, group))
            # each row lies on the 16-level grid between its own min and max
            g = kv_int.grouped(keys, group)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            steps = (g - lo) / ((hi - lo) / 15).clamp_min(1e-12)
            assert (steps - steps.round()).abs().max() < 1e-3
        else:
            for which, x in (("k", keys), ("v", values)):
                again = reference_static(attn, which, args, x)
                assert torch.allclose(again, x, atol=1e-6, rtol=0)  # on the grid
            assert torch.equal(keys, reference_static(attn, "k", args, raw_k))
    with torch.no_grad():  # the cached steps give the same next token as a full recompute
        full = model(out.sequences[:, :-1]).logits[0, -1].argmax()
    assert int(full) == int(out.sequences[0, -1])


def test_dynamic_needs_no_calibration_and_composes_with_weights(tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    quantize(tmp_path / "src", kv_recipe("{format: int8, dynamic: true}"), tmp_path / "dyn")
    model = mpq.load(tmp_path / "dyn")
    assert model.mpq_artifact.plan.kv_cache.dynamic
    assert model.mpq_artifact.plan.precision_policy["kv_cache"] == "int8"
    with pytest.raises(CalibrationError, match="kv_cache"):
        quantize(tmp_path / "src", kv_recipe("{format: int8}"), tmp_path / "static")
    weights = "    weights: {format: int, bits: 4, granularity: group, group_size: 32}\n"
    quantize(tmp_path / "src", kv_recipe("{format: int4, dynamic: true}", weights),
             tmp_path / "both")
    loaded = mpq.load(tmp_path / "both")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False,
                           pad_token_id=0).shape == (1, 11)


def test_writers_other_than_native_refuse_int_kv(tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    weights = "    weights: {format: int, bits: 4, granularity: group, group_size: 32}\n"
    for fmt, why in (("compressed-tensors", "native format \\(mpq\\) only"),
                     ("gptq", "GPTQ v1 stores no KV-cache")):
        with pytest.raises(FormatError, match=why):
            quantize(tmp_path / "src", kv_recipe("{format: int8, dynamic: true}", weights),
                     tmp_path / fmt, options(calib_text, output_format=fmt))
        assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("kv,message", [
    ("{format: int4, granularity: group}", "positive group_size"),
    ("{format: int4, granularity: group, group_size: 0}", "positive group_size"),
    ("{format: int8, group_size: 32}", "group_size only applies to granularity group"),
    ("{format: int4, granularity: tensor}", "granularity 'tensor' does not apply to int4"),
    ("{format: fp8_e4m3, granularity: group, group_size: 8}",
     "granularity 'group' does not apply to fp8_e4m3"),
    ("{format: fp8_e4m3, dynamic: true}", "fp8_e4m3 KV scales are static"),
    ("{format: int8, dynamic: yes please}", "kv_cache.dynamic: expected a boolean"),
    ("{format: int8, group_size: 3.5}", "kv_cache.group_size: expected an integer"),
    ("{format: int8, granularty: head}", "kv_cache.granularty: unknown key"),
])
def test_bad_settings_are_recipe_errors(kv, message):
    with pytest.raises(RecipeError, match=message):
        kv_recipe(kv)


def test_policy_must_agree_with_the_kv_section():
    with pytest.raises(RecipeError, match="'bf16' disagrees with kv_cache.format 'int8'"):
        parse_recipe("mpq_recipe: 1\nkv_cache: {format: int8}\nrules: [{targets: Linear}]\n"
                     "precision_policy: {kv_cache: bf16}\n", "r.yaml")
    agreed = parse_recipe("mpq_recipe: 1\nkv_cache: {format: int4}\nrules: [{targets: Linear}]\n"
                          "precision_policy: {kv_cache: int4}\n", "r.yaml")
    assert agreed.precision_policy.kv_cache == "int4"


def test_group_size_must_divide_head_dim(tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    with pytest.raises(SchemeError, match="group_size 6 does not divide the model's head_dim 16"):
        quantize(tmp_path / "src", kv_recipe("{format: int4, granularity: group, group_size: 6}"),
                 tmp_path / "x", options(calib_text))
    assert not (tmp_path / "x").exists()


def test_describe_and_dict_round_trip():
    args = kv_recipe("{format: int4, granularity: group, group_size: 32, dynamic: true}").kv_cache
    assert args.describe() == ("kv cache: int4 asymmetric per group of 32 channels, dynamic "
                               "(per token, nothing calibrated)")
    assert args.to_dict() == {"format": "int4", "granularity": "group", "group_size": 32,
                              "dynamic": True}
    fp8 = kv_recipe("{format: fp8_e4m3}").kv_cache
    assert fp8.to_dict() == {"format": "fp8_e4m3", "granularity": "tensor"}  # as before
    assert type(args)(**args.to_dict()) == args


def test_plan_and_inspect_describe_the_scheme(tmp_path):
    from tests.helpers import run_cli

    save_tiny_model("llama", tmp_path / "src")
    recipe = tmp_path / "kv.yaml"
    recipe.write_text("mpq_recipe: 1\nkv_cache: {format: int4, granularity: group, group_size: 8,"
                      " dynamic: true}\nrules:\n  - {targets: Linear, skip: true}\n")
    line = "kv cache: int4 asymmetric per group of 8 channels, dynamic"
    result = run_cli("plan", tmp_path / "src", "-r", recipe)
    assert result.exit_code == 0 and line in result.output, result.output
    quantize(tmp_path / "src", str(recipe), tmp_path / "kv")
    result = run_cli("inspect", tmp_path / "kv")
    assert result.exit_code == 0 and line in result.output, result.output


def test_validate_judges_an_int_cache_by_its_own_ranges():
    from mpq.analysis.ranges import RangeStats
    from mpq.analysis.validate import judge
    from mpq.config.recipe import PrecisionPolicy

    policy = PrecisionPolicy(kv_cache="int4").to_dict()
    op = judge("model.layers.0.self_attn", "kv_key", RangeStats(absmax=1e3, count=1, nonzero=1),
               policy)
    assert op.verdict == "ok" and op.dtype == "int4 (own ranges)"  # clips, never overflows
    bad = judge("model.layers.0.self_attn", "kv_key",
                RangeStats(absmax=1.0, count=1, nonzero=1, nonfinite=1), policy)
    assert bad.verdict == "unsafe"
