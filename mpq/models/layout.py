"""Architecture facts as data, and the generic discovery that finds them.

The engine needs four things from a causal LM: the list of decoder blocks, the quantizable
linear layers (``nn.Linear`` and GPT-2's transposed ``Conv1D``), which layer is the output
head and which the input embedding (a protected layer too, its weight [vocab, hidden] planned
like a linear's [N, K]; whether the two share one tensor: :func:`tied_pair`).  A model type with a family record (mpq.models.families) gives the path of its block list;
any other model falls back to the largest ``ModuleList`` of identical blocks, which is tested
against the records.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mpq.errors import ModelError
from mpq.config.plan import LayerInfo
from mpq.models.experts import (PROJECTIONS, FusedExperts, fused_experts, install_slice, routers,
                                slice_name, slice_weight)
from mpq.models.families import family_of

LINEAR_CLASSES = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class ModelLayout:
    """Where things are in one model instance."""

    blocks_path: str
    num_blocks: int
    head_name: str | None
    embed_name: str | None = None  # the input embedding (get_input_embeddings)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_CLASSES)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (Conv1D stores [in, out])."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def set_weight(module: nn.Module, weight_out_in: torch.Tensor) -> None:
    """Give a linear's weight Parameter new values from an [out, in] tensor (in new memory, so
    the old values, e.g. pages of a memory-mapped checkpoint, are not written to)."""
    target = weight_out_in.t() if isinstance(module, Conv1D) else weight_out_in
    if target.shape != module.weight.shape:
        raise ValueError(f"weight shape {tuple(target.shape)} != {tuple(module.weight.shape)}")
    with torch.no_grad():
        module.weight.data = target.to(module.weight.dtype).contiguous()


def untie_head(model: nn.Module) -> bool:
    """Give an output head tied to the input embedding its own copy of the weight (and say so
    in the config); False when it is not tied.  The run does this when the plan's tie record
    says the pair is untied (mpq.config.tying), and before a rotation."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    return True


def tied_pair(model: nn.Module, layout: ModelLayout) -> tuple[str, str] | None:
    """(input embedding, output head) module names when their weights are one tensor — the
    same Parameter, or tied by the model's ``all_tied_weights_keys`` (a meta skeleton) — else
    None."""
    embed, head = layout.embed_name, layout.head_name
    if embed is None or head is None:
        return None
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if tied.get(f"{head}.weight") == f"{embed}.weight":
        return embed, head
    same = model.get_submodule(head).weight is model.get_submodule(embed).weight
    return (embed, head) if same else None


def input_embedding(model: nn.Module) -> nn.Module | None:
    """The model's input embedding module when it is an nn.Embedding (else None)."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embed = getter() if getter is not None else None
    except NotImplementedError:
        return None
    return embed if isinstance(embed, nn.Embedding) else None


def discover_blocks_path(model: nn.Module) -> str:
    """The largest (by parameter count) ModuleList whose children all share one class."""
    best, best_params = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = name, params
    if best is None:
        raise ModelError(f"cannot find the decoder blocks of {type(model).__name__}",
                         hint="add a record of its family (block path) to mpq.models.families")
    return best


def layout_of(model: nn.Module) -> ModelLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = family_of(model)
    path = family.blocks if family is not None else discover_blocks_path(model)
    try:
        blocks = model.get_submodule(path)
    except AttributeError:
        raise ModelError(f"{type(model).__name__}: no module at '{path}' (model_type "
                         f"{model_type})",
                         hint=f"fix the blocks of family '{family.name}' in "
                              "mpq.models.families") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head else None
    embed = input_embedding(model)
    embed_name = next((n for n, m in model.named_modules() if m is embed), None) if embed \
        else None
    return ModelLayout(blocks_path=path, num_blocks=len(blocks), head_name=head_name,
                       embed_name=embed_name)


def blocks_of(model: nn.Module, layout: ModelLayout) -> nn.ModuleList:
    return model.get_submodule(layout.blocks_path)


def block_index(name: str, layout: ModelLayout) -> int | None:
    prefix = layout.blocks_path + "."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def describe_layers(model: nn.Module, layout: ModelLayout) -> tuple[list[LayerInfo], dict[str, str]]:
    """Quantizable layers as LayerInfo, plus the other leaf modules (name → class) for hints.

    Fused MoE experts give one layer per expert and projection, and their router a protected
    layer (mpq.models.experts); the input embedding is a protected layer with ``embedding``
    set."""
    layers, others = [], {}
    experts = {fused.name: fused for fused in fused_experts(model)}
    gates = {name for name, _ in routers(model)}
    for name, module in model.named_modules():
        if name in experts:
            layers.extend(_expert_layers(experts[name], block_index(name, layout)))
        elif name in gates:
            n_out, n_in = module.weight.shape
            layers.append(LayerInfo(name=name, class_name=type(module).__name__,
                                    shape=(int(n_out), int(n_in)),
                                    block=block_index(name, layout), protected=True))
        elif name == layout.embed_name and name:
            vocab, hidden = module.weight.shape
            layers.append(LayerInfo(name=name, class_name=type(module).__name__,
                                    shape=(int(vocab), int(hidden)), protected=True,
                                    bases=_bases(module), embedding=True))
        elif is_linear(module):
            n_out, n_in = weight_of(module).shape
            layers.append(LayerInfo(name=name, class_name=type(module).__name__,
                                    shape=(int(n_out), int(n_in)),
                                    block=block_index(name, layout),
                                    protected=name == layout.head_name, bases=_bases(module)))
        elif name and not list(module.children()):
            others[name] = type(module).__name__
    return layers, others


def _bases(module: nn.Module) -> tuple[str, ...]:
    """Names of the module classes ``module``'s class derives from (nn.Module excluded)."""
    return tuple(cls.__name__ for cls in type(module).__mro__[1:]
                 if issubclass(cls, nn.Module) and cls is not nn.Module)


def _expert_layers(fused: FusedExperts, block: int | None) -> list[LayerInfo]:
    """One LayerInfo per projection and expert, projection by projection."""
    return [LayerInfo(name=slice_name(fused.name, projection, index),
                      class_name=fused.class_name, shape=fused.shapes[projection], block=block,
                      expert=index)
            for projection in PROJECTIONS for index in range(fused.num_experts)]


def layer_weight(model: nn.Module, name: str, expert: int | None) -> torch.Tensor:
    """The [out, in] weight of plan layer ``name`` (``expert``: the LayerPlan's field)."""
    if expert is not None:
        return slice_weight(model, name)
    return weight_of(model.get_submodule(name))


def install_layer_weight(model: nn.Module, name: str, expert: int | None,
                         weight_out_in: torch.Tensor) -> None:
    """Give plan layer ``name`` new weight values (in new memory: see :func:`set_weight`)."""
    if expert is not None:
        install_slice(model, name, weight_out_in)
    else:
        set_weight(model.get_submodule(name), weight_out_in)
