"""The short README.md model card written into every artifact."""
from __future__ import annotations

from mpq import __version__
from mpq.calibration.conventions import bos_note
from mpq.config.plan import Plan


def render_model_card(*, source: dict, recipe_name: str, plan: Plan, calibration: dict | None,
                      sizes: dict, format_name: str = "mpq",
                      load_hint: str = 'import mpq; model = mpq.load("path/to/this/folder")') -> str:
    lines = [
        f"# {source.get('path', 'model').rstrip('/').split('/')[-1]} quantized with mpq ({recipe_name})",
        "",
        f"Written by mpq {__version__} in the `{format_name}` format. Load it with:",
        "",
        "```python",
        *load_hint.split("; "),
        "```",
        "",
        "## Plan summary",
        "",
        "| scheme | layers | weights |",
        "|---|---|---|",
    ]
    summary = plan.summary()
    for row in summary.rows:
        lines.append(f"| {row.label} | {row.layers} | {row.weights:,} |")
    embedding = any(layer.embedding for layer in plan.quantized())
    lines += [
        "",
        f"{summary.kept} linear layer(s) kept in the original dtype "
        + ("(norms are never quantized; the input embedding is quantized as above)."
           if embedding else "(embeddings and norms are never quantized)."),
        "",
        f"Tensor bytes on disk: {sizes['stored_bytes']:,} (ideal {sizes['ideal_bytes']:,}).",
        "",
    ]
    if plan.tying is not None:  # a tied embedding/head pair the plan quantizes
        state = "kept tied" if plan.tying.shared else "untied"
        lines += [f"Tied `{plan.tying.embedding}` / `{plan.tying.head}`: {state} "
                  f"({plan.tying.reason}).", ""]
    lines += [
        "## Provenance",
        "",
        f"- source model: `{source.get('path')}` ({source.get('model_type')}), "
        f"sha256 `{source.get('sha256')}`",
    ]
    if calibration:
        lines.append(f"- calibration: `{calibration.get('source')}`, {calibration.get('num_samples')}"
                     f" samples × {calibration.get('seq_len')} tokens, seed {calibration.get('seed')},"
                     f" sha256 `{calibration.get('sha256')}`" + bos_note(calibration))
    else:
        lines.append("- calibration: none")
    lines += ["", "The full recipe, per-layer plan and errors are in the safetensors header "
              "(`mpq inspect` prints them).", ""]
    return "\n".join(lines)
