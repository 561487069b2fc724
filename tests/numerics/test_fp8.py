"""FP8 grids: scale convention, nearest-value rounding, error vs format spacing, saturation."""
from __future__ import annotations

import pytest
import torch

from mpq.errors import SchemeError
from mpq.numerics.base import NUMBER_FORMATS
from mpq.numerics.int_grid import safe_scale
from mpq.numerics.args import WeightArgs

# name -> (dtype, mantissa bits, minimum normal exponent)
FORMATS = {"fp8_e4m3": (torch.float8_e4m3fn, 3, -6), "fp8_e5m2": (torch.float8_e5m2, 2, -14)}


def _args(name, gran):
    return WeightArgs(format=name, bits=8, granularity=gran, group_size=None)


def _finite_values(dtype):
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    return v[torch.isfinite(v)].unique()


def _w(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 48, generator=g) * torch.logspace(-3, 1, 8)[:, None]
    w[0, :8] = torch.tensor([0.0, 1e-9, -1e-9, 5e-6, -5e-6, 1e-4, 0.0, 0.0])
    return w


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_scale_error_and_nearest(name, gran):
    dtype, mant, emin = FORMATS[name]
    w = _w()
    qw = NUMBER_FORMATS.get(name).quantize(w, _args(name, gran))
    fmax = torch.finfo(dtype).max
    assert qw.codes.dtype == dtype and qw.codes.shape == w.shape
    amax = w.abs().amax() if gran == "tensor" else w.abs().amax(dim=1, keepdim=True)
    assert qw.scale.shape == ((1, 1) if gran == "tensor" else (8, 1))
    assert torch.allclose(qw.scale, amax / fmax)
    y = w / qw.scale                      # exact target on the code scale
    c = qw.codes.float()
    assert torch.isfinite(c).all() and (c.abs() <= fmax).all()
    # half a spacing: relative 2^-(m+1) for normals, absolute 2^(emin-m-1) for subnormals
    bound = torch.maximum(y.abs() * 2.0 ** -(mant + 1), torch.tensor(2.0 ** (emin - mant - 1)))
    assert ((c - y).abs() <= bound * (1 + 1e-6)).all()
    # and it is the nearest finite value of the format (brute force over all 256 codes)
    vals = _finite_values(dtype)
    best = (y.reshape(-1, 1) - vals).abs().min(dim=1).values.reshape(y.shape)
    assert torch.equal((c - y).abs(), best)
    # dequantize is codes·scale in fp32, then the requested dtype
    assert torch.equal(qw.dequantize(), c * qw.scale)
    assert qw.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("name", FORMATS)
def test_absmax_saturates_and_zero_rows(name):
    dtype, _, _ = FORMATS[name]
    w = _w(1)
    w[3] = 0
    qw = NUMBER_FORMATS.get(name).quantize(w, _args(name, "channel"))
    fmax = torch.finfo(dtype).max
    # the absmax element of each nonzero row lands exactly on ±max (never NaN/inf)
    idx = w.abs().argmax(dim=1, keepdim=True)
    top = qw.codes.float().gather(1, idx).abs().squeeze(1)
    assert torch.equal(top[torch.arange(8) != 3], torch.full((7,), fmax))
    assert (qw.dequantize()[3] == 0).all() and torch.isfinite(qw.scale).all()
    assert (qw.scale > 0).all()


@pytest.mark.parametrize("name", FORMATS)
def test_requant_is_stable(name):
    qw = NUMBER_FORMATS.get(name).quantize(_w(2), _args(name, "channel"))
    from mpq.numerics.fp8 import fp8_codes

    again = fp8_codes(qw.dequantize(), qw.scale, FORMATS[name][0])
    assert torch.equal(again.float(), qw.codes.float())


BLOCK = WeightArgs(format="fp8_e4m3", bits=8, granularity="block", group_size=None)


@pytest.mark.parametrize("shape", [(200, 300), (256, 128), (64, 64), (130, 129)])
def test_block_matches_compressed_tensors(shape):
    from tests.ct_reference import ct_compress, ct_decompress, ct_fp8_block

    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(*shape, generator=g) * torch.logspace(-3, 1, shape[0])[:, None]
    w[:, :3] = 0
    ref, scale, _ = ct_fp8_block(w)  # compressed-tensors zero-pads partial 128×128 tiles
    qw = NUMBER_FORMATS.get("fp8_e4m3").quantize(w, BLOCK)
    assert qw.scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert torch.equal(qw.scale, scale) and torch.equal(qw.dequantize(), ref)
    stored = ct_compress("fp8_block", w, scale, None)
    assert stored["weight"].shape == shape
    assert torch.equal(stored["weight"].view(torch.uint8), qw.codes.view(torch.uint8))
    back = ct_decompress("fp8_block", {"weight": qw.codes, "weight_scale": qw.scale})
    assert torch.equal(back, qw.dequantize())


def test_block_scale_is_per_tile_absmax():
    w = torch.zeros(130, 260)
    w[0, 0], w[129, 0], w[5, 259], w[128, 255] = 448.0, -2.0, 4.48, 0.5
    qw = NUMBER_FORMATS.get("fp8_e4m3").quantize(w, BLOCK)
    tile_absmax = torch.tensor([[448.0, 0.0, 4.48], [2.0, 0.5, 0.0]])  # empty tiles get eps
    assert torch.equal(qw.scale, safe_scale(tile_absmax / torch.tensor(448.0)))
    assert torch.allclose(qw.dequantize()[w != 0], w[w != 0], rtol=1e-6, atol=0)
    assert BLOCK.describe() == "fp8_e4m3 block128" and BLOCK.num_groups(260) == 3


def test_block_args_errors():
    for kwargs, match in [
        (dict(format="fp8_e5m2", bits=8, granularity="block", group_size=None), "fp8_e4m3 only"),
        (dict(format="int", bits=8, granularity="block", group_size=None), "fp8_e4m3 only"),
        (dict(format="fp8_e4m3", bits=8, granularity="block", group_size=128), "group_size"),
        (dict(format="fp8_e4m3", bits=8, granularity="group", group_size=128),
         "tensor, channel or block"),
    ]:
        with pytest.raises(SchemeError, match=match) as exc:
            WeightArgs(**kwargs)
        assert exc.value.hint
