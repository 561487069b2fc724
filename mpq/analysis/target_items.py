"""What a serving target (mpq.checkpoint.serving) leaves the mixed-precision choice.

The knapsack of :mod:`mpq.analysis.mixed_precision` picks per *item*: a layer, or, when the
target runs fused groups as one GEMM (vLLM), a whole fused group (its damage and cost the sums of
its members', one candidate for all).  Each item's options are the candidates the target runs on
every member (the float candidate of an edge row always stays).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from mpq.errors import RecipeError
from mpq.analysis.sensitivity_table import LayerRow, SensitivityTable
from mpq.checkpoint.serving import ServingTarget, fused_layer_groups
from mpq.config.plan import LayerPlan


class Item(NamedTuple):
    """Layers chosen together, and the candidates open to them."""

    names: tuple[str, ...]
    options: tuple[str, ...]


def runs(target: ServingTarget, row: LayerRow, candidate: str) -> bool:
    """Whether ``target`` runs ``row`` quantized with ``candidate`` (float always runs)."""
    scheme = row.scheme(candidate)
    if scheme is None:
        return True
    layer = LayerPlan(row.name, "Linear", tuple(row.shape), row.block, scheme, None, "",
                      embedding=row.role == "embedding")
    return not target.layer_problems(layer)


def items(table: SensitivityTable, names: Sequence[str], candidates: Sequence[str],
          target: ServingTarget, model_type: str | None) -> list[Item]:
    """The knapsack's items over layers ``names``: fused groups (when ``target`` fuses) and
    single layers, each with the candidates ``target`` runs on all its members.  RecipeError
    naming the first item left with no candidate."""
    rows = {name: table.row(name) for name in names}
    grouped = fused_layer_groups(names, model_type) if target.fused else []
    in_group = {name for group in grouped for name in group}
    units = grouped + [(name,) for name in names if name not in in_group]
    out = []
    for unit in sorted(units, key=lambda u: names.index(u[0])):
        options = [c for c in rows[unit[0]].options(candidates)
                   if all(c in rows[n].options(candidates) and runs(target, rows[n], c)
                          for n in unit)]
        if not options:
            raise RecipeError(f"--target {target.name}: no candidate is one {target.engine} "
                              f"runs on {' + '.join(unit)}",
                              hint="add a candidate it runs (e.g. int4-g64, int8) with "
                                   "--candidates, or --target any")
        out.append(Item(tuple(unit), tuple(options)))
    return out


def suited(target: ServingTarget, layers, candidates: Sequence[str]) -> list[str]:
    """The ``candidates`` that ``target`` runs on at least one of the decoder-block ``layers``
    (mpq.analysis.sensitivity.TargetLayer), so no time is spent measuring the others."""
    out = []
    for name in candidates:
        for layer in layers:
            scheme = layer.schemes.get(name)
            if layer.block is None or scheme is None:
                continue
            plan = LayerPlan(layer.name, "Linear", tuple(layer.shape), layer.block, scheme,
                             None, "")
            if not target.layer_problems(plan):
                out.append(name)
                break
    return out

