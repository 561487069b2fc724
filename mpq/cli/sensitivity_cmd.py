"""``mpq sensitivity MODEL --calib DATA [--candidates ladder]``: per-layer damage and cost."""
from __future__ import annotations

import click
from rich.table import Table

from mpq.cli.console import emit_json, human_bytes, stderr_console, stdout_console
from mpq.cli.options import json_option, sample_options


def sensitivity_table(table, limit: int | None = None) -> Table:
    cheapest = table.cheapest()
    rotated = "; on the rotated model" if table.rotation is not None else ""
    out = Table(title=f"sensitivity ({table.measure}{rotated}; damage = mean per-token KL, "
                      f"nats; sorted by {cheapest})")
    out.add_column("layer", no_wrap=True)
    out.add_column("shape")
    for candidate in table.candidates:
        out.add_column(f"{candidate}\ndamage", justify="right")
        out.add_column(f"{candidate}\nbits · bytes", justify="right")
    rows = table.ranked(cheapest)
    for row in rows[:limit] if limit else rows:
        cells = [row.name, f"{row.shape[0]}×{row.shape[1]}"]
        for candidate in table.candidates:
            if candidate not in row.damage:  # a scheme this layer cannot take, float for a block
                cells += ["—", "—"]
                continue
            cells.append(f"{row.damage[candidate]:.3e}")
            cells.append(f"{row.bits[candidate]:.2f} · {human_bytes(row.bytes[candidate])}")
        out.add_row(*cells)
    return out


def plot(table, path: str) -> None:
    """Damage per layer by depth (one marker line per candidate, log y) as a PNG."""
    from mpq.cli.plotting import pyplot, save_figure

    plt = pyplot()
    rows = sorted(table.layers, key=lambda r: (r.depth, _order(r.name)))
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) / 12), 4.5))
    for candidate in table.candidates:
        ys = [max(r.damage[candidate], 1e-12) if candidate in r.damage else float("nan")
              for r in rows]
        ax.plot(x, ys, marker="o", markersize=3, linewidth=0.8, label=candidate)
    ax.set_yscale("log")
    ticks = [i for i, r in enumerate(rows) if i == 0 or rows[i - 1].depth != r.depth]
    ax.set_xticks(ticks, [str(rows[i].block) if rows[i].block is not None
                          else (rows[i].role or "") for i in ticks], fontsize=7)
    ax.set_xlabel("decoder block (layers in execution order within a block)")
    ax.set_ylabel(f"damage ({table.measure}, nats/token)")
    ax.set_title(f"layer sensitivity: {table.model}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


_KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _order(name: str) -> int:
    kind = name.rsplit(".", 1)[-1]
    return _KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER)


class _Bars:
    """Rich progress on stderr for the measuring stages."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        from rich.progress import TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=stderr_console(), transient=True)
        self.tasks = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done)


@click.command("sensitivity")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--calib", help="Calibration data (as for mpq quantize); required.")
@click.option("--candidates", default="ladder", show_default=True,
              help="Comma-separated presets, recipe files, shorthands intB / intB-gG (symmetric "
                   "B-bit int, per channel / groups of G) or ladder (int8 down to int2 in steps "
                   "of a fraction of a bit, with group sizes the model takes); each gives a "
                   "weight scheme per layer (rounded to nearest for the measurement).")
@click.option("-r", "--recipe", default=None,
              help="Only the layers this recipe quantizes (default: every decoder-block layer "
                   "all candidates quantize); when it quantizes the input embedding or the "
                   "output head, they are measured too, with a float candidate.")
@click.option("--measure", type=click.Choice(["fisher", "kl"]), default="fisher",
              show_default=True, help="fisher: diagonal-Fisher proxy of the KL (one backward per "
                                      "sample); kl: the exact KL (one partial forward per layer "
                                      "and candidate; slow on real models).")
@sample_options(16)
@click.option("--seed", default=0, show_default=True, type=int,
              help="Calibration draw and the Fisher's sampled labels.")
@click.option("--calib-mode", type=click.Choice(["concat", "document"]), default="concat",
              show_default=True)
@click.option("--calib-field", default="text", show_default=True)
@click.option("--calib-split", default=None)
@click.option("-o", "--output", type=click.Path(path_type=str), default=None,
              help="Write the table as JSON (mpq quantize --sensitivity reads it).")
@click.option("--plot", "plot_path", type=click.Path(path_type=str), default=None,
              help="Write a PNG of damage per layer by depth (needs matplotlib).")
@click.option("--top", default=None, type=click.IntRange(min=1),
              help="Show only the N most sensitive layers in the table.")
@json_option
def command(model, calib, candidates, recipe, measure, num_samples, seq_len, seed, calib_mode,
            calib_field, calib_split, output, plot_path, top, as_json):
    """Damage of quantizing each layer of MODEL alone, per candidate scheme, and its bytes."""
    from mpq.errors import CalibrationError
    from mpq.calibration import CalibrationOptions
    from mpq.analysis.candidates import check_names
    from mpq.analysis.sensitivity import sensitivity

    check_names(candidates)  # unknown candidates fail before anything is read
    if calib is None:
        raise CalibrationError("mpq sensitivity needs calibration data",
                               hint="pass --calib FILE (e.g. a .txt corpus)")
    if plot_path is not None:
        from mpq.cli.plotting import require_matplotlib

        require_matplotlib()  # before anything is read
    options = CalibrationOptions(source=calib, num_samples=num_samples, seq_len=seq_len,
                                 seed=seed, mode=calib_mode, field=calib_field, split=calib_split)
    if as_json:
        table = sensitivity(model, candidates, options, measure=measure, base=recipe)
    else:
        with _Bars() as bars:
            table = sensitivity(model, candidates, options, measure=measure, base=recipe,
                                progress=bars)
    if output:
        table.save(output)
    if plot_path:
        plot(table, plot_path)
    if as_json:
        emit_json(table.to_dict())
        return
    console = stdout_console()
    console.print(sensitivity_table(table, top))
    totals = ", ".join(f"{c} {sum(r.damage[c] for r in table.layers):.3g}"
                       for c in table.candidates)
    console.print(f"{len(table.layers)} layers, {table.seconds:.1f} s; summed damage: {totals}")
    for path in (output, plot_path):
        if path:
            console.print(f"wrote {path}")
