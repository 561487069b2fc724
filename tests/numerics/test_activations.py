"""Activation fake quantization (mpq.numerics.activations) and the ActivationArgs it follows."""
from __future__ import annotations

import pytest
import torch

from mpq.numerics.activations import FP8_MAX, fake_quantize, grid_half_range, static_scale
from mpq.errors import SchemeError
from mpq.numerics.args import ActivationArgs

INT8_TOKEN = ActivationArgs()
INT8_STATIC = ActivationArgs(dynamic=False, granularity="tensor")
FP8_TOKEN = ActivationArgs(format="fp8_e4m3")
INT4_TENSOR = ActivationArgs(bits=4, granularity="tensor")


def test_int8_per_token_error_is_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 10, 5)[None, :, None]
    y = fake_quantize(x, INT8_TOKEN)
    step = x.abs().amax(dim=-1, keepdim=True) / 127.5
    assert bool(((y - x).abs() <= step / 2 * (1 + 1e-3)).all())  # +absmax sits on the edge
    levels = torch.round(y / step)
    assert torch.allclose(levels * step, y, atol=1e-6) and levels.abs().max() <= 128


def test_each_token_has_its_own_scale():
    torch.manual_seed(1)
    x = torch.randn(2, 64)
    x[1] *= 1000
    y = fake_quantize(x, INT8_TOKEN)
    assert float((y[0] - x[0]).abs().max()) < 0.05  # not crushed by the loud token
    coarse = fake_quantize(x, ActivationArgs(granularity="tensor"))
    assert float((coarse[0] - x[0]).abs().max()) > 1


def test_static_scale_clips_and_zero_stays_zero():
    scale = static_scale(torch.tensor([2.0, 4.0]), INT8_STATIC)
    assert scale.shape == (1,) and float(scale) == pytest.approx(4.0 / 127.5)
    x = torch.tensor([[0.0, 1.0, -100.0, 100.0]])
    y = fake_quantize(x, INT8_STATIC, scale)
    assert float(y[0, 0]) == 0.0
    assert float(y[0, 2]) == pytest.approx(-128 * float(scale))
    assert float(y[0, 3]) == pytest.approx(127 * float(scale))
    assert float(static_scale(0.0, INT8_STATIC)) > 0
    with pytest.raises(ValueError, match="calibrated scale"):
        fake_quantize(x, INT8_STATIC)


def test_fp8_matches_torch_float8_rounding():
    torch.manual_seed(2)
    x = torch.randn(4, 32) * 3
    y = fake_quantize(x, FP8_TOKEN)
    scale = x.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    expected = (x / scale).to(torch.float8_e4m3fn).float() * scale
    torch.testing.assert_close(y, expected)
    assert float(((y - x).abs() / x.abs().clamp_min(1e-3)).median()) < 0.07


def test_int4_tensor_grid_and_dtype_kept():
    torch.manual_seed(3)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    y = fake_quantize(x, INT4_TENSOR)
    assert y.dtype == torch.bfloat16
    assert grid_half_range(INT4_TENSOR) == 7.5
    levels = torch.round(y.float() / (x.float().abs().max() / 7.5))
    assert levels.unique().numel() <= 16


@pytest.mark.parametrize("kwargs,match", [
    ({"format": "int4"}, "unknown activation format"),
    ({"granularity": "channel"}, "unknown activation granularity"),
    ({"dynamic": False}, "static activation scales are per tensor"),
    ({"bits": 9}, "2..8"),
    ({"format": "fp8_e4m3", "bits": 4}, "fp8_e4m3 has 8 bits"),
    ({"symmetric": False}, "asymmetric"),
    ({"bits": "8"}, "must be an integer"),
])
def test_bad_activation_args(kwargs, match):
    with pytest.raises(SchemeError, match=match):
        ActivationArgs(**kwargs)
