"""How close ``mpq quantize --dry-run``'s estimate is to a real run: size, peak RSS, wall time.

For a tiny-but-not-trivial random Llama (hidden 256, intermediate 768, 4 blocks, fp32) and, with
``--model PATH``, a real model (e.g. /work/models/SmolLM2-135M), each case is estimated in this
process (mpq.analysis.estimate.estimate_run, with its on-the-spot matmul probe) and then run for real as
``mpq quantize`` in a child process; the child's peak RSS is its own ``ru_maxrss`` (os.wait4, the
per-child form of getrusage(RUSAGE_CHILDREN)), its wall time measured around it.  Prints a table
and writes benchmarks/results/estimate_accuracy.json.

    python benchmarks/estimate_accuracy.py [--model PATH] [--calib FILE] [--only-tiny]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_CALIB = ROOT.parent / "shared" / "corpora" / "enwiki_excerpt.train.txt"
RESULTS = ROOT / "benchmarks" / "results" / "estimate_accuracy.json"

# (recipe, num_samples, seq_len, uses calibration)
TINY_CASES = [("w4a16", 128, 512, False), ("w8a16", 128, 512, False),
              ("w4a16-gptq", 32, 256, True), ("w4a16-gptq", 128, 512, True)]
REAL_CASES = [("w4a16", 128, 512, False), ("w4a16-gptq", 128, 512, True)]


def tiny_llama(path: Path) -> None:
    import torch
    import transformers

    from tests.test_pipeline import _byte_tokenizer
    from tests.tiny_models import model_from_config

    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=768,
                                      num_attention_heads=8, num_key_value_heads=4,
                                      num_hidden_layers=4, vocab_size=256,
                                      max_position_embeddings=1024)
    model = model_from_config(config)
    model.to(torch.float32).save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)


def run_child(args: list[str]) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS bytes) of ``mpq`` ``args`` in a child process."""
    command = [sys.executable, "-c", "from mpq.cli.main import main; main()", *args]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    err = child.stderr.read().decode(errors="replace")
    child.stderr.close()
    if child.returncode:
        print(err[-2000:], file=sys.stderr)
    return child.returncode, seconds, usage.ru_maxrss * 1024


def measure(model: Path, name: str, cases, calib: str, work: Path, device: str) -> list[dict]:
    from mpq.analysis.estimate import estimate_run
    from mpq.calibration import CalibrationOptions
    from mpq.engine.spec import RunOptions, resolve_run

    rows = []
    for recipe, samples, seq_len, use_calib in cases:
        options = CalibrationOptions(source=calib if use_calib else None, num_samples=samples,
                                     seq_len=seq_len)
        est = estimate_run(resolve_run(model, recipe, RunOptions(calibration=options, device=device)))
        out = work / f"{name}-{recipe}-{samples}x{seq_len}"
        args = ["quantize", str(model), "-r", recipe, "-o", str(out), "--device", device,
                "--num-samples", str(samples), "--seq-len", str(seq_len), "--force"]
        if use_calib:
            args += ["--calib", calib]
        status, seconds, rss = run_child(args)
        files = sum(p.stat().st_size for p in out.glob("*.safetensors")) if status == 0 else 0
        shutil.rmtree(out, ignore_errors=True)
        rows.append({
            "model": name, "recipe": recipe, "num_samples": samples if use_calib else 0,
            "seq_len": seq_len if use_calib else 0, "device": device, "status": status,
            "size_est": est.size["file_bytes"], "size_real": files,
            "rss_est": est.host_peak_bytes, "rss_real": rss,
            "time_est": round(est.seconds, 2), "time_real": round(seconds, 2),
            "estimate": est.to_dict(),
        })
        row = rows[-1]
        print(f"{name:10} {recipe:11} {row['num_samples']:4}×{row['seq_len']:<4} "
              f"size {row['size_est'] / 1e6:8.2f}/{files / 1e6:8.2f} MB "
              f"({_ratio(row['size_est'], files)})  "
              f"rss {rss and est.host_peak_bytes / 2**20:7.0f}/{rss / 2**20:7.0f} MiB "
              f"({_ratio(est.host_peak_bytes, rss)})  "
              f"time {est.seconds:6.1f}/{seconds:6.1f} s ({_ratio(est.seconds, seconds)})",
              flush=True)
    return rows


def _ratio(a: float, b: float) -> str:
    return f"×{a / b:.2f}" if b else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a real model folder to measure as well")
    parser.add_argument("--calib", default=str(DEFAULT_CALIB))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    print("estimate/measured (ratio = estimate ÷ measured); peak = child ru_maxrss")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpq-estimate-") as tmp:
        work = Path(tmp)
        tiny = work / "tiny-llama"
        tiny_llama(tiny)
        rows += measure(tiny, "tiny-llama", TINY_CASES, args.calib, work, args.device)
        if args.model:
            rows += measure(Path(args.model), Path(args.model).name, REAL_CASES, args.calib,
                            work, args.device)
    for row in rows:
        for key in ("size", "rss", "time"):
            real = row[f"{key}_real"]
            row[f"{key}_ratio"] = round(row[f"{key}_est"] / real, 3) if real else None
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    import platform

    import torch

    Path(args.output).write_text(json.dumps({
        "note": "estimate vs a real `mpq quantize` in a child process; ratio = estimate / "
                "measured; peak RSS = the child's ru_maxrss",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "rows": rows}, indent=1, default=str) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
