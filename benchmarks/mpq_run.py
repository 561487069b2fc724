"""One mpq quantization in its own process, for benchmarks: prints a JSON line with timings and
peak RSS (``ru_maxrss`` of this process, KiB: at exit, and when quantization was done, before the
artifact is written).

    python benchmarks/mpq_run.py MODEL RECIPE OUT --calib FILE [--num-samples 128 --seq-len 512]
"""
from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("recipe")
    parser.add_argument("out")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-true-sequential", dest="true_sequential", action="store_false")
    args = parser.parse_args()
    started = time.perf_counter()
    from mpq.calibration import CalibrationOptions
    from mpq.engine.spec import RunOptions
    from mpq.quantize import quantize

    marks: dict[str, float] = {}

    def events(kind: str, **data) -> None:
        if kind in ("start", "done"):
            marks[kind] = time.perf_counter()
        if kind == "done":
            marks["peak_rss_quant_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    result = quantize(args.model, args.recipe, args.out, RunOptions(device=args.device, true_sequential=args.true_sequential, calibration=CalibrationOptions(source=args.calib,
                                                     num_samples=args.num_samples,
                                                     seq_len=args.seq_len)), force=True, events=events)
    print(json.dumps({"pipeline_s": marks["done"] - marks["start"],
                      "total_s": time.perf_counter() - started,
                      "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "peak_rss_quant_kib": marks["peak_rss_quant_kib"],
                      "calib_sha256": result.calibration["sha256"]}))


if __name__ == "__main__":
    main()
