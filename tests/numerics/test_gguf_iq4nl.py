"""The iq4_nl GGUF grid against the ``gguf`` package: its table and block size are llama.cpp's,
its dequantizer reads mpq's block bytes back to mpq's dequantized weights bit for bit (RTN and
GPTQ codes), the indices are the nearest table values for the stored step, and the step search
beats putting the largest weight on the table's end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpq.errors import SchemeError
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.format import NUMBER_FORMATS
from mpq.numerics.gguf_iq4nl import KVALUES
from mpq.quantizers.gptq_options import GPTQOptions
from mpq.quantizers.gptq_solve import gptq_solve

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

FMT = NUMBER_FORMATS.get("iq4_nl")
ARGS = WeightArgs(format="iq4_nl", **FMT.implied_weights({}))
QTYPE = GGMLQuantizationType.IQ4_NL


def weight(seed: int = 0, shape=(24, 256)) -> torch.Tensor:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :32] = 0  # an all-zero block
    w[1, 40] = -0.9  # a negative extreme
    w[2, 70] = 0.9  # a positive one (beyond the table's shorter end)
    w[3, 96:128] = 0.25  # a constant block
    return w


def gguf_dequant(rows: torch.Tensor) -> np.ndarray:
    return quants.dequantize(rows.numpy(), QTYPE)


def test_facts_are_the_gguf_packages():
    assert KVALUES == tuple(quants.IQ4_NL.kvalues)
    assert gguf.GGML_QUANT_SIZES[QTYPE] == (FMT.block, FMT.type_size) == (32, 18)
    assert ARGS.bits == 4 and ARGS.symmetric and ARGS.group_size == 32
    assert FMT.ideal_bits(ARGS, (8, 64)) == 4.5
    with pytest.raises(SchemeError, match="blocks of 32"):
        WeightArgs(format="iq4_nl", bits=4, group_size=64)


def test_rtn_bytes_dequantize_bit_for_bit_in_gguf():
    qw = FMT.quantize(weight(), ARGS)
    rows = FMT.encode(qw)["blocks"]
    assert tuple(rows.shape) == (24, 256 // 32 * 18) and rows.dtype == torch.uint8
    ref = gguf_dequant(rows)
    assert ref.tobytes() == qw.dequantize().numpy().tobytes()  # -0.0 vs 0.0 too


def test_block_bytes_round_trip_zero_blocks_and_extremes():
    w = weight(2)
    qw = FMT.quantize(w, ARGS)
    back = FMT.decode(FMT.encode(qw), ARGS, qw.shape)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale)
    assert back.zero is None and int(qw.codes.max()) <= 15
    deq = qw.dequantize()
    assert torch.equal(deq[0, :32], torch.zeros(32))  # all-zero block: d = 0
    assert float(qw.scale[0, 0]) == 0.0
    assert bool(torch.isfinite(deq).all())
    assert abs(float(deq[1, 40]) + 0.9) < 0.9 * 0.02
    assert abs(float(deq[2, 70]) - 0.9) < 0.9 * 0.02
    assert torch.allclose(deq[3, 96:128], torch.full((32,), 0.25), rtol=2e-3)


def test_codes_are_the_nearest_table_values_for_the_stored_step():
    w = weight(5)
    qw = FMT.quantize(w, ARGS)
    assert torch.equal(qw.scale, qw.scale.to(torch.float16).to(torch.float32))
    d = qw.scale.repeat_interleave(32, dim=1)
    table = torch.tensor(KVALUES, dtype=torch.float32)
    all_err = (w.unsqueeze(-1) - d.unsqueeze(-1) * table).abs()  # [N, K, 16]
    ours = (w - qw.dequantize()).abs()
    assert bool((ours <= all_err.amin(-1) + 1e-7).all())


def test_step_search_beats_the_table_end_step_and_q4_0():
    """The searched step has a lower squared error than the plain one (largest weight on
    −127), and the non-uniform table a lower one than q4_0's uniform grid, on Gaussian rows."""
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(7)) * 0.02
    blocks = w.reshape(64, 16, 32)
    m = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    d_end = (m / -127).to(torch.float16).to(torch.float32)
    plain = FMT.values_of(FMT.codes_of(blocks, d_end), d_end).reshape(64, 512)
    searched = FMT.quantize(w, ARGS).dequantize()
    q4_0 = NUMBER_FORMATS.get("q4_0")
    uniform = q4_0.quantize(w, WeightArgs(format="q4_0", **q4_0.implied_weights({})))

    def err(x):
        return float(((x - w) ** 2).sum())

    assert err(searched) < 0.95 * err(plain)
    assert err(searched) < 0.9 * err(uniform.dequantize())
    # never worse block by block than the plain step (it is among those refitted)
    per_block = ((searched - w) ** 2).reshape(64, 16, 32).sum(-1)
    assert bool((per_block <= ((plain - w) ** 2).reshape(64, 16, 32).sum(-1) * 1.001).all())


def test_gptq_codes_dequantize_bit_for_bit_in_gguf():
    w = weight(3, (16, 128))
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(4))
    x[:, :8] *= 10  # uneven inputs, so GPTQ differs from RTN
    h = 2 * x.t() @ x / x.shape[0]
    res = gptq_solve(w, h, ARGS, GPTQOptions())
    qw = QuantizedWeight(args=ARGS, shape=(16, 128), codes=res.codes, scale=res.scale,
                         zero=res.zero)
    assert res.zero is None
    assert torch.equal(qw.dequantize(), res.q)
    assert gguf_dequant(FMT.encode(qw)["blocks"]).tobytes() == res.q.numpy().tobytes()

    def loss(q):
        d = w - q
        return float(torch.einsum("nk,kl,nl->", d, h, d))

    assert loss(res.q) < loss(FMT.quantize(w, ARGS).dequantize())
    static = gptq_solve(w, h, ARGS, GPTQOptions(static_groups=True))
    assert torch.equal(static.scale, FMT.quantize(w, ARGS).scale)  # steps of the original rows
    with pytest.raises(SchemeError, match="act_order"):
        gptq_solve(w, h, ARGS, GPTQOptions(act_order=True))


def test_overflowing_step_is_refused():
    w = torch.zeros(2, 32)
    w[0, 0] = 1e7  # 1e7 / 127 > float16's 65504
    with pytest.raises(SchemeError, match="overflows float16"):
        FMT.quantize(w, ARGS)
