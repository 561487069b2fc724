"""RTN presets on SmolLM2-135M: perplexity, artifact size vs ideal, time. Prints a table, writes JSON.

    python benchmarks/backbone_ppl.py --model ./SmolLM2-135M --corpora ../shared/corpora

Calibration: enwiki_excerpt.train.txt, 128 × 512 tokens (hashed into each artifact; RTN itself
needs no statistics).  Evaluation: the first 40 non-overlapping 512-token windows of
enwiki_excerpt.test.txt.  Each artifact is loaded back with ``mpq.load`` (weights packed,
dequantized on the fly) for the evaluation.
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

PRESETS = ("w8a16", "w4a16", "w4a16-channel", "w3a16", "nf4", "fp8-weights", "w4a16-asym", "nf4-dq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--corpora", default="../shared/corpora")
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--num-windows", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results/backbone_ppl.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    corpora = Path(args.corpora)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = load_eval_ids(corpora / "enwiki_excerpt.test.txt", tokenizer)
    rows = []
    started = time.perf_counter()
    base = perplexity(load_model(args.model), ids, window=512, num_windows=args.num_windows)
    rows.append({"method": "original (fp32)", "ppl": base.ppl, "eval_s": time.perf_counter() - started})
    work = Path(tempfile.mkdtemp(prefix="mpq-bench-"))
    try:
        for preset in args.presets:
            out = work / preset
            t0 = time.perf_counter()
            result = quantize(args.model, preset, out, RunOptions(calibration=CalibrationOptions(
                source=str(corpora / "enwiki_excerpt.train.txt"), num_samples=128, seq_len=512)))
            quantize_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ppl = perplexity(mpq.load(out), ids, window=512, num_windows=args.num_windows).ppl
            files = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            rows.append({"method": preset, "ppl": ppl, "quantize_s": quantize_s,
                         "eval_s": time.perf_counter() - t0, "file_bytes": files,
                         "ideal_bytes": result.sizes["ideal_bytes"],
                         "size_over_ideal": files / result.sizes["ideal_bytes"] - 1,
                         "calib_sha256": result.calibration["sha256"]})
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row["ppl_vs_original"] = row["ppl"] / base.ppl - 1
    print(f"{'method':<18}{'ppl':>9}{'Δ vs fp32':>11}{'file MiB':>10}{'ideal MiB':>11}"
          f"{'over ideal':>11}{'quant s':>9}")
    for row in rows:
        size = (f"{row['file_bytes'] / 2**20:>10.1f}{row['ideal_bytes'] / 2**20:>11.1f}"
                f"{row['size_over_ideal']:>11.2%}" if "file_bytes" in row else " " * 32)
        quant = f"{row['quantize_s']:>9.1f}" if "quantize_s" in row else ""
        print(f"{row['method']:<18}{row['ppl']:>9.3f}{row['ppl_vs_original']:>11.2%}{size}{quant}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": str(args.model), "eval": f"first {args.num_windows} x 512 windows of "
        "enwiki_excerpt.test.txt", "calibration": "enwiki_excerpt.train.txt 128 x 512",
        "torch": torch.__version__, "mpq": mpq.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
