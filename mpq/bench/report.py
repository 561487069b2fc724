"""The rows of ``mpq bench`` as a markdown table (the CLI prints it; benchmarks save it)."""
from __future__ import annotations

from mpq.bench.configs import Settings


def _cell(value) -> str:
    return "-" if value is None else str(value)


def paths_text(paths: dict[str, int]) -> str:
    """{'int4pack': 210} → 'int4pack 210' ('-' for none)."""
    return ", ".join(f"{name} {count}" for name, count in sorted(paths.items())) or "-"


def markdown_table(rows: list[dict], settings: Settings) -> str:
    """One line per row: decode tokens/s per batch, prefill tokens/s, time to first token, peak
    RSS and RSS after load, and the layer paths."""
    decode = [f"decode tok/s b{b}" for b in settings.batches]
    header = ["model", *decode, f"prefill tok/s ({settings.prefill_tokens})", "TTFT ms",
              "peak RSS MB", "RSS after load MB", "layer paths"]
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 2) + "---|"]
    for row in rows:
        cells = [row["model"], *(_cell(row.get(f"decode_tok_s_b{b}")) for b in settings.batches),
                 _cell(row.get("prefill_tok_s")), _cell(row.get("ttft_ms")),
                 _cell(row.get("peak_rss_mb")), _cell(row.get("rss_after_load_mb")),
                 paths_text(row.get("paths") or {})]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(settings: Settings) -> str:
    """The protocol in one line."""
    batches = ", ".join(str(b) for b in settings.batches)
    return (f"{settings.threads} threads; decode: {settings.prompt_tokens}-token prompt, "
            f"{settings.new_tokens} greedy tokens at batch {batches} (steady rate, prompt "
            f"prefill excluded); prefill: one {settings.prefill_tokens}-token forward "
            f"(next-token logits only), best of {settings.repeats}; TTFT at batch "
            f"{1 if 1 in settings.batches else settings.batches[0]}; each row in its own "
            "process")
