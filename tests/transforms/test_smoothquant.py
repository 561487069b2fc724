"""SmoothQuant and activation quantization through the whole pipeline on tiny random models:
the artifact records what was done, the loader applies input quantization, smoothing helps W8A8."""
from __future__ import annotations

import pytest
import torch
import transformers

import mpq
from mpq.errors import ArtifactError, CalibrationError, ModelError, RecipeError
from mpq.loader import _input_scale
from mpq.runtime.qlinear import QuantLinear
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe
from mpq.numerics.args import ActivationArgs
from mpq.transforms.smoothquant import smoothing_scales
from tests.helpers import logits_error, outlier_model, samples_of
from tests.tiny_models import model_from_config, tiny_model

W8 = "{format: int, bits: 8, granularity: channel}"


def recipe(acts: str | None = "{format: int, bits: 8, dynamic: true}", smooth: str = "",
           weights: str = W8):
    text = (f"mpq_recipe: 1\ndefaults:\n  weights: {weights}\n"
            + (f"  input_activations: {acts}\n" if acts else "")
            + (f"transforms:\n  - {smooth}\n" if smooth else "")
            + "rules:\n  - targets: [Linear, Conv1D]\n")
    return parse_recipe(text, "test.yaml")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "granite"])
def test_smoothquant_makes_w8a8_closer_to_float(arch, tmp_path, calib_text):
    source = outlier_model(arch, tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=8, seq_len=64)
    errors = {}
    for name, smooth in (("plain", ""), ("sq", "{type: smoothquant, alpha: 0.5}")):
        result = quantize(tmp_path / "src", recipe(smooth=smooth), tmp_path / name, RunOptions(calibration=calibration))
        errors[name] = logits_error(mpq.load(tmp_path / name), source, samples_of(calib_text))
        if smooth:
            [spec], [applied] = result.plan.transforms, result.log.transforms
            assert spec.type == "smoothquant" and spec.options == {"alpha": 0.5}
            assert [r["block"] for r in applied] == [0, 1]
            prevs = [g["prev"] for g in applied[0]["groups"]]
            assert prevs == ["input_layernorm", "post_attention_layernorm"]
            stored = mpq.load(tmp_path / name).mpq_artifact
            assert stored.plan.transforms == result.plan.transforms
            assert stored.log.transforms == result.log.transforms
    assert errors["sq"] < 0.5 * errors["plain"]


def test_loader_applies_input_quantization(tmp_path, calib_text):
    source = outlier_model("llama", tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=64)
    quantize(tmp_path / "src", recipe(), tmp_path / "w8a8", RunOptions(calibration=calibration))
    quantize(tmp_path / "src", recipe(acts=None), tmp_path / "w8", RunOptions(calibration=calibration))
    w8a8, w8 = mpq.load(tmp_path / "w8a8"), mpq.load(tmp_path / "w8")
    layer = w8a8.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.input_args == ActivationArgs()
    assert "inputs=int8 dynamic token" in repr(layer)
    samples = samples_of(calib_text)
    assert logits_error(w8a8, source, samples) > 2 * logits_error(w8, source, samples)
    dense = mpq.load(tmp_path / "w8a8", dequantize=True)
    with torch.no_grad():
        torch.testing.assert_close(dense(samples[0]).logits, w8a8(samples[0]).logits,
                                   rtol=1e-4, atol=1e-4)


def test_static_input_scales_are_calibrated_stored_and_used(tmp_path, calib_text):
    tiny_model("llama").save_pretrained(tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=64)
    result = quantize(tmp_path / "src", recipe(acts="{format: fp8_e4m3, dynamic: false}"), tmp_path / "out", RunOptions(calibration=calibration))
    for layer in result.plan.quantized():
        assert result.log.input_scale(layer.name) > 0
    model = mpq.load(tmp_path / "out")
    q = model.model.layers[1].mlp.down_proj
    plan_scale = result.log.input_scale("model.layers.1.mlp.down_proj")
    assert q.input_scale.dtype == torch.float32 and float(q.input_scale) == plan_scale
    assert q.input_args.describe() == "fp8_e4m3 static tensor"


def test_stored_input_scale_is_checked():
    static, dynamic = ActivationArgs(dynamic=False, granularity="tensor"), ActivationArgs()
    with pytest.raises(ArtifactError, match="missing tensor 'x.input_scale'"):
        _input_scale("x", None, static)
    with pytest.raises(ArtifactError, match="unexpected tensor"):
        _input_scale("x", torch.ones(1), dynamic)
    with pytest.raises(ArtifactError, match="one positive finite"):
        _input_scale("x", torch.tensor([-1.0]), static)
    assert _input_scale("x", None, None) is None


def test_smoothing_scales_formula():
    act, weight = torch.tensor([4.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 0.0])
    s = smoothing_scales(act, weight, 0.5)
    assert s.tolist() == [2.0, 1.0, 1.0]
    assert smoothing_scales(torch.tensor([9.0]), torch.tensor([4.0]), 1.0).item() == 9.0


@pytest.mark.parametrize("smooth,match", [
    ("{type: smoothqaunt}", "unknown transform 'smoothqaunt'"),
    ("{type: smoothquant, alpha: 2}", "alpha must be a number in"),
    ("{type: smoothquant, alhpa: 0.5}", "unknown smoothquant option 'alhpa'"),
    ("{alpha: 0.5}", "missing required key 'type'"),
])
def test_bad_transforms_fail_before_any_work(smooth, match, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "src")
    with pytest.raises(RecipeError, match=match):
        quantize(tmp_path / "src", recipe(smooth=smooth) if "type" in smooth
                 else parse_recipe(f"mpq_recipe: 1\ntransforms: [{smooth}]\nrules: "
                                   "[{targets: Linear}]\n", "t.yaml"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_smoothquant_needs_calibration_and_a_known_architecture(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(CalibrationError, match="needs calibration data"):
        quantize(tmp_path / "llama", recipe(smooth="{type: smoothquant}"), tmp_path / "out")
    config = transformers.Starcoder2Config(hidden_size=64, intermediate_size=128,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           vocab_size=256, num_hidden_layers=2)
    model_from_config(config).save_pretrained(tmp_path / "starcoder2")  # no family record
    with pytest.raises(ModelError, match="starcoder2"):
        quantize(tmp_path / "starcoder2", recipe(smooth="{type: smoothquant}"),
                 tmp_path / "out2")


def test_alpha_search_picks_per_group_and_beats_a_bad_fixed_alpha(tmp_path, calib_text):
    source = outlier_model("llama", tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=8, seq_len=64)
    errors = {}
    for name, smooth in (("fixed", "{type: smoothquant, alpha: 0.0}"),
                         ("search", "{type: smoothquant, search: true}")):
        result = quantize(tmp_path / "src", recipe(acts="{format: int, bits: 6}", smooth=smooth), tmp_path / name, RunOptions(calibration=calibration))
        errors[name] = logits_error(mpq.load(tmp_path / name), source, samples_of(calib_text))
    alphas = [g["alpha"] for r in result.log.transforms[0] for g in r["groups"]]
    assert len(alphas) == 4 and all(a in [i / 10 for i in range(11)] for a in alphas)
    assert errors["search"] < errors["fixed"]
