"""NF4 grid ``nf4``: the bitsandbytes / QLoRA 4-bit NormalFloat code (Dettmers et al. 2023).

- Code table: bitsandbytes ``get_4bit_type("nf4")`` (quantiles of N(0, 1) normalised to [−1, 1],
  exact 0 included), copied value for value.
- Blocks of 64 consecutive input columns within a row (``group_size`` 64, enforced by WeightArgs);
  ``scale`` = fp32 block absmax [N, K/64]; code = nearest table entry of w/absmax, with decision
  boundaries at the fp32 midpoints and a value exactly on a midpoint going to the lower entry (as
  bnb's kernel: ``x > midpoint`` picks the upper entry).
- Double quantization follows the bitsandbytes *layout idea* (absmax minus its mean, 8-bit codes in
  blocks of 256 over the flattened absmax, one fp32 scale per block, one fp32 offset) but uses the
  linear symmetric int8 grid of :mod:`mpq.numerics.int_grid` (codes stored offset-binary uint8),
  NOT bnb's dynamic 8-bit map, so it is not bit-for-bit bnb.  ``scale`` then holds the *dequantized*
  absmax and the 4-bit codes are chosen against it, so dequantization is one code path.

Native tensors (local keys): ``qweight`` int32 [N, K/8] (the 4-bit table indices packed by
:func:`mpq.numerics.packing.pack_rows`); ``scale`` fp32 [N, K/64] block absmax, or with double
quant ``absmax_codes`` uint8 [N·K/64], ``absmax_scale`` fp32 [ceil(N·K/64/256)] and
``absmax_offset`` fp32 [1], from which :func:`double_dequantize` rebuilds the absmax the quantizer
used.  Neither compressed-tensors nor GPTQ v1 can store nf4.  GPTQ: :class:`Nf4Columns` (not with
double quant); AWQ may clip it.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping

import torch

from mpq.numerics.base import QuantizedWeight
from mpq.errors import SchemeError
from mpq.numerics.int_grid import int_params, int_quantize_codes, prepare_weight
from mpq.numerics.args import WeightArgs
from mpq.numerics.format import NumberFormat, ClipSearch
from mpq.numerics.mappings import NotExpressible
from mpq.numerics.packing import pack_rows, packed_width, unpack_rows
from mpq.numerics.stored import FLOAT_SCALES, take

NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_BLOCK = 64
DQ_BLOCK = 256
DQ_BITS = 8


@functools.cache
def _dq_args() -> WeightArgs:
    """The absmax codes' grid (built on first use: the int format registers after this import)."""
    return WeightArgs(format="int", bits=DQ_BITS, symmetric=True, granularity="channel",
                      group_size=None)


def nf4_table(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values as fp32."""
    return torch.tensor(NF4_TABLE, dtype=torch.float32, device=device)


def nf4_nearest(x: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest NF4 entry for each element of ``x`` (normalised values)."""
    t = nf4_table(x.device)
    mid = (t[1:] + t[:-1]) / 2
    return torch.bucketize(x.to(torch.float32).contiguous(), mid, right=False).to(torch.uint8)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat block absmax [M] → (codes uint8 [M], scale fp32 [ceil(M/256)], offset fp32 [1])."""
    a = absmax.reshape(-1).to(torch.float32)
    m = a.numel()
    offset = a.mean().reshape(1)
    nb = math.ceil(m / DQ_BLOCK)
    c = torch.zeros(nb * DQ_BLOCK, dtype=torch.float32, device=a.device)
    c[:m] = a - offset
    c = c.reshape(nb, DQ_BLOCK)
    scale, _ = int_params(c, _dq_args())
    codes = int_quantize_codes(c, scale, None, DQ_BITS).reshape(-1)[:m]
    return codes, scale.reshape(-1), offset


def double_dequantize(codes: torch.Tensor, scale: torch.Tensor,
                      offset: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`double_quantize`: fp32 absmax [M], clamped at 0 (absmax is never < 0)."""
    m = codes.numel()
    s = scale.to(torch.float32).reshape(-1).repeat_interleave(DQ_BLOCK)[:m]
    half = float(1 << (DQ_BITS - 1))
    c = (codes.reshape(-1).to(torch.float32) - half) * s
    return (c + offset.to(torch.float32).reshape(1)).clamp_min(0)


class Nf4Columns:
    """GPTQ's nf4 grid (:class:`mpq.numerics.format.ColumnGrid`): per-block absmax set at each
    block's first column (or, with static groups, from the original weights up front)."""

    act_order = False
    static_act_order = False
    clip_search = False

    @classmethod
    def check(cls, args: WeightArgs) -> None:
        if args.double_quant:
            raise SchemeError("gptq does not support nf4 with double_quant",
                              hint="set double_quant: false, or use algorithm rtn")

    def __init__(self, args: WeightArgs, w0: torch.Tensor, num_groups: int, dynamic: bool,
                 clip: ClipSearch | None = None):
        n, k = w0.shape
        self.table = nf4_table(w0.device)
        self.mid = (self.table[1:] + self.table[:-1]) / 2
        self.absmax = torch.empty((num_groups, n), dtype=torch.float32, device=w0.device)
        self.div = torch.empty_like(self.absmax)
        self.codes = torch.empty((k, n), dtype=torch.uint8, device=w0.device)
        if not dynamic:
            gs = args.group_size
            for g in range(num_groups):
                self.set_group(g, w0[:, g * gs:(g + 1) * gs])

    def set_group(self, g: int, cols: torch.Tensor) -> None:
        a = cols.abs().amax(dim=1)
        self.absmax[g] = a
        self.div[g] = torch.where(a > 0, a, torch.ones_like(a))

    def column(self, p: int, c: int, g: int, w: torch.Tensor) -> torch.Tensor:
        idx = torch.bucketize(w / self.div[g], self.mid, right=False)
        self.codes[p] = idx
        return self.table[idx] * self.absmax[g]

    def params(self) -> tuple[torch.Tensor, None]:
        return self.absmax.t().contiguous(), None


class Nf4Grid(NumberFormat):
    """The ``nf4`` number format (stateless)."""

    name = "nf4"
    bits = 4
    block = NF4_BLOCK
    double_quant = True
    awq_clip = True
    gptq_columns = Nf4Columns
    compressed_tensors = NotExpressible("nf4 weights have no compressed-tensors format mpq writes")
    gptq_v1 = NotExpressible("nf4 weights (GPTQ stores int codes)")

    def quantize(self, weight: torch.Tensor, args: WeightArgs) -> QuantizedWeight:
        w = prepare_weight(weight, args, self.name)
        n, k = w.shape
        blocks = w.reshape(n, k // NF4_BLOCK, NF4_BLOCK)
        absmax = blocks.abs().amax(dim=-1)
        extras: dict[str, torch.Tensor] = {}
        if args.double_quant:
            codes8, s8, off = double_quantize(absmax)
            absmax = double_dequantize(codes8, s8, off).reshape(absmax.shape)
            extras = {"absmax_codes": codes8, "absmax_scale": s8, "absmax_offset": off}
        div = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        codes = nf4_nearest(blocks / div.unsqueeze(-1)).reshape(n, k)
        return QuantizedWeight(args=args, shape=(n, k), codes=codes, scale=absmax, extras=extras)

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = qw.codes.shape
        vals = nf4_table(qw.codes.device)[qw.codes.long()].reshape(n, -1, NF4_BLOCK)
        return (vals * qw.scale.to(torch.float32).unsqueeze(-1)).reshape(n, k).to(dtype)


    def encode(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        out = {"qweight": pack_rows(qw.codes.to(torch.uint8), 4)}
        if qw.args.double_quant:
            extras = qw.extras
            out["absmax_codes"] = extras["absmax_codes"].to(torch.uint8).reshape(-1).contiguous()
            out["absmax_scale"] = extras["absmax_scale"].to(torch.float32).reshape(-1).contiguous()
            out["absmax_offset"] = extras["absmax_offset"].to(torch.float32).reshape(1).contiguous()
        else:
            out["scale"] = qw.scale.to(torch.float32).contiguous()
        return out

    def decode(self, tensors: Mapping[str, torch.Tensor], args: WeightArgs,
               shape: tuple[int, int], prefix: str = "") -> QuantizedWeight:
        n, k = shape
        qweight = take(tensors, "qweight", (n, packed_width(k, 4)), (torch.int32,), prefix)
        codes = unpack_rows(qweight, 4, k)
        g = k // NF4_BLOCK
        if not args.double_quant:
            scale = take(tensors, "scale", (n, g), FLOAT_SCALES, prefix).to(torch.float32)
            return QuantizedWeight(args=args, shape=shape, codes=codes, scale=scale)
        m = n * g
        extras = {
            "absmax_codes": take(tensors, "absmax_codes", (m,), (torch.uint8,), prefix),
            "absmax_scale": take(tensors, "absmax_scale", (math.ceil(m / DQ_BLOCK),),
                                 (torch.float32,), prefix),
            "absmax_offset": take(tensors, "absmax_offset", (1,), (torch.float32,), prefix),
        }
        scale = double_dequantize(extras["absmax_codes"], extras["absmax_scale"],
                                  extras["absmax_offset"]).reshape(n, g)
        return QuantizedWeight(args=args, shape=shape, codes=codes, scale=scale, extras=extras)

    def native_bytes(self, args: WeightArgs, shape: tuple[int, int], *,
                     act_order: bool = False) -> int:
        n, k = shape
        m = n * (k // NF4_BLOCK)
        codes = 4 * n * packed_width(k, 4)
        return codes + (m + 4 * math.ceil(m / DQ_BLOCK) + 4 if args.double_quant else 4 * m)

    def ideal_bits(self, args: WeightArgs, shape: tuple[int, int], *,
                   act_order: bool = False) -> float:
        n, k = shape
        m = n * (k // NF4_BLOCK)
        side = 8 * m + 32 * math.ceil(m / DQ_BLOCK) + 32 if args.double_quant else 32 * m
        return (4 * n * k + side) / (n * k)


NF4 = Nf4Grid()
