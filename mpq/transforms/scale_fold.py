"""Per-input-channel scale folding (SmoothQuant, AWQ): architecture data and the fold itself.

A *scale group* is a set of linear layers that read the same input ``x`` together with the op
``prev`` that produces ``x``.  Given a positive scale vector ``s`` of length K (the linears' input
size), folding divides ``prev``'s output channels by ``s`` and multiplies each linear's weight
columns by ``s`` (``W[:, j] *= s[j]``), so ``W (x / s) * s == W x`` and the float model's output is
unchanged; only the distribution the quantizer sees moves.

Paths in a :class:`ScaleGroup` are relative to one decoder block (see ``mpq.models.layout.BLOCK_PATHS``).
``prev_kind`` says how ``prev``'s output is divided by ``s``:

* ``"rmsnorm"``           ``y = norm(x) * w``          → ``w /= s``
* ``"rmsnorm_plus_one"``  ``y = norm(x) * (1 + w)``    → ``w = (1 + w) / s - 1``  (Gemma)
* ``"layernorm"``         ``y = norm(x) * w + b``      → ``w /= s; b /= s``       (OPT)
* ``"linear"``            ``y = x W^T + b`` feeding the group, directly or through an op that
  commutes with a positive per-channel scale (Llama's ``act(gate) * up``, OPT's ReLU)
                                                       → ``W[rows] /= s[:, None]; b /= s``

:func:`scale_groups` picks the groups that are exact for one block instance (it drops v→o under
grouped-query attention and the norm groups of post-LN OPT); :func:`fold_scales` applies one.
Parameters get new memory (``param.data = ...``); the old storage, which may be pages of a
read-only memory-mapped checkpoint, is never written to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpq.errors import ModelError, SchemeError

PREV_KINDS = ("rmsnorm", "rmsnorm_plus_one", "layernorm", "linear")


@dataclass(frozen=True)
class ScaleGroup:
    """``prev`` (a dotted path in a block) produces the input of every path in ``linears``."""

    prev: str
    linears: tuple[str, ...]
    prev_kind: str

    def __post_init__(self):
        if self.prev_kind not in PREV_KINDS:
            raise ValueError(f"prev_kind {self.prev_kind!r} is not one of {PREV_KINDS}")

    def __str__(self) -> str:
        return f"{self.prev} → {', '.join(self.linears)}"


def _llama_like(norm_kind: str) -> tuple[ScaleGroup, ...]:
    return (
        ScaleGroup("input_layernorm",
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), norm_kind),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "linear"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), norm_kind),
        # down_proj reads act(gate_proj(x)) * up_proj(x): linear in up_proj's output.
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "linear"),
    )


# model_type → the scale groups of one decoder block (before per-instance filtering).
SCALE_GROUPS: dict[str, tuple[ScaleGroup, ...]] = {
    "llama": _llama_like("rmsnorm"),
    "mistral": _llama_like("rmsnorm"),
    "qwen2": _llama_like("rmsnorm"),
    # Qwen3's q_norm/k_norm act on q/k_proj outputs, so the input side is Llama's.
    "qwen3": _llama_like("rmsnorm"),
    "gemma": _llama_like("rmsnorm_plus_one"),
    "opt": (
        ScaleGroup("self_attn_layer_norm",
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "layernorm"),
        ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "linear"),
        ScaleGroup("final_layer_norm", ("fc1",), "layernorm"),
        # fc2 reads relu(fc1(x)); relu(x / s) == relu(x) / s for s > 0.
        ScaleGroup("fc1", ("fc2",), "linear"),
    ),
}

# Activations f with f(x / s) == f(x) / s for s > 0 (needed for OPT's fc1 → fc2).
_POSITIVE_HOMOGENEOUS = {"relu"}


def _config_of(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def _module(block: nn.Module, path: str, group: ScaleGroup) -> nn.Module:
    try:
        return block.get_submodule(path)
    except AttributeError:
        raise ModelError(f"scale group '{group}': block {type(block).__name__} has no "
                         f"module '{path}'",
                         hint="fix its entry in mpq.transforms.scale_fold.SCALE_GROUPS") from None


def _in_features(block: nn.Module, group: ScaleGroup) -> int:
    sizes = {_module(block, path, group).weight.shape[1] for path in group.linears}
    if len(sizes) != 1:
        raise ModelError(f"scale group '{group}': the linears have different input sizes "
                         f"{sorted(sizes)}", hint="fix its entry in mpq.transforms.scale_fold.SCALE_GROUPS")
    return sizes.pop()


def _prev_size(prev: nn.Module, kind: str) -> int | None:
    """Number of output channels of ``prev`` that can carry a scale, or None if it can't."""
    if kind == "linear":
        return prev.weight.shape[0]
    weight = getattr(prev, "weight", None)
    if weight is None:  # e.g. nn.LayerNorm(elementwise_affine=False)
        return None
    if kind == "layernorm" and getattr(prev, "bias", None) is None:
        return None
    return weight.shape[0]


def scale_groups(model_or_config, block: nn.Module) -> list[ScaleGroup]:
    """The scale groups of ``SCALE_GROUPS[model_type]`` whose fold is exact for ``block``.

    ``model_or_config`` is a ``PreTrainedModel`` or its config.  Dropped: a group whose ``prev``
    output size differs from the linears' input size (v_proj → o_proj under grouped-query
    attention, where several query heads read the same v channel), a norm group without an
    affine weight, OPT's norm groups when ``do_layer_norm_before`` is False (post-LN: the norm's
    output is not the linears' input) and OPT's fc1 → fc2 through a non-ReLU activation.
    Raises ModelError for a model_type without an entry.
    """
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SCALE_GROUPS:
        raise ModelError(f"no scale-folding data for model_type '{model_type}'",
                         hint="add its groups to mpq.transforms.scale_fold.SCALE_GROUPS")
    kept = []
    for group in SCALE_GROUPS[model_type]:
        if model_type == "opt":
            if group.prev_kind != "linear" and not getattr(config, "do_layer_norm_before", True):
                continue
            if group.prev == "fc1" and (getattr(config, "activation_function", "relu")
                                        not in _POSITIVE_HOMOGENEOUS):
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
        elif group.prev_kind == "linear":
            _replace(prev.weight, w / s[:, None])
        else:  # rmsnorm, layernorm
            _replace(prev.weight, w / s)
        bias = getattr(prev, "bias", None)
        if bias is not None and group.prev_kind in ("layernorm", "linear"):
            _replace(bias, bias.float() / s)
        for path in group.linears:
            weight = block.get_submodule(path).weight
            _replace(weight, weight.float() * s.to(weight.device))


def group_weight_absmax(block: nn.Module, group: ScaleGroup) -> torch.Tensor:
    """Per-input-channel max |W[:, j]| over all linears of ``group``, as float32 [K]."""
    _in_features(block, group)  # checks the linears agree on K
    maxima = [block.get_submodule(path).weight.detach().abs().amax(dim=0).float()
              for path in group.linears]
    result = maxima[0]
    for m in maxima[1:]:
        result = torch.maximum(result, m.to(result.device))
    return result
