"""Tuned rounding (autoround) against RTN, GPTQ and the ``*-tuned`` presets (GPTQ with error
feedback) on SmolLM2-135M: perplexity, time, peak memory.

    python benchmarks/tuned_rounding.py --model .cache/SmolLM2-135M --corpora ../shared/corpora \\
        --work /tmp/tuned [--variants w4a16,w4a16-gptq,w4a16-tuned,...] [--mpq mpq]

Each variant is a preset or one of the recipes below (written into the work folder), run with
``mpq quantize`` (calibration: 128 × 512 tokens of enwiki_excerpt.train.txt) and scored with
``mpq eval --reference`` (ppl, KL to the float model, top-1 agreement on the first 40 × 512-token
windows of enwiki_excerpt.test.txt).  Wall time and peak RSS are those of the quantize process
(os.wait4).  ``--mpq`` is the command that runs mpq (e.g. ``mpq``, or
``"python -c 'from mpq.cli.main import main; main()'"`` from a checkout).  Prints a table and
writes JSON (``--out``), one row per variant, merged into the file's earlier rows by variant.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

BODY = ("rules:\n  - targets: [Linear, Conv1D]\n    weights: {{format: int, bits: {bits}, "
        "symmetric: true, granularity: group, group_size: 64}}\n")
RECIPES = {  # name -> (algorithm, options, bits)
    "w2a16-g64-gptq": ("gptq", "{act_order: true, static_groups: true, clip_search: true}", 2),
    "w4a16-autoround-light": ("autoround", "{effort: light}", 4),
    "w3a16-autoround-light": ("autoround", "{effort: light}", 3),
    "w2a16-g64-autoround-light": ("autoround", "{effort: light}", 2),
    "w4a16-tuned-default": ("autoround", "{effort: default}", 4),
    "w3a16-tuned-default": ("autoround", "{effort: default}", 3),
}
DEFAULT = ("w4a16,w4a16-gptq,w4a16-autoround-light,w4a16-tuned,w3a16-gptq,w3a16-autoround-light,"
           "w3a16-tuned,w2a16-g64-gptq,w2a16-g64-autoround-light")


def recipe_argument(name: str, work: Path) -> str:
    """A preset name, or the path of the named recipe written into ``work``."""
    if name not in RECIPES:
        return name
    algorithm, options, bits = RECIPES[name]
    path = work / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"mpq_recipe: 1\nname: {name}\ndefaults:\n  algorithm: {algorithm}\n"
                    f"  options: {options}\n" + BODY.format(bits=bits))
    return str(path)


def run_measured(command: list[str]) -> tuple[float, float]:
    """Run ``command``; (wall seconds, peak RSS in MB).  Raises on failure."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--corpora", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--mpq", default="mpq")
    parser.add_argument("--variants", default=DEFAULT)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tuned_rounding.json"))
    args = parser.parse_args()
    mpq = shlex.split(args.mpq)
    previous = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    rows = {row["variant"]: row for row in previous}
    for variant in [v for v in args.variants.split(",") if v]:
        out = args.work / variant
        seconds, rss = run_measured([*mpq, "quantize", str(args.model), "--recipe",
                                     recipe_argument(variant, args.work), "-o", str(out),
                                     "--calib", str(args.corpora / "enwiki_excerpt.train.txt"),
                                     "--num-samples", "128", "--seq-len", "512", "--force"])
        scored = json.loads(subprocess.run(
            [*mpq, "eval", str(out), "--data", str(args.corpora / "enwiki_excerpt.test.txt"),
             "--reference", str(args.model), "--num-windows", "40", "--json"],
            check=True, capture_output=True, text=True).stdout)
        rows[variant] = {"variant": variant, "ppl": scored["ppl"], "kl": scored["kl_mean"],
                         "top1": scored["top1_agreement"], "ref_ppl": scored["ref_ppl"],
                         "quantize_s": seconds, "peak_rss_mb": rss}
        print(json.dumps(rows[variant]), flush=True)
    print(f"\n{'variant':24} {'ppl':>8} {'KL':>7} {'top-1':>7} {'time s':>8} {'RSS MB':>8}")
    for row in rows.values():
        print(f"{row['variant']:24} {row['ppl']:8.3f} {row['kl']:7.4f} {row['top1']:7.3f} "
              f"{row['quantize_s']:8.0f} {row['peak_rss_mb']:8.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": list(rows.values())}, indent=2) + "\n")


if __name__ == "__main__":
    main()
