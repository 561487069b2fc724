"""FP8 grids ``fp8_e4m3`` (torch.float8_e4m3fn) and ``fp8_e5m2`` (torch.float8_e5m2).

Follows compressed-tensors' float-quantized format (FORMATS.md): symmetric,
scale = absmax / finfo.max per tensor ([1, 1]) or per output channel ([N, 1]);
codes = w/scale clamped to ±finfo.max (so the cast never produces NaN/inf) and cast with torch's
round-to-nearest-even; x̂ = codes·scale in fp32.
"""
from __future__ import annotations

import torch

from mpq.quantizers.base import NUMBER_FORMATS, QuantizedWeight
from mpq.quantizers.int_grid import prepare_weight, safe_scale
from mpq.scheme import WeightArgs


def fp8_params(w: torch.Tensor, args: WeightArgs, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scale [1, 1] (tensor) or [N, 1] (channel) for ``w`` [N, K]."""
    a = w.to(torch.float32).abs()
    amax = a.amax().reshape(1, 1) if args.granularity == "tensor" else a.amax(dim=1, keepdim=True)
    return safe_scale(amax / torch.finfo(dtype).max)


def fp8_codes(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Nearest ``dtype`` value of w/scale, saturating at ±finfo(dtype).max."""
    fmax = torch.finfo(dtype).max
    return (w.to(torch.float32) / scale).clamp_(-fmax, fmax).to(dtype)


class Fp8Grid:
    """One FP8 number format (stateless apart from its name and dtype)."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.dtype = dtype

    def quantize(self, weight: torch.Tensor, args: WeightArgs) -> QuantizedWeight:
        w = prepare_weight(weight, args, self.name)
        scale = fp8_params(w, args, self.dtype)
        return QuantizedWeight(args=args, shape=tuple(w.shape),
                               codes=fp8_codes(w, scale, self.dtype), scale=scale)

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (qw.codes.to(torch.float32) * qw.scale.to(torch.float32)).to(dtype)


FP8_E4M3 = NUMBER_FORMATS.register("fp8_e4m3")(Fp8Grid("fp8_e4m3", torch.float8_e4m3fn))
FP8_E5M2 = NUMBER_FORMATS.register("fp8_e5m2")(Fp8Grid("fp8_e5m2", torch.float8_e5m2))
