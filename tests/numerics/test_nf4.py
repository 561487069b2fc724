"""NF4: code table, nearest-entry coding, block absmax, double quantization."""
from __future__ import annotations

import pytest
import torch

from mpq.errors import SchemeError
from mpq.numerics.base import NUMBER_FORMATS
from mpq.numerics.nf4 import (NF4_TABLE, double_dequantize, double_quantize, nf4_nearest,
                                nf4_table)
from mpq.numerics.args import WeightArgs

NF4 = NUMBER_FORMATS.get("nf4")
ARGS = WeightArgs(format="nf4", bits=4, group_size=64)
DQ = WeightArgs(format="nf4", bits=4, group_size=64, double_quant=True)


def _w(n=6, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, k // 64, generator=g).repeat_interleave(
        64, dim=1)


def test_table():
    t = nf4_table()
    assert len(NF4_TABLE) == 16 and t.dtype == torch.float32
    assert torch.equal(t, t.sort().values) and len(set(NF4_TABLE)) == 16
    assert NF4_TABLE[0] == -1.0 and NF4_TABLE[7] == 0.0 and NF4_TABLE[15] == 1.0
    # bitsandbytes get_4bit_type("nf4") spot values (QLoRA paper)
    assert NF4_TABLE[1] == -0.6961928009986877 and NF4_TABLE[8] == 0.07958029955625534
    # quantile construction: 8 non-negative and 7 negative levels, asymmetric around 0
    assert sum(v > 0 for v in NF4_TABLE) == 8 and sum(v < 0 for v in NF4_TABLE) == 7


def test_nearest_matches_brute_force_and_ties_go_low():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4000, generator=g) * 2.2 - 1.1
    t = nf4_table()
    idx = nf4_nearest(x).long()
    d = (x[:, None] - t).abs()
    assert torch.equal(d.gather(1, idx[:, None]).squeeze(1), d.min(dim=1).values)
    mid = (t[1:] + t[:-1]) / 2
    assert nf4_nearest(mid).tolist() == list(range(15))  # exactly on a midpoint -> lower entry


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_error_bound(dtype):
    w = _w().to(dtype)
    w[2, 64:128] = 0  # an all-zero block
    qw = NF4.quantize(w, ARGS)
    wf = w.float()
    absmax = wf.reshape(6, 4, 64).abs().amax(-1)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 15
    assert qw.scale.shape == (6, 4) and torch.equal(qw.scale, absmax)
    xh = qw.dequantize()
    half_gap = (nf4_table().diff().max() / 2).item()
    bound = absmax.repeat_interleave(64, dim=1) * half_gap
    assert ((xh - wf).abs() <= bound * (1 + 1e-6)).all()
    assert (xh[2, 64:128] == 0).all()
    # each block's absmax element is reconstructed exactly (it maps to ±1)
    idx = wf.reshape(6, 4, 64).abs().argmax(-1, keepdim=True)
    got = xh.reshape(6, 4, 64).gather(-1, idx).squeeze(-1).abs()
    assert torch.equal(got, absmax)
    assert qw.dequantize(torch.float16).dtype == torch.float16


def test_double_quant_layout_and_error():
    w = _w(12, 128 * 13, seed=2)  # 12·26 = 312 absmax values -> 2 blocks of 256 (last partial)
    plain, dq = NF4.quantize(w, ARGS), NF4.quantize(w, DQ)
    ex = dq.extras
    m = 12 * 26
    assert ex["absmax_codes"].shape == (m,) and ex["absmax_codes"].dtype == torch.uint8
    assert ex["absmax_scale"].shape == (2,) and ex["absmax_scale"].dtype == torch.float32
    assert ex["absmax_offset"].shape == (1,)
    assert torch.allclose(ex["absmax_offset"], plain.scale.mean())
    # scale holds the dequantized absmax, reproducible from the extras
    assert torch.equal(dq.scale.reshape(-1), double_dequantize(ex["absmax_codes"],
                                                              ex["absmax_scale"],
                                                              ex["absmax_offset"]))
    a, ah = plain.scale.reshape(-1), dq.scale.reshape(-1)
    centred = (a - a.mean())
    for b in range(2):
        blk = slice(256 * b, min(256 * (b + 1), m))
        step = centred[blk].abs().max() / 127.5
        assert ((ah[blk] - a[blk]).abs() <= step * 0.5 + 1e-6).all()
    # 8-bit absmax costs almost nothing in weight error
    err_plain, err_dq = (plain.dequantize() - w).norm(), (dq.dequantize() - w).norm()
    assert err_dq <= 1.02 * err_plain
    assert (ah >= 0).all()


def test_double_quantize_round_trip_helper():
    a = torch.rand(300) * 2
    codes, s, off = double_quantize(a)
    back = double_dequantize(codes, s, off)
    codes2, _, _ = double_quantize(a)
    assert torch.equal(codes, codes2) and back.shape == a.shape
    assert (back - a).abs().max() <= (a - a.mean()).abs().max() / 255 + 1e-6


def test_bad_args():
    with pytest.raises(SchemeError):
        WeightArgs(format="nf4", bits=4, group_size=128)
    with pytest.raises(SchemeError) as exc:
        NF4.quantize(torch.randn(2, 96), ARGS)
    assert "does not divide" in exc.value.message and exc.value.hint
