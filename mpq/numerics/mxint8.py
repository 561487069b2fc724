"""OCP microscaling ``mxint8`` (OCP Microscaling Formats (MX) v1.0): INT8 elements, one shared
E8M0 power-of-two scale per block of 32 consecutive input columns of a row.

Facts of the spec: an element is an 8-bit two's complement integer q with an implicit scale of
2^−6 (value q/64, so [−2, 1 63/64]); the shared scale is X = 2^(E − 127) with E the E8M0 biased
exponent (255 is NaN); x̂ = X · q/64.  Conversion follows the spec's: X = 2^(floor(log2 a) − emax)
with a the block absmax and emax = 0 for INT8, i.e. a / X ∈ [1, 2); E is clamped to [0, 254] and
an all-zero block gets E = 0.  Choices made here: codes q = clamp(round(64 · w / X), −127, 127)
with round half to even, the symmetric range (−128 is never written, but read as −2 when a
stored artifact holds it).  All arithmetic is fp32; X and q/64 are exact, so the result does not
depend on the input dtype.

RTN error: |w − x̂| ≤ X/128 for every element, except where 64·|w|/X ≥ 127.5 (the top of
[1, 2)) saturates at 127: there |w − x̂| < X/64.

``QuantizedWeight``: ``codes`` int8 [N, K] (q); ``scale`` uint8 [N, K/32] (E).  Native tensors
(local keys): ``weight`` int8 [N, K] and ``scale`` uint8 [N, K/32].  GPTQ: :class:`Mxint8Columns`
(each block's exponent from the current weights at its first column, like nf4's absmax).
compressed-tensors (0.20) and GPTQ v1 cannot store it (the records below say why).
"""
from __future__ import annotations

from typing import Mapping

import torch

from mpq.numerics.args import WeightArgs
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.format import InOrderColumns, NumberFormat, ClipSearch
from mpq.numerics.int_grid import prepare_weight
from mpq.numerics.mappings import NotExpressible
from mpq.numerics.microscaling import (E8M0_BIAS, E8M0_NAN, MX_BLOCK, block_dequantize,
                                       block_quantize, check_e8m0, e8m0_to_float)
from mpq.numerics.stored import take

ELEM_FRACTION = 64  # the INT8 element's implicit scale 2^−6
ELEM_MAX = 127  # codes stay symmetric: −127..127


def shared_exponent(absmax: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 exponents E = floor(log2 absmax) + 127 (clamped to 0..254; 0 for absmax 0)."""
    a = absmax.to(torch.float32)
    _, exp = torch.frexp(a)  # a = m · 2^exp with m in [0.5, 1): floor(log2 a) = exp − 1
    e = (exp - 1 + E8M0_BIAS).clamp_(0, E8M0_NAN - 1)
    return torch.where(a > 0, e, torch.zeros_like(e)).to(torch.uint8)


def element_codes(y: torch.Tensor) -> torch.Tensor:
    """int8 codes of values ``y`` already divided by their block scale."""
    return torch.round(y.to(torch.float32) * ELEM_FRACTION).clamp_(-ELEM_MAX, ELEM_MAX) \
        .to(torch.int8)


def element_values(codes: torch.Tensor) -> torch.Tensor:
    """fp32 q/64 of int8 codes (exact)."""
    return codes.to(torch.float32) / ELEM_FRACTION


class Mxint8Columns(InOrderColumns):
    """GPTQ's mxint8 grid (:class:`mpq.numerics.format.ColumnGrid`): a block's exponent is set
    at its first column (with static groups, from the original weights up front)."""

    def __init__(self, args: WeightArgs, w0: torch.Tensor, num_groups: int, dynamic: bool,
                 clip: ClipSearch | None = None):
        n, k = w0.shape
        self.exp = torch.empty((num_groups, n), dtype=torch.uint8, device=w0.device)
        self.step = torch.empty((num_groups, n), dtype=torch.float32, device=w0.device)
        self.codes = torch.empty((k, n), dtype=torch.int8, device=w0.device)
        if not dynamic:
            for g in range(num_groups):
                self.set_group(g, w0[:, g * MX_BLOCK:(g + 1) * MX_BLOCK])

    def set_group(self, g: int, cols: torch.Tensor) -> None:
        self.exp[g] = shared_exponent(cols.abs().amax(dim=1))
        self.step[g] = e8m0_to_float(self.exp[g])

    def column(self, p: int, c: int, g: int, w: torch.Tensor) -> torch.Tensor:
        q = element_codes(w / self.step[g])
        self.codes[p] = q
        return element_values(q) * self.step[g]

    def params(self) -> tuple[torch.Tensor, None]:
        return self.exp.t().contiguous(), None


class Mxint8Grid(NumberFormat):
    """The ``mxint8`` number format (stateless)."""

    name = "mxint8"
    bits = 8
    block = MX_BLOCK
    gptq_columns = Mxint8Columns
    compressed_tensors = NotExpressible(
        "mxint8 weights have no compressed-tensors format (compressed-tensors 0.20 has no MX "
        "integer scheme; its E8M0-scaled formats are mxfp4, mxfp6 and mxfp8)")
    gptq_v1 = NotExpressible("mxint8 weights (GPTQ v1 stores float16 scales, which cannot hold "
                             "every E8M0 block exponent)")

    def describe(self, args: WeightArgs) -> str:
        return self.name

    def quantize(self, weight: torch.Tensor, args: WeightArgs) -> QuantizedWeight:
        w = prepare_weight(weight, args, self.name)
        codes, exp = block_quantize(w, shared_exponent, element_codes)
        return QuantizedWeight(args=args, shape=tuple(w.shape), codes=codes, scale=exp)

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return block_dequantize(qw.codes, qw.scale, element_values, dtype)

    def encode(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {"weight": qw.codes.to(torch.int8).contiguous(),
                "scale": qw.scale.to(torch.uint8).contiguous()}

    def decode(self, tensors: Mapping[str, torch.Tensor], args: WeightArgs,
               shape: tuple[int, int], prefix: str = "") -> QuantizedWeight:
        n, k = shape
        codes = take(tensors, "weight", shape, (torch.int8,), prefix)
        scale = take(tensors, "scale", (n, k // MX_BLOCK), (torch.uint8,), prefix)
        check_e8m0(scale, prefix)
        return QuantizedWeight(args=args, shape=shape, codes=codes, scale=scale)

    def native_bytes(self, args: WeightArgs, shape: tuple[int, int], *,
                     act_order: bool = False) -> int:
        n, k = shape
        return n * k + n * (k // MX_BLOCK)

    def ideal_bits(self, args: WeightArgs, shape: tuple[int, int], *,
                   act_order: bool = False) -> float:
        n, k = shape
        return (8 * n * k + 8 * n * (k // MX_BLOCK)) / (n * k)


MXINT8 = Mxint8Grid()
