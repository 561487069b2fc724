"""OCP microscaling grids ``mxfp4`` (FP4 E2M1 elements) and ``mxfp8`` (FP8 E4M3 elements).

Semantics are compressed-tensors 0.20's (``calculate_qparams`` → ``generate_mx_scales`` /
``round_to_power_2`` / ``maybe_convert_from_mx_exp``, then ``fake_quantize`` with strategy group,
group_size 32, scale_dtype uint8):

- blocks of 32 consecutive input columns of a row share one E8M0 scale 2^(E − 127);
- a = block absmax, rounded to a power of two p: down to 2^floor(log2 a), except that a mantissa
  1.m ≥ 1.75 rounds up (compressed-tensors' round_to_power_2 with the E2M1 mantissa width, used
  for both element types);
- E = clamp(log2 p + 127 − floor(log2 elem_max), 0, 255) with floor(log2 elem_max) = 2 (E2M1,
  max 6) or 8 (E4M3, max 448); an all-zero block gets E = 0 (scale 2^−127);
- codes: w / 2^(E−127), clamped to ±elem_max and rounded to the element type (E2M1: see
  :mod:`mpq.numerics.fp4`; E4M3: torch's round-to-nearest-even cast); x̂ = value · 2^(E−127).

So mxfp4 clips block values whose mantissa lies in (1.5, 1.75) times the power of two to ±6, as
compressed-tensors does.  Scales are exact powers of two, so the result does not depend on the
input dtype.  The one deliberate difference: for |w| ≥ 1.75·2^127 compressed-tensors' rounding
overflows to an infinite scale; here E stays finite (at most 253).

``QuantizedWeight.scale`` holds the biased exponents E as uint8 [N, K/32], compressed-tensors'
stored ``weight_scale``; :func:`e8m0_to_float` turns them into fp32 powers of two.
"""
from __future__ import annotations

import math

import torch

from mpq.numerics.base import NUMBER_FORMATS, QuantizedWeight
from mpq.numerics.fp4 import E2M1_MAX, e2m1_decode, e2m1_encode
from mpq.numerics.int_grid import prepare_weight
from mpq.numerics.args import MX_BLOCK, WeightArgs

E8M0_BIAS = 127
E8M0_NAN = 255  # the E8M0 encoding of NaN: never produced, refused when read


def e8m0_exponent(absmax: torch.Tensor, elem_max: float) -> torch.Tensor:
    """uint8 biased exponents E of the shared scales for blocks with absmax ``absmax``."""
    a = absmax.to(torch.float32)
    mant, exp = torch.frexp(a)  # a = mant · 2^exp, mant in [0.5, 1)
    log2_p = exp - 1 + (mant >= 0.875).to(exp.dtype)  # 1.m ≥ 1.75 rounds up
    e = (log2_p + (E8M0_BIAS - math.floor(math.log2(elem_max)))).clamp_(0, E8M0_NAN)
    return torch.where(a > 0, e, torch.zeros_like(e)).to(torch.uint8)


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """fp32 2^(E − 127) of uint8 exponents, built from the bits (exact, 2^−127 included)."""
    e = e.to(torch.int32)
    bits = torch.where(e > 0, e << 23, torch.full_like(e, 1 << 22))  # E = 0: subnormal 2^−127
    return bits.view(torch.float32)


def _fp8_encode(y: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of scaled values, saturating (as :func:`mpq.numerics.fp8.fp8_codes`)."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    return y.to(torch.float32).clamp(-fmax, fmax).to(torch.float8_e4m3fn)


class MxGrid:
    """One MX number format: element encode/decode and the element type's largest value."""

    def __init__(self, name: str, elem_max: float, encode, decode):
        self.name = name
        self.elem_max = elem_max
        self._encode = encode
        self._decode = decode

    def quantize(self, weight: torch.Tensor, args: WeightArgs) -> QuantizedWeight:
        w = prepare_weight(weight, args, self.name)
        n, k = w.shape
        blocks = w.reshape(n, k // MX_BLOCK, MX_BLOCK)
        exp = e8m0_exponent(blocks.abs().amax(dim=-1), self.elem_max)
        codes = self._encode(blocks / e8m0_to_float(exp).unsqueeze(-1)).reshape(n, k)
        return QuantizedWeight(args=args, shape=(n, k), codes=codes, scale=exp)

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = qw.codes.shape
        vals = self._decode(qw.codes).reshape(n, -1, MX_BLOCK)
        return (vals * e8m0_to_float(qw.scale).unsqueeze(-1)).reshape(n, k).to(dtype)


MXFP4 = NUMBER_FORMATS.register("mxfp4")(MxGrid("mxfp4", E2M1_MAX, e2m1_encode, e2m1_decode))
MXFP8 = NUMBER_FORMATS.register("mxfp8")(
    MxGrid("mxfp8", torch.finfo(torch.float8_e4m3fn).max, _fp8_encode,
           lambda codes: codes.to(torch.float32)))
