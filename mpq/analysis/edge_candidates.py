"""The input embedding and the output head as items of layer sensitivity and mixed precision.

When the base recipe of ``mpq sensitivity -r BASE`` or ``mpq quantize --target-bits/--target-size``
quantizes the input embedding or the output head (the ``*-compact`` presets' int8 per-row rule),
those tensors join the knapsack as items of their own, with their own damage and bytes, instead
of being fixed bytes beside it:

- their candidates are every candidate whose scheme a lookup table can take (``rtn``, int per
  row or per group along the hidden size, fp8_e4m3 per row: mpq.engine.spec.EMBEDDING_FORMATS;
  a shorthand such as ``int4-g64`` gives its rule's scheme, a preset or recipe file the scheme it
  gives that tensor) plus :data:`FLOAT`: kept in the artifact's storage dtype (its damage is that
  dtype's rounding, 0 for fp32; its bytes those of the float tensor);
- a **tied** pair (one tensor for both, mpq.config.tying) is one item: the shared tensor, its
  weights and bytes counted once, its damage that of perturbing the shared weight through both
  uses (the Fisher of a tied Parameter sums both uses' gradients; the exact KL replays from block
  0).  The chosen scheme goes to both sides, so the pair stays one tensor; ``float`` leaves it as
  it was.  Choosing different schemes for the two sides (which unties them, at the cost of a
  copy) is not a candidate.

A base recipe that quantizes neither leaves them out: plans and tables are as they were.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from mpq.config.scheme import LayerScheme

from mpq.analysis.sensitivity_table import FLOAT, TargetLayer, float_cost

if TYPE_CHECKING:
    from mpq.analysis.candidates import Candidate
    from mpq.config.plan import Plan

EMBEDDING, HEAD, TIED = "embedding", "head", "tied"  # roles of an edge item


def storage_dtype_of(source_dir: Path, base) -> str:
    """The dtype (fp32/bf16/fp16) ``base`` (a Recipe) stores float tensors of ``source_dir`` in."""
    from mpq.checkpoint.storage import resolve_storage_dtype
    from mpq.models.source import read_config, source_weight_map

    return resolve_storage_dtype(base.storage_dtype, source_dir, source_weight_map(source_dir),
                                 read_config(source_dir))


def table_scheme(scheme: LayerScheme | None) -> LayerScheme | None:
    """``scheme`` when a lookup table can take it (see the module docstring), else None."""
    from mpq.engine.spec import EMBEDDING_FORMATS

    if scheme is None or scheme.algorithm != "rtn" or scheme.input_activations is not None:
        return None
    args = scheme.weights
    return scheme if args.granularity in EMBEDDING_FORMATS.get(args.format, ()) else None


def _candidate_scheme(candidate: "Candidate", plan: "Plan", name: str) -> LayerScheme | None:
    """The scheme ``candidate`` gives edge tensor ``name``: its plan's, else (a shorthand or a
    one-rule recipe that does not name it) its only rule's, when a lookup table can take it."""
    layer = plan.get(name)
    if layer is not None and layer.scheme is not None:
        return table_scheme(layer.scheme)
    rules = candidate.recipe.rules
    if len(rules) == 1 and rules[0].scheme is not None:  # measured with RTN, as every layer is
        return table_scheme(LayerScheme(algorithm="rtn", weights=rules[0].scheme.weights))
    return None


def _fits(scheme: LayerScheme, shape: tuple[int, int]) -> bool:
    args = scheme.weights
    return args.granularity != "group" or shape[1] % args.group_size == 0


def edge_layers(model: nn.Module, candidates: Sequence["Candidate"], plans: dict[str, "Plan"],
                base_plan: "Plan", storage: str) -> list[TargetLayer]:
    """The edge items of ``model`` (weights may be on meta) that ``base_plan`` quantizes, each
    with the schemes of the ``candidates`` that apply (``plans``: each candidate's plan) and
    :data:`FLOAT` (None)."""
    from mpq.analysis.candidates import on_base
    from mpq.models.layout import layout_of, tied_pair

    layout = layout_of(model)
    quantized = {layer.name for layer in base_plan.quantized()}
    tied = tied_pair(model, layout)
    if tied is not None:
        items = [(tied[0], TIED, tied[1])] if quantized & set(tied) else []
    else:
        items = [(name, role, None) for name, role in ((layout.embed_name, EMBEDDING),
                                                       (layout.head_name, HEAD))
                 if name is not None and name in quantized]
    out = []
    for name, role, partner in items:
        shape = tuple(model.get_submodule(name).weight.shape)
        base = next(layer.scheme for layer in base_plan.quantized()
                    if layer.name in (name, partner))
        schemes: dict[str, LayerScheme | None] = {}
        for candidate in candidates:
            scheme = _candidate_scheme(candidate, plans[candidate.name], name)
            if scheme is not None and _fits(scheme, shape):  # with the base's scale dtype
                schemes[candidate.name] = on_base(scheme, base, f"candidate '{candidate.name}' "
                                                                f"on {name}")
        schemes[FLOAT] = None
        out.append(TargetLayer(name, shape, None, schemes, role=role, tied_with=partner,
                               storage=storage))
    return out


def float_error(weight: torch.Tensor, storage: str) -> torch.Tensor:
    """What storing ``weight`` in ``storage`` changes (fp32)."""
    from mpq.checkpoint.storage import STORAGE_TORCH

    w = weight.detach().float()
    return w.to(STORAGE_TORCH[storage]).float() - w


def base_item_bytes(plan: "Plan", layer: TargetLayer, output_format: str) -> int:
    """The bytes edge item ``layer`` takes in ``plan``'s artifact: one shared tensor, or each
    side of an untied pair (quantized, or a float copy in the storage dtype)."""
    float_bytes = float_cost(layer.shape, layer.storage)[1]

    def side(name: str) -> int:
        planned = plan.get(name)
        if planned is None or planned.scheme is None:
            return float_bytes
        return planned.scheme.stored_bytes(layer.shape, output_format)

    if layer.tied_with is None:
        return side(layer.name)
    tying = plan.tying
    if tying is not None and tying.shared:
        return side(layer.name)
    return side(layer.name) + side(layer.tied_with)


def replay_start(layer: TargetLayer, num_blocks: int) -> int:
    """The first block the exact KL must run for edge item ``layer``: the head alone needs none
    (every block replays), the embedding (or a tied pair) all of them."""
    return num_blocks if layer.role == HEAD else 0
