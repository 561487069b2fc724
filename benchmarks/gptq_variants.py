"""RTN and GPTQ variants on SmolLM2-135M: activation-weighted scale search and GPTQ error feedback
(GPTAQ) against their baselines, int4 and int3 symmetric g64.  Prints a table; writes JSON and
markdown under benchmarks/results/ (the JSON after every row, so an interrupted run keeps them).

    PYTHONPATH=. python benchmarks/gptq_variants.py --model .cache/SmolLM2-135M \
        --corpora ../shared/corpora [--runs "4:gptq error_feedback" ...] [--fp32-ppl 26.813 --append]

Rows (weights int b-bit symmetric, group 64, every Linear; GPTQ: damp 0.01, block 128, act-order
with static groups, true-sequential, like the w4a16-gptq / w3a16-gptq presets):

- ``rtn``: min-max scales (preset w4a16 / w3a16);
- ``rtn scale_search=activations``: clipping searched per group against the importance-weighted
  rounding error (mean x² of each input column over the calibration tokens);
- ``gptq``: min-max group scales (clip_search false);
- ``gptq clip_search`` (the weighted initialisation: diag H weights the clipping search; this is
  the w4a16-gptq / w3a16-gptq preset);
- ``gptq error_feedback`` (α 0.25, the paper's default, and α 1) with and without clip_search;
- ``... + quarot`` the w4a16-tuned recipe on a QuaRot-rotated model (R1 Hadamard, R2; ``r4``:
  also the online Hadamard on the down_proj inputs, native format only), ``dynamic groups``
  with the group scales set as GPTQ reaches them (act-order's columns then store a g_idx).

Every row is an artifact written by ``mpq quantize`` and loaded back with ``mpq.load``.
Calibration: enwiki_excerpt.train.txt, 128 × 512 tokens.  Evaluation: perplexity over the first
40 × 512-token windows of enwiki_excerpt.test.txt (what ``mpq eval --num-windows 40`` reports).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

import mpq
from mpq.analysis.eval import load_eval_ids, perplexity
from mpq.calibration import CalibrationOptions
from mpq.config.recipe import parse_recipe
from mpq.engine.spec import RunOptions
from mpq.models.source import load_model
from mpq.quantize import quantize

GPTQ = "damp: 0.01, block_size: 128, act_order: true, static_groups: true"
TUNED = f"{GPTQ}, clip_search: true, error_feedback: true"
ROTATION = "rotation: {{type: quarot, r1: hadamard, r2: true, r4: {r4}, seed: 0}}\n"
# name → (algorithm, options[, rotation's r4])
VARIANTS = {
    "rtn": ("rtn", ""),
    "rtn scale_search=activations": ("rtn", "scale_search: activations"),
    "gptq": ("gptq", f"{GPTQ}, clip_search: false"),
    "gptq clip_search (preset)": ("gptq", f"{GPTQ}, clip_search: true"),
    "gptq error_feedback": ("gptq", f"{GPTQ}, clip_search: false, error_feedback: true"),
    "gptq clip_search + error_feedback": (
        "gptq", f"{GPTQ}, clip_search: true, error_feedback: true"),
    "gptq clip_search + error_feedback a=1": (
        "gptq", f"{GPTQ}, clip_search: true, error_feedback: true, feedback_alpha: 1.0"),
    "gptq clip_search + error_feedback + quarot": ("gptq", TUNED, "false"),
    "gptq clip_search + error_feedback + quarot r4": ("gptq", TUNED, "true"),
    "gptq clip_search + error_feedback + quarot r4, dynamic groups": (
        "gptq", TUNED.replace("static_groups: true", "static_groups: false"), "true"),
}


def recipe_for(name: str, bits: int):
    algorithm, options, *r4 = VARIANTS[name]
    text = "mpq_recipe: 1\nname: bench\n" + (ROTATION.format(r4=r4[0]) if r4 else "")
    text += f"defaults:\n  algorithm: {algorithm}\n"
    if options:
        text += f"  options: {{{options}}}\n"
    text += ("rules:\n  - targets: [Linear]\n    weights: {format: int, bits: "
             f"{bits}, symmetric: true, granularity: group, group_size: 64}}\n")
    return parse_recipe(text, f"{name}.yaml")


def _write(path: Path, args, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "model": str(args.model), "eval": f"first {args.num_windows} x 512 windows of "
        "enwiki_excerpt.test.txt",
        "calibration": f"enwiki_excerpt.train.txt {args.num_samples} x 512",
        "torch": torch.__version__, "mpq": mpq.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=".cache/SmolLM2-135M")
    parser.add_argument("--corpora", default="../shared/corpora")
    parser.add_argument("--runs", nargs="*",
                        default=[f"{b}:{v}" for b in (4, 3) for v in VARIANTS],
                        help="BITS:VARIANT pairs, in order (default: every variant at 4 bits, "
                             "then at 3)")
    parser.add_argument("--fp32-ppl", type=float, default=None,
                        help="the float model's perplexity, when known (skips measuring it)")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to those already in --out")
    parser.add_argument("--num-windows", type=int, default=40)
    parser.add_argument("--num-samples", type=int, default=128,
                        help="calibration samples of 512 tokens")
    parser.add_argument("--out", default="benchmarks/results/gptq_variants.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    corpora = Path(args.corpora)
    ids = load_eval_ids(corpora / "enwiki_excerpt.test.txt",
                        AutoTokenizer.from_pretrained(args.model))
    runs = []
    for run in args.runs:
        bits, _, name = run.partition(":")
        if not bits.isdigit() or name not in VARIANTS:
            parser.error(f"--runs {run!r}: expected BITS:VARIANT, variants: "
                         f"{', '.join(VARIANTS)}")
        runs.append((int(bits), name))
    out_json = Path(args.out)
    rows = json.loads(out_json.read_text())["rows"] if args.append and out_json.exists() else []
    base = args.fp32_ppl
    if base is None:
        base = perplexity(load_model(args.model), ids, window=512,
                          num_windows=args.num_windows).ppl
        print(f"fp32: {base:.3f}", flush=True)
    if not any(row["scheme"] == "fp32" for row in rows):
        rows.insert(0, {"scheme": "fp32", "method": "original", "ppl": base})
    work = Path(tempfile.mkdtemp(prefix="mpq-gptq-variants-"))
    try:
        for bits, name in runs:
            out = work / "artifact"
            t0 = time.perf_counter()
            result = quantize(args.model, recipe_for(name, bits), out, RunOptions(
                calibration=CalibrationOptions(
                    source=str(corpora / "enwiki_excerpt.train.txt"),
                    num_samples=args.num_samples, seq_len=512)), force=True)
            quantize_s = time.perf_counter() - t0
            ppl = perplexity(mpq.load(out, dequantize=True), ids, window=512,
                             num_windows=args.num_windows).ppl
            rows.append({"scheme": f"int{bits} g64 sym", "method": name, "ppl": ppl,
                         "quantize_s": quantize_s,
                         "peak_rss_mib": resource.getrusage(
                             resource.RUSAGE_SELF).ru_maxrss // 1024,
                         "calib_sha256": result.calibration["sha256"]})
            print(f"int{bits} {name}: {ppl:.3f} ({quantize_s:.0f} s)", flush=True)
            shutil.rmtree(out)
            _write(out_json, args, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"{'scheme':<14}{'method':<40}{'ppl':>9}{'Δ vs fp32':>11}{'quant s':>9}"]
    for row in rows:
        quant = f"{row['quantize_s']:>9.1f}" if "quantize_s" in row else ""
        lines.append(f"{row['scheme']:<14}{row['method']:<40}{row['ppl']:>9.3f}"
                     f"{row['ppl'] / base - 1:>11.2%}{quant}")
    print("\n".join(lines))
    _write(out_json, args, rows)
    out_json.with_suffix(".md").write_text(
        "# RTN and GPTQ variants on SmolLM2-135M\n\n"
        f"Generated by `python benchmarks/gptq_variants.py` (see its docstring; calibration "
        f"{args.num_samples} × 512 tokens, first {args.num_windows} × 512 evaluation windows; "
        "peak RSS is of the whole benchmark process so far)."
        "\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
