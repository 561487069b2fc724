"""Activation quantization as it happens at inference: quantize a linear's input, dequantize it,
then the matmul (fake quantization; the result equals a W·A kernel's up to accumulation order).

Grids, per :class:`mpq.numerics.args.ActivationArgs`: the number format's
(:meth:`~mpq.numerics.format.NumberFormat.activation_half_range` and ``activation_grid``), e.g.

- ``int`` b bits, symmetric: q ∈ [−2^(b−1), 2^(b−1)−1], scale = absmax / ((q_max − q_min)/2)
  (the weight grid's convention, so −absmax lands on q_min), x̂ = clamp(round(x/scale))·scale.
- ``fp8_e4m3``: scale = absmax / 448, x̂ = fp8(clamp(x/scale, ±448))·scale.

Dynamic scales come from each input: per token (the abs-max over the last dim) or per tensor.
Static scales are fixed: :func:`static_scale` turns the calibration abs-max into one.  A zero
abs-max gives a scale of fp32 eps, so all-zero inputs stay exactly zero.  Arithmetic is fp32;
the output has the input's dtype.
"""
from __future__ import annotations

import torch

from mpq.numerics.args import ActivationArgs
from mpq.numerics.format import NUMBER_FORMATS

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
EPS = float(torch.finfo(torch.float32).eps)


def grid_half_range(args: ActivationArgs) -> float:
    """absmax / scale: 448 for fp8_e4m3, (q_max − q_min)/2 = 2^(b−1) − 0.5 for int."""
    return NUMBER_FORMATS.get(args.format).activation_half_range(args.bits)


def static_scale(absmax: torch.Tensor | float, args: ActivationArgs) -> torch.Tensor:
    """fp32 [1] static scale for inputs whose calibration abs-max (over everything) is ``absmax``."""
    value = torch.as_tensor(absmax, dtype=torch.float32).reshape(-1).amax()
    scale = value / grid_half_range(args)
    return torch.where(scale > 0, scale, torch.full_like(scale, EPS)).reshape(1)


def _on_grid(x: torch.Tensor, scale: torch.Tensor, args: ActivationArgs) -> torch.Tensor:
    return NUMBER_FORMATS.get(args.format).activation_grid(x / scale, args.bits).mul_(scale)


def fake_quantize(x: torch.Tensor, args: ActivationArgs,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] quantized and dequantized per ``args``; ``scale`` is the static scale
    (required when ``args.dynamic`` is false, ignored otherwise)."""
    xf = x.to(torch.float32)
    if args.dynamic:
        if args.granularity == "token":
            absmax = xf.abs().amax(dim=-1, keepdim=True)
        else:
            absmax = xf.abs().amax()
        scale = absmax / grid_half_range(args)
        scale = torch.where(scale > 0, scale, torch.full_like(scale, EPS))
    elif scale is None:
        raise ValueError("static activation quantization needs its calibrated scale")
    else:
        scale = scale.to(device=x.device, dtype=torch.float32)
    return _on_grid(xf, scale, args).to(x.dtype)
