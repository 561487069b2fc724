"""Automatic mixed precision on SmolLM2-135M: uniform RTN recipes vs the per-layer choice at the
same average bits per weight, and the sensitivity ranking's top vs bottom layers quantized alone.
Prints a table; writes JSON and markdown under benchmarks/results/.

    python benchmarks/mixed_precision_ppl.py --model /work/models/SmolLM2-135M \\
        --corpora /work/shared/corpora

Rows (all RTN, symmetric int, group 64 unless said; every row is an artifact written by
``mpq.quantize.quantize`` and scored with ``mpq.load(out, dequantize=True)``):
(a) uniform w4a16 (int4 g64) vs ``--target-bits`` = its bits per weight, with the coarse
    candidates w8a16 (int8 per channel), w4a16, w3a16, and with the fine ones: int8, int6 g64,
    int5 g64, int4 g32, int4 g64, int4 g96, int4 g192, int3 g32, int3 g64 (steps of 0.17-1
    bit; the non-preset schemes are mpq's shorthands, mpq.analysis.candidates);
(b) uniform w3a16 (int3 g64) vs the choice at 3.5 bits, coarse candidates w8a16, w4a16, w3a16,
    int2 g64, and fine ones: int8, int4 g64, int4 g192, int3 g32, int3 g64, int3 g96, int3 g192,
    int2 g32, int2 g64;
(a) and (b) also with mpq's default candidates, the ladder: int8, int6 g64, int5 g64, int4 g32,
    int4 g64, int4 g192, int3 g32, int3 g64, int3 g192, int2 g64;
(c) the 10 layers ranked most sensitive under w3a16 quantized alone to int3 g64 (the rest fp32)
    vs the 10 least sensitive.
Sensitivity: the diagonal-Fisher proxy on enwiki_excerpt.train.txt, 16 × 512 tokens (seed 0),
one table for every candidate.  Evaluation: the first 40 × 512-token windows of
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
from mpq.checkpoint.native_codec import ideal_bits
from mpq.analysis.mixed_precision import MixedTarget, auto_recipe
from mpq.models.source import load_model
from mpq.calibration import CalibrationOptions
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe
from mpq.analysis.sensitivity import sensitivity

# candidates: presets (w8a16 = int8 per channel, w4a16 = int4 g64, w3a16 = int3 g64) and mpq's
# shorthands intB-gG (mpq.analysis.candidates); SmolLM2's input sizes 576 and 1536 take groups of 32, 64,
# 96 and 192, not 128
COARSE_A = ["w8a16", "w4a16", "w3a16"]
FINE_A = ["int8", "int6-g64", "int5-g64", "int4-g32", "w4a16", "int4-g96", "int4-g192",
          "int3-g32", "w3a16"]
COARSE_B = ["w8a16", "w4a16", "w3a16", "int2-g64"]
FINE_B = ["int8", "w4a16", "int4-g192", "int3-g32", "w3a16", "int3-g96", "int3-g192",
          "int2-g32", "int2-g64"]
# mpq's default candidates on SmolLM2 (mpq.analysis.candidates.ladder), int4-g64/int3-g64 as presets
LADDER = ["int8", "int6-g64", "int5-g64", "int4-g32", "w4a16", "int4-g192", "int3-g32", "w3a16",
          "int3-g192", "int2-g64"]


def bits_of(plan) -> float:
    layers = plan.quantized()
    weights = sum(l.shape[0] * l.shape[1] for l in layers)
    return sum(ideal_bits(l.scheme.weights, l.shape) * l.shape[0] * l.shape[1]
               for l in layers) / weights


def alone_recipe(names, label):
    targets = "\n".join(f"      - {n}" for n in names)
    return parse_recipe("mpq_recipe: 1\nrules:\n  - targets:\n" + targets + "\n    weights: "
                        "{format: int, bits: 3, symmetric: true, granularity: group, "
                        "group_size: 64}\n", label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--corpora", default="../shared/corpora")
    parser.add_argument("--num-windows", type=int, default=40)
    parser.add_argument("--fisher-samples", type=int, default=16)
    parser.add_argument("--table", default=None,
                        help="reuse a sensitivity table (JSON from a previous run / mpq "
                             "sensitivity -o with the same candidates) instead of measuring")
    parser.add_argument("--extras", action="store_true",
                        help="also score the original (fp32) model")
    parser.add_argument("--out", default="benchmarks/results/mixed_precision_ppl.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    started = time.perf_counter()
    corpora = Path(args.corpora)
    ids = load_eval_ids(corpora / "enwiki_excerpt.test.txt",
                        AutoTokenizer.from_pretrained(args.model))
    work = Path(tempfile.mkdtemp(prefix="mpq-mixed-"))
    names = list(dict.fromkeys(COARSE_A + FINE_A + COARSE_B + FINE_B + LADDER))
    calib = CalibrationOptions(source=str(corpora / "enwiki_excerpt.train.txt"),
                               num_samples=args.fisher_samples, seq_len=512, seed=0)
    t0 = time.perf_counter()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if args.table:
        from mpq.analysis.sensitivity_table import SensitivityTable

        table = SensitivityTable.load(args.table)
        by_stem = {Path(c).stem: c for c in table.candidates}
        lacking = sorted(set(names) - set(by_stem))
        if lacking:
            raise SystemExit(f"{args.table} lacks the candidates {', '.join(lacking)}")
        # tables from earlier runs name the shorthands by recipe files: <dir>/int5-g64.yaml
        rename = {by_stem[stem]: stem for stem in names}
        table.candidates = [rename.get(c, c) for c in table.candidates]
        for row in table.layers:
            for field in (row.damage, row.bits, row.bytes, row.schemes):
                for old_name in [c for c in field if c in rename]:
                    field[rename[old_name]] = field.pop(old_name)
        fisher_s = table.seconds
    else:
        table = sensitivity(args.model, names, calib,
                            progress=lambda stage, done, total: done == total or print(
                                f"  {stage} {done}/{total} {time.perf_counter() - t0:.0f} s",
                                flush=True))
        fisher_s = time.perf_counter() - t0
        table.save(out_path.with_name("mixed_precision_sensitivity.json"))
    print(f"sensitivity (fisher, {args.fisher_samples} x 512 tokens): {fisher_s:.0f} s", flush=True)

    def score(name, recipe, group, extra=None):
        out = work / "artifact"
        t = time.perf_counter()
        result = quantize(args.model, recipe, out, force=True)
        ppl = perplexity(mpq.load(out, dequantize=True), ids, window=512,
                         num_windows=args.num_windows).ppl
        row = {"group": group, "method": name, "ppl": ppl, "bits_per_weight": bits_of(result.plan),
               "quantized_layers": len(result.plan.quantized()),
               "stored_bytes": result.sizes["stored_bytes"],
               "seconds": time.perf_counter() - t, **(extra or {})}
        print(f"{group} {name}: ppl {ppl:.3f}, {row['bits_per_weight']:.4f} bits/weight "
              f"({row['seconds']:.0f} s)", flush=True)
        shutil.rmtree(out)
        return row

    def mixed(label, base_recipe, bits, stems, group):
        recipe, choice, _ = auto_recipe(args.model, base_recipe, MixedTarget(
            bits=bits, candidates=stems, sensitivity_table=table))
        return score(label, recipe, group, {"candidates": stems,
                                            "counts": _short(choice.counts()),
                                            "predicted_damage": choice.predicted_damage})

    rows = []
    base = None
    try:
        if args.extras:
            base = perplexity(load_model(args.model), ids, window=512,
                              num_windows=args.num_windows).ppl
            rows.append({"group": "-", "method": "original (fp32)", "ppl": base,
                         "bits_per_weight": 32.0})
            print(f"original: {base:.3f}", flush=True)
        w4 = score("uniform w4a16 (int4 g64)", "w4a16", "(a)")
        rows.append(w4)
        for stems, label in ((COARSE_A, "coarse"), (FINE_A, "fine"), (LADDER, "ladder")):
            rows.append(mixed(f"mixed @{w4['bits_per_weight']:.2f} ({label})", "w4a16",
                              w4["bits_per_weight"], stems, "(a)"))
        w3 = score("uniform w3a16 (int3 g64)", "w3a16", "(b)")
        rows.append(w3)
        for stems, label in ((COARSE_B, "coarse"), (FINE_B, "fine"), (LADDER, "ladder")):
            rows.append(mixed(f"mixed @3.50 ({label})", "w3a16", 3.5, stems, "(b)"))
        ranked = [r.name for r in table.ranked("w3a16")]
        for label, names in (("top-10", ranked[:10]), ("bottom-10", ranked[-10:])):
            rows.append(score(f"{label} sensitive layers alone at int3 g64", alone_recipe(
                names, label), "(c)", {"layers": names}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = base or 1.0
    for row in rows:
        row["ppl_vs_original"] = row["ppl"] / base - 1 if base != 1.0 else None
    lines = [f"{'':4}{'method':<44}{'ppl':>9}{'bits/w':>9}"]
    for row in rows:
        lines.append(f"{row['group']:<4}{row['method']:<44}{row['ppl']:>9.3f}"
                     f"{row['bits_per_weight']:>9.3f}")
    print("\n".join(lines))
    total = time.perf_counter() - started
    out_path.write_text(json.dumps({
        "model": str(args.model), "eval": f"first {args.num_windows} x 512 windows of "
        "enwiki_excerpt.test.txt", "sensitivity": f"fisher, enwiki_excerpt.train.txt "
        f"{args.fisher_samples} x 512, {fisher_s:.0f} s", "seconds": round(total, 1),
        "torch": torch.__version__, "mpq": mpq.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    md = ["# Automatic mixed precision on SmolLM2-135M (RTN)", "",
          f"Sensitivity: diagonal-Fisher proxy, enwiki_excerpt.train.txt {args.fisher_samples} × "
          f"512 tokens ({fisher_s:.0f} s). Eval: first {args.num_windows} × 512 windows of "
          "enwiki_excerpt.test.txt. Bits per weight: codes + fp32 scales over the quantized "
          "layers (210 block linears; the tied embedding/head stays fp32).", "",
          "| | method | ppl | bits/weight | choice |", "|---|---|---|---|---|"]
    for row in rows:
        md.append(f"| {row['group']} | {row['method']} | {row['ppl']:.3f} | "
                  f"{row['bits_per_weight']:.3f} | {row.get('counts', '')} |")
    md += ["", "Candidates: (a) coarse " + ", ".join(COARSE_A) + "; fine " + ", ".join(FINE_A)
           + ". (b) coarse " + ", ".join(COARSE_B) + "; fine " + ", ".join(FINE_B)
           + ". Both: ladder (mpq's default, mpq.analysis.candidates.ladder) " + ", ".join(LADDER)
           + ". Presets: w8a16 = int8 per channel, w4a16 = int4 g64, w3a16 = int3 g64; the "
           "others are mpq's shorthands for symmetric int RTN (intB-gG: B bits, group G; int8: "
           "per channel)."]
    md += ["", "(c) layers: top-10 " + ", ".join(rows[-2]["layers"]),
           "", "bottom-10 " + ", ".join(rows[-1]["layers"]), ""]
    out_path.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out_path} and {out_path.with_suffix('.md')} ({total:.0f} s)")


def _short(counts: dict) -> str:
    return ", ".join(f"{Path(c).stem}: {n}" for c, n in counts.items())


if __name__ == "__main__":
    main()
