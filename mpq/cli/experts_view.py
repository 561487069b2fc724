"""Fused MoE experts as ``mpq plan`` / ``inspect`` show them: one row per group of expert slices
(same projection pattern, scheme and deciding rule), not one row per expert; the per-expert
details stay in ``--json``."""
from __future__ import annotations

from dataclasses import dataclass, field

from mpq.models.coverage import name_pattern


@dataclass
class ExpertGroup:
    """Expert slices of one projection pattern (block index as ``*``) sharing a scheme and rule."""

    pattern: str  # e.g. model.layers.*.mlp.experts.gate_up_proj
    shape: tuple[int, int]
    scheme: object
    reason: str
    experts: set[int] = field(default_factory=set)
    blocks: set[int] = field(default_factory=set)
    names: list[str] = field(default_factory=list)

    def label(self) -> str:
        blocks = f" (blocks {_ranges(self.blocks)})" if self.blocks else ""
        return f"experts {_ranges(self.experts)} of {self.pattern}{blocks}"


def _ranges(values: set[int]) -> str:
    """{0, 1, 2, 5} → ``0-2, 5``."""
    ordered, parts = sorted(values), []
    start = prev = None
    for value in ordered + [None]:
        if value is not None and prev is not None and value == prev + 1:
            prev = value
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = value
    return ", ".join(parts)


def plan_rows(plan) -> list:
    """The plan's layers in order, each run of expert slices replaced by its ExpertGroup (at
    the place of its first slice); other layers as they are."""
    rows, groups = [], {}
    for layer in plan.layers:
        if layer.expert is None:
            rows.append(layer)
            continue
        fused = layer.name.rpartition(".")[0]
        scheme = layer.scheme.to_dict() if layer.scheme is not None else None
        key = (name_pattern(fused), repr(scheme), layer.rule, layer.reason)
        group = groups.get(key)
        if group is None:
            group = groups[key] = ExpertGroup(name_pattern(fused), layer.shape, layer.scheme,
                                              layer.reason)
            rows.append(group)
        group.experts.add(layer.expert)
        if layer.block is not None:
            group.blocks.add(layer.block)
        group.names.append(layer.name)
    return rows


def routing_lines(plan, log) -> list[str]:
    """Per fused projection pattern: the routed calibration tokens per expert (min, median,
    max over experts and blocks) and how many slices took the RTN fallback, from a run log."""
    if log is None:  # before a run: say what the run will count and when it falls back
        from mpq.engine.spec import needed_stats

        calibrated = [l for l in plan.quantized()
                      if l.expert is not None and l.name in needed_stats(plan)]
        if not calibrated:
            return []
        return [f"{len(calibrated)} expert slices are calibrated on the tokens routed to them: "
                "the run records each one's routed-token count, and one with fewer than "
                f"{plan.min_expert_tokens} takes rtn on its scheme's grid (recorded with the reason)"]
    lines = []
    for row in plan_rows(plan):
        if not isinstance(row, ExpertGroup) or row.scheme is None:
            continue
        results = [log.layers.get(name, {}) for name in row.names]
        tokens = sorted(r["routed_tokens"] for r in results if "routed_tokens" in r)
        fallbacks = sum("fallback" in r for r in results)
        if not tokens and not fallbacks:
            continue
        counts = (f"routed tokens per expert min {tokens[0]}, median {tokens[len(tokens) // 2]},"
                  f" max {tokens[-1]}" if tokens else "routed tokens not counted")
        lines.append(f"{row.label()}: {counts}; {fallbacks} of {len(row.names)} on the rtn "
                     "fallback" + (" (too few routed tokens)" if fallbacks else ""))
    return lines


def transform_lines(plan) -> list[str]:
    """For a plan with transforms (SmoothQuant, AWQ) that quantizes fused experts: one line
    saying the experts get none of them, and why (mpq.models.experts.NO_SMOOTHING)."""
    from mpq.models.experts import NO_SMOOTHING

    experts = [l for l in plan.quantized() if l.expert is not None]
    if not plan.transforms or not experts:
        return []
    types = ", ".join(spec.type for spec in plan.transforms)
    return [f"{types}: not applied to the {len(experts)} quantized expert slices; "
            f"{NO_SMOOTHING}"]
