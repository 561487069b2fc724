"""The legacy GGUF block grids (q8_0, q4_0, q4_1, q5_0, q5_1) against the ``gguf`` package:
its dequantizer reads mpq's block bytes back to mpq's dequantized weights bit for bit, for RTN
and GPTQ codes; its own quantizer's error is matched."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpq.errors import SchemeError
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.format import NUMBER_FORMATS
from mpq.numerics.gguf_legacy import GGUF_LEGACY
from mpq.quantizers.gptq_options import GPTQOptions
from mpq.quantizers.gptq_solve import gptq_solve

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

NAMES = [f.name for f in GGUF_LEGACY]


def args_of(name: str) -> WeightArgs:
    return WeightArgs(format=name, **NUMBER_FORMATS.get(name).implied_weights({}))


def weight(seed: int = 0, shape=(24, 256)) -> torch.Tensor:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :32] = 0  # an all-zero block
    w[1, 40] = -0.9  # a negative extreme
    w[2, 70] = 0.9
    w[3, 96:128] = 0.25  # a constant block
    return w


def gguf_dequant(name: str, rows: torch.Tensor) -> np.ndarray:
    return quants.dequantize(rows.numpy(), GGMLQuantizationType[name.upper()])


@pytest.mark.parametrize("name", NAMES)
def test_rtn_bytes_dequantize_bit_for_bit_in_gguf(name):
    fmt = NUMBER_FORMATS.get(name)
    qw = fmt.quantize(weight(), args_of(name))
    rows = fmt.encode(qw)["blocks"]
    block, type_size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]]
    assert (block, type_size) == (32, fmt.type_size)
    assert tuple(rows.shape) == (24, 256 // 32 * type_size)
    ref = gguf_dequant(name, rows)
    assert np.array_equal(ref, qw.dequantize().numpy())
    assert ref.tobytes() == qw.dequantize().numpy().tobytes()  # -0.0 vs 0.0 too


@pytest.mark.parametrize("name", NAMES)
def test_rtn_error_matches_llama_cpp_reference(name):
    """mpq's rounding (codes from the stored float16 step) is as good as llama.cpp's reference
    quantizer (codes from the unrounded step) to within a float16 step's rounding."""
    w = weight(1)
    qtype = GGMLQuantizationType[name.upper()]
    ref = quants.dequantize(quants.quantize(w.numpy(), qtype), qtype)
    ours = NUMBER_FORMATS.get(name).quantize(w, args_of(name)).dequantize().numpy()
    err_ref = float(((ref - w.numpy()) ** 2).sum())
    err_ours = float(((ours - w.numpy()) ** 2).sum())
    assert err_ours <= err_ref * 1.01
    assert float(np.abs(ours - w.numpy()).max()) <= float(np.abs(ref - w.numpy()).max()) * 1.05


@pytest.mark.parametrize("name", NAMES)
def test_block_bytes_round_trip_and_zero_blocks(name):
    fmt = NUMBER_FORMATS.get(name)
    args = args_of(name)
    w = weight(2)
    qw = fmt.quantize(w, args)
    back = fmt.decode(fmt.encode(qw), args, qw.shape)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale)
    assert (back.zero is None) == (qw.zero is None)
    if qw.zero is not None:
        assert torch.equal(back.zero, qw.zero)
    deq = qw.dequantize()
    assert torch.equal(deq[0, :32], torch.zeros(32))  # all-zero block → exactly 0
    assert bool(torch.isfinite(deq).all())
    # the extreme weight of a block lands on the grid (only float16 rounding of d)
    assert abs(float(deq[1, 40]) + 0.9) < 0.9 * 2e-3
    assert abs(float(deq[2, 70]) - 0.9) < 0.9 * 2e-3


@pytest.mark.parametrize("name", NAMES)
def test_gptq_codes_dequantize_bit_for_bit_in_gguf(name):
    fmt = NUMBER_FORMATS.get(name)
    args = args_of(name)
    w = weight(3, (16, 128))
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(4))
    x[:, :8] *= 10  # uneven inputs, so GPTQ differs from RTN
    h = 2 * x.t() @ x / x.shape[0]
    res = gptq_solve(w, h, args, GPTQOptions())
    qw = QuantizedWeight(args=args, shape=(16, 128), codes=res.codes, scale=res.scale,
                         zero=res.zero)
    assert torch.equal(qw.dequantize(), res.q)
    assert np.array_equal(gguf_dequant(name, fmt.encode(qw)["blocks"]), res.q.numpy())

    def loss(q):
        d = w - q
        return float(torch.einsum("nk,kl,nl->", d, h, d))

    assert loss(res.q) < loss(fmt.quantize(w, args).dequantize())
    with pytest.raises(SchemeError, match="act_order"):
        gptq_solve(w, h, args, GPTQOptions(act_order=True))


def test_args_validation():
    assert args_of("q4_1").symmetric is False and args_of("q4_0").symmetric is True
    assert args_of("q4_0").group_size == 32 and args_of("q8_0").bits == 8
    with pytest.raises(SchemeError, match="blocks of 32"):
        WeightArgs(format="q4_0", bits=4, group_size=64)
    with pytest.raises(SchemeError, match="asymmetric"):
        WeightArgs(format="q4_1", bits=4, group_size=32, symmetric=True)
    with pytest.raises(SchemeError, match="symmetric only"):
        WeightArgs(format="q5_0", bits=5, group_size=32, symmetric=False)
    with pytest.raises(SchemeError, match="has 4 bits"):
        WeightArgs(format="q4_0", bits=5, group_size=32)


def test_overflowing_step_is_refused():
    w = torch.zeros(2, 32)
    w[0, 0] = 1e6  # 1e6 / 8 > float16's 65504
    with pytest.raises(SchemeError, match="overflows float16"):
        NUMBER_FORMATS.get("q4_0").quantize(w, args_of("q4_0"))
