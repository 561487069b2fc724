"""Peak RSS and wall time of ``mpq quantize`` versus model depth.

Saves random Llama models of SmolLM2-135M's width (hidden 576, intermediate 1536, 9 heads,
3 KV heads, vocab 49152, tied embeddings; fp32 safetensors, torch's default init, seed 0) with
30 and 60 layers, plus the real SmolLM2-135M when ``--model`` is given, and quantizes each with
``w4a16`` (RTN, no calibration pass) and ``w4a16-gptq`` (``--num-samples`` × ``--seq-len``
calibration tokens) in a child process, streamed (the default) and with ``--no-stream``
(``--modes``), measuring the child's peak RSS (``os.wait4`` →
``ru_maxrss``) and wall time.  Prints a table and writes
``benchmarks/results/rss_vs_depth.{json,md}`` (``--tag`` adds a suffix, e.g. ``before``).

    python benchmarks/rss_vs_depth.py --model /work/models/SmolLM2-135M \\
        --calib ../shared/corpora/enwiki_excerpt.train.txt
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
WIDTH = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
             max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
             bos_token_id=1, eos_token_id=2, pad_token_id=2)


def random_model(folder: Path, layers: int, tokenizer_from: Path | None) -> Path:
    """A random fp32 Llama of SmolLM2's width with ``layers`` blocks (reused when present)."""
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=layers, **WIDTH)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(folder)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copyfile(tokenizer_from / name, folder / name)
    del model
    return folder


def run_child(model: Path, recipe: str, out: Path, calib: str | None, num_samples: int,
              seq_len: int, stream: bool = True) -> dict:
    """``mpq quantize`` in a child process: peak RSS (MiB) and wall time (s)."""
    cmd = [sys.executable, "-c", "from mpq.cli.main import main; main()", "quantize",
           str(model), "--recipe", recipe, "-o", str(out), "--force", "--no-memory-check", "--no-resume",
           "--stream" if stream else "--no-stream"]
    if calib:
        cmd += ["--calib", calib, "--num-samples", str(num_samples), "--seq-len", str(seq_len)]
    started = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    child.returncode = code
    if code != 0:
        raise SystemExit(f"mpq quantize {model} {recipe} failed ({code}):\n"
                         f"{stderr.decode(errors='replace')[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="the real SmolLM2-135M folder (also the "
                        "tokenizer of the random models)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: --model)")
    parser.add_argument("--calib", default=str(ROOT.parent / "shared" / "corpora"
                                               / "enwiki_excerpt.train.txt"))
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--depths", default="30,60")
    parser.add_argument("--recipes", default="w4a16,w4a16-gptq")
    parser.add_argument("--modes", default="stream,no-stream",
                        help="stream (the default of mpq quantize) and/or no-stream")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mpq-rss-vs-depth"))
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    tokenizer = args.tokenizer or args.model
    if tokenizer is None:
        raise SystemExit("pass --model or --tokenizer (the random models need a tokenizer)")
    args.work.mkdir(parents=True, exist_ok=True)
    models = [("random", depth, random_model(args.work / f"random-{depth}L", depth, tokenizer))
              for depth in map(int, args.depths.split(","))]
    if args.model is not None:
        config = json.loads((args.model / "config.json").read_text())
        models.append(("SmolLM2-135M", config["num_hidden_layers"], args.model))
    rows = []
    for mode in args.modes.split(","):
        for recipe in args.recipes.split(","):
            calib = args.calib if recipe != "w4a16" else None
            for name, depth, folder in models:
                measured = run_child(folder, recipe, args.work / "out", calib, args.num_samples,
                                     args.seq_len, stream=mode == "stream")
                rows.append({"model": name, "layers": depth, "recipe": recipe, "mode": mode,
                             **measured})
                print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        base = [r for r in rows if r["model"] == "random" and r["recipe"] == row["recipe"]
                and r["mode"] == row["mode"]]
        shallow = min(base, key=lambda r: r["layers"]) if base else None
        row["ratio_vs_shallowest_random"] = (round(row["peak_rss_mib"] / shallow["peak_rss_mib"],
                                                   3) if shallow else None)
    header = ("| mode | model | layers | recipe | peak RSS MiB | ratio to the shallowest random "
              "| time s |\n|---|---|---|---|---|---|---|\n")
    table = header + "".join(
        f"| {r['mode']} | {r['model']} | {r['layers']} | {r['recipe']} | "
        f"{r['peak_rss_mib']:.0f} | "
        f"{r['ratio_vs_shallowest_random']:.3f} | {r['seconds']:.1f} |\n" for r in rows)
    print(table)
    setup = {"calibration": {"source": args.calib, "num_samples": args.num_samples,
                             "seq_len": args.seq_len}, "cpus": os.cpu_count(),
             "python": sys.version.split()[0]}
    suffix = f".{args.tag}" if args.tag else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"rss_vs_depth{suffix}.json").write_text(
        json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"rss_vs_depth{suffix}.md").write_text(
        f"# Peak RSS of `mpq quantize` versus depth{' (' + args.tag + ')' if args.tag else ''}"
        f"\n\nRandom Llama models of SmolLM2-135M's width (fp32), the real SmolLM2-135M; "
        f"calibration {args.num_samples} × {args.seq_len} tokens for GPTQ; peak RSS of the "
        f"child process (ru_maxrss).\n\n{table}")


if __name__ == "__main__":
    main()
