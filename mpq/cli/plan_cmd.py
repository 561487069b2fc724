"""``mpq plan MODEL --recipe R``: the resolved per-layer plan, without touching weights."""
from __future__ import annotations

import click
from rich.table import Table

from mpq.cli.console import emit_json, stdout_console
from mpq.cli.options import json_option


def plan_table(plan, *, results: bool = False) -> Table:
    table = Table(title=f"plan: {plan.recipe_name}", show_lines=False)
    table.add_column("layer", no_wrap=True)
    for column in ("shape", "scheme", "algorithm", "decided by"):
        table.add_column(column)
    if results:
        table.add_column("rel. MSE", justify="right")
    for layer in plan.layers:
        scheme = layer.scheme
        row = [layer.name, f"{layer.shape[0]}×{layer.shape[1]}",
               scheme.describe() if scheme else "[dim]kept[/dim]",
               scheme.algorithm if scheme else "", layer.reason]
        if results:
            error = layer.result.get("rel_mse")
            row.append(f"{error:.2e}" if error is not None else "")
        table.add_row(*row)
    return table


@click.command("plan")
@click.argument("model", type=click.Path(path_type=str))
@click.option("-r", "--recipe", required=True, help="Recipe YAML file or preset name.")
@json_option
def command(model, recipe, as_json):
    """Print the per-layer plan RECIPE resolves to on MODEL."""
    from mpq.model_io import load_skeleton
    from mpq.quantize import as_recipe, plan_model

    recipe = as_recipe(recipe)
    _, plan = plan_model(load_skeleton(model), recipe)
    if as_json:
        emit_json(plan.to_dict())
        return
    console = stdout_console()
    console.print(plan_table(plan))
    kept = len(plan.layers) - len(plan.quantized())
    console.print(f"{len(plan.quantized())} layers quantized, {kept} kept")
    if plan.describe_transforms():
        console.print(plan.describe_transforms())
    if plan.describe_kv_cache():
        console.print(plan.describe_kv_cache())
    if plan.describe_rotation():
        console.print(plan.describe_rotation())
