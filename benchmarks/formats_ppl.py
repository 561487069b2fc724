"""Number formats and KV-cache FP8 on SmolLM2-135M: perplexity of RTN artifacts written by
``mpq quantize`` and loaded back with ``mpq.load`` (so NVFP4/MXFP4/MXFP8/FP8-block weights and
FP8 KV-cache fake quantization are what is evaluated).  Prints a table; writes JSON and markdown.

    python benchmarks/formats_ppl.py --model ./SmolLM2-135M --corpora ../shared/corpora

Weights: round to nearest on each format's grid, every Linear except the (tied) lm_head.
KV cache: static FP8 E4M3 scales (abs-max / 448) calibrated on the post-RoPE keys and values of
``--kv-samples`` (128) × 512 tokens of enwiki_excerpt.train.txt, per tensor or per KV head, on top of fp32 weights
and of int8 weights (the KV rows' delta is against the same weights without KV quantization).
Evaluation: the first 40 × 512-token windows of enwiki_excerpt.test.txt.
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

SKIP = None  # every Linear kept in fp32
KV_TENSOR = "{format: fp8_e4m3, granularity: tensor}"
KV_HEAD = "{format: fp8_e4m3, granularity: head}"
INT8 = "{format: int, bits: 8, granularity: channel}"
# name → (weights or SKIP, kv_cache or None, row the delta is measured against)
VARIANTS = {
    "int4 sym g64 (w4a16)": ("{format: int, bits: 4, granularity: group, group_size: 64}",
                             None, None),
    "nvfp4 (g16, fp8 scales, global scale)": ("{format: nvfp4}", None, None),
    "mxfp4 (g32, e8m0 scales)": ("{format: mxfp4}", None, None),
    "mxfp8 (g32, e8m0 scales)": ("{format: mxfp8}", None, None),
    "fp8_e4m3 block 128x128": ("{format: fp8_e4m3, granularity: block}", None, None),
    "fp8_e4m3 per channel": ("{format: fp8_e4m3, granularity: channel}", None, None),
    "fp32 weights + kv fp8 per tensor": (SKIP, KV_TENSOR, "original (fp32)"),
    "fp32 weights + kv fp8 per head": (SKIP, KV_HEAD, "original (fp32)"),
    "int8 channel (w8a16)": (INT8, None, None),
    "int8 channel + kv fp8 per tensor": (INT8, KV_TENSOR, "int8 channel (w8a16)"),
    "int8 channel + kv fp8 per head": (INT8, KV_HEAD, "int8 channel (w8a16)"),
}


def recipe_for(weights: str | None, kv: str | None):
    text = "mpq_recipe: 1\nname: formats-bench\ndefaults:\n  algorithm: rtn\n"
    if kv:
        text += f"kv_cache: {kv}\n"
    rule = "    skip: true\n" if weights is None else f"    weights: {weights}\n"
    return parse_recipe(text + "rules:\n  - targets: [Linear]\n" + rule, "formats-bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--corpora", default="../shared/corpora")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--num-windows", type=int, default=40)
    parser.add_argument("--kv-samples", type=int, default=128,
                        help="calibration samples (× 512 tokens) for the KV scales")
    parser.add_argument("--out", default="benchmarks/results/formats_ppl.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    corpora = Path(args.corpora)
    ids = load_eval_ids(corpora / "enwiki_excerpt.test.txt",
                        AutoTokenizer.from_pretrained(args.model))
    base = perplexity(load_model(args.model), ids, window=512, num_windows=args.num_windows).ppl
    rows = {"original (fp32)": {"method": "original (fp32)", "ppl": base}}
    work = Path(tempfile.mkdtemp(prefix="mpq-formats-"))
    try:
        for name in args.variants:
            weights, kv, _ = VARIANTS[name]
            out = work / "artifact"
            calibration = (CalibrationOptions(source=str(corpora / "enwiki_excerpt.train.txt"),
                                              num_samples=args.kv_samples, seq_len=512)
                           if kv else CalibrationOptions())
            t0 = time.perf_counter()
            result = quantize(args.model, recipe_for(weights, kv), out, RunOptions(calibration=calibration), force=True)
            quantize_s = time.perf_counter() - t0
            ppl = perplexity(mpq.load(out, dequantize=True), ids, window=512,
                             num_windows=args.num_windows).ppl
            rows[name] = {"method": name, "ppl": ppl, "quantize_s": quantize_s,
                          "stored_bytes": result.sizes["stored_bytes"],
                          "ideal_bytes": result.sizes["ideal_bytes"]}
            print(f"{name}: {ppl:.3f} ({quantize_s:.0f} s)", flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"{'method':<40}{'ppl':>9}{'vs fp32':>9}{'KV delta':>10}{'MiB':>8}{'quant s':>9}"]
    for name, row in rows.items():
        row["ppl_vs_original"] = row["ppl"] / base - 1
        against = VARIANTS.get(name, (None, None, None))[2]
        if against in rows:
            row["kv_delta"] = row["ppl"] / rows[against]["ppl"] - 1
        lines.append(f"{name:<40}{row['ppl']:>9.3f}{row['ppl_vs_original']:>9.2%}"
                     + (f"{row['kv_delta']:>10.2%}" if "kv_delta" in row else " " * 10)
                     + (f"{row['stored_bytes'] / 2**20:>8.1f}{row['quantize_s']:>9.1f}"
                        if "quantize_s" in row else ""))
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": str(args.model), "eval": f"first {args.num_windows} x 512 windows of "
        "enwiki_excerpt.test.txt",
        "kv_calibration": f"enwiki_excerpt.train.txt {args.kv_samples} x 512",
        "torch": torch.__version__, "mpq": mpq.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "rows": list(rows.values())}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        "# Number formats and KV-cache FP8 on SmolLM2-135M (RTN)\n\n"
        "Generated by `python benchmarks/formats_ppl.py` (see its docstring).\n\n```\n"
        + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
