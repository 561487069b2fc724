"""Candidate weight schemes for layer sensitivity and automatic mixed precision.

A candidate is named on the command line (``--candidates a,b,c``) as
- a preset (``w4a16``) or a recipe file, whose scheme for each layer is used;
- a shorthand ``intB`` (symmetric B-bit int weights, one scale per output channel) or
  ``intB-gG`` (groups of G inputs), B from 2 to 8, rounded to nearest: no file needed;
- ``ladder`` (the default): a set of shorthands fine enough for the knapsack to trade a fraction
  of a bit at a time, with the group sizes the model's layers take (:func:`ladder`).

Why a fine ladder: with only int8/int4/int3 g64, the only way to spend bits on a sensitive layer
at the budget of uniform int4 g64 is to drop other layers to int3, whose damage the per-layer sum
underestimates; on SmolLM2-135M that choice loses to uniform int4 g64 (ppl 38.6 vs 37.3), while
the ladder (int4 with a coarse group frees the bits; int5/int6 take them) wins (34.1;
benchmarks/results/mixed_precision_ppl.md).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from functools import reduce
from pathlib import Path
from typing import Sequence

from torch import nn

from mpq.errors import RecipeError
from mpq.config.recipe import Recipe, parse_recipe
from mpq.config.scheme import LayerScheme

LADDER = "ladder"
DEFAULT_CANDIDATES = LADDER
_SHORTHAND = re.compile(r"int([2-8])(?:-g([1-9][0-9]*))?")
COARSE_GROUPS = (256, 192, 128)  # the largest that divides every input size joins the ladder


@dataclass(frozen=True)
class Candidate:
    """A candidate as named on the command line and its parsed recipe."""

    name: str
    recipe: Recipe


def split_names(spec: str | Sequence[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(item.strip() for item in items if item and item.strip()))
    if not names:
        raise RecipeError("no candidate given", hint="e.g. --candidates ladder or "
                                                     "--candidates w8a16,int5-g64,w4a16")
    return names


def shorthand_recipe(name: str) -> Recipe | None:
    """The recipe of a shorthand candidate (``int5-g64``, ``int8``), None for other names."""
    match = _SHORTHAND.fullmatch(name)
    if match is None or Path(name).exists():
        return None
    bits, group = int(match.group(1)), match.group(2)
    layout = (f"granularity: group, group_size: {group}" if group else "granularity: channel")
    return parse_recipe(
        f"mpq_recipe: 1\nname: {name}\ndescription: int{bits} symmetric weights, "
        f"{'groups of ' + group if group else 'per output channel'} (RTN)\nrules:\n"
        f"  - targets: [Linear]\n    weights: {{format: int, bits: {bits}, symmetric: true, "
        f"{layout}}}\n", f"candidate {name}")


def load_candidates(spec: str | Sequence[str]) -> list[Candidate]:
    """Comma-separated presets / recipe files / shorthands → candidates (RecipeError for unknown
    ones, naming the candidate).  ``ladder`` must be expanded first (:func:`expand`)."""
    from mpq.engine.spec import as_recipe

    out = []
    for name in split_names(spec):
        if name == LADDER:
            raise RecipeError("the ladder candidates depend on the model",
                              hint="expand them with mpq.analysis.candidates.expand(spec, model)")
        recipe = shorthand_recipe(name)
        if recipe is None:
            try:
                recipe = as_recipe(name)
            except RecipeError as exc:
                raise RecipeError(f"candidate '{name}': {exc.message}",
                                  hint=exc.hint or "use a preset, a recipe file, intB or "
                                                   "intB-gG (e.g. int5-g64), or ladder") from None
        if recipe.rotation is not None or recipe.transforms:
            raise RecipeError(f"candidate '{name}' has rotation/transforms; a candidate only "
                              "contributes its weight scheme",
                              hint="use a recipe with rules only (e.g. w4a16)")
        out.append(Candidate(name, recipe))
    return out


def on_base(candidate: LayerScheme, base: LayerScheme | None, where: str = "") -> LayerScheme:
    """The scheme a mixed recipe gives a layer for which a candidate offers ``candidate``: the
    candidate's grid (its weight args, with the scale dtype of ``base``'s when its format takes
    one, and ``base``'s ``full_range`` scales when the grid is symmetric int) under the base
    recipe's algorithm, options and input activations for that layer, so a GPTQ base quantizes
    every chosen grid with GPTQ.  ``static_groups`` (meaningful for groups only) is dropped for
    a per-channel grid.  RecipeError when the base's algorithm cannot produce the grid
    (``where``: the candidate and layer, for the message)."""
    from mpq.errors import SchemeError
    from mpq.quantizers.base import QUANTIZERS

    if base is None:
        return candidate
    weights = candidate.weights
    if weights.scale_dtype != base.weights.scale_dtype:
        try:
            weights = replace(weights, scale_dtype=base.weights.scale_dtype)
        except SchemeError:  # a format with a scale dtype of its own (nf4, mx...)
            pass
    if base.weights.full_range and not weights.full_range:
        try:
            weights = replace(weights, full_range=True)
        except SchemeError:  # not symmetric int: its scales keep their own rule
            pass
    options = dict(base.options)
    if weights.granularity != "group":
        options.pop("static_groups", None)
    scheme = LayerScheme(algorithm=base.algorithm, weights=weights,
                         options=tuple(sorted(options.items())),
                         input_activations=base.input_activations)
    try:
        QUANTIZERS.get(base.algorithm).check(scheme)
    except SchemeError as exc:
        raise RecipeError(f"{where}: the base recipe's algorithm {base.algorithm} cannot "
                          f"quantize this candidate's grid: {exc.message}",
                          hint="drop that candidate (--candidates) or change the base "
                               "recipe") from None
    return scheme


def check_names(spec: str | Sequence[str]) -> None:
    """Fail early on unknown candidates, before any model is read (``ladder`` passes)."""
    names = [n for n in split_names(spec) if n != LADDER]
    if names:
        load_candidates(names)


def block_input_sizes(model: nn.Module) -> list[int]:
    """Input sizes of the decoder-block linears (weights may be on meta)."""
    from mpq.engine.spec import plan_model

    _, plan = plan_model(model, shorthand_recipe("int8"))
    return sorted({layer.shape[1] for layer in plan.layers if layer.block is not None})


def ladder(model: nn.Module) -> list[str]:
    """The default candidates for ``model``: int8 per channel, int6/int5 g64, int4 g32/g64 and
    int3 g32/g64, int4/int3 with the coarsest of 256/192/128 that divides every block input
    size, and int2 g64; entries whose group does not divide every input size are left out."""
    common = reduce(math.gcd, block_input_sizes(model), 0)
    coarse = next((g for g in COARSE_GROUPS if common and common % g == 0), None)
    wanted = [("int8", None), ("int6", 64), ("int5", 64), ("int4", 32), ("int4", 64),
              ("int4", coarse), ("int3", 32), ("int3", 64), ("int3", coarse), ("int2", 64)]
    names = []
    for stem, group in wanted:
        if stem != "int8" and (group is None or not common or common % group):
            continue
        names.append(stem if group is None else f"{stem}-g{group}")
    return names


def expand(spec: str | Sequence[str], model: nn.Module, extra: Sequence[str] = ()) -> list[str]:
    """Candidate names with ``ladder`` replaced by :func:`ladder` of ``model`` followed by
    ``extra`` (a serving target's own rungs, mpq.checkpoint.serving)."""
    out: list[str] = []
    for name in split_names(spec):
        out.extend([*ladder(model), *extra] if name == LADDER else [name])
    return list(dict.fromkeys(out))
