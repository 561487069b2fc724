"""Peak memory of ``mpq quantize`` with a huge one-line calibration file, against its --dry-run
estimate (issue: a 2 GB single-line file was read and tokenized whole).

For each calibration source — a generated ~2 GB file on ONE line (the enwiki training excerpt
repeated, newlines turned into spaces) and, for comparison, the normal-size corpus
``enwiki_excerpt.train.txt`` — it runs, each in a child process:

1. ``mpq quantize MODEL -r RECIPE --calib SRC --dry-run --json``: the estimate's peak memory
   (``memory.host_peak_bytes``) and its phase;
2. the real ``mpq quantize`` (same options, ``-o`` in a temporary folder): its peak RSS (the
   child's ``ru_maxrss`` through os.wait4, the per-child form of getrusage(RUSAGE_CHILDREN)) and
   wall seconds, and the calibration provenance it reports (``--json`` events).

It prints a table (estimate, peak RSS, ratio estimate / peak, wall seconds) and writes
benchmarks/results/calibration_memory.json.  The big file goes to ``--tmp`` (default: the system
temporary folder, after checking it has room) and is deleted afterwards.  Timings are noisy when
other jobs share the machine's cores: the JSON records the load average before and after.

    python benchmarks/calibration_memory.py [--model DIR] [--recipe w4a16-gptq]
        [--num-samples 4] [--seq-len 128] [--size-gb 2] [--tmp DIR]

The defaults keep the GPTQ run short (a few minutes on 2 busy cores); the reading budget, and so
what reading the big file costs, is the same 2**20 tokens for any run up to 128 × 512.
"""
from __future__ import annotations

import argparse
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
CORPUS = ROOT.parent / "shared" / "corpora" / "enwiki_excerpt.train.txt"
if not CORPUS.exists():
    CORPUS = Path("/work/shared/corpora/enwiki_excerpt.train.txt")
DEFAULT_MODEL = Path("/work/main/.cache/SmolLM2-135M")
RESULTS = ROOT / "benchmarks" / "results" / "calibration_memory.json"
MiB = 1 << 20


def one_line_file(path: Path, size: int) -> int:
    """``size`` bytes (about) of the corpus on one line: its text with spaces for newlines,
    repeated; returns the size written."""
    text = " ".join(CORPUS.read_text(encoding="utf-8").split()).encode("utf-8") + b" "
    block = text * max(1, (64 * MiB) // len(text))
    written = 0
    with open(path, "wb") as out:
        while written < size:
            part = block[:size - written]
            out.write(part)
            written += len(part)
    return written


def run_measured(args: list[str]) -> tuple[int, float, int, str, str]:
    """(exit status, wall seconds, peak RSS bytes, stdout, stderr) of ``mpq ARGS``; the peak RSS
    is the child's own ru_maxrss (os.wait4)."""
    command = [sys.executable, "-c", "from mpq.cli.main import main; main()", *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (child.returncode, seconds, usage.ru_maxrss * 1024,
                out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def measure(name: str, calib: Path, model: Path, recipe: str, samples: int, seq_len: int,
            work: Path) -> dict:
    common = [str(model), "-r", recipe, "--calib", str(calib), "--num-samples", str(samples),
              "--seq-len", str(seq_len)]
    status, seconds, _, out, err = run_measured(
        ["quantize", *common, "-o", str(work / name), "--dry-run", "--json"])
    if status:
        raise SystemExit(f"dry run failed ({status}): {err[-2000:]}")
    estimate = json.loads(out)
    status, seconds, peak, out, err = run_measured(
        ["quantize", *common, "-o", str(work / name), "--force", "--json"])
    if status:
        raise SystemExit(f"quantize failed ({status}): {err[-2000:]}")
    calibration = {}
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("event") == "calibration":
            calibration = {k: v for k, v in record.items() if k != "event"}
    shutil.rmtree(work / name, ignore_errors=True)
    est = estimate["memory"]["host_peak_bytes"]
    return {"source": name, "source_bytes": calib.stat().st_size, "recipe": recipe,
            "num_samples": samples, "seq_len": seq_len, "estimate_bytes": est,
            "estimate_phase": estimate["memory"]["peak_phase"],
            "estimate_parts": estimate["memory"]["parts"], "peak_rss_bytes": peak,
            "ratio": round(est / peak, 3), "wall_s": round(seconds, 1),
            "estimate_s": estimate["time"]["seconds"], "calibration": calibration}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--recipe", default="w4a16-gptq")
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    size = int(args.size_gb * 1e9)
    free = shutil.disk_usage(args.tmp).free
    if free < size + 2 * (1 << 30):
        raise SystemExit(f"{args.tmp} has {free / 1e9:.1f} GB free, too little for a "
                         f"{size / 1e9:.1f} GB file: pass --tmp DIR")
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="mpq-calib-memory-") as tmp:
        work = Path(tmp)
        big = work / "one_line.txt"
        started = time.perf_counter()
        written = one_line_file(big, size)
        made = time.perf_counter() - started
        print(f"wrote {written / 1e9:.2f} GB on one line to {big} in {made:.1f} s "
              f"({args.tmp}: {free / 1e9:.0f} GB free before)", file=sys.stderr)
        big_name = f"one_line_{written / 1e9:.2g}GB.txt"
        for name, calib in ((big_name, big), (CORPUS.name, CORPUS)):
            rows.append(measure(name, calib, args.model, args.recipe, args.num_samples,
                                args.seq_len, work))
            print(f"  {name}: estimate {rows[-1]['estimate_bytes'] / MiB:.0f} MiB, peak RSS "
                  f"{rows[-1]['peak_rss_bytes'] / MiB:.0f} MiB, {rows[-1]['wall_s']} s",
                  file=sys.stderr)
        big.unlink()
    load_after = os.getloadavg()

    print(f"{'source':<26} {'size':>9} {'estimate':>10} {'peak RSS':>10} {'ratio':>6} "
          f"{'wall s':>7}  phase / calibration read")
    for row in rows:
        cal = row["calibration"]
        read = ("cut at %d tokens, %d chars read" % (cal.get("read_budget_tokens", 0),
                                                      cal.get("read_characters", 0))
                if cal.get("read_to_end") is False else "read to its end")
        print(f"{row['source']:<26} {row['source_bytes'] / 1e6:>7.0f}MB "
              f"{row['estimate_bytes'] / MiB:>7.0f}MiB {row['peak_rss_bytes'] / MiB:>7.0f}MiB "
              f"{row['ratio']:>6.2f} {row['wall_s']:>7.1f}  {row['estimate_phase']}; {read}")
    note = ("timings are noisy: the machine's 2 cores were shared with other jobs "
            f"(load average {load_before[0]:.1f} before, {load_after[0]:.1f} after); "
            "ratio = estimate / peak RSS (>= 1: the estimate is an upper bound)")
    print(note)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "note": note, "command": " ".join(["python", "benchmarks/calibration_memory.py",
                                           *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "load_average": {"before": load_before, "after": load_after},
        "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
