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

Native tensors (local keys), also compressed-tensors' own (``mxfp4-pack-quantized``,
``mxfp8-quantized``; renamed ``weight_packed`` / ``weight`` / ``weight_scale``): mxfp4
``packed`` uint8 [N, K/2], the E2M1 codes two per byte
(:func:`mpq.numerics.packing.pack_nibbles`: element 2j in the low nibble of byte j); mxfp8
``weight`` float8_e4m3fn [N, K]; both ``scale`` uint8 [N, K/32] E8M0 biased exponents (255,
E8M0's NaN, is refused when read).  RTN only; GPTQ v1 cannot store them.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from mpq.errors import ArtifactError
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.fp4 import E2M1_MAX, e2m1_decode, e2m1_encode
from mpq.numerics.int_grid import prepare_weight
from mpq.numerics.args import WeightArgs
from mpq.numerics.format import NumberFormat
from mpq.numerics.mappings import CompressedTensorsMapping, NotExpressible
from mpq.numerics.packing import pack_nibbles, unpack_nibbles
from mpq.numerics.stored import take

MX_BLOCK = 32  # OCP microscaling blocks of 32 input columns

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


def check_e8m0(scale: torch.Tensor, prefix: str) -> None:
    """ArtifactError when stored E8M0 exponents hold the NaN code."""
    if scale.numel() and int(scale.max()) == E8M0_NAN:
        raise ArtifactError(f"tensor '{prefix}scale' holds the E8M0 NaN code {E8M0_NAN}",
                            hint="the artifact is damaged; re-run mpq quantize")


def block_quantize(w: torch.Tensor, exponent_of: Callable[[torch.Tensor], torch.Tensor],
                   encode: Callable[[torch.Tensor], torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K], uint8 E8M0 exponents [N, K/32]) of ``w`` [N, K]: each block of 32 inputs
    gets the exponent ``exponent_of`` gives its abs-max, and ``encode`` rounds the block
    divided by that power of two onto the element grid."""
    n, k = w.shape
    blocks = w.reshape(n, k // MX_BLOCK, MX_BLOCK)
    exp = exponent_of(blocks.abs().amax(dim=-1))
    return encode(blocks / e8m0_to_float(exp).unsqueeze(-1)).reshape(n, k), exp


def block_dequantize(codes: torch.Tensor, exp: torch.Tensor,
                     decode: Callable[[torch.Tensor], torch.Tensor],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`block_quantize`: element values times their block's 2^(E−127)."""
    n, k = codes.shape
    vals = decode(codes).reshape(n, -1, MX_BLOCK)
    return (vals * e8m0_to_float(exp).unsqueeze(-1)).reshape(n, k).to(dtype)


def _fp8_encode(y: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of scaled values, saturating (as :func:`mpq.numerics.fp8.fp8_codes`)."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    return y.to(torch.float32).clamp(-fmax, fmax).to(torch.float8_e4m3fn)


class MxGrid(NumberFormat):
    """One MX number format: element encode/decode and the element type's largest value."""

    block = MX_BLOCK

    def __init__(self, name: str, bits: int, elem_max: float,
                 encode: Callable[[torch.Tensor], torch.Tensor],
                 decode: Callable[[torch.Tensor], torch.Tensor], ct_format: str):
        """``bits`` 4: codes stored two per byte (``packed``); 8: fp8 codes (``weight``)."""
        self.name = name
        self.bits = bits
        self.elem_max = elem_max
        self._encode = encode
        self._decode = decode
        codes = ("packed", "weight_packed") if bits == 4 else ("weight", "weight")
        self.compressed_tensors = CompressedTensorsMapping(
            type="float", layout="native", format=ct_format, strategy="group",
            scale_dtype="torch.uint8", names=(("scale", "weight_scale"), codes))
        self.gptq_v1 = NotExpressible(f"{name} weights (GPTQ stores int codes)")

    def describe(self, args: WeightArgs) -> str:
        return self.name

    def quantize(self, weight: torch.Tensor, args: WeightArgs) -> QuantizedWeight:
        w = prepare_weight(weight, args, self.name)
        codes, exp = block_quantize(w, lambda absmax: e8m0_exponent(absmax, self.elem_max),
                                    self._encode)
        return QuantizedWeight(args=args, shape=tuple(w.shape), codes=codes, scale=exp)

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return block_dequantize(qw.codes, qw.scale, self._decode, dtype)

    def encode(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        out = {"scale": qw.scale.to(torch.uint8).contiguous()}
        if self.bits == 4:
            out["packed"] = pack_nibbles(qw.codes.to(torch.uint8))
        else:
            out["weight"] = qw.codes.to(torch.float8_e4m3fn).contiguous()
        return out

    def decode(self, tensors: Mapping[str, torch.Tensor], args: WeightArgs,
               shape: tuple[int, int], prefix: str = "") -> QuantizedWeight:
        n, k = shape
        scale = take(tensors, "scale", (n, k // MX_BLOCK), (torch.uint8,), prefix)
        if self.bits == 4:
            codes = unpack_nibbles(take(tensors, "packed", (n, k // 2), (torch.uint8,), prefix))
        else:
            codes = take(tensors, "weight", shape, (torch.float8_e4m3fn,), prefix)
        check_e8m0(scale, prefix)
        return QuantizedWeight(args=args, shape=shape, codes=codes, scale=scale)

    def native_bytes(self, args: WeightArgs, shape: tuple[int, int], *,
                     act_order: bool = False) -> int:
        n, k = shape
        return n * k * self.bits // 8 + n * (k // MX_BLOCK)

    def ideal_bits(self, args: WeightArgs, shape: tuple[int, int], *,
                   act_order: bool = False) -> float:
        n, k = shape
        return (self.bits * n * k + 8 * n * (k // MX_BLOCK)) / (n * k)


MXFP4 = MxGrid("mxfp4", 4, E2M1_MAX, e2m1_encode, e2m1_decode, "mxfp4-pack-quantized")
MXFP8 = MxGrid("mxfp8", 8, torch.finfo(torch.float8_e4m3fn).max, _fp8_encode,
               lambda codes: codes.to(torch.float32), "mxfp8-quantized")
