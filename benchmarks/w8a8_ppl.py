"""W8A8 on SmolLM2-135M: SmoothQuant vs none, int8 and FP8, with the activation quantization
really applied at evaluation.  Prints a table; writes JSON and markdown under benchmarks/results/.

    python benchmarks/w8a8_ppl.py --model ./SmolLM2-135M --corpora ../shared/corpora

Every row is an artifact written by ``mpq quantize`` and loaded back with ``mpq.load``, whose
linears fake-quantize their inputs (so the perplexity is that of W8A8 inference; weights are
dequantized once at load: the same outputs as packed layers, faster).  Weights: RTN, symmetric
per channel (GPTQ with act-order and static groups where the row says so).  Calibration: enwiki_excerpt.train.txt, 128 × 512 tokens (SmoothQuant's
activation maxima, static scales).  Evaluation: the first 40 × 512-token windows of
enwiki_excerpt.test.txt.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import mpq
from mpq.analysis.eval import load_eval_ids, perplexity
from mpq.models.source import load_model
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe

INT8_W = "{format: int, bits: 8, granularity: channel}"
FP8_W = "{format: fp8_e4m3, granularity: channel}"
INT8_TOKEN = "{format: int, bits: 8, dynamic: true, granularity: token}"
INT8_STATIC = "{format: int, bits: 8, dynamic: false}"
FP8_TOKEN = "{format: fp8_e4m3, dynamic: true, granularity: token}"
# name → (weights, input activations or None, smoothquant options or None[, algorithm: rtn])
VARIANTS = {
    "w8a16 int8 (weights only)": (INT8_W, None, None),
    "w8a8 int8 token, no smoothing": (INT8_W, INT8_TOKEN, None),
    "w8a8 int8 token, smoothquant 0.5": (INT8_W, INT8_TOKEN, "{alpha: 0.5}"),
    "w8a8 int8 token, smoothquant 0.5 +pairs": (INT8_W, INT8_TOKEN, "{alpha: 0.5, pairs: true}"),
    "w8a8 int8 token, smoothquant 0.8": (INT8_W, INT8_TOKEN, "{alpha: 0.8}"),
    "w8a8 int8 token, smoothquant searched": (INT8_W, INT8_TOKEN, "{search: true}"),
    "w8a8 int8 token, smoothquant searched +pairs": (INT8_W, INT8_TOKEN,
                                                     "{search: true, pairs: true}"),
    "w8a8 int8 static, no smoothing": (INT8_W, INT8_STATIC, None),
    "w8a8 int8 static, smoothquant 0.5": (INT8_W, INT8_STATIC, "{alpha: 0.5}"),
    "w8a8 fp8 token (preset w8a8-fp8)": (FP8_W, FP8_TOKEN, None),
    "w8a8 int8 token, smoothquant 0.5, gptq weights": (INT8_W, INT8_TOKEN, "{alpha: 0.5}",
                                                        "gptq"),
    "w8a8 int8 token, smoothquant 0.5, activation-weighted weight scales": (
        INT8_W, INT8_TOKEN, "{alpha: 0.5}", "rtn-activations"),
    "w8a8 int8 token, smoothquant 0.5 +pairs, activation-weighted weight scales": (
        INT8_W, INT8_TOKEN, "{alpha: 0.5, pairs: true}", "rtn-activations"),
    "w8a8 int8 token, smoothquant searched +pairs, gptq weights": (
        INT8_W, INT8_TOKEN, "{search: true, pairs: true}", "gptq"),
}


def recipe_for(name: str, weights: str, acts: str | None, smooth: str | None,
               algorithm: str = "rtn"):
    text = f"mpq_recipe: 1\nname: bench\ndefaults:\n  algorithm: {algorithm}\n"
    if algorithm == "gptq":
        text += "  options: {act_order: true, static_groups: true}\n"
    if algorithm == "rtn-activations":  # rtn with the activation-weighted scale search
        text = text.replace(algorithm, "rtn") + "  options: {scale_search: activations}\n"
    if acts:
        text += f"  input_activations: {acts}\n"
    if smooth:
        text += f"transforms:\n  - {{type: smoothquant, {smooth[1:-1]}}}\n"
    text += f"rules:\n  - targets: [Linear]\n    weights: {weights}\n"
    return parse_recipe(text, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--corpora", default="../shared/corpora")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--num-windows", type=int, default=40)
    parser.add_argument("--num-samples", type=int, default=128,
                        help="calibration samples of 512 tokens")
    parser.add_argument("--out", default="benchmarks/results/w8a8_ppl.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    corpora = Path(args.corpora)
    ids = load_eval_ids(corpora / "enwiki_excerpt.test.txt",
                        AutoTokenizer.from_pretrained(args.model))
    base = perplexity(load_model(args.model), ids, window=512, num_windows=args.num_windows).ppl
    rows = [{"method": "original (fp32)", "ppl": base}]
    work = Path(tempfile.mkdtemp(prefix="mpq-w8a8-"))
    try:
        for name in args.variants:
            out = work / "artifact"
            t0 = time.perf_counter()
            result = quantize(args.model, recipe_for(name, *VARIANTS[name]), out, RunOptions(calibration=CalibrationOptions(
                                  source=str(corpora / "enwiki_excerpt.train.txt"),
                                  num_samples=args.num_samples, seq_len=512)), force=True)
            quantize_s = time.perf_counter() - t0
            ppl = perplexity(mpq.load(out, dequantize=True), ids, window=512,
                             num_windows=args.num_windows).ppl
            rows.append({"method": name, "ppl": ppl, "quantize_s": quantize_s,
                         "calib_sha256": result.calibration["sha256"]})
            print(f"{name}: {ppl:.3f} ({quantize_s:.0f} s)", flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row["ppl_vs_original"] = row["ppl"] / base - 1
    lines = [f"{'method':<42}{'ppl':>9}{'Δ vs fp32':>11}{'quant s':>9}"]
    for row in rows:
        quant = f"{row['quantize_s']:>9.1f}" if "quantize_s" in row else ""
        lines.append(f"{row['method']:<42}{row['ppl']:>9.3f}{row['ppl_vs_original']:>11.2%}{quant}")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": str(args.model), "eval": f"first {args.num_windows} x 512 windows of "
        "enwiki_excerpt.test.txt",
        "calibration": f"enwiki_excerpt.train.txt {args.num_samples} x 512",
        "torch": torch.__version__, "mpq": mpq.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        "# W8A8 on SmolLM2-135M (activation quantization applied at evaluation)\n\n"
        f"Generated by `python benchmarks/w8a8_ppl.py` (see its docstring; calibration "
        f"{args.num_samples} × 512 tokens, first {args.num_windows} × 512 evaluation windows)."
        "\n\n```\n"
        + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
