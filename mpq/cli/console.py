"""The console belongs to the CLI: human output and progress on stderr, ``--json`` on stdout."""
from __future__ import annotations

import json
import math
import sys
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def stdout_console() -> Console:
    """Tables on stdout; when piped, wide enough that layer names are never cut."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)
    return console


def emit_json(obj: Any) -> None:
    """One JSON document per line on stdout (NaN and ±inf, which JSON has no number for, are
    written as null)."""
    sys.stdout.write(json.dumps(_finite(obj), sort_keys=True, default=str, allow_nan=False)
                     + "\n")
    sys.stdout.flush()


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


class JsonEvents:
    """Pipeline events as JSON lines on stdout (``{"event": kind, ...}``)."""

    def __call__(self, kind: str, **data: Any) -> None:
        emit_json({"event": kind, **data})


class ProgressEvents:
    """Pipeline events as rich progress bars (blocks, layers) with ETA on stderr.  The
    ``coverage`` event is not shown here: ``mpq quantize`` prints it with its result (a
    failing run's stderr stays one error line)."""

    def __init__(self, console: Console | None = None):
        self.progress = Progress(TextColumn("{task.description:<8}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), TextColumn("{task.fields[detail]}"),
                                 console=console or stderr_console(), transient=False)
        self.blocks = self.layers = None

    def __enter__(self) -> "ProgressEvents":
        self.progress.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # the error's one line replaces the bars (erased, not printed)
            self.progress.live.transient = True
        self.progress.stop()

    def __call__(self, kind: str, **data: Any) -> None:
        if kind == "start":
            self.blocks = self.progress.add_task("blocks", total=data["blocks"], detail="")
            self.layers = self.progress.add_task("layers", total=data["layers"], detail="")
        elif kind == "layer" and self.layers is not None:
            self.progress.update(self.layers, advance=1, detail=data["name"])
        elif kind == "block_done" and self.blocks is not None:
            self.progress.update(self.blocks, advance=1)
        elif kind == "block_resumed" and self.layers is not None:
            self.progress.update(self.layers, advance=data["layers"], detail="resumed")
        elif kind == "warning":
            self.progress.console.print(f"[yellow]warning:[/yellow] {data['message']}")
        elif kind == "calibration":
            from mpq.calibration.conventions import bos_note
            self.progress.console.print(
                f"calibration: {data.get('num_samples')} × {data.get('seq_len')} tokens "
                f"from {data.get('source')} (sha256 {str(data.get('sha256'))[:12]}…)"
                + bos_note(data))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def size_line(sizes: dict) -> str:
    """Whole-model size figures (mpq.checkpoint.sizes) in one line, e.g. '4.52 bits/weight over
    all 134.5 M weights (quantized layers alone: 4.25; other tensors 55.2 MiB)'."""
    line = (f"{sizes['bits_per_weight']:.2f} bits/weight over all "
            f"{sizes['total_weights'] / 1e6:.2f} M weights")
    if sizes.get("quantized_bits_per_weight"):
        line += (f" (quantized layers alone: {sizes['quantized_bits_per_weight']:.2f}; "
                 f"other tensors {human_bytes(sizes['dense_bytes'])})")
    return line
