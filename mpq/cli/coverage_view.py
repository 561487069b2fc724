"""The parameter account (mpq.models.coverage) as the console shows it: the kept weights
grouped by category, and the share of the weight bytes left unquantized."""
from __future__ import annotations

from typing import Any

from rich.table import Table

from mpq.cli.console import human_bytes

PATTERNS_SHOWN = 3


def kept_table(coverage) -> Table:
    """One row per (category, reason): tensors, bytes, share of the model's weight bytes, why,
    and the tensor names with block indices as ``*``."""
    table = Table(title="kept in the source dtype (not quantized)", show_lines=False)
    table.add_column("category", no_wrap=True)
    for column in ("tensors", "bytes", "share"):
        table.add_column(column, justify="right")
    table.add_column("why")
    table.add_column("tensors (block index as *)")
    for group in coverage.groups():
        more = len(group.patterns) - PATTERNS_SHOWN
        names = ", ".join(group.patterns[:PATTERNS_SHOWN]) + (f", +{more} more" if more > 0 else "")
        table.add_row(group.category, str(group.tensors), human_bytes(group.bytes),
                      f"{100 * group.share:.1f}%", group.reason, names)
    return table


def share_line(coverage) -> str:
    """``unquantized: X% of the weight bytes (A of B)``."""
    return (f"{coverage.share_line()} ({human_bytes(coverage.unquantized_bytes)} of "
            f"{human_bytes(coverage.total_bytes)})")


def coverage_line(data: dict[str, Any]) -> str:
    """A ``coverage`` event (mpq.models.coverage.CoverageAccount.summary) as one line."""
    kept = ", ".join(f"{g['category']} {100 * g['share']:.1f}%" for g in data["kept"])
    return (f"unquantized: {100 * data['unquantized_share']:.1f}% of the weight bytes"
            + (f" (kept: {kept})" if kept else ""))


def tying_line(tying: dict[str, Any] | None) -> str | None:
    """The tie record of a plan (mpq.config.tying; with ``untied_bytes`` when it comes from a
    coverage summary) as one line, or None without one."""
    if not tying:
        return None
    pair = f"{tying['embedding']} / {tying['head']}"
    if tying["shared"]:
        return f"tied {pair}: kept tied ({tying['reason']})"
    cost = (f", +{human_bytes(tying['untied_bytes'])} for the second copy before quantization"
            if tying.get("untied_bytes") else "")
    return f"tied {pair}: untied ({tying['reason']}{cost})"
