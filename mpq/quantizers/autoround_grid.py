"""One weight on the ``int`` grid with learnable rounding offsets and clipping factors.

The parametrisation of SignRound / AutoRound (Cheng et al., "Optimize Weight Rounding via Signed
Gradient Descent for the Quantization of LLMs", arXiv:2309.05516), on mpq's int grid
(mpq.numerics.int_grid):

- every weight has an offset V ∈ [−½, ½] added before rounding: q = clamp(round(W/s + V) [+ z]);
- every scale group has clipping factors α ∈ [½, 1] that shrink its range before the scale and
  zero point are computed: symmetric s = α·absmax / ((q_max − q_min)/2) (``full_range``:
  α·e / q_min, e the group's signed extreme, as intel/auto-round's symmetric grid); asymmetric
  lo = α_lo·min(x_min, 0), hi = α_hi·max(x_max, 0), s = (hi − lo)/(q_max − q_min),
  z = clamp(round(q_min − lo/s)).

Rounding passes gradients straight through (straight-through estimator).  Scales are rounded to
the args' ``scale_dtype`` in the forward (values only), so the tuned weight is exactly the one
:meth:`TunedIntWeight.export` stores.  With V = 0 and α = 1 the export is bit-identical to
round-to-nearest (``NUMBER_FORMATS['int'].quantize``).
"""
from __future__ import annotations

import torch

from mpq.numerics.args import WeightArgs
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.int_grid import (_grouped, int_range, rounded_scale, symmetric_divisor,
                                     symmetric_extent)

V_MAX = 0.5
CLIP_MIN = 0.5


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """torch.round in the forward, identity in the backward."""
    return x + (torch.round(x) - x).detach()


class TunedIntWeight:
    """A weight [N, K] (fp32, not modified) being tuned on ``args``' int grid.

    ``rounding``: the offsets V [N, K]; ``clipping``: the factors [N or 1, G] (one tensor when
    symmetric, two (lo, hi) when asymmetric; none when ``clip`` is false).  All are leaves that
    require grad.
    """

    def __init__(self, weight: torch.Tensor, args: WeightArgs, clip: bool = True):
        self.args = args
        self.shape = tuple(weight.shape)
        self.w = _grouped(weight.detach().to(torch.float32), args)  # [R, G, g]
        self.qmin, self.qmax = int_range(args.bits)
        rows, groups = self.w.shape[:2]
        self.v = torch.zeros_like(self.w, requires_grad=True)
        count = (1 if args.symmetric else 2) if clip else 0
        self.clipping = [torch.ones((rows, groups), device=self.w.device, requires_grad=True)
                         for _ in range(count)]
        if args.symmetric:  # absmax, or full_range's signed extreme
            self.amax = symmetric_extent(self.w, args)
        else:
            self.lo = self.w.amin(dim=-1).clamp(max=0)
            self.hi = self.w.amax(dim=-1).clamp(min=0)

    @property
    def rounding(self) -> list[torch.Tensor]:
        return [self.v]

    def _scale_zero(self, ste: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale [R, G], signed zero [R, G] or None), differentiable in the clip factors with
        ``ste``; without, the exact stored values (the same formulas as int_params)."""
        if self.args.symmetric:
            amax = self.amax * self.clipping[0] if self.clipping else self.amax
            raw = amax / symmetric_divisor(self.args)
        else:
            lo, hi = self.lo, self.hi
            if self.clipping:
                lo, hi = lo * self.clipping[0], hi * self.clipping[1]
            raw = (hi - lo) / (self.qmax - self.qmin)
        stored = rounded_scale(raw.detach(), self.args)
        scale = raw + (stored - raw).detach() if ste else stored
        if self.args.symmetric:
            return scale, None
        rounding = round_ste if ste else torch.round
        return scale, torch.clamp(rounding(self.qmin - lo / scale), self.qmin, self.qmax)

    def dequantized(self) -> torch.Tensor:
        """The quantized-dequantized weight [N, K] (fp32), differentiable in V and the factors."""
        scale, zero = self._scale_zero()
        x = self.w / scale[..., None] + self.v
        if zero is None:
            q = torch.clamp(round_ste(x), self.qmin, self.qmax)
            return (q * scale[..., None]).reshape(self.shape)
        q = torch.clamp(round_ste(x) + zero[..., None], self.qmin, self.qmax)
        return ((q - zero[..., None]) * scale[..., None]).reshape(self.shape)

    @torch.no_grad()
    def project(self) -> None:
        """Clamp V to [−½, ½] and the factors to [½, 1] (after each update)."""
        self.v.clamp_(-V_MAX, V_MAX)
        for factor in self.clipping:
            factor.clamp_(CLIP_MIN, 1.0)

    @torch.no_grad()
    def export(self, info: dict | None = None) -> QuantizedWeight:
        """The QuantizedWeight of the current V and factors (int codes, scales, zeros)."""
        scale, zero = self._scale_zero(ste=False)
        off = 1 << (self.args.bits - 1)
        x = self.w / scale[..., None] + self.v
        if zero is not None:
            x = x + zero[..., None]
        q = torch.round(x).clamp_(self.qmin, self.qmax)
        codes = (q + off).to(torch.uint8).reshape(self.shape)
        zero_u = None if zero is None else (zero + off).to(torch.int32)
        return QuantizedWeight(args=self.args, shape=self.shape, codes=codes,
                               scale=scale.detach().clone(), zero=zero_u, info=dict(info or {}))
