"""How mpq chooses a K-quant super-block's parameters (mpq.numerics.gguf_kquants): min-max per
sub-block, then the sub-block steps (and mins) quantized to integers against the super-block's
float16 scale.  Simpler than llama.cpp's ``make_qkx2_quants`` / ``make_qx_quants`` searches
(which move each sub-block's range to lower its squared error); the codes are then the nearest
ones for the stored parameters, so RTN error is that of the grid the parameters pick.

- With a min (q4_k, q5_k: L = 2^b − 1 levels): a sub-block's range [lo, hi] with lo = min(x, 0)
  and hi = max(x) gives step s = (hi − lo)/L and offset o = −lo ≥ 0 (x̂ = s·q − o).  Then
  d = fp16(max s / 63), sc = round(s / d) ∈ [0, 63]; dmin = fp16(max o / 63),
  m = round(o / dmin) ∈ [0, 63].
- Symmetric (q6_k: q ∈ [−32, 31], int8 sc; q3_k: q ∈ [−4, 3], sc ∈ [−32, 31]): as llama.cpp's
  legacy q4_0, a sub-block's element v of largest magnitude (sign included) lands on the grid's
  lone extra negative level: s = v / −2^(b−1).  The super-block's d puts the s of largest
  magnitude on the scales' extra negative level: d = fp16(s_max / −128) (q6_k) or
  fp16(s_max / −32) (q3_k), sc = round(s / d) clamped to the scales' range.

Rounding is to nearest, ties to even (llama.cpp's ``nearest_int``).  A d or dmin of 0 (an
all-zero super-block) gives integer scales 0, and x̂ = 0.  A d beyond float16's range is refused.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from mpq.numerics.gguf_legacy import _fp16

SCALE_LEVELS = 63  # 6-bit sub-block scales and mins of q4_k / q5_k


class KParams(NamedTuple):
    """A super-block's parameters: ``step`` fp32 [..., S] = d·sc and ``off`` = dmin·m (None
    without a min), and their stored form ``scale`` / ``zero`` [..., 1 + S] (d or dmin, then the
    integers), as :class:`~mpq.numerics.base.QuantizedWeight` holds them."""

    step: torch.Tensor
    off: torch.Tensor | None
    scale: torch.Tensor
    zero: torch.Tensor | None


def _ints(values: torch.Tensor, unit: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """round(values / unit) clamped to [lo, hi] (0 where unit is 0), fp32; never −0, which
    the stored integers cannot hold (d·(−0) and d·0 differ in sign)."""
    safe = torch.where(unit == 0, torch.ones_like(unit), unit)
    q = torch.round(values / safe.unsqueeze(-1)).clamp_(lo, hi)
    return torch.where(unit.unsqueeze(-1) == 0, torch.zeros_like(q), q) + 0.0


def _stored(unit: torch.Tensor, ints: torch.Tensor) -> torch.Tensor:
    return torch.cat([unit.unsqueeze(-1), ints], dim=-1)


def asym_params(sub: torch.Tensor, levels: int, name: str) -> KParams:
    """Parameters of sub-blocks ``sub`` [..., S, n] on a grid of ``levels`` steps with a min."""
    lo = sub.amin(dim=-1).clamp(max=0)
    s = (sub.amax(dim=-1) - lo) / levels
    o = -lo
    d = _fp16(s.amax(dim=-1) / SCALE_LEVELS, f"{name} scale")
    dmin = _fp16(o.amax(dim=-1) / SCALE_LEVELS, f"{name} min scale")
    sc = _ints(s, d, 0, SCALE_LEVELS)
    m = _ints(o, dmin, 0, SCALE_LEVELS)
    return KParams(d.unsqueeze(-1) * sc, dmin.unsqueeze(-1) * m, _stored(d, sc), _stored(dmin, m))


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along the last dim (its sign kept, first on ties)."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def sym_params(sub: torch.Tensor, qneg: int, scale_neg: int, name: str) -> KParams:
    """Parameters of sub-blocks ``sub`` [..., S, n] on the grid [−qneg, qneg − 1] with integer
    scales in [−scale_neg, scale_neg − 1]."""
    s = _signed_max(sub) / -qneg
    d = _fp16(_signed_max(s) / -scale_neg, f"{name} scale")
    sc = _ints(s, d, -scale_neg, scale_neg - 1)
    return KParams(d.unsqueeze(-1) * sc, None, _stored(d, sc), None)
