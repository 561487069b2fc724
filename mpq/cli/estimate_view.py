"""``mpq quantize --dry-run``: the estimate (mpq.analysis.estimate) as rich tables or one JSON object."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from mpq.cli.console import emit_json, human_bytes, stdout_console
from mpq.cli.coverage_view import coverage_line
from mpq.config.run_log import describe_transforms


def dry_run(model, recipe, options, *, output, force, as_json) -> None:
    """Estimate the run (``options``: mpq.engine.spec.RunOptions), print it, and raise
    ResourceError (exit 11) when it would not fit."""
    from mpq.analysis.estimate import check_fits, estimate_and_check
    from mpq.checkpoint.native import check_output_apart, check_output_free
    from mpq.engine.spec import resolve_run
    from mpq.errors import OutputError

    spec = resolve_run(model, recipe, options)
    estimate = estimate_and_check(spec)
    try:
        check_output_free(Path(output), force)
        check_output_apart(Path(output), spec.inputs)
    except OutputError as exc:
        estimate.warnings.append(f"the real run would stop: {exc.one_line()}")
    if as_json:
        emit_json({"event": "estimate", "output": str(output), **estimate.to_dict(),
                   "coverage": spec.coverage.summary()})
    else:
        show(estimate, spec.coverage)
    check_fits(estimate, estimate.available_bytes,
               host_available=estimate.host_available_bytes)


def show(estimate, coverage=None) -> None:
    console = stdout_console()
    summary = estimate.plan.summary()
    plan = Table(title=f"dry run: {estimate.recipe} on {estimate.model} → {estimate.output_format}"
                       f" ({estimate.dtype}, {estimate.device})")
    for column, justify in (("scheme", "left"), ("layers", "right"), ("weights", "right")):
        plan.add_column(column, justify=justify)
    for row in summary.rows:
        plan.add_row(row.label, str(row.layers), f"{row.weights:,}")
    plan.add_row("[dim]kept[/dim]", str(summary.kept), "")
    console.print(plan)
    for line in (describe_transforms(estimate.plan), estimate.plan.describe_kv_cache()):
        if line:
            console.print(line)
    if coverage is not None:
        console.print(coverage_line(coverage.summary()))

    size = estimate.size
    table = Table(title="estimate (≈, no weight was read)", show_header=True)
    table.add_column("what")
    table.add_column("≈", justify="right")
    table.add_column("notes")
    table.add_row("artifact", human_bytes(size["file_bytes"]),
                  f"quantized {human_bytes(size['quantized_bytes'])}, other tensors "
                  f"{human_bytes(size['dense_bytes'])} ({size['storage_dtype']}), header "
                  f"{human_bytes(size['header_bytes'])}")
    table.add_row("bits/weight", f"{size['bits_per_weight']:.2f}",
                  f"over all {size['total_weights'] / 1e6:.2f} M weights; quantized layers "
                  f"alone {size['quantized_bits_per_weight']:.2f}")
    tying = size.get("tying")
    if tying is not None:
        table.add_row("  tied embedding/head", human_bytes(tying["untie_bytes"]),
                      "kept tied: stored once" if tying["shared"]
                      else f"untied: the head's own copy ({tying['reason']})")
    where = "host" if estimate.device == "cpu" else estimate.device
    streamed = ("streamed: one block resident" if estimate.streaming is None
                else f"whole model loaded ({estimate.streaming})")
    table.add_row(f"peak memory ({where})", human_bytes(estimate.peak_bytes),
                  f"at the {estimate.peak_phase}; {streamed}")
    for part, value in estimate.memory.items():
        note = ("writing phase only" if part == "write_buffers" else "calibration phase only"
                if part in ("tokenizer", "calibration_reading") else "")
        table.add_row(f"  {part.replace('_', ' ')}", human_bytes(value), note)
    if estimate.device != "cpu":
        table.add_row("peak memory (host)", human_bytes(estimate.host_peak_bytes), "")
    calib = estimate.calibration
    table.add_row("time", f"{estimate.seconds:.0f} s",
                  f"{calib['tokens']:,} calibration tokens, "
                  f"{calib['forward_passes_per_block']:g} passes/block, "
                  f"{estimate.throughput_flops / 1e9:.0f} GFLOP/s measured")
    for part, value in estimate.time_parts.items():
        table.add_row(f"  {part}", f"{value:.1f} s", "")
    console.print(table)
    for warning in estimate.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    available = estimate.available_bytes
    if available is not None:
        verdict = "fits" if estimate.fits else "[red]does not fit[/red]"
        extra = ""
        if estimate.host_available_bytes is not None:
            extra = f"; host {human_bytes(estimate.host_available_bytes)} available"
        console.print(f"{verdict}: ≈{human_bytes(estimate.peak_bytes)} needed, "
                      f"{human_bytes(available)} available on {estimate.device}{extra}")
