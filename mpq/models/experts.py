"""Mixture-of-experts experts stored as fused 3-D parameters, seen as one plan layer per slice.

transformers 5 stores the experts of Qwen3-MoE, Mixtral and others in one module holding
``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]; its forward receives the block's hidden
states [T, H] with the router's choice, ``top_k_index`` [T, k] and ``top_k_weights`` [T, k], and
computes for each expert e and the tokens routed to it
``down_proj[e] @ (act(gate) * up)`` with ``gate, up = chunk(gate_up_proj[e] @ x, 2)``.

mpq plans each expert's matrix of each projection as a layer of its own, named
``<experts module>.<projection>.<e>`` (e.g. ``model.layers.0.mlp.experts.gate_up_proj.3``): the
[out, in] slice ``param[e]``, applied like a linear to the tokens routed to e.  Only that
layout is supported (attributes set by transformers' ``use_experts_implementation``:
concatenated gate/up, not transposed, no biases, gated); other fused layouts (e.g. GPT-OSS's
transposed experts with biases) stay out of the plan and the parameter account lists them as
kept, with the reason.

The router (``mlp.gate``, a module with an [E, H] ``weight`` applied like a linear) is planned as
a protected layer: kept by default for routing stability, quantized only by a rule naming it
exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PROJECTIONS = ("gate_up_proj", "down_proj")
# why SmoothQuant/AWQ leave fused experts alone (written into each block's transform record)
NO_SMOOTHING = ("fused MoE experts get no smoothing, scale search or clipping: the norm that "
                "feeds them feeds the router and every expert at once, so no per-channel scale "
                "folds into one expert alone, and each expert sees only its routed tokens")


@dataclass(frozen=True)
class FusedExperts:
    """One experts module: its name, class name, and the [E, out, in] shape of each projection."""

    name: str
    class_name: str
    num_experts: int
    shapes: dict[str, tuple[int, int]]  # projection → per-expert [out, in]


def unsupported_layout(module: nn.Module) -> str | None:
    """Why the fused experts ``module`` cannot be planned (None: it can)."""
    params = dict(module.named_parameters(recurse=False))
    if any(p not in params or params[p].dim() != 3 for p in PROJECTIONS):
        return "not the gate_up_proj [E, 2I, H] / down_proj [E, H, I] layout"
    if set(params) - set(PROJECTIONS) or getattr(module, "has_bias", False):
        return "experts with biases"
    if getattr(module, "is_transposed", False):
        return "transposed expert weights"
    if not getattr(module, "is_concatenated", True) or not getattr(module, "has_gate", True):
        return "an interleaved or ungated gate/up layout"
    experts, double_inner, hidden = params["gate_up_proj"].shape
    if params["down_proj"].shape != (experts, hidden, double_inner // 2) or double_inner % 2:
        return "down_proj's shape does not match gate_up_proj's"
    return None


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding 3-D ``gate_up_proj`` and ``down_proj`` parameters."""
    params = dict(module.named_parameters(recurse=False))
    return all(p in params and params[p].dim() == 3 for p in PROJECTIONS)


def fused_experts(model: nn.Module) -> list[FusedExperts]:
    """The planable fused experts modules of ``model``, in module order."""
    found = []
    for name, module in model.named_modules():
        if not is_fused_experts(module) or unsupported_layout(module) is not None:
            continue
        shapes = {p: tuple(int(d) for d in getattr(module, p).shape[1:]) for p in PROJECTIONS}
        found.append(FusedExperts(name, type(module).__name__,
                                  int(module.gate_up_proj.shape[0]), shapes))
    return found


def routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each MoE router beside planable fused experts: a sibling ``gate``
    module with one [E, H] ``weight`` parameter."""
    modules = dict(model.named_modules())
    out = []
    for experts in fused_experts(model):
        parent = experts.name.rpartition(".")[0]
        name = f"{parent}.gate" if parent else "gate"
        gate = modules.get(name)
        weight = getattr(gate, "weight", None)
        if (gate is not None and isinstance(weight, nn.Parameter) and weight.dim() == 2
                and weight.shape[0] == experts.num_experts
                and len(list(gate.parameters())) == 1):
            out.append((name, gate))
    return out


def slice_name(experts: str, projection: str, index: int) -> str:
    return f"{experts}.{projection}.{index}"


def split_slice(name: str) -> tuple[str, str, int]:
    """``a.experts.gate_up_proj.3`` → (``a.experts``, ``gate_up_proj``, 3)."""
    fused, _, index = name.rpartition(".")
    module, _, projection = fused.rpartition(".")
    return module, projection, int(index)


def fused_param_name(name: str) -> str:
    """The fused parameter holding slice ``name``: ``a.experts.gate_up_proj``."""
    return name.rpartition(".")[0]


def slice_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The [out, in] weight of expert slice ``name`` (a view into the fused parameter)."""
    module, projection, index = split_slice(name)
    return getattr(model.get_submodule(module), projection)[index]


def install_slice(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Write ``weight`` [out, in] into slice ``name``.  The first write to a fused parameter
    moves it to new memory, so the source's pages (a memory-mapped checkpoint) are not
    written to."""
    module_name, projection, index = split_slice(name)
    module = model.get_submodule(module_name)
    param = getattr(module, projection)
    owned = module.__dict__.setdefault("_mpq_owned", {})  # projection → data_ptr of our copy
    with torch.no_grad():
        if owned.get(projection) != param.data.data_ptr():
            param.data = param.data.clone()
            owned[projection] = param.data.data_ptr()
        param.data[index] = weight.to(device=param.device, dtype=param.dtype)


def routed_tokens(top_k_index: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """For each expert, the indices of the tokens routed to it (``top_k_index`` [T, k])."""
    flat = top_k_index.reshape(top_k_index.shape[0], -1)
    return [torch.nonzero((flat == e).any(dim=-1)).flatten() for e in range(num_experts)]


def expert_activation(module: nn.Module, hidden: torch.Tensor, index: int) -> torch.Tensor:
    """The input of expert ``index``'s down projection for the rows of ``hidden`` (routed to
    it): ``act(gate) * up`` with its current gate_up weight."""
    gate_up = torch.nn.functional.linear(hidden, module.gate_up_proj[index].to(hidden.dtype))
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up
