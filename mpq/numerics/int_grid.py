"""Integer grid ``int`` (2–8 bits): round-to-nearest with tensor, channel or group scales.

Semantics are those of /work/shared/docs/FORMATS.md ("Integer math"), i.e. compressed-tensors'
``calculate_qparams`` / ``_quantize`` / ``_dequantize``:

- signed range q ∈ [q_min, q_max] = [−2^(b−1), 2^(b−1)−1];
- symmetric: scale = absmax / ((q_max − q_min)/2), zero 0;
- asymmetric: lo = min(x_min, 0), hi = max(x_max, 0), scale = (hi − lo)/(q_max − q_min),
  zero = round(q_min − lo/scale) (clamped to the range);
- q = clamp(round(x/scale + zero)), torch.round (half to even); x̂ = (q − zero)·scale.

Storage (see :class:`mpq.numerics.base.QuantizedWeight`): codes are offset-binary
u = q + 2^(b−1) as uint8, zeros int32 in the same unsigned domain (None when symmetric, meaning the
implicit 2^(b−1)).  A zero scale (all-zero group) is replaced by fp32 eps, as compressed-tensors
does, so such groups round-trip to exactly 0.  All arithmetic is fp32 whatever the input dtype.

Note that the symmetric grid is not clipped at absmax: x = −absmax lands on q_min, so |x̂| can
exceed absmax by scale/2.  Every element is reconstructed within scale/2 (plus fp32 rounding).

:func:`int_params`, :func:`int_quantize_codes` and :func:`int_dequantize_codes` are pure functions
of an [N, k] slice so that GPTQ can call them group by group / column by column.
"""
from __future__ import annotations

import torch

from mpq.errors import SchemeError
from mpq.numerics.base import NUMBER_FORMATS, QuantizedWeight
from mpq.numerics.args import WeightArgs


def int_range(bits: int) -> tuple[int, int]:
    """(q_min, q_max) of the signed b-bit grid."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def prepare_weight(weight: torch.Tensor, args: WeightArgs, fmt: str) -> torch.Tensor:
    """Validate ``weight`` [N, K] against ``args`` for number format ``fmt``; return it as fp32."""
    if args.format != fmt:
        raise SchemeError(f"the '{fmt}' number format was given args for '{args.format}'")
    args.check_shape(tuple(weight.shape), where=f"{fmt} weight")
    if not weight.is_floating_point():
        raise SchemeError(f"{fmt} weight must be floating point, got {weight.dtype}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise SchemeError(f"{fmt} weight {tuple(w.shape)} has {bad} NaN/inf values",
                          hint="the source weights or a preceding transform are broken")
    return w


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """Replace zero scales by fp32 eps (compressed-tensors convention) so x/scale stays finite."""
    eps = torch.finfo(torch.float32).eps
    return torch.where(scale == 0, torch.full_like(scale, eps), scale)


def _grouped(w: torch.Tensor, args: WeightArgs) -> torch.Tensor:
    """View ``w`` [N, k] as [N or 1, G, g] following ``args.granularity``."""
    n, k = w.shape
    if args.granularity == "tensor":
        return w.reshape(1, 1, n * k)
    if args.granularity == "channel":
        return w.reshape(n, 1, k)
    if k % args.group_size:
        raise SchemeError(f"group_size {args.group_size} does not divide the slice width {k}")
    return w.reshape(n, k // args.group_size, args.group_size)


def int_params(w: torch.Tensor, args: WeightArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero for the slice ``w`` [N, k] under ``args``.

    Returns ``scale`` fp32 [1, 1] (tensor), [N, 1] (channel) or [N, k/g] (group), and ``zero``
    int32 of the same shape in the unsigned domain, or None when symmetric.
    """
    if w.dim() != 2:
        raise SchemeError(f"int_params expects a 2-D slice, got shape {tuple(w.shape)}")
    qmin, qmax = int_range(args.bits)
    v = _grouped(w.to(torch.float32), args)
    if args.symmetric:
        amax = v.abs().amax(dim=-1)
        return safe_scale(amax / ((qmax - qmin) / 2)), None
    lo = v.amin(dim=-1).clamp(max=0)
    hi = v.amax(dim=-1).clamp(min=0)
    scale = safe_scale((hi - lo) / (qmax - qmin))
    zero_q = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return scale, (zero_q + (1 << (args.bits - 1))).to(torch.int32)


def _per_column(t: torch.Tensor, k: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Broadcastable [N or 1, k] view of per-group params ``t`` [N or 1, G]."""
    g = t.shape[1]
    if g_idx is not None and g > 1:
        return t[:, g_idx.long()]
    if g in (1, k):
        return t
    if k % g:
        raise SchemeError(f"{g} groups do not divide the input dimension {k}")
    return t.repeat_interleave(k // g, dim=1)


def int_quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero_u: torch.Tensor | None,
                       bits: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Unsigned codes uint8 [N, k] of ``w`` [N, k] on the grid (scale, zero_u).

    ``scale``/``zero_u`` are [N or 1, G] with G dividing k (consecutive groups) or, with ``g_idx``
    int [k], indexed per column.  ``zero_u`` None means symmetric.
    """
    qmin, qmax = int_range(bits)
    off = 1 << (bits - 1)
    k = w.shape[1]
    x = w.to(torch.float32) / _per_column(scale.to(torch.float32), k, g_idx)
    if zero_u is not None:  # add the signed zero, as the reference does
        x = x + (_per_column(zero_u, k, g_idx).to(torch.int32) - off).to(torch.float32)
    q = torch.round(x).clamp_(qmin, qmax)
    return (q + off).to(torch.uint8)


def int_dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero_u: torch.Tensor | None,
                         bits: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 x̂ = (u − zero_u)·scale for codes [N, k]; ``zero_u`` None means 2^(b−1)."""
    k = codes.shape[1]
    u = codes.to(torch.float32)
    if zero_u is None:
        u = u - float(1 << (bits - 1))
    else:
        u = u - _per_column(zero_u, k, g_idx).to(torch.float32)
    return u * _per_column(scale.to(torch.float32), k, g_idx)


class IntGrid:
    """The ``int`` number format (stateless)."""

    name = "int"

    def quantize(self, weight: torch.Tensor, args: WeightArgs) -> QuantizedWeight:
        w = prepare_weight(weight, args, self.name)
        scale, zero = int_params(w, args)
        codes = int_quantize_codes(w, scale, zero, args.bits)
        return QuantizedWeight(args=args, shape=tuple(w.shape), codes=codes, scale=scale,
                               zero=zero)

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return int_dequantize_codes(qw.codes, qw.scale, qw.zero, qw.args.bits,
                                    qw.g_idx).to(dtype)


INT_GRID = NUMBER_FORMATS.register("int")(IntGrid())
