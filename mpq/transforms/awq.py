"""AWQ (Lin et al., arXiv:2306.00978): activation-aware scaling and clipping before quantization.

Per decoder block, on the block's calibration inputs (one pass collects, for every quantized
linear's input, the per-channel mean |x| and the second moments H = (2/T)·Σ x xᵀ):

1. **Scale search**, for each scale group (mpq.transforms.scale_fold: a norm or linear feeding linears):
   candidates s = mean|x|^α / w̄^(1−α) (``duo_scaling``; else mean|x|^α) for α = 0, 1/grid, …,
   (grid−1)/grid, each normalised by sqrt(max s · min s); w̄_j is the mean over the group's rows
   of |W| divided by its group's (or row's) max.  Each candidate is scored by the error of the
   group's linear outputs over all calibration tokens with the layers' *own* planned weight
   scheme (round to nearest on its grid): Σ_layers tr(E H Eᵀ), E = W − Q(W·diag s)·diag(1/s).
   No scaling (s = 1) is scored first and kept unless a candidate beats it.  The winner is
   folded (mpq.transforms.scale_fold.fold_scales): the float block computes the same function.
   Note: the reference scores the output of the module enclosing the group (e.g. the whole
   attention); here the group's own outputs are scored, exactly and over every token.
2. **Clip search** (``clip``), for each quantized linear whose number format allows it
   (``awq_clip``: int, nf4) with channel or group scales, except the attention's q/k
   projections (the family record's ``q_proj``/``k_proj``, or a fused ``qkv_proj``; as in the
   reference: their error acts through the attention scores):
   each scale group's weight range is shrunk by the factor in 1, 0.95, …, 0.55 that minimises
   that group's share of the output error, d_g H_gg d_gᵀ (d = W − Q(clamped W)); the weights are
   clamped to the chosen range, so every quantizer that runs afterwards (RTN, GPTQ) sees them.
   This changes the float model, by design.

Options: ``grid`` (int ≥ 1, default 20), ``duo_scaling`` (bool, default true), ``clip`` (bool,
default true).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from mpq.models.layout import set_weight, weight_of
from mpq.errors import SchemeError, did_you_mean
from mpq.quantizers.rtn import rtn_dequant
from mpq.models.families import family_of
from mpq.models.family import ScaleGroup
from mpq.transforms.scale_fold import fold_scales, scale_groups
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import NUMBER_FORMATS
from mpq.transforms.base import TRANSFORMS, BlockContext

DEFAULTS = {"grid": 20, "duo_scaling": True, "clip": True}
CLIP_FACTORS = tuple(1 - i / 20 for i in range(10))  # 1.0 … 0.55
TINY = 1e-8


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ): the summed squared output error over the calibration tokens."""
    d = w - q
    return float(((d @ h) * d).sum())


def _group_view(w: torch.Tensor, args: WeightArgs) -> torch.Tensor:
    """w [N, K] as [N, G, g] along the scheme's scale groups (channel: one group per row)."""
    n, k = w.shape
    g = args.group_size if args.granularity == "group" else k
    return w.reshape(n, k // g, g)


def normalized_weight_mean(weights: list[tuple[torch.Tensor, WeightArgs]]) -> torch.Tensor:
    """w̄ [K]: mean over all rows of |W| / (max |W| of its scale group)."""
    rows = []
    for w, args in weights:
        v = _group_view(w.abs(), args)
        rows.append((v / v.amax(dim=-1, keepdim=True).clamp_min(TINY)).reshape(w.shape))
    return torch.cat(rows).mean(dim=0)


def search_scales(weights: list[tuple[torch.Tensor, WeightArgs]], x_mean: torch.Tensor,
                  h: torch.Tensor, grid: int, duo: bool
                  ) -> tuple[torch.Tensor | None, float | None, float, float]:
    """The best scale vector for one group (None: no scaling wins), its α, and the output error
    with and without it (see the module docstring)."""
    def loss(s: torch.Tensor | None) -> float:
        total = 0.0
        for w, args in weights:
            q = rtn_dequant(w, args) if s is None else rtn_dequant(w * s, args) / s
            total += output_error(w, q, h)
        return total

    base = loss(None)
    best, best_alpha, best_loss = None, None, base
    x = x_mean.float().clamp_min(TINY)
    w_mean = normalized_weight_mean(weights).clamp_min(TINY) if duo else None
    for i in range(grid):
        alpha = i / grid
        s = x.pow(alpha) / w_mean.pow(1 - alpha) if duo else x.pow(alpha)
        s = s.clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        value = loss(s)
        if value < best_loss:
            best, best_alpha, best_loss = s, alpha, value
    return best, best_alpha, base, best_loss


def clip_ranges(w: torch.Tensor, args: WeightArgs, h: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``w`` clamped, per scale group, to the shrunk range with the smallest d_g H_gg d_gᵀ; also
    the mean chosen shrink factor."""
    v = _group_view(w, args)
    n, groups, g = v.shape
    hb = torch.stack([h[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(groups)])
    if args.symmetric:
        hi = v.abs().amax(dim=-1, keepdim=True)
        lo = -hi
    else:
        lo = v.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = v.amax(dim=-1, keepdim=True).clamp(min=0)
    best_err = best_f = None
    for f in CLIP_FACTORS:
        clamped = torch.maximum(torch.minimum(v, hi * f), lo * f)
        d = v - _group_view(rtn_dequant(clamped.reshape(w.shape), args), args)
        err = torch.einsum("ngi,gij,ngj->ng", d, hb, d)
        if best_err is None:
            best_err, best_f = err, torch.ones_like(err)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_f = torch.where(better, torch.full_like(err, f), best_f)
    f = best_f.unsqueeze(-1)
    out = torch.maximum(torch.minimum(v, hi * f), lo * f).reshape(w.shape)
    return out, float(best_f.mean())


def _clippable(name: str, args: WeightArgs, no_clip: set[str]) -> bool:
    return (NUMBER_FORMATS.get(args.format).awq_clip and args.granularity in ("channel", "group")
            and name not in no_clip)


def _score_projections(ctx: BlockContext) -> set[str]:
    """Full names of the block's attention q/k projections, or its fused q/k/v projection
    (never clipped)."""
    family = family_of(ctx.model)
    attention = family.attention if family is not None else None
    if attention is None:
        return set()
    return {ctx.prefix + path for path in attention.scores}


class AWQ:
    name = "awq"
    needs_calibration = True

    def check(self, options: Mapping[str, Any]) -> None:
        for key, value in options.items():
            if key not in DEFAULTS:
                raise SchemeError(f"unknown awq option '{key}'",
                                  hint=did_you_mean(key, DEFAULTS) or
                                  f"known: {', '.join(DEFAULTS)}")
        grid = options.get("grid", DEFAULTS["grid"])
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise SchemeError(f"awq grid must be an integer ≥ 1, got {grid!r}", hint="e.g. grid: 20")
        for key in ("duo_scaling", "clip"):
            if not isinstance(options.get(key, DEFAULTS[key]), bool):
                raise SchemeError(f"awq {key} must be true or false")

    def select_groups(self, groups: list, options: Mapping[str, Any]) -> list:
        return list(groups)

    def apply(self, ctx: BlockContext, options: Mapping[str, Any]) -> dict[str, Any]:
        opts = {**DEFAULTS, **options}
        record: dict[str, Any] = {"block": ctx.index, "groups": [], "clipped": []}
        layers = ctx.layers
        if not layers:
            return record
        stats = self._collect(ctx, layers)
        for group in scale_groups(ctx.model, ctx.block):
            names = [ctx.prefix + local for local in group.linears]
            if any(name in layers for name in names):
                record["groups"].append(self._scale_group(ctx, group, names, layers, stats,
                                                          opts))
        if opts["clip"]:
            no_clip = _score_projections(ctx)
            for name, layer in layers.items():
                args = layer.scheme.weights
                if not _clippable(name, args, no_clip):
                    continue
                module = ctx.block.get_submodule(name[len(ctx.prefix):])
                h = stats[name]["hessian"] / stats[name]["scale_outer"]
                clipped, shrink = clip_ranges(weight_of(module).detach().float(), args, h)
                set_weight(module, clipped)
                record["clipped"].append({"layer": name, "mean_shrink": shrink})
        return record

    def _collect(self, ctx: BlockContext, layers) -> dict[str, dict[str, torch.Tensor]]:
        """Per quantized linear: input_absmean and hessian of its input (shared by layers that
        read the same input), plus 'scale_outer', s sᵀ of the scales folded into it so far."""
        groups = ctx.input_groups(list(layers))
        wanted = {name: frozenset({"input_absmean", "hessian"}) for name in layers}
        stats = ctx.collect(wanted, groups)
        for per_layer in stats.values():
            per_layer["scale_outer"] = torch.ones(())
        return stats

    def _scale_group(self, ctx, group: ScaleGroup, names, layers, stats, opts) -> dict[str, Any]:
        leader = next(n for n in names if n in stats)
        x_mean, h = stats[leader]["input_absmean"], stats[leader]["hessian"]
        weights = [(weight_of(ctx.block.get_submodule(name[len(ctx.prefix):])).detach().float(),
                    layers[name].scheme.weights) for name in names if name in layers]
        s, alpha, base, best = search_scales(weights, x_mean, h, opts["grid"],
                                             opts["duo_scaling"])
        entry = {"prev": group.prev, "linears": list(group.linears), "alpha": alpha,
                 "error_ratio": best / base if base > 0 else 1.0}
        if s is not None:
            fold_scales(ctx.block, group, s)
            outer = torch.outer(s, s)
            for name in names:  # their input is now x / s
                if name in stats:
                    stats[name] = {**stats[name], "scale_outer": outer}
        return entry


AWQ_TRANSFORM = TRANSFORMS.register("awq")(AWQ())
