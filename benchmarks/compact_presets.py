"""Size and quality of whole-model presets on SmolLM2-135M, beside llama.cpp's own files.

    python benchmarks/compact_presets.py --model ./SmolLM2-135M --corpora ../shared/corpora \\
        --work /tmp/compact [--presets w4a16-gptq-compact,w4a16-gptq-g32-compact,...]

Each preset is run with ``mpq quantize`` (calibration: 128 × 512 tokens of
enwiki_excerpt.train.txt, the default) and scored with ``mpq eval --reference`` (ppl, KL to the
float model and top-1 agreement on the first 40 × 512-token windows of enwiki_excerpt.test.txt).
The size is every file of the artifact folder (tensors, config, tokenizer, manifest), in MB
(10^6 bytes).  The llama.cpp rows are the figures of issue 20 (llama.cpp's converter and
quantizer on the same fp32 folder, no importance matrix, scored from llama.cpp's logits on the
same windows); they are quoted, not measured here.  Prints a table; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

LLAMA_CPP = {"llama.cpp Q4_0": (33.89, 91.7), "llama.cpp Q4_K_M": (28.56, 105.5),
             "llama.cpp Q3_K_M": (30.55, 93.5), "SmolLM2 Q4_1 (the shipped GGUF)": (None, 98.4)}
DEFAULT = "w4a16-gptq,w4a16-gptq-compact,w4a16-gptq-g32-compact,w5a16-gptq-compact"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--corpora", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--mpq", default="mpq")
    parser.add_argument("--presets", default=DEFAULT)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compact_presets.json"))
    args = parser.parse_args()
    rows = []
    for preset in [p for p in args.presets.split(",") if p]:
        out = args.work / preset
        started = time.perf_counter()
        subprocess.run([args.mpq, "quantize", str(args.model), "--recipe", preset, "-o", str(out),
                        "--calib", str(args.corpora / "enwiki_excerpt.train.txt"), "--force"],
                       check=True, capture_output=True)
        seconds = time.perf_counter() - started
        scored = json.loads(subprocess.run(
            [args.mpq, "eval", str(out), "--data", str(args.corpora / "enwiki_excerpt.test.txt"),
             "--reference", str(args.model), "--num-windows", "40", "--json"],
            check=True, capture_output=True, text=True).stdout)
        row = {"preset": preset, "mb": folder_bytes(out) / 1e6, "ppl": scored["ppl"],
               "kl": scored["kl_mean"], "top1": scored["top1_agreement"],
               "ref_ppl": scored["ref_ppl"], "quantize_s": seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'artifact':36} {'MB':>7} {'ppl':>8} {'KL':>7} {'top-1':>7}")
    for row in rows:
        print(f"{row['preset']:36} {row['mb']:7.1f} {row['ppl']:8.3f} {row['kl']:7.4f} "
              f"{row['top1']:7.3f}")
    for name, (ppl, mb) in LLAMA_CPP.items():
        print(f"{name:36} {mb:7.1f} {ppl if ppl is not None else float('nan'):8.2f}   (quoted)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "llama_cpp_quoted": LLAMA_CPP}, indent=2)
                        + "\n")


if __name__ == "__main__":
    main()
