"""QuaRot on SmolLM2-135M: W4A4 and W4A8 perplexity with and without rotation, RTN and GPTQ
weights, plus the rotated float model.  Prints a table; writes JSON and markdown.

    python benchmarks/quarot_ppl.py --model ./SmolLM2-135M --corpora ../shared/corpora

Every row is an artifact written by ``mpq quantize`` and loaded back with ``mpq.load`` (the
online R4 Hadamard and the activation fake quantization run as at inference).  Weights: int4
symmetric, group 64 (``--weights channel`` for per-channel), every Linear of the blocks (the tied
lm_head stays fp32); GPTQ with act-order, static groups and clip_search (mpq's w4a16-gptq
settings).  Activations: int4 (W4A4) or int8 (W4A8) symmetric, dynamic per token, on the inputs
of every quantized Linear, or none (W4A16, which separates the rotation's effect on the weights).  Rotation: QuaRot R1 (randomized Hadamard 576 = 16·36), R2 (64), R4
online (1536 = 128·12), seed 0.  Calibration (GPTQ only): enwiki_excerpt.train.txt, 128 × 512
tokens.  Evaluation: the first 40 × 512-token windows of enwiki_excerpt.test.txt.
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

WEIGHTS = {"g64": "{format: int, bits: 4, granularity: group, group_size: 64}",
           "channel": "{format: int, bits: 4, granularity: channel}"}
ACTS = {"a4": "{format: int, bits: 4, dynamic: true, granularity: token}",
        "a8": "{format: int, bits: 8, dynamic: true, granularity: token}"}
GPTQ_OPTIONS = "{act_order: true, static_groups: true, clip_search: true}"
ROTATION = "{type: quarot, r1: hadamard, r2: true, r4: true, seed: 0}"


def variants() -> dict[str, tuple]:
    """name → (algorithm or None for float, activations key or None, rotated)."""
    out = {"rotated float (no quantization)": (None, None, True)}
    for acts in ("a4", "a8", None):
        for algorithm in ("rtn", "gptq"):
            for rotated in (False, True):
                name = (f"W4{(acts or 'a16').upper()} {algorithm}"
                        f"{' + quarot' if rotated else ', no rotation'}")
                out[name] = (algorithm, acts, rotated)
    return out


def recipe_for(algorithm: str | None, acts: str | None, rotated: bool, weights: str):
    text = f"mpq_recipe: 1\nname: quarot-bench\ndefaults:\n  algorithm: {algorithm or 'rtn'}\n"
    if algorithm == "gptq":
        text += f"  options: {GPTQ_OPTIONS}\n"
    if acts:
        text += f"  input_activations: {ACTS[acts]}\n"
    if rotated:
        text += f"rotation: {ROTATION}\n"
    rule = "    skip: true\n" if algorithm is None else f"    weights: {WEIGHTS[weights]}\n"
    return parse_recipe(text + "rules:\n  - targets: [Linear]\n" + rule, "quarot-bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--corpora", default="../shared/corpora")
    parser.add_argument("--weights", choices=sorted(WEIGHTS), default="g64")
    parser.add_argument("--variants", nargs="*", default=list(variants()),
                        choices=list(variants()))
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--num-windows", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results/quarot_ppl.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    corpora = Path(args.corpora)
    ids = load_eval_ids(corpora / "enwiki_excerpt.test.txt",
                        AutoTokenizer.from_pretrained(args.model))
    base = perplexity(load_model(args.model), ids, window=512, num_windows=args.num_windows).ppl
    rows = [{"method": "original (fp32)", "ppl": base}]
    work = Path(tempfile.mkdtemp(prefix="mpq-quarot-"))
    table = variants()
    try:
        for name in args.variants:
            algorithm, acts, rotated = table[name]
            calibration = (CalibrationOptions(source=str(corpora / "enwiki_excerpt.train.txt"),
                                              num_samples=args.num_samples, seq_len=512)
                           if algorithm == "gptq" else CalibrationOptions())
            out = work / "artifact"
            t0 = time.perf_counter()
            quantize(args.model, recipe_for(algorithm, acts, rotated, args.weights), out, RunOptions(calibration=calibration), force=True)
            quantize_s = time.perf_counter() - t0
            ppl = perplexity(mpq.load(out, dequantize=True), ids, window=512,
                             num_windows=args.num_windows).ppl
            rows.append({"method": name, "ppl": ppl, "quantize_s": quantize_s})
            print(f"{name}: {ppl:.3f} ({quantize_s:.0f} s)", flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by_name = {row["method"]: row for row in rows}
    lines = [f"{'method':<34}{'ppl':>11}{'vs fp32':>10}{'no-rot / rot':>14}{'quant s':>9}"]
    for row in rows:
        row["ppl_vs_original"] = row["ppl"] / base - 1
        twin = row["method"].replace(" + quarot", ", no rotation")
        if twin != row["method"] and twin in by_name:
            row["unrotated_over_rotated"] = by_name[twin]["ppl"] / row["ppl"]
        lines.append(f"{row['method']:<34}{row['ppl']:>11.3f}{row['ppl_vs_original']:>10.2%}"
                     + (f"{row['unrotated_over_rotated']:>14.1f}x"
                        if "unrotated_over_rotated" in row else " " * 15)
                     + (f"{row['quantize_s']:>8.0f}" if "quantize_s" in row else ""))
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": str(args.model), "weights": WEIGHTS[args.weights], "rotation": ROTATION,
        "gptq_options": GPTQ_OPTIONS, "eval": f"first {args.num_windows} x 512 windows of "
        "enwiki_excerpt.test.txt", "calibration": f"enwiki_excerpt.train.txt "
        f"{args.num_samples} x 512 (GPTQ rows)", "torch": torch.__version__,
        "mpq": mpq.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        "# QuaRot on SmolLM2-135M: W4A4 / W4A8 with and without rotation\n\n"
        "Generated by `python benchmarks/quarot_ppl.py` (see its docstring).\n\n```\n"
        + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
