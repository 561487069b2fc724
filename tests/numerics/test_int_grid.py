"""Integer grid: FORMATS.md semantics, error bounds, edge cases, reuse helpers."""
from __future__ import annotations

import pytest
import torch

from mpq.errors import SchemeError
from mpq.numerics.base import NUMBER_FORMATS
from mpq.numerics.int_grid import (int_dequantize_codes, int_params, int_quantize_codes,
                                     int_range)
from mpq.numerics.args import WeightArgs

GRID = NUMBER_FORMATS.get("int")
GRANS = [("tensor", None), ("channel", None), ("group", 16)]


def _w(n=6, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3


def _per_col_scale(qw):
    s = qw.scale
    return s.repeat_interleave(qw.shape[1] // s.shape[1], dim=1)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gran,gs", GRANS)
def test_error_codes_and_requant(bits, sym, gran, gs):
    w = _w(seed=bits)
    args = WeightArgs(bits=bits, symmetric=sym, granularity=gran, group_size=gs)
    qw = GRID.quantize(w, args)
    n, k = w.shape
    g = args.num_groups(k)
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (n, k)
    assert int(qw.codes.max()) < 2 ** bits
    assert qw.scale.dtype == torch.float32
    assert qw.scale.shape == ((1, 1) if gran == "tensor" else (n, g))
    if sym:
        assert qw.zero is None
    else:
        assert qw.zero.dtype == torch.int32 and qw.zero.shape == qw.scale.shape
        assert int(qw.zero.min()) >= 0 and int(qw.zero.max()) < 2 ** bits
    xh = qw.dequantize()
    # every element within half a step (the grid covers [lo, hi] of its group by construction)
    assert ((xh - w).abs() <= _per_col_scale(qw) * (0.5 + 1e-4)).all()
    # dequantized values lie on the grid: requantizing with the same params gives the same codes
    assert torch.equal(int_quantize_codes(xh, qw.scale, qw.zero, bits), qw.codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_range(bits):
    w = _w(seed=bits)
    qw = GRID.quantize(w, WeightArgs(bits=bits, granularity="channel", group_size=None))
    xh = qw.dequantize()
    amax = w.abs().amax(dim=1, keepdim=True)
    # positive side clips below absmax; −absmax may land on q_min = absmax·(1 + 1/(2^b − 1))
    assert (xh <= amax * (1 + 1e-6)).all()
    assert (xh.abs() <= amax * (1 + 1 / (2 ** bits - 1)) * (1 + 1e-6)).all()
    assert torch.allclose(qw.scale, amax / ((2 ** bits - 1) / 2))


def test_hand_computed_symmetric_half_to_even():
    # 4-bit symmetric, absmax 1.875 -> scale 0.25 exactly; x/scale = 2.5 -> 2, 3.5 -> 4, -7.5 -> -8
    w = torch.tensor([[0.625, 0.875, -0.625, -1.875, 1.875, 0.0, 0.1, -0.2]])
    qw = GRID.quantize(w, WeightArgs(bits=4, granularity="channel", group_size=None))
    assert qw.scale.item() == 0.25
    assert (qw.codes.to(torch.int32) - 8).tolist() == [[2, 4, -2, -8, 7, 0, 0, -1]]
    assert qw.dequantize().tolist() == [[0.5, 1.0, -0.5, -2.0, 1.75, 0.0, 0.0, -0.25]]


def test_hand_computed_asymmetric():
    # lo = min(0.5, 0) = 0, hi = 1.5, 4-bit: scale 0.1, zero = round(-8 - 0) = -8 -> u 0
    w = torch.tensor([[0.5, 1.5, 1.0, 0.75]])
    qw = GRID.quantize(w, WeightArgs(bits=4, symmetric=False, granularity="channel",
                                     group_size=None))
    assert qw.scale.item() == pytest.approx(0.1)
    assert qw.zero.tolist() == [[0]]
    assert qw.codes.tolist() == [[5, 15, 10, 8]]  # 7.5 rounds to 8 (half to even)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_asym_extremes_and_exact_zero(sym, bits):
    w = _w(4, 32, seed=7)
    w[:, ::5] = 0.0
    args = WeightArgs(bits=bits, symmetric=sym, granularity="group", group_size=8)
    qw = GRID.quantize(w, args)
    xh = qw.dequantize()
    assert (xh[:, ::5] == 0).all()  # 0 is exactly representable (compressed-tensors requirement)
    v, vh = w.reshape(4, 4, 8), xh.reshape(4, 4, 8)
    s = qw.scale
    lo_i, hi_i = v.argmin(-1, keepdim=True), v.argmax(-1, keepdim=True)
    for idx in (lo_i, hi_i):
        err = (v.gather(-1, idx) - vh.gather(-1, idx)).abs().squeeze(-1)
        assert (err <= s * (0.5 + 1e-4)).all()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_rows_and_dtypes(sym, dtype):
    w = _w(4, 32).to(dtype)
    w[1] = 0
    args = WeightArgs(bits=4, symmetric=sym, group_size=16)
    qw = GRID.quantize(w, args)
    ref = GRID.quantize(w.float(), args)  # computed in fp32 whatever the input dtype
    assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.scale, ref.scale)
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    out = qw.dequantize(dtype)
    assert out.dtype == dtype and (out[1] == 0).all()
    allzero = GRID.quantize(torch.zeros(2, 32), args).dequantize()
    assert (allzero == 0).all()


def test_int_params_on_slices_match_full():
    w = _w(5, 64, seed=3)
    for sym in (True, False):
        args = WeightArgs(bits=3, symmetric=sym, group_size=16)
        scale, zero = int_params(w, args)
        for gi in range(4):
            s, z = int_params(w[:, gi * 16:(gi + 1) * 16], args)
            assert s.shape == (5, 1) and torch.equal(s[:, 0], scale[:, gi])
            assert (z is None) == sym and (sym or torch.equal(z[:, 0], zero[:, gi]))


def test_g_idx_columns_use_their_group():
    w = _w(3, 32, seed=4)
    args = WeightArgs(bits=4, symmetric=False, group_size=8)
    scale, zero = int_params(w, args)
    g_idx = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(1)).int()
    codes = int_quantize_codes(w, scale, zero, 4, g_idx)
    per_col_s, per_col_z = scale[:, g_idx.long()], zero[:, g_idx.long()]
    assert torch.equal(codes, int_quantize_codes(w, per_col_s, per_col_z, 4))
    assert torch.equal(int_dequantize_codes(codes, scale, zero, 4, g_idx),
                       int_dequantize_codes(codes, per_col_s, per_col_z, 4))


def test_int_range():
    assert int_range(4) == (-8, 7) and int_range(2) == (-2, 1) and int_range(8) == (-128, 127)


def test_bad_inputs_raise_scheme_error():
    with pytest.raises(SchemeError) as exc:
        GRID.quantize(torch.randn(4, 96), WeightArgs(bits=4, group_size=128))
    assert "does not divide" in exc.value.message and "group_size 32" in exc.value.hint
    with pytest.raises(SchemeError) as exc:
        GRID.quantize(torch.randn(4, 100), WeightArgs(bits=4, group_size=64))
    assert "channel" in exc.value.hint
    with pytest.raises(SchemeError):
        GRID.quantize(torch.randn(2, 4, 8), WeightArgs(granularity="channel", group_size=None))
    with pytest.raises(SchemeError, match="NaN"):
        GRID.quantize(torch.tensor([[1.0, float("nan")]]),
                      WeightArgs(granularity="channel", group_size=None))
    with pytest.raises(SchemeError):
        GRID.quantize(torch.randn(2, 64), WeightArgs(format="nf4", group_size=64))


def test_matches_compressed_tensors_reference():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    w = _w(6, 64, seed=11)
    for bits in range(2, 9):
        for sym in (True, False):
            qa = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group",
                                  group_size=16)
            v = w.reshape(6, 4, 16)
            s, z = calculate_qparams(v.amin(-1), v.amax(-1), qa)
            q = quantize(w, s, z, qa, dtype=torch.int8)
            qw = GRID.quantize(w, WeightArgs(bits=bits, symmetric=sym, group_size=16))
            assert torch.equal(s, qw.scale)
            assert torch.equal(q.to(torch.int32) + 2 ** (bits - 1), qw.codes.to(torch.int32))
            if not sym:
                assert torch.equal(z.to(torch.int32) + 2 ** (bits - 1), qw.zero)
