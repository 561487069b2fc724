"""SmoothQuant (Xiao et al., arXiv:2211.10438): move activation outliers into the weights.

For each scale group of a block (mpq.transforms.scale_fold: a norm or linear feeding a set of linears),
per input channel j: s_j = max|X_j|^α / max|W_j|^(1−α), with max|X_j| over the block's
calibration inputs of the group and max|W_j| over the group's weight columns.  The preceding op's
output is divided by s and the weight columns multiplied by it, so the float block computes the
same function while its activations have flatter channels.  A channel whose activation or weight
max is 0 keeps s_j = 1; s is clamped to ≥ 1e-5.

Options: ``alpha`` (number in [0, 1], default 0.5: migration strength), ``search`` (boolean,
default false: instead of ``alpha``, pick per group the α in 0, 0.1, …, 1 whose smoothed,
quantized group (each layer's activation fake-quantization and round-to-nearest weights) has the
smallest output error on the block's first 4096 calibration tokens), ``pairs`` (boolean, default
false: also smooth linear → linear groups such as v_proj → o_proj and up_proj → down_proj; the
paper smooths only the norm → linear groups).  Only groups with at least one layer whose scheme
quantizes input activations are smoothed.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from mpq.numerics.activations import fake_quantize, static_scale
from mpq.models.layout import weight_of
from mpq.errors import SchemeError, did_you_mean
from mpq.quantizers.rtn import rtn_dequant
from mpq.transforms.scale_fold import fold_scales, group_weight_absmax, scale_groups
from mpq.transforms.base import TRANSFORMS, BlockContext

DEFAULTS = {"alpha": 0.5, "search": False, "pairs": False}
SEARCH_ALPHAS = tuple(i / 10 for i in range(11))
MIN_SCALE = 1e-5


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """s = act^α / weight^(1−α) per channel (fp32), 1 where either max is 0, clamped ≥ 1e-5."""
    act, weight = act_absmax.float(), weight_absmax.float()
    ok = (act > 0) & (weight > 0)
    s = act.clamp_min(1e-30).pow(alpha) / weight.clamp_min(1e-30).pow(1 - alpha)
    return torch.where(ok, s, torch.ones_like(s)).clamp_min(MIN_SCALE)


class SmoothQuant:
    name = "smoothquant"
    needs_calibration = True

    def check(self, options: Mapping[str, Any]) -> None:
        for key, value in options.items():
            if key not in DEFAULTS:
                raise SchemeError(f"unknown smoothquant option '{key}'",
                                  hint=did_you_mean(key, DEFAULTS) or
                                  f"known: {', '.join(DEFAULTS)}")
        alpha = options.get("alpha", DEFAULTS["alpha"])
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise SchemeError(f"smoothquant alpha must be a number in [0, 1], got {alpha!r}",
                              hint="e.g. alpha: 0.5")
        for key in ("pairs", "search"):
            if not isinstance(options.get(key, False), bool):
                raise SchemeError(f"smoothquant {key} must be true or false")

    def select_groups(self, groups: list, options: Mapping[str, Any]) -> list:
        """Norm → linears groups; linear → linear pairs too with ``pairs``."""
        return [g for g in groups if g.prev_kind != "linear" or options.get("pairs", False)]

    def apply(self, ctx: BlockContext, options: Mapping[str, Any]) -> dict[str, Any]:
        alpha = float(options.get("alpha", DEFAULTS["alpha"]))
        groups = [g for g in self.select_groups(scale_groups(ctx.model, ctx.block), options)
                  if any(_quantizes_inputs(ctx, ctx.prefix + name) for name in g.linears)]
        record: dict[str, Any] = {"block": ctx.index, "groups": []}
        if not groups:
            return record
        search = bool(options.get("search", False))
        stats = {"input_absmax", "input_sample"} if search else {"input_absmax"}
        wanted = {ctx.prefix + g.linears[0]: frozenset(stats) for g in groups}
        members = [[ctx.prefix + name for name in g.linears] for g in groups]
        collected = ctx.collect(wanted, members)
        for group in groups:
            got = collected[ctx.prefix + group.linears[0]]
            w_max = group_weight_absmax(ctx.block, group)
            chosen = (best_alpha(ctx, group, got["input_sample"], got["input_absmax"], w_max)
                      if search else alpha)
            s = smoothing_scales(got["input_absmax"], w_max, chosen)
            fold_scales(ctx.block, group, s)
            record["groups"].append({"prev": group.prev, "linears": list(group.linears),
                                     "alpha": chosen, "scale_min": float(s.min()),
                                     "scale_max": float(s.max())})
        return record


def best_alpha(ctx: BlockContext, group, x: torch.Tensor, x_max: torch.Tensor,
               w_max: torch.Tensor) -> float:
    """The α in SEARCH_ALPHAS minimising Σ_layers ‖x Wᵀ − A(x/s) Q(W·s)ᵀ‖² on the sample ``x``
    (A: the layer's activation fake-quantization, a static scale taken from the smoothed abs-max;
    Q: round to nearest on its weight grid; layers that are not quantized count as float)."""
    layers = []
    for local in group.linears:
        weight = weight_of(ctx.block.get_submodule(local)).detach().float()
        plan = ctx.layers.get(ctx.prefix + local)
        layers.append((weight, plan.scheme if plan is not None else None, x @ weight.t()))
    best, best_err = SEARCH_ALPHAS[0], None
    for alpha in SEARCH_ALPHAS:
        s = smoothing_scales(x_max, w_max, alpha)
        xs, err = x / s, 0.0
        for weight, scheme, reference in layers:
            ws = weight * s
            if scheme is not None:
                ws = rtn_dequant(ws, scheme.weights)
            acts = scheme.input_activations if scheme is not None else None
            if acts is None:
                xq = xs
            elif acts.dynamic:
                xq = fake_quantize(xs, acts)
            else:  # the static scale the engine would calibrate after this smoothing
                xq = fake_quantize(xs, acts, static_scale(x_max / s, acts))
            err += float((xq @ ws.t() - reference).square().sum())
        if best_err is None or err < best_err:
            best, best_err = alpha, err
    return best


def _quantizes_inputs(ctx: BlockContext, name: str) -> bool:
    layer = ctx.layers.get(name)
    return layer is not None and layer.scheme.input_activations is not None


SMOOTHQUANT = TRANSFORMS.register("smoothquant")(SmoothQuant())
