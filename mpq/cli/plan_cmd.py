"""``mpq plan MODEL --recipe R``: the resolved per-layer plan, without touching weights."""
from __future__ import annotations

import click
from rich.table import Table

from mpq.cli.console import emit_json, stdout_console
from mpq.cli.experts_view import ExpertGroup, plan_rows, routing_lines, transform_lines
from mpq.cli.options import json_option, max_unquantized_option, serving_target_option


def plan_table(plan, log=None) -> Table:
    """The per-layer plan; with ``log`` (a stored artifact's), each layer's error too."""
    table = Table(title=f"plan: {plan.recipe_name}", show_lines=False)
    table.add_column("layer", no_wrap=True)
    for column in ("shape", "scheme", "algorithm", "decided by"):
        table.add_column(column)
    if log is not None:
        table.add_column("rel. MSE", justify="right")
    for layer in plan_rows(plan):  # fused experts: one row per group of slices
        grouped = isinstance(layer, ExpertGroup)
        scheme = layer.scheme
        row = [layer.label() if grouped else layer.name, f"{layer.shape[0]}×{layer.shape[1]}",
               scheme.describe() if scheme else "[dim]kept[/dim]",
               scheme.algorithm if scheme else "", layer.reason]
        if log is not None:
            errors = [log.layers.get(name, {}).get("rel_mse")
                      for name in (layer.names if grouped else [layer.name])]
            errors = [e for e in errors if e is not None]
            row.append(f"{max(errors):.2e}{' (max)' if grouped else ''}" if errors else "")
        table.add_row(*row)
    return table


def scheme_summary(plan) -> list[dict]:
    """Per scheme label: layers, weights and average bits per weight (unpadded encoding)."""
    from mpq.checkpoint.native_codec import ideal_bits

    rows: dict[str, dict] = {}
    for layer in plan.quantized():
        label = f"{layer.scheme.algorithm} {layer.scheme.describe()}"
        row = rows.setdefault(label, {"scheme": label, "layers": 0, "weights": 0, "bits": 0.0})
        weights = layer.shape[0] * layer.shape[1]
        row["layers"] += 1
        row["weights"] += weights
        row["bits"] += ideal_bits(layer.scheme.weights, layer.shape) * weights
    out = []
    for row in rows.values():
        out.append({"scheme": row["scheme"], "layers": row["layers"], "weights": row["weights"],
                    "bits_per_weight": row["bits"] / row["weights"]})
    return out


def summary_lines(plan) -> list[str]:
    rows = scheme_summary(plan)
    lines = [f"{r['scheme']}: {r['layers']} layers, {r['bits_per_weight']:.3f} bits/weight"
             for r in rows]
    weights = sum(r["weights"] for r in rows)
    if len(rows) > 1 and weights:
        average = sum(r["bits_per_weight"] * r["weights"] for r in rows) / weights
        lines.append(f"all quantized layers: {average:.3f} bits/weight")
    return lines


@click.command("plan")
@click.argument("model", type=click.Path(path_type=str))
@click.option("-r", "--recipe", default=None,
              help="Recipe YAML file or preset name (not needed when MODEL is an mpq artifact: "
                   "its stored plan is shown).")
@click.option("--strict", is_flag=True,
              help="Refuse (exit 3) when more than half of the model's weight bytes would stay "
                   "unquantized (--max-unquantized 0.5).")
@max_unquantized_option
@serving_target_option
@json_option
def command(model, recipe, strict, max_unquantized, serving_target, as_json):
    """Print the per-layer plan RECIPE resolves to on MODEL, or the plan stored in an artifact.

    With RECIPE, every parameter tensor of MODEL is accounted for: quantized, or kept in the
    source dtype with its reason (embeddings, norms, head, MoE router and fused experts, layers
    no rule matched); the kept ones are listed by category with their share of the bytes.  The
    architecture lines say where each part the pipelines use comes from: the model family's
    record, generic discovery (a model type without a record), or nowhere, and why."""
    from mpq.checkpoint.native import is_artifact, open_artifact
    from mpq.cli.coverage_view import kept_table, share_line, tying_line
    from mpq.config.run_log import describe_rotation, describe_transforms, plan_record
    from mpq.engine.spec import (RunOptions, as_recipe, checked_for_target, plan_model,
                                 with_storage_dtype)
    from mpq.engine.streaming import build_streamed
    from mpq.models.coverage import account
    from mpq.models.source import check_model_dir

    from mpq.models.discovery import architecture_report

    description, log, coverage, architecture = None, None, None, None
    stored = recipe is None and is_artifact(model)
    if stored:
        if strict or max_unquantized is not None:
            raise click.UsageError("--strict and --max-unquantized check a recipe's plan on a "
                                   "model: pass --recipe")
        artifact = open_artifact(model)
        plan, log = artifact.plan, artifact.log
        if serving_target is not None:  # check the stored plan against the engine
            checked_for_target(plan, serving_target, artifact.config.get("model_type"))
        description = (artifact.json_field("recipe") or {}).get("description")
    elif recipe is None:
        raise click.UsageError(f"'{model}' is not an mpq artifact: pass --recipe to plan it")
    else:
        recipe = as_recipe(recipe)
        source_dir = check_model_dir(model)
        skeleton, weight_map = build_streamed(source_dir)  # in the dtype a run loads
        layout, plan = plan_model(skeleton, recipe)
        plan = with_storage_dtype(plan, recipe, source_dir, weight_map)
        coverage = account(skeleton, plan)
        architecture = architecture_report(skeleton, layout, plan)
        limits = RunOptions(strict=strict, max_unquantized=max_unquantized)
        coverage.check(*limits.unquantized_limit())
        plan = checked_for_target(plan, serving_target,
                                  getattr(skeleton.config, "model_type", None))
    if as_json:
        data = plan_record(plan, log)
        if stored:
            data["summary"] = scheme_summary(plan)
            data["description"] = description
        if coverage is not None:
            data["coverage"] = coverage.to_dict()
        if architecture is not None:
            data["architecture"] = architecture.to_dict()
        emit_json(data)
        return
    console = stdout_console()
    console.print(plan_table(plan, log))
    if coverage is not None and coverage.kept():
        console.print(kept_table(coverage))
    if description:
        console.print(f"recipe {plan.recipe_name}: {description}")
    kept = len(plan.layers) - len(plan.quantized())
    console.print(f"{len(plan.quantized())} layers quantized, {kept} kept")
    if plan.storage_dtype is not None:
        console.print(f"float tensors kept (embeddings, norms, biases, ...) stored in "
                      f"{plan.storage_dtype}")
    for line in summary_lines(plan):
        console.print(line)
    for line in routing_lines(plan, log):
        console.print(line)
    for line in transform_lines(plan):
        console.print(line)
    for line in (describe_transforms(plan, log), plan.describe_kv_cache(),
                 describe_rotation(plan, log)):
        if line:
            console.print(line)
    if coverage is not None:
        console.print(share_line(coverage))
    tying = coverage.summary().get("tying") if coverage is not None else (
        plan.tying.to_dict() if plan.tying is not None else None)
    if (line := tying_line(tying)) is not None:
        console.print(line)
    if architecture is not None:
        for line in architecture.lines():
            console.print(line, markup=False, highlight=False)
