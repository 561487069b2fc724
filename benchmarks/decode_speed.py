"""Decode and prefill speed and peak RSS of SmolLM2-135M: transformers fp32 and bf16 versus an
mpq w4a16 artifact through ``mpq.load`` with packed kernels, with the reference per-forward
decode, and dequantized once; with ``--emb-artifact``, also an artifact whose tied
embedding/head is int4 too (w4a16 keeps it in fp32), with kernels.

Each configuration runs in its own child process (so its peak RSS, ``ru_maxrss``, is its own)
with ``--threads`` torch threads (peak RSS covers loading and the 512-token prefill, whose
fp32 logits alone are 100 MB; the RSS right after loading is reported too):
- decode: a 32-token prompt (fixed random ids, seed 0), 64 greedy tokens (``min_new_tokens`` so
  EOS cannot stop it early), batch 1, after a warm-up generate; tokens/s = 64 / the wall time of
  ``generate`` (the 32-token prefill included);
- prefill: one forward of 512 tokens (no cache), best of ``--repeats`` after a warm-up;
  tokens/s = 512 / that time.
Prints a table and writes ``benchmarks/results/decode_speed.{json,md}``.

    python -m mpq quantize .cache/SmolLM2-135M -r w4a16 -o /tmp/w4
    OMP_NUM_THREADS=2 python benchmarks/decode_speed.py --model .cache/SmolLM2-135M \\
        --artifact /tmp/w4 --emb-artifact /tmp/w4emb --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {
    "transformers fp32": {"kind": "hf", "dtype": "float32"},
    "transformers bf16": {"kind": "hf", "dtype": "bfloat16"},
    "mpq w4a16 kernels": {"kind": "mpq", "load": {"kernels": True}},
    "mpq w4a16 reference decode": {"kind": "mpq", "load": {}},
    "mpq w4a16 dequantized": {"kind": "mpq", "load": {"dequantize": True}},
    # w4a16 leaves the tied embedding/head in fp32 (113 MB, a third of decode time); with
    # --emb-artifact, an artifact that quantizes them too (int4 symmetric g64, kept tied)
    "mpq w4a16 + int4 embedding/head, kernels": {"kind": "mpq", "load": {"kernels": True},
                                                 "artifact": "emb"},
}
PROMPT, NEW_TOKENS, PREFILL = 32, 64, 512
EMB_RECIPE = """mpq_recipe: 1
description: w4a16 with the tied embedding/head quantized too (int4 symmetric g64, kept tied)
defaults: {algorithm: rtn}
rules:
  - targets: [Embedding, lm_head]
    weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 64}
  - targets: [Linear, Conv1D]
    weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 64}
"""


def _load(config: dict, model_dir: str, artifact: str, emb_artifact: str | None):
    import torch

    if config["kind"] == "hf":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, config["dtype"]), local_files_only=True).eval(), {}
    import mpq
    from mpq.runtime.qlinear import layer_paths

    model = mpq.load(emb_artifact if config.get("artifact") == "emb" else artifact,
                     **config["load"])
    paths: dict[str, int] = {}
    for path in layer_paths(model).values():
        paths[path] = paths.get(path, 0) + 1
    return model, paths


def _current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def child(name: str, model_dir: str, artifact: str, emb_artifact: str | None, threads: int,
          repeats: int) -> dict:
    """Measure one configuration in this process; the row as a dict."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model, paths = _load(CONFIGS[name], model_dir, artifact, emb_artifact)
    load_s = time.perf_counter() - start
    loaded_rss = _current_rss_mb()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, PROMPT), generator=gen)
    long = torch.randint(0, vocab, (1, PREFILL), generator=gen)
    pad = model.config.eos_token_id if model.config.pad_token_id is None else \
        model.config.pad_token_id
    options = dict(do_sample=False, pad_token_id=pad)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **options)
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             **options)
        decode_s = time.perf_counter() - start
        if out.shape[1] != PROMPT + NEW_TOKENS:
            raise RuntimeError(f"generate gave {out.shape[1] - PROMPT} tokens")
        model(long, use_cache=False)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(long, use_cache=False)
            times.append(time.perf_counter() - start)
    return {"config": name, "decode_tok_s_b1": round(NEW_TOKENS / decode_s, 2),
            "prefill_tok_s": round(PREFILL / min(times), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_load_mb": loaded_rss, "load_s": round(load_s, 2), "layer_paths": paths}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / ".cache" / "SmolLM2-135M"))
    parser.add_argument("--artifact", default="/tmp/w4",
                        help="an mpq w4a16 artifact of --model (built with mpq quantize "
                             "-r w4a16 when missing)")
    parser.add_argument("--emb-artifact",
                        help="an artifact of --model that also quantizes the tied embedding/head "
                             "(EMB_RECIPE; built when missing); its configuration is skipped "
                             "without it")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--note", default="", help="free text stored with the results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.artifact, args.emb_artifact,
                               args.threads, args.repeats)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not Path(args.artifact, "config.json").is_file():
        subprocess.run([sys.executable, "-m", "mpq", "quantize", args.model, "-r", "w4a16",
                        "-o", args.artifact], check=True, env=env, cwd=ROOT)
    if args.emb_artifact and not Path(args.emb_artifact, "config.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            recipe = Path(tmp, "w4a16-emb.yaml")
            recipe.write_text(EMB_RECIPE)
            subprocess.run([sys.executable, "-m", "mpq", "quantize", args.model, "-r",
                            str(recipe), "-o", args.emb_artifact], check=True, env=env, cwd=ROOT)
    rows = []
    for name in args.configs:
        extra = []
        if CONFIGS[name].get("artifact") == "emb":
            if not args.emb_artifact:
                continue
            extra = ["--emb-artifact", args.emb_artifact]
        done = subprocess.run([sys.executable, __file__, "--child", name, "--model", args.model,
                               "--artifact", args.artifact, "--threads", str(args.threads),
                               "--repeats", str(args.repeats), *extra],
                              check=True, env=env, capture_output=True, text=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name}: {row['decode_tok_s_b1']} tok/s decode", file=sys.stderr)
    import torch

    header = "| configuration | decode tok/s (b1, 32+64) | prefill tok/s (512) | peak RSS MB | " \
             "RSS after load MB | layer paths |\n|---|---:|---:|---:|---:|---|"
    lines = [header]
    for r in rows:
        paths = ", ".join(f"{k} {v}" for k, v in r["layer_paths"].items()) or "-"
        lines.append(f"| {r['config']} | {r['decode_tok_s_b1']} | {r['prefill_tok_s']} | "
                     f"{r['peak_rss_mb']} | {r['rss_after_load_mb']} | {paths} |")
    table = "\n".join(lines)
    print(table)
    meta = {"model": args.model, "artifact": args.artifact, "emb_artifact": args.emb_artifact,
            "threads": args.threads,
            "repeats": args.repeats, "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "note": args.note}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_speed.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                          indent=2) + "\n")
    (RESULTS / "decode_speed.md").write_text(
        f"# decode_speed ({meta['date']}, {args.threads} threads, torch {meta['torch']})\n\n"
        f"{args.note}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
