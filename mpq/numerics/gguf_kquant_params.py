"""How mpq chooses a K-quant super-block's parameters (mpq.numerics.gguf_kquants): min-max per
sub-block, the sub-block steps (and mins) rounded to integers against the super-block's float16
scale, then a small search of each sub-block's integers around that choice for the least squared
error.  Simpler than llama.cpp's ``make_qkx2_quants`` / ``make_qx_quants`` (which search each
sub-block's float range before the integers are fixed, optionally weighted by an importance
matrix); the codes are always the nearest ones for the stored parameters.

- With a min (q4_k, q5_k: L = 2^b − 1 levels): a sub-block's range [lo, hi] with lo = min(x, 0)
  and hi = max(x) gives step s = (hi − lo)/L and offset o = −lo ≥ 0 (x̂ = s·q − o).  Then
  d = fp16(max s / 63), sc = round(s / d) ∈ [0, 63]; dmin = fp16(max o / 63),
  m = round(o / dmin) ∈ [0, 63].
- Symmetric (q6_k: q ∈ [−32, 31], int8 sc; q3_k: q ∈ [−4, 3], sc ∈ [−32, 31]): as llama.cpp's
  legacy q4_0, a sub-block's element v of largest magnitude (sign included) lands on the grid's
  lone extra negative level: s = v / −2^(b−1).  The super-block's d puts the s of largest
  magnitude on the scales' extra negative level: d = fp16(s_max / −128) (q6_k) or
  fp16(s_max / −32) (q3_k), sc = round(s / d) clamped to the scales' range.
- The search (d and dmin stay): each sub-block tries sc + {0, −1, −2, −3, +1} × m + {0, −1, +1,
  −2, +2} (with a min; 25 pairs) or sc + {0, −1, +1, −2, +2} (symmetric), clamped to their
  ranges, with the nearest codes for each, and keeps the pair of least Σ (x̂ − x)² — the min-max
  choice unless another is strictly better, so no sub-block's error grows.  GPTQ's clipping
  search weights each element's squared error by its column's error weight (diag H, what an
  importance matrix gives llama.cpp's search).  A smaller scale
  clips a sub-block's extremes for finer steps elsewhere.

Rounding is to nearest, ties to even (llama.cpp's ``nearest_int``).  A d or dmin of 0 (an
all-zero super-block) gives integer scales 0, and x̂ = 0.  A d beyond float16's range is refused.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from mpq.numerics.gguf_legacy import _fp16

SCALE_LEVELS = 63  # 6-bit sub-block scales and mins of q4_k / q5_k
# integer moves of a sub-block's scale (and min) tried around the min-max choice (first: none)
MOVES_SCALE = torch.tensor([0.0, -1.0, -2.0, -3.0, 1.0])
MOVES_MIN = torch.tensor([0.0, -1.0, 1.0, -2.0, 2.0])
MOVES_SYM = torch.tensor([0.0, -1.0, 1.0, -2.0, 2.0])
ROW_CHUNK = 2048  # super-blocks searched at once


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


def _codes(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Nearest codes of ``x`` / ``step`` in [lo, hi] (0 where the step is 0), fp32."""
    safe = torch.where(step == 0, torch.ones_like(step), step)
    q = torch.round(x / safe).clamp_(lo, hi)
    return torch.where(step == 0, torch.zeros_like(q), q)


def _pick(err: torch.Tensor, *candidates: torch.Tensor) -> list[torch.Tensor]:
    """The candidates [..., C] at the index of the least ``err`` [..., C] (the first on ties:
    candidate 0, the min-max choice, unless another is strictly better)."""
    idx = err.argmin(dim=-1, keepdim=True)
    return [c.gather(-1, idx).squeeze(-1) + 0.0 for c in candidates]


def _rows(sub: torch.Tensor, fn, *per_row: torch.Tensor) -> list[torch.Tensor]:
    """``fn`` over chunks of the flattened leading dims of ``sub`` [..., S, n] (bounded memory);
    ``per_row`` tensors share those leading dims."""
    lead = sub.shape[:-2]
    flat = sub.reshape(-1, *sub.shape[-2:])
    rest = [t.reshape(flat.shape[0], *t.shape[len(lead):]) for t in per_row]
    outs = [fn(flat[i:i + ROW_CHUNK], *(t[i:i + ROW_CHUNK] for t in rest))
            for i in range(0, flat.shape[0], ROW_CHUNK)]
    return [torch.cat(parts).reshape(*lead, *parts[0].shape[1:]) for parts in zip(*outs)]


def _weights(sub: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The error weights of the elements of ``sub`` [..., S, n] as per-row arguments of the
    search: none without ``weight`` (unweighted), else one tensor shaped like ``sub``."""
    return () if weight is None else (weight.expand_as(sub).contiguous(),)


def _weighted(err: torch.Tensor, c: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``err`` times the error weights ``c`` (broadcast), or ``err`` itself without them."""
    return err * c[0] if c else err


def asym_params(sub: torch.Tensor, levels: int, name: str,
                weight: torch.Tensor | None = None) -> KParams:
    """Parameters of sub-blocks ``sub`` [..., S, n] on a grid of ``levels`` steps with a min;
    ``weight`` (broadcast to ``sub``) weights each element's squared error in the search."""
    lo = sub.amin(dim=-1).clamp(max=0)
    s = (sub.amax(dim=-1) - lo) / levels
    o = -lo
    d = _fp16(s.amax(dim=-1) / SCALE_LEVELS, f"{name} scale")
    dmin = _fp16(o.amax(dim=-1) / SCALE_LEVELS, f"{name} min scale")
    sc = _ints(s, d, 0, SCALE_LEVELS)
    m = _ints(o, dmin, 0, SCALE_LEVELS)

    def search(x, d, sc, dmin, m, *c):  # x, c [R, S, n]; d, dmin [R]; sc, m [R, S]
        sc_c = (sc.unsqueeze(-1) + MOVES_SCALE).clamp(0, SCALE_LEVELS)  # [R, S, A]
        m_c = (m.unsqueeze(-1) + MOVES_MIN).clamp(0, SCALE_LEVELS)  # [R, S, B]
        step = (d[:, None, None] * sc_c)[..., :, None, None]  # [R, S, A, 1, 1]
        off = (dmin[:, None, None] * m_c)[..., None, :, None]  # [R, S, 1, B, 1]
        x = x[:, :, None, None, :]
        c = tuple(t[:, :, None, None, :] for t in c)
        err = _weighted((step * _codes(x + off, step, 0, levels) - off - x).square(), c).sum(-1)
        a, b = sc_c.shape[-1], m_c.shape[-1]
        pairs = (sc_c.unsqueeze(-1).expand(*sc_c.shape, b).flatten(-2),
                 m_c.unsqueeze(-2).expand(*m_c.shape[:-1], a, b).flatten(-2))
        return _pick(err.flatten(-2), *pairs)

    sc, m = _rows(sub, search, d, sc, dmin, m, *_weights(sub, weight))
    return KParams(d.unsqueeze(-1) * sc, dmin.unsqueeze(-1) * m, _stored(d, sc), _stored(dmin, m))


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along the last dim (its sign kept, first on ties)."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def sym_params(sub: torch.Tensor, qneg: int, scale_neg: int, name: str,
               weight: torch.Tensor | None = None) -> KParams:
    """Parameters of sub-blocks ``sub`` [..., S, n] on the grid [−qneg, qneg − 1] with integer
    scales in [−scale_neg, scale_neg − 1]; ``weight`` as :func:`asym_params`'."""
    s = _signed_max(sub) / -qneg
    d = _fp16(_signed_max(s) / -scale_neg, f"{name} scale")
    sc = _ints(s, d, -scale_neg, scale_neg - 1)

    def search(x, d, sc, *c):  # x, c [R, S, n]; d [R]; sc [R, S]
        sc_c = (sc.unsqueeze(-1) + MOVES_SYM).clamp(-scale_neg, scale_neg - 1)  # [R, S, A]
        step = (d[:, None, None] * sc_c).unsqueeze(-1)  # [R, S, A, 1]
        x = x.unsqueeze(-2)
        c = tuple(t.unsqueeze(-2) for t in c)
        err = _weighted((step * _codes(x, step, -qneg, qneg - 1) - x).square(), c).sum(-1)
        return _pick(err, sc_c)

    (sc,) = _rows(sub, search, d, sc, *_weights(sub, weight))
    return KParams(d.unsqueeze(-1) * sc, None, _stored(d, sc), None)
