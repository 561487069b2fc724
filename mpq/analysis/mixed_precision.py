"""Automatic mixed precision: one candidate scheme per layer under a bit or byte budget.

Given a sensitivity table (:mod:`mpq.analysis.sensitivity`: per layer and candidate, the damage of
quantizing that layer alone and its cost), the predicted damage of a whole assignment is the sum of
its per-layer damages (the first-order additivity a Fisher/KL proxy implies), and the choice is a
*multiple-choice knapsack*: minimise Σ_l d[l, c_l] subject to Σ_l cost[l, c_l] ≤ budget, exactly
one candidate per layer.

Solver (:func:`solve_mckp`): dynamic programming over the budget.  Costs are integers (bits of the
unpadded encoding, or bytes); each layer's cost is taken relative to its cheapest candidate (so
the all-cheapest assignment is always representable) and measured in units of the greatest
common divisor of those extra costs — then the DP is *exact*.  Only when that would need more
than ``resolution`` (200 000) cells, the unit grows to budget/resolution and extra costs are
rounded *up* (the result still respects the real budget, and is optimal for the rounded costs; at
most one unit per layer of budget can go unused).  On SmolLM2-135M with int8/4/3/2 candidates the
gcd is 12 288 bits, so the DP is exact with ~17 000 cells.  O(layers × candidates × cells) in numpy.

The choice becomes a real recipe (:func:`build_recipe`): one rule per chosen scheme listing its
layers by exact name, followed by the base recipe's rules that decide the other layers (lm_head,
...), its transforms, kv_cache, rotation and precision policy.  The target and the achieved bits
go into the recipe's name and description, so they travel inside the artifact.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mpq.errors import RecipeError
from mpq.config.recipe import Recipe, parse_recipe
from mpq.analysis.sensitivity_table import SensitivityTable, layer_cost

RESOLUTION = 200_000
SIZE_PASSES = 4  # --target-size: choices made before the estimated artifact must fit
HEADER_MARGIN = 0.03  # of the estimated header (SmolLM2, a mixed recipe: the estimate was 1.1 % low)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6,
               "g": 10**9}


def parse_size(text: str) -> int:
    """'70MB' → 70 000 000, '1.5GiB' → bytes; RecipeError for anything else."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise RecipeError(f"cannot read the size '{text}'",
                          hint="e.g. 70MB, 68.5MiB, 1.2GB or a number of bytes")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value <= 0:
        raise RecipeError(f"the size must be positive, got '{text}'")
    return int(value)


def solve_mckp(damage: Sequence[Sequence[float]], cost: Sequence[Sequence[int]], budget: int, *,
               resolution: int = RESOLUTION) -> list[int] | None:
    """Indices (one per item) minimising Σ damage subject to Σ cost ≤ budget; None when even the
    cheapest choice exceeds the budget.  See the module docstring for exactness."""
    n = len(damage)
    if n == 0:
        return []
    base = [min(row) for row in cost]
    spare = budget - sum(base)
    if spare < 0:
        return None
    extra = [[int(c) - b for c in row] for row, b in zip(cost, base)]
    positive = [e for row in extra for e in row if e > 0]
    unit = reduce(math.gcd, positive, 0) or 1
    if spare // unit > resolution:
        unit = max(unit, -(-spare // resolution))
    units = [[-(-e // unit) for e in row] for row in extra]
    cap = spare // unit
    best = np.zeros(cap + 1)  # min damage of the items so far with extra cost ≤ c
    choice = np.zeros((n, cap + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(cap + 1, np.inf)
        for j, (w, d) in enumerate(zip(units[i], damage[i])):
            if w > cap:
                continue
            shifted = np.full(cap + 1, np.inf)
            shifted[w:] = best[:cap + 1 - w] + float(d)
            better = shifted < new
            new[better] = shifted[better]
            choice[i, better] = j
        best = new
    picks = [0] * n
    c = cap
    for i in reversed(range(n)):
        j = int(choice[i, c])
        picks[i] = j
        c -= units[i][j]
    return picks


@dataclass
class MixedChoice:
    """The chosen candidate per layer and the figures of the choice."""

    target: str  # e.g. "4.5 bits/weight" or "70000000 bytes"
    picks: dict[str, str]  # layer → candidate
    bits_per_weight: float  # achieved, over the chosen layers (unpadded encoding)
    predicted_damage: float
    layer_bytes: int  # quantized bytes of the chosen layers in the output format
    fixed_bytes: int | None = None  # everything else (size targets only)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for candidate in self.picks.values():
            out[candidate] = out.get(candidate, 0) + 1
        return out

    def describe(self) -> str:
        counts = ", ".join(f"{n} layers {c}" for c, n in self.counts().items())
        text = (f"automatic mixed precision (mpq): target {self.target}, achieved "
                f"{self.bits_per_weight:.4f} bits/weight over {len(self.picks)} layers")
        if self.fixed_bytes is not None:
            text += f", {self.fixed_bytes + self.layer_bytes} bytes expected"
        return f"{text}; predicted damage {self.predicted_damage:.4g} nats/token; {counts}"

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "bits_per_weight": self.bits_per_weight,
                "predicted_damage": self.predicted_damage, "layer_bytes": self.layer_bytes,
                "fixed_bytes": self.fixed_bytes, "counts": self.counts(), "picks": self.picks}


def _total_bits(table: SensitivityTable, name: str, candidate: str) -> int:
    row = table.row(name)
    return round(row.bits[candidate] * row.shape[0] * row.shape[1])


def choose(table: SensitivityTable, *, target_bits: float | None = None,
           target_bytes: int | None = None, fixed_bytes: int = 0,
           candidates: Sequence[str] | None = None, output_format: str = "mpq",
           layers: Sequence[str] | None = None, items: Sequence | None = None) -> MixedChoice:
    """Pick one candidate per layer of ``table`` (or of ``layers``) minimising the summed damage
    with average bits per weight ≤ ``target_bits``, or ``fixed_bytes`` + the layers' bytes in
    ``output_format`` ≤ ``target_bytes``.  ``items`` (mpq.analysis.target_items.Item: layers
    chosen together and their open candidates; default: each layer alone with all its
    candidates) is what a serving target leaves.  RecipeError naming the minimum achievable
    when the target is below the cheapest candidate."""
    if (target_bits is None) == (target_bytes is None):
        raise RecipeError("give exactly one of --target-bits and --target-size")
    names = list(layers) if layers is not None else [row.name for row in table.layers]
    cands = list(candidates) if candidates is not None else list(table.candidates)
    missing = [c for c in cands if c not in table.candidates]
    if missing:
        raise RecipeError(f"the sensitivity table has no candidate {', '.join(missing)}",
                          hint=f"it has {', '.join(table.candidates)}; re-run mpq sensitivity")
    rows = {name: table.row(name) for name in names}
    if items is None:  # an edge row adds its float candidate
        items = [((name,), tuple(rows[name].options(cands))) for name in names]
    weights = sum(r.shape[0] * r.shape[1] for r in rows.values())
    options = [list(opts) for _, opts in items]
    damage = [[sum(rows[n].damage[c] for n in members) for c in opts]
              for members, opts in items]
    if target_bits is not None:
        if not target_bits > 0:
            raise RecipeError(f"--target-bits must be positive, got {target_bits}")
        cost = [[sum(_total_bits(table, n, c) for n in members) for c in opts]
                for members, opts in items]
        budget = math.floor(target_bits * weights + 1e-6)
        target = f"{target_bits:g} bits/weight"
    else:
        cost = [[sum(rows[n].cost_bytes(c, output_format) for n in members) for c in opts]
                for members, opts in items]
        budget = int(target_bytes) - int(fixed_bytes)
        target = f"{int(target_bytes)} bytes"
    picks = solve_mckp(damage, cost, budget)
    if picks is None:
        cheapest = [min(range(len(cost_row)), key=lambda j: cost_row[j]) for cost_row in cost]
        low = sum(row[j] for row, j in zip(cost, cheapest))
        used = sorted({opts[j] for opts, j in zip(options, cheapest)})
        if target_bits is not None:
            minimum = f"{low / weights:.4f} bits/weight"
        else:
            minimum = f"{low + fixed_bytes} bytes ({(low + fixed_bytes) / 1e6:.2f} MB)"
        raise RecipeError(f"target {target} is below what the candidates can reach: the minimum "
                          f"achievable is {minimum} (every layer {', '.join(used)})",
                          hint="raise the target, or add a cheaper candidate (--candidates)")
    picked = {n: opts[j] for (members, _), opts, j in zip(items, options, picks) for n in members}
    chosen = {name: picked[name] for name in names}
    bits = sum(_total_bits(table, n, chosen[n]) for n in names) / weights
    layer_bytes = sum(rows[n].cost_bytes(chosen[n], output_format) for n in names)
    return MixedChoice(target=target, picks=chosen, bits_per_weight=bits,
                       predicted_damage=sum(rows[n].damage[chosen[n]] for n in names),
                       layer_bytes=layer_bytes,
                       fixed_bytes=int(fixed_bytes) if target_bytes is not None else None)


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, width=100, default_flow_style=False,
                          allow_unicode=True)


def build_recipe(base: Recipe, table: SensitivityTable, choice: MixedChoice, model,
                 name: str | None = None) -> tuple[str, Recipe]:
    """The recipe text (YAML) of ``choice`` on top of ``base`` and its parsed Recipe.

    ``model`` (weights may be on meta) resolves the base recipe, to keep only its rules that
    decide a layer outside the choice."""
    from mpq.engine.spec import as_recipe, plan_model

    _, base_plan = plan_model(model, base)
    groups: dict[str, list[str]] = {}
    schemes: dict[str, dict] = {}
    for layer_name, candidate in choice.picks.items():
        row = table.row(layer_name)
        scheme = row.schemes[candidate]
        scheme = scheme if scheme is not None else {"skip": True}  # an edge kept in float
        key = json.dumps(scheme, sort_keys=True)
        schemes[key] = scheme
        groups.setdefault(key, []).extend(row.names)  # a tied pair: both sides, one scheme
    rules = []
    for key, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        rules.append({"targets": names, **schemes[key]})
    chosen = {name for layer_name in choice.picks for name in table.row(layer_name).names}
    keep = {layer.rule for layer in base_plan.layers
            if layer.name not in chosen and layer.rule is not None}
    rules.extend(rule.to_dict() for rule in base.rules if rule.index in keep)
    base_dict = base.to_dict()
    label = choice.target.replace(" bits/weight", "b").replace(" bytes", "B")
    data = {"mpq_recipe": base.version,
            "name": name or f"{base.name}-mixed-{label}",
            "description": choice.describe() + f"; base recipe {base.name}",
            "rules": rules, "precision_policy": base_dict["precision_policy"]}
    for extra in ("transforms", "kv_cache", "rotation", "storage_dtype"):
        if extra in base_dict:
            data[extra] = base_dict[extra]
    # this header is part of the recipe stored in artifacts: its bytes stay as they were
    text = ("# written by mpq quantize --target-bits/--target-size (mpq.mixed_precision)\n"
            + _yaml(data))
    recipe = parse_recipe(text, data["name"] + ".yaml",
                          known_algorithms=list(_quantizers()))
    as_recipe(recipe)
    return text, recipe


def _quantizers():
    from mpq.quantizers.base import QUANTIZERS

    return QUANTIZERS


def check_table(table: SensitivityTable, layers, candidates: Sequence[str], source: str) -> None:
    """A table read from a file must cover the model's targeted layers and the candidates."""
    names = {row.name for row in table.layers}
    missing = [layer.name for layer in layers if layer.name not in names]
    if missing:
        raise RecipeError(f"{source} has no row for {len(missing)} layer(s), e.g. {missing[0]}",
                          hint="it was measured on another model or recipe: re-run "
                               "mpq sensitivity on this model (with -r BASE when BASE "
                               "quantizes the input embedding or the output head)")
    for layer in layers:
        row = table.row(layer.name)
        if tuple(row.shape) != tuple(layer.shape):
            raise RecipeError(f"{source}: {layer.name} has shape {list(row.shape)} in the table "
                              f"but {list(layer.shape)} in the model",
                              hint="re-run mpq sensitivity on this model")
    absent = [c for c in candidates if c not in table.candidates]
    if absent:
        raise RecipeError(f"{source} has no candidate {', '.join(absent)}",
                          hint=f"it has {', '.join(table.candidates)}")


def check_rotation(table: SensitivityTable, base_recipe: Recipe, source: str) -> None:
    """A table must have been measured under the base's rotation (or none, for a base without):
    rotated weights have other damages."""
    wanted = base_recipe.rotation.to_dict() if base_recipe.rotation is not None else None
    if table.rotation == wanted:
        return
    measured = (f"on the model rotated by {table.rotation}" if table.rotation is not None
                else "on the unrotated model")
    asked = (f"rotates ({wanted})" if wanted is not None else "does not rotate")
    raise RecipeError(f"{source} was measured {measured}, but the base recipe "
                      f"{base_recipe.source} {asked}",
                      hint="re-run `mpq sensitivity MODEL -r BASE --calib ... -o FILE` with this "
                           "base, or leave out --sensitivity to measure it here")


@dataclass(frozen=True)
class MixedTarget:
    """What ``mpq quantize --target-bits/--target-size`` asks for: exactly one budget (``bits``
    per weight, or an artifact ``size`` such as 70MB), the ``candidates`` (default: the ladder,
    or a given table's), a ``sensitivity_table`` (path or SensitivityTable) to read instead of
    measuring with ``measure``, where to ``save_recipe`` the chosen one (YAML), and the
    ``serving`` target (mpq.checkpoint.serving) whose schemes and fused groups the choice
    keeps to."""

    bits: float | None = None
    size: str | int | None = None
    candidates: str | Sequence[str] | None = None
    sensitivity_table: Any = None
    save_recipe: str | Path | None = None
    measure: str = "fisher"
    serving: str | None = None


def auto_recipe(model_path: str | Path, base: str | Recipe, target: MixedTarget, *,
                calibration=None, output_format: str = "mpq", progress=None
                ) -> tuple[Recipe, MixedChoice, SensitivityTable]:
    """Measure (or read ``target.sensitivity_table``), choose and build the mixed recipe for
    ``mpq quantize --target-bits/--target-size``."""
    target_bits, target_size, candidates = target.bits, target.size, target.candidates
    sensitivity_table, save_recipe, measure = (target.sensitivity_table, target.save_recipe,
                                               target.measure)
    from mpq.errors import CalibrationError, OutputError
    from mpq.models.source import check_model_dir, load_skeleton
    from mpq.engine.spec import as_recipe
    from mpq.analysis.candidates import DEFAULT_CANDIDATES, expand
    from mpq.analysis.edge_candidates import storage_dtype_of
    from mpq.analysis.sensitivity import sensitivity
    from mpq.analysis.target_items import items as target_items
    from mpq.checkpoint.serving import DEFAULT_TARGET, serving_target

    serving = serving_target(target.serving)
    if (target_bits is None) == (target_size is None):
        raise RecipeError("give exactly one of --target-bits and --target-size")
    base_recipe = as_recipe(base)
    target_bytes = parse_size(target_size) if target_size is not None else None
    source_dir = check_model_dir(model_path)
    skeleton = load_skeleton(source_dir)
    storage = storage_dtype_of(source_dir, base_recipe)
    if sensitivity_table is None:
        if calibration is None or calibration.source is None:
            raise CalibrationError("--target-bits/--target-size measure layer sensitivity on "
                                   "calibration data", hint="pass --calib FILE, or a table "
                                   "from `mpq sensitivity -o` with --sensitivity")
        names = expand(candidates or DEFAULT_CANDIDATES, skeleton, serving.ladder_extra)
        names, layers = _for_target(serving, skeleton, names, base_recipe, storage)
        kwargs = {"progress": progress} if progress is not None else {}
        table = sensitivity(source_dir, names, calibration, measure=measure, base=base_recipe,
                            **kwargs)
        source = "the sensitivity table"
    else:
        table = (sensitivity_table if isinstance(sensitivity_table, SensitivityTable)
                 else SensitivityTable.load(sensitivity_table))
        source = str(sensitivity_table) if not isinstance(sensitivity_table,
                                                          SensitivityTable) else "table"
        names = (expand(candidates, skeleton, serving.ladder_extra) if candidates
                 else table.measured_candidates())
        names, layers = _for_target(serving, skeleton, names, base_recipe, storage)
    check_table(table, layers, names, source)
    check_rotation(table, base_recipe, source)
    table = table.costed_for(layers)  # this base's algorithm, scale and storage dtypes
    items = (target_items(table, [layer.name for layer in layers], names, serving,
                          getattr(skeleton.config, "model_type", None))
             if serving.name != DEFAULT_TARGET else None)
    fixed = 0
    if target_bytes is not None:
        fixed = fixed_bytes(source_dir, base_recipe, layers, output_format)
    for attempt in range(SIZE_PASSES):
        choice = choose(table, target_bits=target_bits, target_bytes=target_bytes,
                        fixed_bytes=fixed, candidates=names, output_format=output_format,
                        layers=[layer.name for layer in layers], items=items)
        text, recipe = build_recipe(base_recipe, table, choice, skeleton)
        if target_bytes is None:
            break
        expected = expected_bytes(source_dir, recipe, output_format)
        over = expected - target_bytes
        if over <= 0:
            break
        # the header grew more than guessed: choose again within this choice's own fixed bytes
        # and a step that grows (each choice has a header of its own, which a step can chase)
        fixed = max(fixed, expected - choice.layer_bytes) + (over << attempt)
    else:
        raise RecipeError(f"no choice of the candidates fits {target_bytes} bytes once the "
                          "artifact's header is counted", hint="raise --target-size a little")
    if save_recipe is not None:
        try:
            Path(save_recipe).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write the recipe {save_recipe}: {exc}") from None
    return recipe, choice, table


def _for_target(serving, skeleton, names: list[str], base: Recipe, storage: str):
    """The candidate names the ``serving`` target runs on some block layer (all for ``any``)
    and the target layers under them (mpq.analysis.sensitivity.target_layers)."""
    from mpq.analysis.candidates import load_candidates
    from mpq.analysis.sensitivity import target_layers
    from mpq.analysis.target_items import suited
    from mpq.checkpoint.serving import DEFAULT_TARGET

    layers = target_layers(skeleton, load_candidates(names), base, storage=storage)
    if serving.name == DEFAULT_TARGET:
        return names, layers
    kept = suited(serving, layers, names)
    if not kept:
        raise RecipeError(f"--target {serving.name}: {serving.engine} runs none of the "
                          f"candidates {', '.join(names)}",
                          hint="give candidates it runs with --candidates (e.g. int4-g64, int8)")
    if kept != names:
        layers = target_layers(skeleton, load_candidates(kept), base, storage=storage)
    return kept, layers


def expected_bytes(model_path, recipe: Recipe, output_format: str) -> int:
    """The artifact's tensor-file bytes for ``recipe`` as ``--dry-run`` estimates them, plus
    :data:`HEADER_MARGIN` of its header estimate (the header is estimated, not computed)."""
    from mpq.analysis.estimate import estimate_run
    from mpq.engine.spec import RunOptions, resolve_run

    spec = resolve_run(model_path, recipe, RunOptions(output_format=output_format))
    size = estimate_run(spec, probe=False).size
    return size["file_bytes"] + math.ceil(size["header_bytes"] * HEADER_MARGIN)


def fixed_bytes(model_path, base: Recipe, layers, output_format: str) -> int:
    """Expected artifact bytes outside the chosen layers: mpq.analysis.estimate's file size for the base
    recipe minus the base's bytes of those layers (an edge item: what it takes in the base's
    artifact, mpq.analysis.edge_candidates), plus the header growth of a recipe that names every
    chosen layer (stored twice, JSON-escaped)."""
    from mpq.analysis.edge_candidates import base_item_bytes
    from mpq.analysis.estimate import estimate_run
    from mpq.engine.spec import RunOptions, resolve_run

    spec = resolve_run(model_path, base, RunOptions(output_format=output_format))
    size = estimate_run(spec, probe=False).size["file_bytes"]
    plan = spec.plan
    chosen = sum(base_item_bytes(plan, layer, output_format) if layer.block is None
                 else layer_cost(plan.get(layer.name).scheme, layer.shape, output_format)[1]
                 for layer in layers)
    names = sum(len(layer.name) + 6 for layer in layers)
    return size - chosen + int(2.3 * names) + 2000
