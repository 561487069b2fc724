"""AWQ (mpq.transforms.awq): the scale and clip searches, and the whole pipeline on tiny models."""
from __future__ import annotations

import pytest
import torch

import mpq
from mpq.errors import RecipeError
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe
from mpq.numerics.args import WeightArgs
from mpq.transforms.awq import clip_ranges, output_error, rtn_dequant, search_scales
from tests.helpers import logits_error, outlier_model, samples_of

INT4_G16_ASYM = WeightArgs(bits=4, symmetric=False, group_size=16)
INT3_CH = WeightArgs(bits=3, granularity="channel", group_size=None)


def inputs_with_salient_channels(t: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :4] *= 20  # a few loud channels, as in real LLM activations
    return x


@pytest.mark.parametrize("args", [INT4_G16_ASYM, INT3_CH], ids=lambda a: a.describe())
def test_scale_search_lowers_the_output_error(args):
    x = inputs_with_salient_channels(512, 64)
    h = 2 / x.shape[0] * x.T @ x
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    s, alpha, base, best = search_scales([(w, args)], x.abs().mean(0), h, grid=20, duo=True)
    assert base == pytest.approx(output_error(w, rtn_dequant(w, args), h), rel=1e-5)
    assert s is not None and 0 <= alpha < 1 and best < 0.9 * base
    assert best == pytest.approx(output_error(w, rtn_dequant(w * s, args) / s, h), rel=1e-5)
    assert float(s[:4].mean()) > float(s[4:].mean())  # salient channels get scaled up


def test_scale_search_keeps_identity_when_nothing_helps():
    args = WeightArgs(bits=8, granularity="channel", group_size=None)
    w = torch.eye(8)  # uniform channels: every candidate normalises to s = 1
    s, alpha, base, best = search_scales([(w, args)], torch.ones(8), torch.eye(8), 20, True)
    assert s is None and alpha is None and base == best


@pytest.mark.parametrize("args", [INT4_G16_ASYM, INT3_CH], ids=lambda a: a.describe())
def test_clip_search_never_widens_and_lowers_each_groups_error(args):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=g) * (1 + 5 * (torch.rand(16, 64, generator=g) > 0.97))
    x = torch.randn(256, 64, generator=g)
    h = 2 / x.shape[0] * x.T @ x
    clipped, shrink = clip_ranges(w, args, h)
    assert 0.55 <= shrink <= 1.0 and shrink < 1.0
    assert bool((clipped.abs() <= w.abs() + 1e-7).all())
    assert output_error(w, rtn_dequant(clipped, args), h) < output_error(w, rtn_dequant(w, args), h)


def recipe(transform: str, weights: str = "{bits: 4, symmetric: false, group_size: 32}"):
    text = ("mpq_recipe: 1\ndefaults:\n  algorithm: rtn\n"
            + (f"transforms:\n  - {transform}\n" if transform else "")
            + f"rules:\n  - targets: [Linear]\n    weights: {weights}\n")
    return parse_recipe(text, "awq.yaml")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "granite"])
def test_awq_beats_rtn_through_the_pipeline(arch, tmp_path, calib_text):
    source = outlier_model(arch, tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=8, seq_len=64)
    errors = {}
    for name, transform in (("rtn", ""), ("awq", "{type: awq}")):
        result = quantize(tmp_path / "src", recipe(transform), tmp_path / name, RunOptions(calibration=calibration))
        errors[name] = logits_error(mpq.load(tmp_path / name), source, samples_of(calib_text))
    [spec], [applied] = result.plan.transforms, result.log.transforms
    assert spec.type == "awq" and len(applied) == 2
    block0 = applied[0]
    assert [g["prev"] for g in block0["groups"]] == ["input_layernorm",
                                                     "post_attention_layernorm", "mlp.up_proj"]
    assert all(g["error_ratio"] <= 1 for g in block0["groups"])
    clipped = [c["layer"].rsplit(".", 1)[-1] for c in block0["clipped"]]
    assert "q_proj" not in clipped and "down_proj" in clipped
    assert errors["awq"] < 0.7 * errors["rtn"]


@pytest.mark.parametrize("transform,match", [
    ("{type: awq, grid: 0}", "grid must be an integer"),
    ("{type: awq, clip: 1}", "clip must be true or false"),
    ("{type: awq, gird: 20}", "unknown awq option 'gird'"),
])
def test_bad_awq_options(transform, match, tmp_path):
    outlier_model("llama", tmp_path / "src")
    with pytest.raises(RecipeError, match=match):
        quantize(tmp_path / "src", recipe(transform), tmp_path / "out")


def test_awq_composes_with_gptq(tmp_path, calib_text):
    source = outlier_model("llama", tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=8, seq_len=64)
    text = ("mpq_recipe: 1\ntransforms: [{type: awq, grid: 10}]\ndefaults:\n  algorithm: gptq\n"
            "  options: {act_order: true, static_groups: true}\nrules:\n  - targets: [Linear]\n"
            "    weights: {bits: 4, symmetric: false, group_size: 32}\n")
    result = quantize(tmp_path / "src", parse_recipe(text, "awq-gptq.yaml"), tmp_path / "out", RunOptions(calibration=calibration))
    assert all("gptq_loss" in result.log.result(layer.name) for layer in result.plan.quantized())
    assert len(result.log.transforms[0]) == 2
    rtn = quantize(tmp_path / "src", recipe(""), tmp_path / "rtn", RunOptions(calibration=calibration))
    assert rtn.plan.transforms == () and rtn.log.transforms == []
    samples = samples_of(calib_text)
    assert (logits_error(mpq.load(tmp_path / "out"), source, samples)
            < logits_error(mpq.load(tmp_path / "rtn"), source, samples))
