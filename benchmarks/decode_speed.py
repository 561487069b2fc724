"""Decode and prefill speed, time to first token and peak RSS of SmolLM2-135M: an mpq w4a16
artifact through ``mpq.load`` (packed kernels, the reference per-forward decode, dequantized
once) beside transformers fp32 and bf16 and the int8 weight-only baseline — a thin driver over
``mpq.bench`` (the measuring code and its protocol: mpq/bench/measure.py), which ``mpq bench``
runs too.  With ``--emb-artifact``, also an artifact whose tied embedding/head is int4 (w4a16
keeps it in fp32).

Each configuration runs in its own child process.  Prints a table and writes
``benchmarks/results/<--name>.{json,md}`` with the machine's load average before and after.

    python -m mpq quantize .cache/SmolLM2-135M -r w4a16 -o /tmp/bench-w4
    python benchmarks/decode_speed.py --artifact /tmp/bench-w4 --threads 2 \\
        --configs kernels fp32 bf16 int8 --name bench_smollm2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mpq.bench import runner  # noqa: E402
from mpq.bench.configs import (Config, Settings, check_lengths, parse_batches,  # noqa: E402
                               plan)
from mpq.bench.report import describe, markdown_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
EMB_RECIPE = """mpq_recipe: 1
description: w4a16 with the tied embedding/head quantized too (int4 symmetric g64, kept tied)
defaults: {algorithm: rtn}
rules:
  - targets: [Embedding, lm_head]
    weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 64}
  - targets: [Linear, Conv1D]
    weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 64}
"""
CHOICES = ("kernels", "kernels-bf16", "fp32", "bf16", "int8", "decode", "dequantize", "emb")


def configurations(args) -> tuple[list[Config], Path]:
    """The chosen rows: mpq bench's own (the artifact on kernels, fp32, bf16, int8) and the
    extra load modes of the artifact."""
    baselines = tuple(name for name in ("fp32", "bf16", "int8") if name in args.configs)
    rows, source = plan(args.artifact, baselines, args.model)
    target, named = rows[0], dict(zip(baselines, rows[1:]))
    art = Path(args.artifact).name
    extra = {"kernels": target,
             "kernels-bf16": Config(f"{art} (kernels, bfloat16)", "mpq", args.artifact,
                                    "bfloat16"),
             "decode": Config(f"{art} (reference decode)", "mpq", args.artifact, load="decode"),
             "dequantize": Config(f"{art} (dequantized)", "mpq", args.artifact,
                                  load="dequantize")}
    if args.emb_artifact:
        extra["emb"] = Config(f"{Path(args.emb_artifact).name} (int4 embedding/head, kernels)",
                              "mpq", args.emb_artifact)
    return [named.get(name) or extra[name] for name in args.configs
            if name in named or name in extra], source


def quantize_missing(args) -> None:
    env = runner.child_env(args.threads)
    if not Path(args.artifact, "config.json").is_file():
        subprocess.run([sys.executable, "-m", "mpq", "quantize", args.model, "-r", "w4a16",
                        "-o", args.artifact], check=True, env=env, cwd=ROOT)
    if args.emb_artifact and not Path(args.emb_artifact, "config.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            recipe = Path(tmp, "w4a16-emb.yaml")
            recipe.write_text(EMB_RECIPE)
            subprocess.run([sys.executable, "-m", "mpq", "quantize", args.model, "-r",
                            str(recipe), "-o", args.emb_artifact], check=True, env=env, cwd=ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / ".cache" / "SmolLM2-135M"))
    parser.add_argument("--artifact", default="/tmp/bench-w4",
                        help="an mpq w4a16 artifact of --model (quantized when missing)")
    parser.add_argument("--emb-artifact", help="an artifact of --model that also quantizes the "
                        "tied embedding/head (EMB_RECIPE; quantized when missing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--configs", nargs="+", default=list(CHOICES), choices=CHOICES)
    parser.add_argument("--name", default="decode_speed", help="results file name")
    parser.add_argument("--note", default="", help="free text stored with the results")
    args = parser.parse_args(argv)
    quantize_missing(args)
    settings = Settings(threads=args.threads, repeats=args.repeats,
                        batches=parse_batches(args.batch))
    rows, source = configurations(args)
    check_lengths(rows, settings)
    load_before = os.getloadavg()
    results = runner.run(rows, settings, source,
                         progress=lambda message: print(message, file=sys.stderr))
    load_after = os.getloadavg()
    import torch

    table = markdown_table(results, settings)
    print(table)
    meta = {"model": args.model, "artifact": args.artifact, "emb_artifact": args.emb_artifact,
            "settings": settings.to_dict(), "torch": torch.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "note": args.note}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": results},
                                                          indent=2) + "\n")
    load = (f"load average (1/5/15 min) before {meta['load_average_before']}, after "
            f"{meta['load_average_after']} on {meta['cpus']} CPUs")
    (RESULTS / f"{args.name}.md").write_text(
        f"# {args.name} ({meta['date']}, torch {meta['torch']})\n\n{describe(settings)}.\n"
        f"{load}.\n\n{args.note}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
