"""GPTQ on SmolLM2-135M: mpq vs llm-compressor with identical settings, plus RTN for reference.

    python benchmarks/gptq_vs_llmcompressor.py --model ./SmolLM2-135M --corpora ../shared/corpora

Settings shared by both tools: int symmetric weights (int4 g64, int4 per-channel, int3 g64),
damping 0.01, block size 128, lm_head kept, act-order with static groups (llm-compressor's
default ``actorder: static``; mpq's GPTQ presets) unless ``--no-act-order`` (plain column order
for both); scales: mpq's GPTQ presets search each scale's clipping range against diag(H)
(``clip_search``; ``--no-clip-search`` for min-max), llm-compressor runs twice, with its default
min-max weight observer and with its MSE observer (``--peer-observers``), and the time and RSS
ratios are taken to its default run; fp32 compute; calibration 128 × 512 tokens from
enwiki_excerpt.train.txt (mpq draws them; the exact same token ids are handed to llm-compressor);
evaluation: the first 40 × 512-token windows of enwiki_excerpt.test.txt with mpq's evaluator.
Each quantization runs in its own process (mpq: benchmarks/mpq_run.py; llm-compressor: its own
venv, built by benchmarks/peers/setup_llmcompressor.sh when missing) so wall time and peak RSS
(ru_maxrss of that process) are the tool's own.  ``quant_s`` is the span from model loaded to
quantization done (writing excluded) for both; ``total_s`` is the whole process.  Peak RSS is
reported twice: ``rss_quant`` when quantization was done (the fair comparison), and for the whole
process, where the peer's runner also reloads a second fp32 model to save a dense copy.
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

HERE = Path(__file__).resolve().parent
PEER_METHODS = {"minmax": "llm-compressor gptq", "mse": "llm-compressor gptq mse",
                "imatrix_mse": "llm-compressor gptq imatrix-mse"}
SCHEMES = {  # name → (bits, group size or None for per-channel)
    "int4-g64": (4, 64),
    "int4-channel": (4, None),
    "int3-g64": (3, 64),
}


def recipe_text(algorithm: str, bits: int, group: int | None, act_order: bool,
                clip_search: bool) -> str:
    weights = (f"{{format: int, bits: {bits}, symmetric: true, granularity: group, "
               f"group_size: {group}}}" if group else
               f"{{format: int, bits: {bits}, symmetric: true, granularity: channel}}")
    order = (f", act_order: true, static_groups: {'true' if group else 'false'}"
             if act_order else "")
    clip = f", clip_search: {'true' if clip_search else 'false'}"
    options = (f"\n  options: {{damp: 0.01, block_size: 128{order}{clip}}}"
               if algorithm == "gptq" else "")
    return (f"mpq_recipe: 1\nname: {algorithm}-{bits}b-{group or 'ch'}\ndefaults:\n"
            f"  algorithm: {algorithm}{options}\nrules:\n  - targets: [Linear]\n"
            f"    weights: {weights}\n")


def run_json(cmd: list[str], env=None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def perplexity_of(path: Path, ids, num_windows: int) -> float:
    import mpq
    from mpq.analysis.eval import perplexity
    from mpq.checkpoint.native import is_artifact
    from mpq.models.source import load_model

    # dequantized once at load: the same outputs as packed layers, faster to evaluate
    model = mpq.load(path, dequantize=True) if is_artifact(path) else load_model(path)
    return perplexity(model, ids, window=512, num_windows=num_windows).ppl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--corpora", default="../shared/corpora")
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    parser.add_argument("--num-windows", type=int, default=40)
    parser.add_argument("--skip-peer", action="store_true", help="mpq only (no llm-compressor)")
    parser.add_argument("--no-act-order", dest="act_order", action="store_false",
                        help="plain GPTQ column order for both tools")
    parser.add_argument("--no-clip-search", dest="clip_search", action="store_false",
                        help="mpq GPTQ with min-max scales (default: clip_search, as its presets)")
    parser.add_argument("--peer-observers", nargs="*", default=["minmax", "mse"],
                        choices=["minmax", "mse", "imatrix_mse"],
                        help="llm-compressor weight observers to run (default: both)")
    parser.add_argument("--peer-rtn-observers", nargs="*", default=[],
                        choices=["minmax", "mse", "imatrix_mse"],
                        help="also llm-compressor's RTN (QuantizationModifier) with these "
                             "observers (default: none)")
    parser.add_argument("--skip-mpq", action="store_true",
                        help="llm-compressor rows only (the mpq rows of an earlier run stand)")
    parser.add_argument("--out", default=str(HERE / "results" / "gptq_vs_llmcompressor.json"))
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
    work = Path(tempfile.mkdtemp(prefix="mpq-gptq-bench-"))
    calib = build_calibration_set(CalibrationOptions(source=calib_file, num_samples=128, seq_len=512, seed=0), tokenizer)
    calib_ids = work / "calib_ids.pt"
    torch.save(torch.cat(calib.samples), calib_ids)
    ids = load_eval_ids(Path(args.corpora) / "enwiki_excerpt.test.txt", tokenizer)
    rows = [{"scheme": "fp32", "method": "original",
             "ppl": perplexity(load_model(model), ids, window=512, num_windows=args.num_windows).ppl}]
    peer_python = None
    if not args.skip_peer:
        setup = subprocess.run(["bash", str(HERE / "peers" / "setup_llmcompressor.sh")],
                               capture_output=True, text=True, env=env)
        if setup.returncode != 0:
            sys.stderr.write(setup.stderr[-4000:])
            raise SystemExit("could not set up llm-compressor's venv (see above); --skip-peer")
        peer_python = setup.stdout.strip().splitlines()[-1]
    for scheme in args.schemes:
        bits, group = SCHEMES[scheme]
        for algorithm in ("rtn", "gptq") if not args.skip_mpq else ():
            recipe = work / f"{algorithm}-{scheme}.yaml"
            recipe.write_text(recipe_text(algorithm, bits, group, args.act_order,
                                          args.clip_search))
            out = work / f"mpq-{algorithm}-{scheme}"
            stats = run_json([sys.executable, str(HERE / "mpq_run.py"), model, str(recipe),
                              str(out), "--calib", calib_file], env=env)
            if stats["calib_sha256"] != calib.provenance["sha256"]:
                raise SystemExit("mpq drew different calibration tokens than the peer was given")
            rows.append({"scheme": scheme, "method": f"mpq {algorithm}",
                         "ppl": perplexity_of(out, ids, args.num_windows),
                         "quant_s": stats["pipeline_s"], "total_s": stats["total_s"],
                         "peak_rss_mib": stats["peak_rss_kib"] / 1024,
                         "rss_quant_mib": stats["peak_rss_quant_kib"] / 1024})
            report(rows, args.out, calib.provenance["sha256"], args.act_order, args.clip_search)
        peer_runs = [("gptq", o) for o in args.peer_observers]
        peer_runs += [("rtn", o) for o in args.peer_rtn_observers]
        for algorithm, observer in peer_runs if peer_python else []:
            out = work / f"llmc-{algorithm}-{scheme}-{observer}"
            stats = run_json([peer_python, str(HERE / "peers" / "llmcompressor_gptq.py"),
                              "--model", model, "--calib-ids", str(calib_ids), "--out", str(out),
                              "--scheme", scheme, "--damp", "0.01", "--block-size", "128",
                              "--actorder", "static" if args.act_order else "none",
                              "--observer", observer, "--algorithm", algorithm], env=env)
            method = (PEER_METHODS[observer] if algorithm == "gptq"
                      else f"llm-compressor rtn {observer}")
            rows.append({"scheme": scheme, "method": method,
                         "ppl": perplexity_of(out, ids, args.num_windows),
                         "quant_s": stats["quant_s"], "total_s": stats.get("total_s"),
                         "peak_rss_mib": stats["peak_rss_kib"] / 1024,
                         "rss_quant_mib": stats["peak_rss_quant_kib"] / 1024,
                         "peer_version": stats.get("llmcompressor_version")})
            report(rows, args.out, calib.provenance["sha256"], args.act_order, args.clip_search)
    report(rows, args.out, calib.provenance["sha256"], args.act_order, args.clip_search)


def report(rows: list[dict], out: str, calib_sha: str, act_order: bool,
           clip_search: bool) -> None:
    """Print the table and write it (called after every row, so an interrupted run keeps its
    rows); ratios of mpq GPTQ to the peer's default (min-max) run, ppl also to its MSE-observer
    run, time and ppl to its imatrix-MSE run."""
    peers = {r["scheme"]: r for r in rows if r["method"] == PEER_METHODS["minmax"]}
    peers_mse = {r["scheme"]: r for r in rows if r["method"] == PEER_METHODS["mse"]}
    peers_imatrix = {r["scheme"]: r for r in rows if r["method"] == PEER_METHODS["imatrix_mse"]}
    for row in rows:
        if row["method"] != "mpq gptq":
            continue
        imatrix = peers_imatrix.get(row["scheme"])
        if imatrix:
            row["time_ratio_to_peer_imatrix"] = row["quant_s"] / imatrix["quant_s"]
            row["rss_quant_ratio_to_peer_imatrix"] = (row["rss_quant_mib"]
                                                      / imatrix["rss_quant_mib"])
            row["ppl_ratio_to_peer_imatrix"] = row["ppl"] / imatrix["ppl"]
        peer = peers.get(row["scheme"])
        if peer:
            row["time_ratio_to_peer"] = row["quant_s"] / peer["quant_s"]
            row["rss_quant_ratio_to_peer"] = row["rss_quant_mib"] / peer["rss_quant_mib"]
            row["rss_ratio_to_peer"] = row["peak_rss_mib"] / peer["peak_rss_mib"]
            row["ppl_ratio_to_peer"] = row["ppl"] / peer["ppl"]
        if row["scheme"] in peers_mse:
            row["ppl_ratio_to_peer_mse"] = row["ppl"] / peers_mse[row["scheme"]]["ppl"]
    columns = [("scheme", "scheme", "<14"), ("method", "method", "<25"), ("ppl", "ppl", ">9.3f"),
               ("quant s", "quant_s", ">8.1f"), ("total s", "total_s", ">8.1f"),
               ("RSS@quant MiB", "rss_quant_mib", ">14.0f"), ("RSS MiB", "peak_rss_mib", ">8.0f"),
               ("time/peer", "time_ratio_to_peer", ">10.2f"),
               ("RSS@quant/peer", "rss_quant_ratio_to_peer", ">15.2f"),
               ("RSS/peer", "rss_ratio_to_peer", ">9.2f"),
               ("ppl/peer", "ppl_ratio_to_peer", ">9.3f"),
               ("ppl/peer-mse", "ppl_ratio_to_peer_mse", ">13.3f"),
               ("time/peer-imx", "time_ratio_to_peer_imatrix", ">14.2f"),
               ("RSS@q/peer-imx", "rss_quant_ratio_to_peer_imatrix", ">15.2f"),
               ("ppl/peer-imx", "ppl_ratio_to_peer_imatrix", ">13.3f")]
    lines = ["".join(format(title, spec.split(".")[0]) for title, _, spec in columns)]
    for r in rows:
        cells = []
        for title, key, spec in columns:
            width = spec.split(".")[0]
            value = r.get(key)
            cells.append(format(value, spec) if value is not None else format("", width))
        lines.append("".join(cells))
    print("\n".join(lines))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"calibration_sha256": calib_sha, "act_order": act_order,
                                     "mpq_clip_search": clip_search, "rows": rows},
                                    indent=2) + "\n")
    Path(out).with_suffix(".md").write_text(
        "# GPTQ: mpq vs llm-compressor on SmolLM2-135M\n\n"
        "Generated by `python benchmarks/gptq_vs_llmcompressor.py` (see its docstring for the "
        f"settings; act-order: {act_order}; mpq clip_search: {clip_search}; ratios are mpq "
        "GPTQ over llm-compressor's default min-max run, `ppl/peer-mse` over its MSE-observer "
        "run, `*/peer-imx` over its imatrix-MSE run).\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
