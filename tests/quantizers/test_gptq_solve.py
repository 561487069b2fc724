"""GPTQ solve (mpq.quantizers.gptq_solve): loss vs RTN, identity Hessian, act-order g_idx, damping
retries, dead columns, block-size invariance and agreement with a naive column-by-column oracle."""
from __future__ import annotations

import pytest
import torch

import mpq.quantizers  # noqa: F401
from mpq.errors import SchemeError
from mpq.numerics.base import NUMBER_FORMATS
from mpq.quantizers.gptq_options import GPTQOptions
from mpq.quantizers.gptq_solve import gptq_solve
from mpq.numerics.int_grid import int_dequantize_codes, int_params, int_quantize_codes
from mpq.numerics.args import WeightArgs
from mpq.numerics.format import format_names
from tests.numerics.test_formats import default_args, fitting

INT4_G32 = WeightArgs(bits=4, group_size=32)
INT3_ASYM_CH = WeightArgs(bits=3, symmetric=False, granularity="channel", group_size=None)
INT8_ASYM_T = WeightArgs(bits=8, symmetric=False, granularity="tensor", group_size=None)
INT4_ASYM_G16 = WeightArgs(bits=4, symmetric=False, group_size=16)
FP8_CH = WeightArgs(format="fp8_e4m3", bits=8, granularity="channel", group_size=None)
FP8_T = WeightArgs(format="fp8_e5m2", bits=8, granularity="tensor", group_size=None)
NF4 = WeightArgs(format="nf4", bits=4, group_size=64)
MXINT8 = WeightArgs(format="mxint8", bits=8, group_size=32)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hessian_from(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T @ x


def correlated_inputs(t: int, k: int, seed: int = 0, col_scale: torch.Tensor | None = None):
    g = gen(seed)
    mix = torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / k**.5
    x = torch.randn(t, k, generator=g) @ mix
    return x * col_scale if col_scale is not None else x


def output_loss(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - q).double()
    return float(torch.trace(d @ h.double() @ d.T))


def rtn(w: torch.Tensor, args: WeightArgs):
    return NUMBER_FORMATS.get(args.format).quantize(w, args)


def naive_gptq(w: torch.Tensor, h: torch.Tensor, args: WeightArgs, damp: float = 0.01):
    """Textbook GPTQ for int grids: one column at a time, full update of the rest, no blocks."""
    w = w.clone()
    hd = h + damp * h.diagonal().mean() * torch.eye(h.shape[0])
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    q = torch.zeros_like(w)
    gs = args.group_size
    scale, zero = int_params(w, args) if gs is None else (None, None)
    for i in range(w.shape[1]):
        if gs is not None and i % gs == 0:
            scale, zero = int_params(w[:, i:i + gs], args)
        c = int_quantize_codes(w[:, i:i + 1], scale, zero, args.bits)
        q[:, i:i + 1] = int_dequantize_codes(c, scale, zero, args.bits)
        e = (w[:, i] - q[:, i]) / u[i, i]
        w[:, i:] -= e[:, None] * u[i, i:][None, :]
    return q


@pytest.mark.parametrize("args", [INT4_G32, INT3_ASYM_CH, FP8_CH, NF4, MXINT8],
                         ids=lambda a: a.describe())
def test_loss_not_above_rtn(args):
    w = torch.randn(32, 128, generator=gen(1))
    h = hessian_from(correlated_inputs(512, 128))
    res = gptq_solve(w, h, args)
    ours, base = output_loss(w, res.q, h), output_loss(w, rtn(w, args).dequantize(), h)
    assert ours <= base
    if args.format == "int":
        assert ours < 0.9 * base
    assert res.damp == 0.01 and res.damp_retries == 0 and res.loss > 0


@pytest.mark.parametrize("args", [INT4_G32, INT3_ASYM_CH, INT8_ASYM_T, FP8_CH, FP8_T, NF4],
                         ids=lambda a: a.describe())
def test_identity_hessian_equals_rtn(args):
    w = torch.randn(16, 128, generator=gen(2))
    res = gptq_solve(w, torch.eye(128), args)
    ref = rtn(w, args)
    assert torch.equal(res.codes.view(torch.uint8), ref.codes.view(torch.uint8))
    assert torch.equal(res.scale, ref.scale)
    assert torch.equal(res.q, ref.dequantize())


# Symmetric grids put −absmax exactly on a rounding tie (−(2^(b−1)−½)·scale), so fp32 noise in the
# updated weights can flip that code and the flip propagates along its row: asymmetric grids and nf4
# are compared code for code, symmetric ones by loss.
@pytest.mark.parametrize("args", [INT3_ASYM_CH, INT4_ASYM_G16, INT4_G32],
                         ids=lambda a: a.describe())
@pytest.mark.parametrize("block_size", [16, 32, 40])
def test_matches_naive_oracle(args, block_size):
    w = torch.randn(24, 96, generator=gen(3))
    h = hessian_from(correlated_inputs(384, 96, seed=3))
    res = gptq_solve(w, h, args, GPTQOptions(block_size=block_size))
    q = naive_gptq(w, h, args)
    ours, oracle = output_loss(w, res.q, h), output_loss(w, q, h)
    if args.symmetric:
        assert abs(ours - oracle) < 0.03 * oracle
    else:
        assert torch.allclose(res.q, q, atol=1e-5) and abs(ours - oracle) < 1e-4 * oracle


@pytest.mark.parametrize("args,act_order", [(INT4_ASYM_G16, False), (INT4_ASYM_G16, True),
                                             (NF4, False)], ids=["int4-g16", "int4-g16-act", "nf4"])
def test_block_size_does_not_matter(args, act_order):
    w = torch.randn(16, 128, generator=gen(4))
    h = hessian_from(correlated_inputs(512, 128, seed=4))
    ref = gptq_solve(w, h, args, GPTQOptions(block_size=128, act_order=act_order))
    for bs in (1, 8, 24, 200):  # 24: groups straddle block ends
        res = gptq_solve(w, h, args, GPTQOptions(block_size=bs, act_order=act_order))
        same = (res.codes == ref.codes).all(dim=1)  # rows without a single flipped code
        assert same.float().mean() >= 0.9, bs
        assert torch.allclose(res.q[same], ref.q[same], atol=1e-5), bs
        assert abs(res.loss - ref.loss) < 1e-4 * ref.loss, bs


def _diag_scaled_hessian(k: int) -> torch.Tensor:
    # column scales whose descending order is far from the identity permutation
    col_scale = 1 + torch.randperm(k, generator=gen(5)).float() / k
    return hessian_from(correlated_inputs(4 * k, k, seed=5, col_scale=col_scale))


def test_act_order_g_idx_follows_processing_order():
    k, gs = 128, 32
    w = torch.randn(16, k, generator=gen(6))
    h = _diag_scaled_hessian(k)
    args = WeightArgs(bits=4, symmetric=False, group_size=gs)
    res = gptq_solve(w, h, args, GPTQOptions(act_order=True))
    perm = torch.sort(h.diagonal(), descending=True, stable=True).indices
    expect = torch.empty(k, dtype=torch.int32)
    expect[perm] = torch.arange(k, dtype=torch.int32) // gs
    assert res.g_idx.dtype == torch.int32 and torch.equal(res.g_idx, expect)
    assert bool((res.g_idx[1:] < res.g_idx[:-1]).any())  # non-monotonic
    assert res.scale.shape == (16, k // gs) and res.zero.shape == (16, k // gs)
    deq = int_dequantize_codes(res.codes, res.scale, res.zero, 4, res.g_idx)
    assert torch.equal(deq, res.q)
    plain = gptq_solve(w, h, args)
    assert output_loss(w, res.q, h) < 1.1 * output_loss(w, plain.q, h)


def test_act_order_static_groups():
    k, gs = 128, 32
    w = torch.randn(16, k, generator=gen(7))
    h = _diag_scaled_hessian(k)
    args = WeightArgs(bits=4, group_size=gs)
    res = gptq_solve(w, h, args, GPTQOptions(act_order=True, static_groups=True))
    assert torch.equal(res.g_idx, torch.arange(k, dtype=torch.int32) // gs)
    scale, zero = int_params(w, args)
    assert torch.equal(res.scale, scale) and zero is None and res.zero is None
    assert torch.equal(int_dequantize_codes(res.codes, res.scale, None, 4, res.g_idx), res.q)
    assert output_loss(w, res.q, h) < output_loss(w, rtn(w, args).dequantize(), h)
    plain = gptq_solve(w, h, args, GPTQOptions(static_groups=True))  # without act_order: natural order
    assert plain.g_idx is None and torch.equal(plain.scale, scale)
    assert torch.equal(int_dequantize_codes(plain.codes, plain.scale, None, 4), plain.q)


def test_indefinite_hessian_retries_damping():
    k = 64
    h = hessian_from(correlated_inputs(16, k, seed=8))  # rank 16
    h = h - 0.005 * h.diagonal().mean() * torch.eye(k)  # negative eigenvalues
    w = torch.randn(8, k, generator=gen(8))
    res = gptq_solve(w, h, INT4_G32, GPTQOptions(damp=0.0))
    assert res.damp > 0.0 and res.damp_retries >= 1
    assert torch.isfinite(res.q).all()
    with pytest.raises(SchemeError, match="not positive definite") as exc:
        gptq_solve(w, h, INT4_G32, GPTQOptions(damp=0.0, max_damp=0.004))
    assert "raise damp" in exc.value.hint and "NaN" in exc.value.hint


def test_nan_hessian_raises():
    h = torch.eye(64)
    h[3, 5] = float("nan")
    with pytest.raises(SchemeError, match="NaN") as exc:
        gptq_solve(torch.randn(8, 64), h, INT4_G32)
    assert exc.value.hint


def test_hessian_shape_mismatch_raises():
    with pytest.raises(SchemeError, match="Hessian shape"):
        gptq_solve(torch.randn(8, 64), torch.eye(32), INT4_G32)


@pytest.mark.parametrize("args", [INT4_G32, INT3_ASYM_CH, FP8_CH, NF4], ids=lambda a: a.describe())
def test_dead_columns_are_zero(args):
    x = correlated_inputs(512, 128, seed=9)
    dead = [0, 5, 77]
    x[:, dead] = 0
    h = hessian_from(x)
    before = h.clone()
    w = torch.randn(16, 128, generator=gen(9))
    res = gptq_solve(w, h, args)
    assert torch.equal(h, before)  # the shared statistic is not modified
    assert (res.q[:, dead] == 0).all()
    assert torch.isfinite(res.q).all()


def test_unsupported_combinations_raise():
    w, h = torch.randn(4, 64), torch.eye(64)
    with pytest.raises(SchemeError, match="act_order"):
        gptq_solve(w, h, NF4, GPTQOptions(act_order=True))
    with pytest.raises(SchemeError, match="double_quant"):
        gptq_solve(w, h, WeightArgs(format="nf4", bits=4, group_size=64, double_quant=True))
    with pytest.raises(SchemeError, match="static_groups"):
        gptq_solve(w, h, INT3_ASYM_CH, GPTQOptions(static_groups=True))


GRID_FORMATS = format_names(lambda f: f.gptq_columns is not None)


@pytest.mark.parametrize("name", format_names())
def test_every_registered_grid_with_identity_hessian_equals_rtn(name):
    """Whatever format has a GPTQ grid (its ``gptq_columns``) reproduces its own RTN when no
    error feedback happens; the others are refused, naming those that have one."""
    args = default_args(name)
    n, k = fitting(name, (16, 128))
    w = torch.randn(n, k, generator=gen(4))
    if name not in GRID_FORMATS:
        with pytest.raises(SchemeError) as exc:
            gptq_solve(w, torch.eye(k), args)
        assert exc.value.message == (f"gptq does not support the {name} format (it supports "
                                     f"{', '.join(GRID_FORMATS)})")
        return
    res = gptq_solve(w, torch.eye(k), args)
    ref = rtn(w, args)
    assert torch.equal(res.codes.view(torch.uint8), ref.codes.view(torch.uint8))
    assert res.scale.dtype == ref.scale.dtype and torch.equal(res.scale, ref.scale)
    assert torch.equal(res.q, ref.dequantize())
