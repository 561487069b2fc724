"""The static scales of a loaded mpq artifact and what each one clips.

A *static scale* is fixed at quantization time from the calibration data:

- ``input``: a QuantLinear's ``input_scale`` (``input_activations: {dynamic: false}``); the grid
  covers ``|x| <= half_range × scale`` (mpq.numerics.activations.grid_half_range: 127.5 for
  int8, 448 for fp8_e4m3), i.e. the calibration abs-max; a value beyond it is *clipped* (int:
  clamped to the end code; fp8: saturated at ±448 × scale).
- ``k`` / ``v``: an attention module's calibrated KV-cache scale (mpq.quantizers.kv_cache): fp8
  covers ``|x| <= 448 × scale`` (per tensor or per kv head); a static int grid covers
  ``[−zero × scale, (2^b − 1 − zero) × scale]`` per kv head (or head × group).  A dynamic int
  cache has no static scale.

A value counts as clipped only beyond the grid by more than float rounding
(:data:`TOLERANCE`, relative): a scale computed from an abs-max reproduces it only to an ulp,
and a value at the calibration abs-max itself lands on the grid's end (int: code q_max + ½
rounds to the end code, an error of half a step like any rounding).

Per scale and forward, :class:`ClipStats` counts the values seen, those clipped, those beyond
FP16's largest finite value (65504: they would overflow an fp16 run), and keeps their range
statistics (mpq.analysis.ranges.RangeStats: abs-max, non-finite values).  Counting is exact, on
the values *before* the layer's own quantization.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpq.analysis.ranges import FP16_MAX, RangeStats, summarize
from mpq.numerics import kv_int
from mpq.numerics.activations import FP8_MAX, grid_half_range
from mpq.numerics.args import ActivationArgs
from mpq.config.kv_cache import KVCacheArgs

TOLERANCE = 1e-6  # relative: beyond the grid by more than fp32 rounding of scale × range


@dataclass
class ClipStats:
    """Values one static scale saw, and how many it clipped."""

    values: int = 0
    clipped: int = 0
    fp16_overflow: int = 0
    ranges: RangeStats = field(default_factory=RangeStats)

    def add(self, x: torch.Tensor, clipped: torch.Tensor) -> None:
        """``clipped``: a bool tensor over ``x``'s values (broadcast shape allowed)."""
        self.values += x.numel()
        self.clipped += int(clipped.sum())
        self.fp16_overflow += int((x.detach().float().abs() > FP16_MAX).sum())
        self.ranges.merge(summarize(x))

    @property
    def clipped_fraction(self) -> float:
        return self.clipped / self.values if self.values else 0.0

    def to_dict(self) -> dict[str, Any]:
        absmax = self.ranges.to_dict()["absmax"]
        return {"values": self.values, "clipped": self.clipped,
                "clipped_fraction": self.clipped_fraction, "fp16_overflow": self.fp16_overflow,
                "absmax": absmax if self.values else None,
                "nonfinite": self.ranges.nonfinite}


@dataclass(frozen=True)
class StaticScale:
    """One static scale: ``name`` (the layer for ``input``, the attention module for ``k``/``v``),
    its ``kind``, the format's description and the largest |x| it represents (the widest, for
    per-head scales)."""

    name: str
    kind: str           # "input" | "k" | "v"
    format: str         # e.g. "int8", "fp8_e4m3"
    limit: float
    module: nn.Module
    args: ActivationArgs | KVCacheArgs

    @property
    def key(self) -> str:
        return f"{self.name}.input_scale" if self.kind == "input" else f"{self.name}.{self.kind}_scale"

    def clipped(self, x: torch.Tensor) -> torch.Tensor:
        """Bool tensor: which values of ``x`` lie beyond this scale's grid."""
        xf = x.detach().float()
        if self.kind == "input":
            scale = self.module.input_scale.to(xf.device, torch.float32)
            return xf.abs() > grid_half_range(self.args) * scale * (1 + TOLERANCE)
        scale = getattr(self.module, f"{self.kind}_scale").to(xf.device, torch.float32)
        if not self.args.is_int:
            return xf.abs() > FP8_MAX * scale * (1 + TOLERANCE)
        zero = getattr(self.module, f"{self.kind}_zero").to(xf.device, torch.float32)
        codes = kv_int.grouped(xf, self.args.group_of(xf.shape[-1])) / scale.unsqueeze(-1) \
            + zero.unsqueeze(-1)
        qmax = kv_int.qmax_of(self.args.bits)
        return (codes < -qmax * TOLERANCE) | (codes > qmax * (1 + TOLERANCE))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "tensor": self.key, "format": self.format,
                "limit": self.limit}


def _kv_limit(module: nn.Module, which: str, args: KVCacheArgs) -> float:
    scale = getattr(module, f"{which}_scale").float()
    if not args.is_int:
        return float(FP8_MAX * scale.max())
    zero = getattr(module, f"{which}_zero").float()
    lo, hi = -zero * scale, (kv_int.qmax_of(args.bits) - zero) * scale
    return float(torch.maximum(lo.abs(), hi.abs()).max())


def static_scales(model: nn.Module) -> list[StaticScale]:
    """Every static scale of a model loaded with :func:`mpq.load` (packed or ``dequantize=True``),
    in module order: the inputs of linears with static input activations (their ``input_args``
    and ``input_scale``), then each calibrated KV cache's k and v."""
    from mpq.models.attention import attention_modules
    from mpq.models.layout import blocks_of, layout_of
    from mpq.runtime.qlinear import QuantLinear

    out = []
    for name, module in model.named_modules():
        args = getattr(module, "input_args", None)
        if isinstance(module, (QuantLinear, nn.Linear)) and args is not None and not args.dynamic:
            fmt = f"{args.format}{args.bits}" if args.format == "int" else args.format
            out.append(StaticScale(name, "input", fmt, float(
                grid_half_range(args) * module.input_scale.float().max()), module, args))
    kv = getattr(getattr(model, "mpq_artifact", None), "plan", None)
    kv = kv.kv_cache if kv is not None else None
    if kv is None or (kv.is_int and kv.dynamic):
        return out
    layout = layout_of(model)
    fmt = kv.format
    for index, block in enumerate(blocks_of(model, layout)):
        for local, module in attention_modules(model, block):
            name = f"{layout.blocks_path}.{index}.{local}"
            for which in ("k", "v"):
                out.append(StaticScale(name, which, fmt, _kv_limit(module, which, kv), module, kv))
    return out


def planned_static_scales(plan) -> tuple[int, bool]:
    """(layers with a static input scale, whether the KV cache is calibrated) of an artifact's
    plan: what :func:`static_scales` will find, known before the model is loaded."""
    inputs = sum(1 for layer in plan.quantized() if layer.scheme.input_activations is not None
                 and not layer.scheme.input_activations.dynamic)
    kv = plan.kv_cache
    return inputs, kv is not None and not (kv.is_int and kv.dynamic)
