"""Clipping search for the ``int`` grid: shrink each scale's range where that lowers the error.

Min-max scales (:func:`mpq.numerics.int_grid.int_params`) spend grid points on rare outliers.
:func:`searched_int_params` tries ranges shrunk by factors ``1, 1 − step, …, min_shrink`` (range
[lo, hi] → [f·lo, f·hi], then the usual symmetric/asymmetric formula) and keeps, per scale, the
factor with the smallest error Σ_j c_j·(w_j − x̂_j)² over the scale's elements, where ``c`` [K]
weights the input columns (GPTQ passes diag H, so the error is the layer-output error of the
rounded weights under a diagonal Hessian; None weights every column 1).  Factor 1 is tried first
and only a strictly smaller error replaces it, so the result is never worse than min-max on this
measure.  Tensor, channel and consecutive-group granularities.
"""
from __future__ import annotations

import torch

from mpq.numerics.int_grid import (_grouped, int_range, rounded_scale, symmetric_divisor,
                                     symmetric_extent)
from mpq.numerics.args import WeightArgs


def _params_at(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, factor: float,
               args: WeightArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, signed zero as fp32 or None) for ranges [factor·lo, factor·hi]."""
    qmin, qmax = int_range(args.bits)
    if args.symmetric:  # hi: the symmetric extent (absmax, or full_range's signed extreme)
        return rounded_scale(hi * factor / symmetric_divisor(args), args), None
    scale = rounded_scale((hi - lo) * factor / (qmax - qmin), args)
    return scale, torch.round(qmin - lo * factor / scale).clamp(qmin, qmax)


def _error(v: torch.Tensor, c: torch.Tensor | None, scale: torch.Tensor,
           zero: torch.Tensor | None, args: WeightArgs) -> torch.Tensor:
    """Σ_j c_j (v − x̂)² over the last dim of ``v`` [A, G, g] for params [A, G]."""
    qmin, qmax = int_range(args.bits)
    s = scale.unsqueeze(-1)
    x = v / s
    if zero is not None:
        x = x + zero.unsqueeze(-1)
        q = torch.round(x).clamp_(qmin, qmax).sub_(zero.unsqueeze(-1))
    else:
        q = torch.round(x).clamp_(qmin, qmax)
    d = q.mul_(s).sub_(v).square_()
    if c is not None:
        d.mul_(c)
    return d.sum(dim=-1)


def searched_int_params(w: torch.Tensor, args: WeightArgs, col_weight: torch.Tensor | None = None,
                        *, min_shrink: float = 0.7, steps: int = 16
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero for ``w`` [N, K] like ``int_params``, with each range shrunk by the best of
    ``steps`` factors evenly spaced from 1 down to ``min_shrink`` (see the module docstring).

    ``col_weight`` [K] (≥ 0) weights the error of each input column.
    """
    n, k = w.shape
    v = _grouped(w.to(torch.float32), args)
    c = None
    if col_weight is not None:
        c = col_weight.to(device=w.device, dtype=torch.float32).reshape(1, k)
        c = _grouped(c.expand(n, k) if args.granularity == "tensor" else c, args)
    if args.symmetric:
        lo, hi = None, symmetric_extent(v, args)
    else:
        lo, hi = v.amin(dim=-1).clamp(max=0), v.amax(dim=-1).clamp(min=0)
    best_s, best_z = _params_at(v, lo, hi, 1.0, args)
    best_err = _error(v, c, best_s, best_z, args)
    for i in range(1, steps):
        factor = 1.0 - (1.0 - min_shrink) * i / (steps - 1)
        s, z = _params_at(v, lo, hi, factor, args)
        err = _error(v, c, s, z, args)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    if best_z is None:
        return best_s, None
    return best_s, (best_z + (1 << (args.bits - 1))).to(torch.int32)
