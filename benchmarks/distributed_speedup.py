"""Wall time of ``mpq quantize`` versus the number of processes (torchrun, gloo on CPU), and
whether the artifacts are byte-identical.

    python benchmarks/distributed_speedup.py --model /work/models/SmolLM2-135M \\
        --calib ../shared/corpora/enwiki_excerpt.train.txt

Runs, each a fresh ``mpq quantize MODEL -r RECIPE`` (default ``w4a16-gptq``, ``--num-samples``
× ``--seq-len`` calibration tokens, ``--no-memory-check``):

- one process with torch's default threads (every core);
- one process with one thread (``OMP_NUM_THREADS=1``): the reference the multi-process runs
  must equal byte for byte (mpq.engine.distributed: same threads per process);
- ``torchrun --standalone --nproc-per-node N`` for each N of ``--ranks`` (one thread each).

Prints a table (wall time, speedup over each one-process run, identical bytes or not) and writes
``benchmarks/results/distributed_speedup.{json,md}``.  Timings on a shared machine are noisy:
compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MPQ = Path(sys.executable).parent / "mpq"


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run(cmd: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calib", default=str(ROOT.parent / "shared" / "corpora"
                                               / "enwiki_excerpt.train.txt"))
    parser.add_argument("--recipe", default="w4a16-gptq")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ranks", default="2")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results"
                        / "distributed_speedup.json")
    args = parser.parse_args()
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMP_NUM_THREADS")}
    one_thread = {**base_env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    work = Path(tempfile.mkdtemp(prefix="mpq-dist-"))
    quantize = ["quantize", str(args.model), "--recipe", args.recipe, "--calib", args.calib,
                "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
                "--no-memory-check", "--force", "-o"]
    runs = [("1 process, default threads", [str(MPQ)], base_env),
            ("1 process, 1 thread", [str(MPQ)], one_thread)]
    for n in map(int, args.ranks.split(",")):
        runs.append((f"torchrun {n} processes, 1 thread each",
                     [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc-per-node={n}", "--no-python", str(MPQ)], one_thread))
    rows = []
    try:
        for name, prefix, env in runs:
            out = work / "out"
            seconds = run(prefix + quantize + [str(out)], env)
            rows.append({"run": name, "seconds": round(seconds, 1), "sha256": folder_digest(out)})
            shutil.rmtree(out)
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    default, single = rows[0], rows[1]
    for row in rows:
        row["speedup_vs_default_threads"] = round(default["seconds"] / row["seconds"], 2)
        row["speedup_vs_one_thread"] = round(single["seconds"] / row["seconds"], 2)
        row["identical_to_one_thread"] = row["sha256"] == single["sha256"]
    table = ("| run | wall s | speedup vs 1 process (default threads) | vs 1 process (1 thread) "
             "| bytes identical to 1 process, 1 thread |\n|---|---|---|---|---|\n") + "".join(
        f"| {r['run']} | {r['seconds']:.1f} | {r['speedup_vs_default_threads']:.2f}x | "
        f"{r['speedup_vs_one_thread']:.2f}x | {'yes' if r['identical_to_one_thread'] else 'no'} |\n"
        for r in rows)
    print(table)
    setup = {"model": str(args.model), "recipe": args.recipe, "calibration": {
        "source": args.calib, "num_samples": args.num_samples, "seq_len": args.seq_len},
        "cpus": os.cpu_count(), "machine": platform.machine(),
        "python": sys.version.split()[0], "torch": _torch_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        "# `mpq quantize` across processes (torchrun, gloo, CPU)\n\n"
        f"{args.model.name}, {args.recipe}, calibration {args.num_samples} × {args.seq_len} "
        f"tokens, {os.cpu_count()} CPU cores.\n\n{table}")


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
