"""AWQ on SmolLM2-135M: mpq vs llm-compressor with identical settings, plus RTN for reference.

    python benchmarks/awq_vs_llmcompressor.py --model ./SmolLM2-135M --corpora ../shared/corpora

Settings shared by both tools: int4 asymmetric weights, group 64, lm_head kept, AWQ scale grid of
20 points with duo scaling (s = mean|x|^α / mean|ŵ|^(1−α)), round to nearest after AWQ, fp32;
calibration 128 × 512 tokens from enwiki_excerpt.train.txt (mpq draws them; the same token ids
are handed to llm-compressor); evaluation: the first 40 × 512-token windows of
enwiki_excerpt.test.txt with mpq's evaluator.  mpq runs twice: its preset (``w4a16-awq``:
scales and clipping) and without the clipping search, which llm-compressor does not have.  Each
quantization runs in its own process (benchmarks/mpq_run.py; benchmarks/peers/llmcompressor_awq.py
in llm-compressor's venv, built by benchmarks/peers/setup_llmcompressor.sh when missing).
Prints a table; writes JSON and markdown under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gptq_vs_llmcompressor import perplexity_of, run_json

HERE = Path(__file__).resolve().parent
WEIGHTS = "{format: int, bits: 4, symmetric: false, granularity: group, group_size: 64}"
MPQ_METHODS = {  # method → transforms line (None: plain RTN)
    "mpq rtn": None,
    "mpq awq": "{type: awq, grid: 20, duo_scaling: true, clip: true}",
    "mpq awq (no clip)": "{type: awq, grid: 20, duo_scaling: true, clip: false}",
}
PEER = "llm-compressor awq"


def recipe_text(transform: str | None) -> str:
    text = "mpq_recipe: 1\nname: awq-bench\ndefaults:\n  algorithm: rtn\n"
    if transform:
        text += f"transforms:\n  - {transform}\n"
    return text + f"rules:\n  - targets: [Linear]\n    weights: {WEIGHTS}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--corpora", default="../shared/corpora")
    parser.add_argument("--num-windows", type=int, default=40)
    parser.add_argument("--num-samples", type=int, default=128,
                        help="calibration samples of 512 tokens, the same for both tools")
    parser.add_argument("--skip-peer", action="store_true", help="mpq only (no llm-compressor)")
    parser.add_argument("--out", default=str(HERE / "results" / "awq_vs_llmcompressor.json"))
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from mpq.calibration import CalibrationOptions, build_calibration_set
    from mpq.analysis.eval import load_eval_ids, perplexity
    from mpq.models.source import load_model

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    model = str(Path(args.model).resolve())
    calib_file = str(Path(args.corpora, "enwiki_excerpt.train.txt").resolve())
    tokenizer = AutoTokenizer.from_pretrained(model)
    work = Path(tempfile.mkdtemp(prefix="mpq-awq-bench-"))
    calib = build_calibration_set(CalibrationOptions(source=calib_file, num_samples=args.num_samples, seq_len=512, seed=0), tokenizer)
    calib_ids = work / "calib_ids.pt"
    torch.save(torch.cat(calib.samples), calib_ids)
    ids = load_eval_ids(Path(args.corpora) / "enwiki_excerpt.test.txt", tokenizer)
    rows = [{"method": "original (fp32)",
             "ppl": perplexity(load_model(model), ids, window=512, num_windows=args.num_windows).ppl}]
    for method, transform in MPQ_METHODS.items():
        recipe = work / f"{len(rows)}.yaml"
        recipe.write_text(recipe_text(transform))
        out = work / f"mpq-{len(rows)}"
        stats = run_json([sys.executable, str(HERE / "mpq_run.py"), model, str(recipe), str(out),
                          "--calib", calib_file, "--num-samples", str(args.num_samples)],
                         env=env)
        if stats["calib_sha256"] != calib.provenance["sha256"]:
            raise SystemExit("mpq drew different calibration tokens than the peer was given")
        rows.append({"method": method, "ppl": perplexity_of(out, ids, args.num_windows),
                     "quant_s": stats["pipeline_s"], "rss_quant_mib":
                     stats["peak_rss_quant_kib"] / 1024})
        print(f"{method}: ppl {rows[-1]['ppl']:.3f}, {stats['pipeline_s']:.0f} s", flush=True)
    if not args.skip_peer:
        setup = subprocess.run(["bash", str(HERE / "peers" / "setup_llmcompressor.sh")],
                               capture_output=True, text=True, env=env)
        if setup.returncode != 0:
            sys.stderr.write(setup.stderr[-4000:])
            raise SystemExit("could not set up llm-compressor's venv (see above); --skip-peer")
        out = work / "llmc"
        stats = run_json([setup.stdout.strip().splitlines()[-1],
                          str(HERE / "peers" / "llmcompressor_awq.py"), "--model", model,
                          "--calib-ids", str(calib_ids), "--out", str(out)], env=env)
        print(f"{PEER}: quantized in {stats['quant_s']:.0f} s", flush=True)  # ppl follows
        rows.append({"method": PEER, "ppl": perplexity_of(out, ids, args.num_windows),
                     "quant_s": stats["quant_s"],
                     "rss_quant_mib": stats["peak_rss_quant_kib"] / 1024,
                     "peer_version": stats["llmcompressor_version"]})
    report(rows, args.out, calib.provenance["sha256"], args.num_samples)


def report(rows: list[dict], out: str, calib_sha: str, num_samples: int) -> None:
    peer = next((r for r in rows if r["method"] == PEER), None)
    for row in rows:
        if peer and row["method"].startswith("mpq awq"):
            row["ppl_ratio_to_peer"] = row["ppl"] / peer["ppl"]
            row["time_ratio_to_peer"] = row["quant_s"] / peer["quant_s"]
    lines = [f"{'method':<22}{'ppl':>9}{'quant s':>9}{'RSS@quant MiB':>15}{'ppl/peer':>10}"
             f"{'time/peer':>11}"]
    for r in rows:
        cells = [f"{r['method']:<22}", f"{r['ppl']:>9.3f}"]
        for key, spec in (("quant_s", ">9.1f"), ("rss_quant_mib", ">15.0f"),
                          ("ppl_ratio_to_peer", ">10.3f"), ("time_ratio_to_peer", ">11.2f")):
            width = spec.split(".")[0]
            cells.append(format(r[key], spec) if key in r else format("", width))
        lines.append("".join(cells))
    print("\n".join(lines))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"calibration_sha256": calib_sha, "weights": WEIGHTS,
                                     "calibration_samples": num_samples,
                                     "rows": rows}, indent=2) + "\n")
    Path(out).with_suffix(".md").write_text(
        "# AWQ: mpq vs llm-compressor on SmolLM2-135M (int4 asym g64)\n\n"
        "Generated by `python benchmarks/awq_vs_llmcompressor.py` (see its docstring for the "
        f"settings; calibration {num_samples} × 512 tokens).\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
