"""Calibration coverage: what the calibration samples of a run covered (not to be confused with
the *weight* coverage of mpq.models.coverage, quantized vs kept weight bytes).

The report (:func:`data_coverage`, completed by :func:`with_run_records`) is one JSON-able dict
that artifacts store under the metadata key ``mpq.calibration_coverage``, beside the calibration
provenance; it carries its own ``version`` (:data:`COVERAGE_VERSION`).  Keys:

- ``samples``, ``mode``, ``seq_len``; ``sample_tokens``: min / median (the lower one) / max /
  total tokens of the samples (a BOS included);
- ``documents``: ``in_samples`` (source documents with at least one token in the samples) and
  ``cut``: concat mode, those of them split across a sample boundary (their text continues in
  another sample, or in a part of the stream not drawn); document mode, those truncated at
  seq_len;
- ``vocabulary``: ``distinct_tokens`` (ids seen in the samples), ``vocab_size`` (the
  tokenizer's, added tokens included) and ``share`` of the vocabulary seen;
- ``scripts``: share of the samples' characters (their decoded text, special tokens and
  whitespace left out) by Unicode script: Latin, Cyrillic, Greek, Han, Kana, Hangul, Arabic,
  Hebrew, Devanagari, Thai, ``digits`` (decimal digits of any script), ``punctuation``
  (punctuation and symbols), ``other``; ``characters`` counts them.  From ``unicodedata`` only;
- ``activations`` (only where a calibration pass collected statistics): per quantized layer
  inside the decoder blocks, statistics of its input over every element of every calibration
  token: ``tokens``, ``absmax``, ``p99`` and ``p99_9`` of |x| (from a histogram with 16 bins
  per octave, mpq.engine.stats.InputOutliers: a bin's upper edge, at most 6.25 % above the exact
  percentile, at most ``absmax``) and ``kurtosis`` (Pearson's, E[(x-μ)⁴]/σ⁴: 3 for a Gaussian,
  far more with outliers);
- ``experts`` (fused MoE experts whose statistics were collected): per experts module, the
  routed calibration tokens of each expert (the engine's counts, mpq.engine.expert_steps).
"""
from __future__ import annotations

import statistics
import unicodedata
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import torch

COVERAGE_VERSION = 1
OUTLIER_STAT = "input_outliers"  # the statistic (mpq.engine.stats) behind ``activations``

_SCRIPTS = (("CJK", "Han"), ("LATIN", "Latin"), ("CYRILLIC", "Cyrillic"), ("GREEK", "Greek"),
            ("ARABIC", "Arabic"), ("HEBREW", "Hebrew"), ("DEVANAGARI", "Devanagari"),
            ("HANGUL", "Hangul"), ("HIRAGANA", "Kana"), ("KATAKANA", "Kana"), ("THAI", "Thai"))


def char_script(ch: str) -> str | None:
    """The script class of one character (module docstring), None for whitespace."""
    category = unicodedata.category(ch)
    if ch.isspace() or category.startswith("Z"):
        return None
    if category == "Nd":
        return "digits"
    if category[0] in "PS":
        return "punctuation"
    if category[0] in "LMN":
        name = unicodedata.name(ch, "")
        for prefix, script in _SCRIPTS:
            if name.startswith(prefix):
                return script
    return "other"


def script_mix(texts: Iterable[str]) -> tuple[dict[str, float], int]:
    """(script → share of the non-whitespace characters, largest first; their count)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    by_script: Counter[str] = Counter()
    for ch, n in counts.items():
        script = char_script(ch)
        if script is not None:
            by_script[script] += n
    total = sum(by_script.values())
    shares = {script: round(n / total, 6)
              for script, n in sorted(by_script.items(), key=lambda kv: (-kv[1], kv[0]))}
    return shares, total


def vocabulary_seen(samples: Sequence[torch.Tensor], vocab_size: int) -> dict[str, Any]:
    distinct = int(torch.unique(torch.cat([s.reshape(-1) for s in samples])).numel())
    return {"distinct_tokens": distinct, "vocab_size": vocab_size,
            "share": round(distinct / vocab_size, 6) if vocab_size else None}


def concat_cuts(doc_starts: Sequence[int], stream_tokens: int, separator: int, seq_len: int,
                picked: Sequence[int]) -> dict[str, int]:
    """Concat mode: documents with tokens in the picked chunks (``seq_len`` tokens each, chunk
    i = stream[i·seq_len, (i+1)·seq_len)) and how many of them span more than one chunk.
    Document d's tokens are stream[doc_starts[d], doc_starts[d+1] - separator) (the last one's
    end at ``stream_tokens``)."""
    chosen = set(picked)
    in_samples = cut = 0
    ends = [start - separator for start in doc_starts[1:]] + [stream_tokens]
    for start, end in zip(doc_starts, ends):
        if end <= start:
            continue
        first, last = start // seq_len, (end - 1) // seq_len
        if any(chunk in chosen for chunk in range(first, last + 1)):
            in_samples += 1
            cut += first != last
    return {"in_samples": in_samples, "cut": cut}


def data_coverage(samples: Sequence[torch.Tensor], texts: Sequence[str], *, mode: str,
                  seq_len: int, vocab_size: int, documents: Mapping[str, int]) -> dict[str, Any]:
    """The report's data part (module docstring) for ``samples`` and their decoded ``texts``."""
    lengths = sorted(int(s.shape[-1]) for s in samples)
    scripts, characters = script_mix(texts)
    return {"version": COVERAGE_VERSION, "samples": len(samples), "mode": mode,
            "seq_len": seq_len,
            "sample_tokens": {"min": lengths[0], "median": statistics.median_low(lengths),
                              "max": lengths[-1], "total": sum(lengths)},
            "documents": dict(documents), "vocabulary": vocabulary_seen(samples, vocab_size),
            "scripts": scripts, "characters": characters}


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def outlier_record(value: torch.Tensor) -> dict[str, Any]:
    """The ``activations`` entry of one layer from the ``input_outliers`` statistic's result
    (mpq.engine.stats.InputOutliers: [tokens, absmax, p99, p99.9, kurtosis])."""
    tokens, absmax, p99, p999, kurtosis = value.tolist()
    return {"tokens": int(tokens), "absmax": _round(absmax), "p99": _round(p99),
            "p99_9": _round(p999), "kurtosis": _round(kurtosis)}


def take_activation_records(layers: dict[str, dict]) -> dict[str, dict]:
    """Remove the per-layer ``input_outliers`` records from a run log's layer results (where the
    engine keeps them through resume and multi-process runs) and return them by layer name."""
    return {name: result.pop(OUTLIER_STAT) for name, result in layers.items()
            if OUTLIER_STAT in result}


def expert_routing(layers: Mapping[str, dict], expert_slices: Iterable[str]) -> dict[str, dict]:
    """Per experts module (``a.experts``): expert index → routed calibration tokens, from the
    run log's ``routed_tokens`` of each slice (the largest over a module's projections)."""
    from mpq.models.experts import split_slice

    out: dict[str, dict[str, int]] = {}
    for name in expert_slices:
        tokens = layers.get(name, {}).get("routed_tokens")
        if tokens is None:
            continue
        module, _, index = split_slice(name)
        per_expert = out.setdefault(module, {})
        per_expert[str(index)] = max(per_expert.get(str(index), 0), int(tokens))
    return {module: dict(sorted(counts.items(), key=lambda kv: int(kv[0])))
            for module, counts in sorted(out.items())}


def with_run_records(report: dict[str, Any], activations: Mapping[str, dict],
                     experts: Mapping[str, dict]) -> dict[str, Any]:
    """``report`` with the run's ``activations`` and ``experts`` (each only when not empty)."""
    out = dict(report)
    if activations:
        out["activations"] = dict(sorted(activations.items()))
    if experts:
        out["experts"] = dict(experts)
    return out


def longest_sample(coverage: Mapping | None, calibration: Mapping | None) -> int | None:
    """The longest calibration sample of an artifact, in tokens: from its coverage report, else
    (artifacts written before the report) the ``seq_len`` of its calibration provenance."""
    if isinstance(coverage, Mapping):
        longest = (coverage.get("sample_tokens") or {}).get("max")
        if isinstance(longest, int):
            return longest
    if isinstance(calibration, Mapping) and isinstance(calibration.get("seq_len"), int):
        return calibration["seq_len"]
    return None
