"""Asymmetric integer grids for cached keys and values (int8 / int4), as pure tensor functions.

Tensors are ``[batch, kv_heads, seq, head_dim]``.  Channels are viewed in groups: ``[B, H, T, G,
g]`` with ``g = group_size`` and ``G = head_dim / g`` (per head: ``g = head_dim``, ``G = 1``).

A range ``[lo, hi]`` gives ``scale = (hi − lo) / (2^bits − 1)`` and a *float* zero point
``zero = −lo / scale`` (in code units, not rounded, so both ends of the range lie on the grid);
``q = clamp(round(x / scale + zero), 0, 2^bits − 1)`` and ``x̂ = (q − zero) · scale``.

- static: one range per (kv head, group), calibrated; ``scale`` and ``zero`` are fp32
  ``[kv_heads, 1, G]`` (per head: ``[kv_heads, 1, 1]``).
- dynamic: one range per (token, kv head, group), taken from the tensor itself at run time.
"""
from __future__ import annotations

import torch

MIN_SCALE = 1e-8  # a constant range (lo == hi) still gets a usable grid


def grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` [B, H, T, D] viewed as [B, H, T, D / group_size, group_size]."""
    *lead, d = x.shape
    return x.reshape(*lead, d // group_size, group_size)


def qmax_of(bits: int) -> int:
    return (1 << bits) - 1


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) fp32 of the grid that spans [lo, hi] with 2^bits levels."""
    lo, hi = lo.float(), hi.float()
    scale = ((hi - lo) / qmax_of(bits)).clamp_min(MIN_SCALE)
    return scale, -lo / scale


def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        bits: int) -> torch.Tensor:
    """x̂ in fp32 for ``x`` against broadcastable ``scale`` and ``zero``."""
    q = torch.round(x.float() / scale + zero).clamp(0, qmax_of(bits))
    return (q - zero) * scale


def static_range(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of ``x`` per (kv head, group): fp32 [H, 1, G]."""
    g = grouped(x.detach().float(), group_size)
    lo = g.amin(dim=(0, 2, 4))  # [H, G]
    hi = g.amax(dim=(0, 2, 4))
    return lo.unsqueeze(1), hi.unsqueeze(1)


def fake_quantize_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                         group_size: int) -> torch.Tensor:
    """``x`` [B, H, T, D] on the grid of ``scale``/``zero`` ([H, 1, G]), in x's dtype."""
    s = scale.to(device=x.device, dtype=torch.float32).unsqueeze(-1)  # [H, 1, G, 1]
    z = zero.to(device=x.device, dtype=torch.float32).unsqueeze(-1)
    out = quantize_dequantize(grouped(x, group_size), s, z, bits)
    return out.reshape(x.shape).to(x.dtype)


def fake_quantize_dynamic(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``x`` [B, H, T, D] on a grid per (token, head, group) spanning its own min..max."""
    g = grouped(x.float(), group_size)
    scale, zero = params_from_range(g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True),
                                    bits)
    return quantize_dequantize(g, scale, zero, bits).reshape(x.shape).to(x.dtype)
