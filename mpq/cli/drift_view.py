"""The terminal view of ``mpq drift``: phase totals, KL, and the scales that clip most."""
from __future__ import annotations

from typing import Any

PHASES = ("prefill", "decode")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.3f}"


def _num(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def summary_lines(result: dict[str, Any]) -> list[str]:
    calib = result["traffic"]
    lines = [f"{result['artifact']}: {len(result['scales'])} static scales against "
             f"{calib.get('num_samples')} × {calib.get('seq_len')} tokens of {calib.get('source')}"
             f" + {result['decode_tokens']} greedy decode tokens each"]
    for phase in PHASES:
        totals = result["phases"][phase]
        text = (f"{phase:<8} {totals['tokens']} tokens: {totals['scales_clipping']} scale(s) clip, "
                f"{_pct(totals['clipped_fraction'])}% of all values")
        kl = (result.get("kl") or {}).get(phase)
        if kl and kl["kl_mean"] is not None:
            text += (f"; KL(float ‖ quantized) {kl['kl_mean']:.5f}, top-1 agreement "
                     f"{kl['top1_agreement']:.4f}")
        lines.append(text)
    if result.get("kl") is None:
        lines.append(f"KL not measured: {result['kl_note']}")
    else:
        lines.append(f"float reference: {result['source']}")
    return lines


def scale_table(result: dict[str, Any], top: int):
    """The ``top`` scales with the largest clipped share in either phase."""
    from rich.table import Table

    def worst(row):
        return max(row[phase]["clipped_fraction"] for phase in PHASES)

    rows = sorted(result["scales"], key=worst, reverse=True)[:top]
    table = Table(title=f"static scales, most clipped first (top {len(rows)} of "
                        f"{len(result['scales'])}; --json lists all)")
    table.add_column("scale")
    table.add_column("format")
    table.add_column("limit |x|", justify="right")
    for phase in PHASES:
        table.add_column(f"{phase} absmax", justify="right")
        table.add_column(f"{phase} clipped %", justify="right")
    table.add_column("fp16 overflow", justify="right")
    limit = result.get("max_clipped_pct")
    for row in rows:
        cells = [row["tensor"], row["format"], _num(row["limit"])]
        for phase in PHASES:
            stats = row[phase]
            pct = _pct(stats["clipped_fraction"] if stats["values"] else None)
            if limit is not None and stats["values"] and \
                    100 * stats["clipped_fraction"] > limit:
                pct = f"[bold red]{pct}[/bold red]"
            elif stats["clipped"]:
                pct = f"[yellow]{pct}[/yellow]"
            cells += [_num(stats["absmax"]), pct]
        cells.append(str(row["prefill"]["fp16_overflow"] + row["decode"]["fp16_overflow"]))
        table.add_row(*cells)
    return table


def print_result(result: dict[str, Any], console, top: int) -> None:
    for line in summary_lines(result):
        console.print(line, soft_wrap=True)
    console.print(scale_table(result, top))
    console.print("clipped % = share of the values a scale saw beyond its grid (|x| > limit: "
                  "int clamps, fp8 saturates); fp16 overflow = values beyond 65504")
    recal = result.get("recalibration")
    if recal is not None:
        ratio = recal.get("max_scale_ratio")
        console.print(f"wrote {recal['output']}: {recal['input_scales']} input scales and "
                      f"{recal['kv_tensors']} KV tensors recalibrated from the traffic"
                      + (f" (largest growth ×{ratio:.3g})" if ratio else ""))
    failed = result["gate_failed"]
    if failed:
        console.print(f"[bold red]gate failed[/bold red]: {len(failed)} scale/phase pair(s) clip "
                      f"more than {result['max_clipped_pct']}%")
    elif result.get("max_clipped_pct") is not None:
        console.print(f"[green]gate passed[/green]: no static scale clips more than "
                      f"{result['max_clipped_pct']}%")
