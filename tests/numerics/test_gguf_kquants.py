"""The K-quant GGUF grids (q4_k, q5_k, q6_k, q3_k) against the ``gguf`` package: its dequantizer
reads mpq's super-block bytes back to mpq's dequantized weights bit for bit, for RTN and GPTQ
codes; the parameters are the documented ones; GPTQ beats RTN on the same grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpq.errors import SchemeError
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.format import NUMBER_FORMATS
from mpq.numerics.gguf_kquants import GGUF_KQUANTS
from mpq.quantizers.gptq_options import GPTQOptions
from mpq.quantizers.gptq_solve import gptq_solve

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

NAMES = [f.name for f in GGUF_KQUANTS]
RANGES = {"q4_k": (0, 15), "q5_k": (0, 31), "q6_k": (-32, 31), "q3_k": (-4, 3)}
SCALES = {"q4_k": (0, 63), "q5_k": (0, 63), "q6_k": (-128, 127), "q3_k": (-32, 31)}


def args_of(name: str) -> WeightArgs:
    return WeightArgs(format=name, **NUMBER_FORMATS.get(name).implied_weights({}))


def weight(seed: int = 0, shape=(24, 512)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    w[0, :256] = 0  # an all-zero super-block
    w[1, 256:272] = 0  # an all-zero sub-block of 16 (half of one of 32)
    w[1, 300] = -0.9  # a negative extreme
    w[2, 70] = 0.9
    w[3, 96:128] = 0.25  # a constant sub-block
    w[4, 256:] = torch.rand(256, generator=g) * 0.1 + 0.02  # all positive
    w[5, :256] = -torch.rand(256, generator=g) * 0.1 - 0.02  # all negative
    w[6] *= 1e-4  # tiny weights: float16 subnormal steps
    return w


def gguf_dequant(name: str, rows: torch.Tensor) -> np.ndarray:
    return quants.dequantize(rows.numpy(), GGMLQuantizationType[name.upper()])


@pytest.mark.parametrize("name", NAMES)
def test_rtn_bytes_dequantize_bit_for_bit_in_gguf(name):
    fmt = NUMBER_FORMATS.get(name)
    qw = fmt.quantize(weight(), args_of(name))
    rows = fmt.encode(qw)["blocks"]
    block, type_size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]]
    assert (block, type_size) == (256, fmt.type_size)
    assert tuple(rows.shape) == (24, 2 * type_size) and rows.dtype == torch.uint8
    ref = gguf_dequant(name, rows)
    assert ref.tobytes() == qw.dequantize().numpy().tobytes()  # -0.0 vs 0.0 too


@pytest.mark.parametrize("name", NAMES)
def test_every_code_and_scale_value_survives_the_bytes(name):
    """Codes and integer scales spanning their whole ranges (not only RTN's) round-trip through
    the bytes, and gguf decodes them as x̂ = (d·sc)·q [− dmin·m]: the layout, field by field."""
    fmt = NUMBER_FORMATS.get(name)
    g = torch.Generator().manual_seed(5)
    n, nb = 6, 3
    lo, hi = RANGES[name]
    codes = torch.randint(0, hi - lo + 1, (n, nb * 256), generator=g).to(torch.uint8)
    slo, shi = SCALES[name]
    sc = torch.randint(slo, shi + 1, (n, nb, fmt.subs), generator=g).float()
    d = (torch.rand(n, nb, 1, generator=g) - 0.3).half().float()
    scale = torch.cat([d, sc], dim=-1)
    zero = None
    if fmt.with_min:
        m = torch.randint(0, 64, (n, nb, fmt.subs), generator=g).float()
        zero = torch.cat([torch.rand(n, nb, 1, generator=g).half().float(), m], dim=-1)
    qw = QuantizedWeight(args=args_of(name), shape=(n, nb * 256), codes=codes, scale=scale,
                         zero=zero)
    rows = fmt.to_blocks(qw)
    back = fmt.from_blocks(rows, qw.args, qw.shape)
    assert torch.equal(back.codes, codes) and torch.equal(back.scale, scale)
    assert (back.zero is None) == (zero is None)
    if zero is not None:
        assert torch.equal(back.zero, zero)
    q = codes.float().reshape(n, nb, fmt.subs, fmt.sub) + lo
    expect = (d * sc).unsqueeze(-1) * q
    if zero is not None:
        expect = expect - (zero[..., :1] * zero[..., 1:]).unsqueeze(-1)
    assert gguf_dequant(name, rows).tobytes() == expect.reshape(n, -1).numpy().tobytes()


def _sub_errors(fmt, w, qw) -> torch.Tensor:
    """Σ (x̂ − x)² per sub-block."""
    n, k = w.shape
    return (qw.dequantize() - w).square().reshape(n, k // 256, fmt.subs, fmt.sub).sum(-1)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_are_the_documented_choice(name, monkeypatch):
    """Min-max integers against the float16 d, then the search: no sub-block's error grows and
    the total drops; the integers stay within the moves of the min-max ones."""
    from mpq.numerics import gguf_kquant_params as params

    fmt = NUMBER_FORMATS.get(name)
    w = weight(1)
    qw = fmt.quantize(w, args_of(name))
    for moves in ("MOVES_SCALE", "MOVES_MIN", "MOVES_SYM"):
        monkeypatch.setattr(params, moves, torch.zeros(1))
    minmax = fmt.quantize(w, args_of(name))
    monkeypatch.undo()
    assert torch.equal(qw.scale[..., 0], minmax.scale[..., 0])  # the same float16 d
    moved = qw.scale[..., 1:] - minmax.scale[..., 1:]
    assert bool((moved >= -3).all() and (moved <= 2).all()) and bool((moved != 0).any())
    ours, base = _sub_errors(fmt, w, qw), _sub_errors(fmt, w, minmax)
    assert bool((ours <= base * (1 + 1e-6) + 1e-12).all())
    assert float(ours.sum()) < 0.95 * float(base.sum())

    lo, hi = RANGES[name]
    slo, shi = SCALES[name]
    sc = qw.scale[..., 1:]
    assert bool((sc >= slo).all() and (sc <= shi).all() and (sc == sc.round()).all())
    assert torch.equal(qw.scale[..., 0], qw.scale[..., 0].half().float())
    deq = qw.dequantize()
    assert torch.equal(deq[0, :256], torch.zeros(256))  # all-zero super-block → exactly 0
    assert torch.equal(qw.scale[0, 0], torch.zeros(1 + fmt.subs))
    sub = w.reshape(24, 2, fmt.subs, fmt.sub)
    if fmt.with_min:  # min-max: step (max − min(min, 0))/L against the float16 d, nearest
        rng = sub.amax(-1) - sub.amin(-1).clamp(max=0)
        d = minmax.scale[..., :1]
        rel = ((d * minmax.scale[..., 1:] - rng / hi).abs() / d.clamp_min(1e-30))
        assert float(rel[(d > 0).expand_as(rel)].max()) <= 0.5 + 1e-3
        assert bool((qw.zero[..., 1:] >= 0).all() and (qw.zero[..., 1:] <= 63).all())
        # a sub-block of one value, all positive: its min offset is 0, the value on the grid
        assert float((deq[3, 96:128] - 0.25).abs().max()) < 0.25 * 0.03
    else:  # min-max: a sub-block's extreme is on the grid (up to float16 / integer rounding;
        # the search may clip it where that lowers the sub-block's error)
        base_deq = minmax.dequantize()
        assert abs(float(base_deq[1, 300]) + 0.9) < 0.9 * 0.01
        assert abs(float(base_deq[2, 70]) - 0.9) < 0.9 * 0.01
    err = float(((deq - w) ** 2).sum() / (w ** 2).sum())
    assert err < {"q4_k": 0.01, "q5_k": 0.003, "q6_k": 0.001, "q3_k": 0.04}[name]


def test_search_is_chunked_without_changing_the_result(monkeypatch):
    from mpq.numerics import gguf_kquant_params as params

    w = weight(6, (40, 512))
    for name in NAMES:
        fmt = NUMBER_FORMATS.get(name)
        whole = fmt.quantize(w, args_of(name))
        monkeypatch.setattr(params, "ROW_CHUNK", 7)
        chunked = fmt.quantize(w, args_of(name))
        monkeypatch.undo()
        assert torch.equal(whole.codes, chunked.codes)
        assert torch.equal(whole.scale, chunked.scale)


@pytest.mark.parametrize("name", NAMES)
def test_gptq_codes_dequantize_bit_for_bit_in_gguf_and_beat_rtn(name):
    fmt = NUMBER_FORMATS.get(name)
    args = args_of(name)
    w = weight(3, (16, 512))
    x = torch.randn(1024, 512, generator=torch.Generator().manual_seed(4))
    x[:, :8] *= 10  # uneven inputs, so GPTQ differs from RTN
    x[:, 300:310] += x[:, :10]  # correlated inputs, across super-blocks
    h = 2 * x.t() @ x / x.shape[0]
    res = gptq_solve(w, h, args, GPTQOptions(block_size=128))
    qw = QuantizedWeight(args=args, shape=(16, 512), codes=res.codes, scale=res.scale,
                         zero=res.zero)
    assert torch.equal(qw.dequantize(), res.q)
    assert gguf_dequant(name, fmt.encode(qw)["blocks"]).tobytes() == res.q.numpy().tobytes()

    def loss(q):
        d = w - q
        return float(torch.einsum("nk,kl,nl->", d, h, d))

    assert loss(res.q) < 0.9 * loss(fmt.quantize(w, args).dequantize())
    static = gptq_solve(w, h, args, GPTQOptions(static_groups=True))
    rtn = fmt.quantize(w, args)  # static groups: RTN's parameters, GPTQ's codes
    assert torch.equal(static.scale, rtn.scale)
    with pytest.raises(SchemeError, match="act_order"):
        gptq_solve(w, h, args, GPTQOptions(act_order=True))


def test_args_validation_and_row_length():
    assert args_of("q4_k").symmetric is False and args_of("q6_k").symmetric is True
    assert args_of("q4_k").group_size == 256 and args_of("q6_k").bits == 6
    assert args_of("q3_k").describe() == "q3_k"
    with pytest.raises(SchemeError, match="blocks of 256"):
        WeightArgs(format="q4_k", bits=4, symmetric=False, group_size=32)
    with pytest.raises(SchemeError, match="asymmetric"):
        WeightArgs(format="q5_k", bits=5, group_size=256, symmetric=True)
    with pytest.raises(SchemeError, match="symmetric only"):
        WeightArgs(format="q6_k", bits=6, group_size=256, symmetric=False)
    with pytest.raises(SchemeError, match="does not divide the input dimension 576") as exc:
        NUMBER_FORMATS.get("q4_k").quantize(torch.zeros(2, 576), args_of("q4_k"))
    assert "q4_k needs a multiple of 256 inputs" in exc.value.hint


def test_overflowing_scale_is_refused():
    w = torch.zeros(2, 256)
    w[0, 0] = 3e7  # 3e7 / 4 / 32 > float16's 65504
    with pytest.raises(SchemeError, match="overflows float16"):
        NUMBER_FORMATS.get("q3_k").quantize(w, args_of("q3_k"))
