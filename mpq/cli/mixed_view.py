"""``mpq quantize --target-bits/--target-size``: measure or read the sensitivity table, choose the
per-layer recipe (mpq.analysis.mixed_precision) and say what was chosen (stderr, or a JSON event)."""
from __future__ import annotations

from dataclasses import replace

import click

from mpq.cli.console import emit_json, stderr_console


def choose_recipe(model, recipe, options, *, target_bits, target_size, candidates, sensitivity,
                  samples, output_format, save_recipe, dry_run, as_json, serving=None):
    """The mixed Recipe that ``mpq quantize`` then runs as usual."""
    from mpq.analysis.mixed_precision import MixedTarget, auto_recipe

    if target_bits is not None and target_size is not None:
        raise click.UsageError("give --target-bits or --target-size, not both")
    if dry_run and sensitivity is None:
        raise click.UsageError("--dry-run with --target-bits/--target-size reads no weights: "
                               "pass a table from `mpq sensitivity -o` with --sensitivity")
    calibration = replace(options, num_samples=samples)
    target = MixedTarget(bits=target_bits, size=target_size, candidates=candidates,
                         sensitivity_table=sensitivity, save_recipe=save_recipe,
                         serving=serving)
    kwargs = dict(calibration=calibration, output_format=output_format)
    if as_json or sensitivity is not None:
        chosen, choice, table = auto_recipe(model, recipe, target, **kwargs)
    else:
        from mpq.cli.sensitivity_cmd import _Bars

        with _Bars() as bars:
            chosen, choice, table = auto_recipe(model, recipe, target, progress=bars, **kwargs)
    if as_json:
        emit_json({"event": "mixed_precision", "measure": table.measure, **choice.to_dict(),
                   "recipe_name": chosen.name})
    else:
        console = stderr_console()
        console.print(choice.describe())
        if save_recipe:
            console.print(f"wrote {save_recipe}")
    return chosen
