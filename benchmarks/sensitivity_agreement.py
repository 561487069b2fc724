"""How well the diagonal-Fisher proxy ranks layers like the exact KL, on SmolLM2-135M.
Prints the Spearman rank correlation; writes JSON and markdown under benchmarks/results/.

    python benchmarks/sensitivity_agreement.py --model /work/models/SmolLM2-135M \\
        --corpora /work/shared/corpora

For ``--layers`` (30) layers spread over depths and kinds (block i contributes kind i mod 7,
cycling) and the candidate w3a16 (int3 g64, RTN): the Fisher proxy ½ Σ F_ii ΔW_i² (F from
``--fisher-samples`` × 512 tokens of enwiki_excerpt.train.txt, labels sampled from the model) and
the exact mean per-token KL(p_orig ‖ p_quant) of quantizing that layer alone, on
``--kl-samples`` × ``--kl-seq-len`` tokens of the same file drawn with another seed.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import mpq
from mpq.calibration import CalibrationOptions, build_calibration_set
from mpq.models.source import load_model, load_tokenizer
from mpq.analysis.candidates import load_candidates
from mpq.analysis.sensitivity import measure_damage, pick_spread, spearman, target_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--corpora", default="../shared/corpora")
    parser.add_argument("--candidate", default="w3a16")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--fisher-samples", type=int, default=16)
    parser.add_argument("--kl-samples", type=int, default=8)
    parser.add_argument("--kl-seq-len", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/sensitivity_agreement.json")
    args = parser.parse_args()

    model = load_model(args.model, dtype=torch.float32)
    tokenizer = load_tokenizer(args.model)
    source = str(Path(args.corpora) / "enwiki_excerpt.train.txt")
    candidates = load_candidates([args.candidate])
    all_layers = target_layers(model, candidates)
    chosen = set(pick_spread([l.name for l in all_layers], args.layers))
    layers = [l for l in all_layers if l.name in chosen]
    fisher_set = build_calibration_set(CalibrationOptions(source=source, num_samples=args.fisher_samples, seq_len=512, seed=0), tokenizer).samples
    kl_set = build_calibration_set(CalibrationOptions(source=source, num_samples=args.kl_samples, seq_len=args.kl_seq_len, seed=1), tokenizer).samples
    t0 = time.perf_counter()
    fisher = measure_damage(model, layers, fisher_set, "fisher")
    fisher_s = time.perf_counter() - t0
    print(f"fisher: {fisher_s:.0f} s", flush=True)
    t0 = time.perf_counter()
    kl = measure_damage(model, layers, kl_set, "kl")
    kl_s = time.perf_counter() - t0
    print(f"kl: {kl_s:.0f} s", flush=True)
    c = args.candidate
    rows = [{"layer": l.name, "block": l.block, "fisher": fisher[l.name][c], "kl": kl[l.name][c]}
            for l in layers]
    rho = spearman([r["fisher"] for r in rows], [r["kl"] for r in rows])
    log_fisher = torch.tensor([r["fisher"] for r in rows]).log()
    log_kl = torch.tensor([r["kl"] for r in rows]).log()
    ratio = (log_fisher - log_kl).exp()
    top_k = 10
    top_f = {r["layer"] for r in sorted(rows, key=lambda r: -r["fisher"])[:top_k]}
    top_k_kl = {r["layer"] for r in sorted(rows, key=lambda r: -r["kl"])[:top_k]}
    summary = {"spearman": rho, "pearson_log": float(torch.corrcoef(
        torch.stack([log_fisher, log_kl]))[0, 1]), "fisher_over_kl_median": float(ratio.median()),
        "fisher_over_kl_min": float(ratio.min()), "fisher_over_kl_max": float(ratio.max()),
        f"top{top_k}_overlap": len(top_f & top_k_kl)}
    for row in sorted(rows, key=lambda r: -r["kl"]):
        print(f"{row['layer']:<36}{row['fisher']:>12.3e}{row['kl']:>12.3e}")
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": str(args.model), "candidate": c,
        "fisher": f"enwiki_excerpt.train.txt {args.fisher_samples} x 512 (seed 0), {fisher_s:.0f} s",
        "kl": f"enwiki_excerpt.train.txt {args.kl_samples} x {args.kl_seq_len} (seed 1), "
              f"{kl_s:.0f} s", "summary": summary, "torch": torch.__version__,
        "mpq": mpq.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    md = [f"# Fisher proxy vs exact KL on SmolLM2-135M ({c}, {len(rows)} layers)", "",
          f"Fisher: {args.fisher_samples} × 512 tokens ({fisher_s:.0f} s for these layers); exact "
          f"KL: {args.kl_samples} × {args.kl_seq_len} tokens, another draw ({kl_s:.0f} s).", "",
          f"Spearman rank correlation **{rho:.3f}**; Pearson of logs {summary['pearson_log']:.3f}; "
          f"Fisher/KL median {summary['fisher_over_kl_median']:.2f} (range "
          f"{summary['fisher_over_kl_min']:.2f}–{summary['fisher_over_kl_max']:.2f}); top-{top_k} "
          f"overlap {summary[f'top{top_k}_overlap']}/{top_k}.", "",
          "| layer | Fisher proxy | exact KL |", "|---|---|---|"]
    for row in sorted(rows, key=lambda r: -r["kl"]):
        md.append(f"| {row['layer']} | {row['fisher']:.3e} | {row['kl']:.3e} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
