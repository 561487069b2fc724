"""The calibration coverage report (mpq.calibration.coverage) as the console shows it: summary
lines for ``mpq quantize`` and ``mpq inspect``, and the warning of ``mpq eval`` when the
calibration samples are shorter than the evaluation window."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

SCRIPTS_SHOWN = 4
LAYERS_SHOWN = 5


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%" if share >= 0.001 else f"{100 * share:.2f}%"


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """Three short lines: samples × tokens (lengths, documents cut), vocabulary share, scripts."""
    tokens = report.get("sample_tokens") or {}
    docs = report.get("documents") or {}
    vocab = report.get("vocabulary") or {}
    if tokens.get("min") == tokens.get("max"):
        lengths = f"{tokens.get('max')} tokens"
    else:
        lengths = (f"{tokens.get('min')}/{tokens.get('median')}/{tokens.get('max')} tokens "
                   "(min/median/max)")
    cut = ("split across sample boundaries" if report.get("mode") == "concat"
           else f"truncated at {report.get('seq_len')} tokens")
    lines = [f"calibration coverage: {report.get('samples')} samples × {lengths}, "
             f"{report.get('mode')} mode; {docs.get('in_samples')} source documents, "
             f"{docs.get('cut')} {cut}"]
    share = vocab.get("share")
    lines.append(f"  vocabulary seen: {vocab.get('distinct_tokens')} of {vocab.get('vocab_size')} "
                 f"token ids" + (f" ({_percent(share)})" if share is not None else ""))
    # largest first (the header stores JSON with sorted keys)
    scripts = sorted((report.get("scripts") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    shown = [f"{name} {_percent(share)}" for name, share in scripts[:SCRIPTS_SHOWN]]
    more = len(scripts) - SCRIPTS_SHOWN
    lines.append(f"  scripts ({report.get('characters')} characters): "
                 + (", ".join(shown) if shown else "none")
                 + (f", +{more} more" if more > 0 else ""))
    return lines


def activation_lines(report: Mapping[str, Any]) -> list[str]:
    """The input outlier statistics: how many layers, then the ones with the largest abs-max
    (layers that read the same input, e.g. q/k/v, are one entry), and the routed tokens."""
    activations = report.get("activations") or {}
    lines = []
    if activations:
        shared: dict[tuple, list[str]] = {}
        for name, record in activations.items():
            shared.setdefault(tuple(sorted(record.items())), []).append(name)
        entries = sorted(shared.items(), key=lambda kv: -dict(kv[0])["absmax"])
        kurt = [dict(key)["kurtosis"] for key, _ in entries]
        lines.append(f"  layer inputs ({len(activations)} layers): kurtosis {min(kurt):.3g}–"
                     f"{max(kurt):.3g}; largest |x|:")
        for key, names in entries[:LAYERS_SHOWN]:
            record = dict(key)
            others = f" (+{len(names) - 1} on the same input)" if len(names) > 1 else ""
            lines.append(f"    {names[0]}{others}: max {record['absmax']:.4g}, p99.9 "
                         f"{record['p99_9']:.4g}, p99 {record['p99']:.4g}, kurtosis "
                         f"{record['kurtosis']:.3g}")
    else:
        lines.append("  layer inputs: no outlier statistics (no calibration pass collected "
                     "statistics)")
    for module, counts in (report.get("experts") or {}).items():
        values = sorted(counts.values())
        lines.append(f"  {module}: routed tokens per expert min {values[0]}, median "
                     f"{values[len(values) // 2]}, max {values[-1]} over {len(values)} experts")
    return lines


def recorded_calibration(path: str | Path) -> tuple[dict | None, dict | None]:
    """(calibration coverage, calibration provenance) recorded in the safetensors header of a
    folder mpq wrote (any safetensors format); (None, None) when there is none (not written by
    mpq, a GGUF file, no calibration)."""
    import json

    from safetensors import SafetensorError, safe_open

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return None, None
    try:
        with safe_open(str(files[0]), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError):
        return None, None

    def field(key):
        try:
            value = json.loads(metadata.get(f"mpq.{key}") or "null")
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None

    return field("calibration_coverage"), field("calibration")


def short_calibration_warning(path: str | Path, window: int) -> str | None:
    """The warning when the artifact at ``path`` was calibrated on samples shorter than the
    evaluation ``window`` (tokens), else None."""
    from mpq.calibration.coverage import longest_sample

    coverage, calibration = recorded_calibration(path)
    longest = longest_sample(coverage, calibration)
    if longest is None or longest >= window:
        return None
    return (f"calibrated on samples of at most {longest} tokens, shorter than the evaluation "
            f"window of {window} tokens: its calibration statistics and static scales never saw "
            f"positions past {longest}")
