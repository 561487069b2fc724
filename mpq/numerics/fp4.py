"""FP4 E2M1 elements (OCP MX spec; used by ``mxfp4`` and ``nvfp4``): 1 sign, 2 exponent, 1
mantissa bit; magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}.

A code is the 4-bit pattern ``sign<<3 | exp<<1 | man`` as uint8 0..15, i.e. the magnitude index
0..7 (0 → 0, 1 → 0.5, ..., 7 → 6) plus 8 for negative values: the layout compressed-tensors packs
into ``weight_packed`` (``pack_fp4_to_uint8``) and vLLM reads.

Rounding is that of compressed-tensors' ``FP4_E2M1_DATA.cast_to_fp4`` after clamping to ±6:
nearest value, ties to the value with an even mantissa bit (0.25 → 0, 0.75 → 1, 1.25 → 1,
1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4).  The sign bit is set for inputs < 0, so a negative value
that rounds to 0 gets code 8 (−0) while an input −0.0 gets code 0, byte for byte what
compressed-tensors packs (``torch.sign`` then ``signbit``; its Triton kernel tests ``x < 0``).
"""
from __future__ import annotations

import torch

E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# (boundary, inclusive): a magnitude reaches the next value when it is > boundary, or >= boundary
# when the tie goes up (to the even mantissa)
_STEPS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True),
          (5.0, False))


def e2m1_table(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 values of codes 0..15 as fp32 (code 8 is −0.0)."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes of the (already scaled) values ``y``, saturating at ±6."""
    y = y.to(torch.float32)
    a = y.abs().clamp_(max=E2M1_MAX)
    idx = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
    for bound, up in _STEPS:
        idx += (a >= bound if up else a > bound).to(torch.uint8)
    return idx | ((y < 0).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of uint8 E2M1 codes."""
    return e2m1_table(codes.device)[codes.long()]
