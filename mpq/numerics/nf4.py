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
"""
from __future__ import annotations

import math

import torch

from mpq.numerics.base import NUMBER_FORMATS, QuantizedWeight
from mpq.numerics.int_grid import int_params, int_quantize_codes, prepare_weight
from mpq.numerics.args import NF4_BLOCK, WeightArgs

NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
DQ_BLOCK = 256
_DQ_ARGS = WeightArgs(format="int", bits=8, symmetric=True, granularity="channel", group_size=None)


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
    scale, _ = int_params(c, _DQ_ARGS)
    codes = int_quantize_codes(c, scale, None, _DQ_ARGS.bits).reshape(-1)[:m]
    return codes, scale.reshape(-1), offset


def double_dequantize(codes: torch.Tensor, scale: torch.Tensor,
                      offset: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`double_quantize`: fp32 absmax [M], clamped at 0 (absmax is never < 0)."""
    m = codes.numel()
    s = scale.to(torch.float32).reshape(-1).repeat_interleave(DQ_BLOCK)[:m]
    half = float(1 << (_DQ_ARGS.bits - 1))
    c = (codes.reshape(-1).to(torch.float32) - half) * s
    return (c + offset.to(torch.float32).reshape(1)).clamp_min(0)


class Nf4Grid:
    """The ``nf4`` number format (stateless)."""

    name = "nf4"

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


NF4 = NUMBER_FORMATS.register("nf4")(Nf4Grid())
