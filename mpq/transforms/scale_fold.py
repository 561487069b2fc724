"""Per-input-channel scale folding (SmoothQuant, AWQ): which of a family's scale groups hold for
one block, and the fold itself.

A *scale group* (:class:`mpq.models.family.ScaleGroup`, listed by each family record in
mpq.models.families) is a set of linear layers that read the same input ``x`` together with the op
``prev`` that produces ``x``.  Given a positive scale vector ``s`` of length K (the linears' input
size), folding divides ``prev``'s output channels by ``s`` and multiplies each linear's weight
columns by ``s`` (``W[:, j] *= s[j]``), so ``W (x / s) * s == W x`` and the float model's output is
unchanged; only the distribution the quantizer sees moves.

Paths in a :class:`ScaleGroup` are relative to one decoder block (the family's ``blocks``).
``prev_kind`` says how ``prev``'s output is divided by ``s``:

* ``"rmsnorm"``           ``y = norm(x) * w``          → ``w /= s``
* ``"rmsnorm_plus_one"``  ``y = norm(x) * (1 + w)``    → ``w = (1 + w) / s - 1``  (Gemma)
* ``"layernorm"``         ``y = norm(x) * w + b``      → ``w /= s; b /= s``       (OPT)
* ``"linear"``            ``y = x W^T + b`` feeding the group, directly or through an op that
  commutes with a positive per-channel scale (Llama's ``act(gate) * up``, OPT's ReLU)
                                                       → ``W[rows] /= s[:, None]; b /= s``

:func:`scale_groups` picks the groups that are exact for one block instance (it drops v→o under
grouped-query attention, and groups whose ``requires`` fail, e.g. the norm groups of post-LN
OPT); :func:`fold_scales` applies one.
Linears may be GPT-2's ``Conv1D`` (weight stored [in, out]): channels are taken on the matching
axis.  Parameters get new memory (``param.data = ...``); the old storage, which may be pages of
a read-only memory-mapped checkpoint, is never written to.
"""
from __future__ import annotations

import torch
from torch import nn

from transformers.pytorch_utils import Conv1D

from mpq.errors import ModelError, SchemeError
from mpq.models.families import family_of
from mpq.models.family import ScaleGroup
from mpq.models.layout import weight_of

_FIX_HINT = "fix the family's scale groups in mpq.models.families"


def _config_of(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def _module(block: nn.Module, path: str, group: ScaleGroup) -> nn.Module:
    try:
        return block.get_submodule(path)
    except AttributeError:
        raise ModelError(f"scale group '{group}': block {type(block).__name__} has no "
                         f"module '{path}'", hint=_FIX_HINT) from None


def _in_features(block: nn.Module, group: ScaleGroup) -> int:
    sizes = {weight_of(_module(block, path, group)).shape[1] for path in group.linears}
    if len(sizes) != 1:
        raise ModelError(f"scale group '{group}': the linears have different input sizes "
                         f"{sorted(sizes)}", hint=_FIX_HINT)
    return sizes.pop()


def _prev_size(prev: nn.Module, kind: str) -> int | None:
    """Number of output channels of ``prev`` that can carry a scale, or None if it can't."""
    if kind == "linear":
        return weight_of(prev).shape[0]
    weight = getattr(prev, "weight", None)
    if weight is None:  # e.g. nn.LayerNorm(elementwise_affine=False)
        return None
    if kind == "layernorm" and getattr(prev, "bias", None) is None:
        return None
    return weight.shape[0]


def scale_groups(model_or_config, block: nn.Module) -> list[ScaleGroup]:
    """The scale groups of the model's family record whose fold is exact for ``block``.

    ``model_or_config`` is a ``PreTrainedModel`` or its config.  Dropped: a group whose
    ``requires`` do not hold for the config (OPT's norm groups when post-LN, its fc1 → fc2
    through a non-ReLU activation), a group whose ``prev`` output size differs from the linears'
    input size (v_proj → o_proj under grouped-query attention, where several query heads read
    the same v channel) and a norm group without an affine weight.
    Raises ModelError for a model_type whose family records no scale groups (naming the
    record's reason) or that has no family record.
    """
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    family = family_of(config)
    if family is None:
        raise ModelError(f"no scale-folding data for model_type '{model_type}'",
                         hint="add its scale groups to its family record in mpq.models.families")
    if not family.scale_groups:
        raise ModelError(f"scale folding (SmoothQuant, AWQ) is not supported for model type "
                         f"'{model_type}' (family '{family.name}'): "
                         f"{family.why_not('scale_groups')}",
                         hint="remove the smoothquant/awq transform from the recipe")
    kept = []
    for group in family.scale_groups:
        if not all(condition.holds(config) for condition in group.requires):
            continue
        size = _prev_size(_module(block, group.prev, group), group.prev_kind)
        if size is not None and size == _in_features(block, group):
            kept.append(group)
    return kept


def _replace(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give ``param`` new memory holding ``value`` in the parameter's dtype."""
    param.data = value.to(param.dtype).contiguous()


def fold_scales(block: nn.Module, group: ScaleGroup, scales: torch.Tensor) -> None:
    """Fold ``scales`` [K] into ``group`` of ``block`` in place: ``prev``'s output channels are
    divided by it and the linears' weight columns multiplied by it.

    Computes in float32 and writes back in each parameter's dtype, into new memory.  Raises
    SchemeError unless ``scales`` is 1-D of length K with all values finite and > 0, or when
    ``prev``'s output size is not K (use :func:`scale_groups` to get only foldable groups).
    """
    k = _in_features(block, group)
    scales = torch.as_tensor(scales).detach()
    if scales.dim() != 1 or scales.numel() != k:
        raise SchemeError(f"scale group '{group}': scales have shape {tuple(scales.shape)}, "
                          f"expected ({k},)", hint="one scale per input channel of the linears")
    scales = scales.float()
    if not (torch.isfinite(scales).all() and (scales > 0).all()):
        raise SchemeError(f"scale group '{group}': scales must be finite and > 0 "
                          f"(min {scales.min().item():g}, max {scales.max().item():g})",
                          hint="clamp the scales to a positive range before folding")
    prev = _module(block, group.prev, group)
    if _prev_size(prev, group.prev_kind) != k:
        raise SchemeError(f"scale group '{group}': '{group.prev}' has no {k} output channels "
                          "to carry the scales (grouped-query v_proj, or a norm without "
                          "affine weight)", hint="fold only groups returned by scale_groups()")

    with torch.no_grad():
        s = scales.to(prev.weight.device)
        w = prev.weight.float()
        if group.prev_kind == "rmsnorm_plus_one":
            _replace(prev.weight, (1.0 + w) / s - 1.0)
        elif group.prev_kind == "linear":  # output channels: rows ([in, out] Conv1D: columns)
            _replace(prev.weight, w / (s[None, :] if isinstance(prev, Conv1D) else s[:, None]))
        else:  # rmsnorm, layernorm
            _replace(prev.weight, w / s)
        bias = getattr(prev, "bias", None)
        if bias is not None and group.prev_kind in ("layernorm", "linear"):
            _replace(bias, bias.float() / s)
        for path in group.linears:
            linear = block.get_submodule(path)
            weight, cols = linear.weight, s.to(linear.weight.device)
            _replace(weight, weight.float() * (cols[:, None] if isinstance(linear, Conv1D)
                                               else cols))


def group_weight_absmax(block: nn.Module, group: ScaleGroup) -> torch.Tensor:
    """Per-input-channel max |W[:, j]| over all linears of ``group``, as float32 [K]."""
    _in_features(block, group)  # checks the linears agree on K
    maxima = [weight_of(block.get_submodule(path)).detach().abs().amax(dim=0).float()
              for path in group.linears]
    result = maxima[0]
    for m in maxima[1:]:
        result = torch.maximum(result, m.to(result.device))
    return result
