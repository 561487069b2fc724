"""Tiny Gemma and Gemma 2 GGUF files run by llama.cpp itself: its logits against mpq.load's, and
its tokenizer against the source tokenizer.

    bash benchmarks/peers/setup_llama_cpp.sh              # once: llama-cpp-python in /tmp
    python benchmarks/gguf_gemma_llama_cpp.py [--work /tmp/gguf-gemma] [--python PY]

For each tiny model (tests.tiny_models: gemma, gemma2 with query_pre_attn_scalar = head_dim as
llama.cpp assumes, and llama as the reference for llama.cpp's arithmetic noise; all with the
SentencePiece-style tokenizer tests.helpers.spm_tokenizer) and recipe (``float``: every Linear
kept, an F32 file; ``q8_0``/``q4_0``: RTN onto that grid for every Linear, the embedding and head on q8_0, one
tensor when tied):
``mpq quantize`` (native), ``mpq convert --format gguf``, then llama.cpp
(benchmarks/peers/llama_cpp_logits.py in the setup script's venv, float32 KV cache) evaluates
one sequence (BOS and 63 random ids) and tokenizes a few texts.  mpq.load (dequantized, fp32)
runs the native artifact on the same ids.  Reported per row: the largest |logit difference|,
the largest |logit|, the relative RMS difference and the share of positions whose argmax agrees;
whether llama.cpp's token ids equal the source tokenizer's.  A control row compares the Gemma 2
file with mpq.load's model scaled by 1/sqrt(256) (transformers' default query_pre_attn_scalar,
which llama.cpp does not apply) to show what a real mismatch looks like.  Writes
benchmarks/results/gguf_gemma_llama_cpp.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "gguf_gemma_llama_cpp.json"
PEER = ROOT / "benchmarks" / "peers" / "llama_cpp_logits.py"

MODELS = {"gemma": {}, "gemma2": {"query_pre_attn_scalar": 16}, "llama": {}}
RECIPES = {
    "float": "mpq_recipe: 1\nrules:\n  - targets: [Linear]\n    skip: true\n",
    "q8_0": "mpq_recipe: 1\ndefaults: {algorithm: rtn}\nrules:\n"
            "  - targets: [Linear, model.embed_tokens, lm_head]\n    weights: {format: q8_0}\n",
    "q4_0": "mpq_recipe: 1\ndefaults: {algorithm: rtn}\nrules:\n"
            "  - targets: [model.embed_tokens, lm_head]\n    weights: {format: q8_0}\n"
            "  - targets: [Linear]\n    weights: {format: q4_0}\n",
}
TEXTS = ["ther", "the cat and the rest", "another theme is there", "in an inn, is it?",
         "Hi! 42 cats"]
SEQ = 64


def mpq(*args) -> None:
    subprocess.run([sys.executable, "-m", "mpq", *map(str, args)], check=True,
                   capture_output=True, text=True)


def compare(ours, theirs) -> dict:
    diff = (ours - theirs).abs()
    return {"max_abs_diff": float(diff.max()), "max_abs_logit": float(ours.abs().max()),
            "rel_rms_diff": float((diff.pow(2).mean() / ours.pow(2).mean()).sqrt()),
            "argmax_agree": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())}


def run_row(arch: str, recipe: str, work: Path, python: str) -> tuple[dict, object, object]:
    import numpy as np
    import torch

    from mpq.loader import load
    from tests.helpers import gemma_dir, spm_tokenizer

    folder = work / f"{arch}-{recipe}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    src = gemma_dir(folder / "src", arch, **MODELS[arch])
    (folder / "r.yaml").write_text(RECIPES[recipe])
    mpq("quantize", src, "--recipe", folder / "r.yaml", "-o", folder / "native")
    mpq("convert", folder / "native", "-o", folder / "gguf", "--format", "gguf")
    ids = torch.randint(4, 180, (SEQ,), generator=torch.Generator().manual_seed(0))
    ids[0] = 2  # the tokenizer's BOS
    peer = [python, str(PEER), "--gguf", str(folder / "gguf" / "model.gguf"),
            "--ids", ",".join(map(str, ids.tolist())), "--out", str(folder / "logits.npy")]
    for text in TEXTS:
        peer += ["--text", text]
    started = time.perf_counter()
    out = json.loads(subprocess.run(peer, check=True, capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1])
    seconds = time.perf_counter() - started
    theirs = torch.from_numpy(np.load(folder / "logits.npy"))
    model = load(folder / "native", dequantize=True)
    with torch.no_grad():
        ours = model(ids[None]).logits[0]
    tok = spm_tokenizer()
    expected = [tok(t)["input_ids"] for t in TEXTS]
    row = {"model": arch, "recipe": recipe, **compare(ours, theirs),
           "tokens_equal": out["tokens"] == expected, "llama_cpp_seconds": round(seconds, 2),
           "llama_cpp_python": out["llama_cpp_python"]}
    return row, model, (ids, theirs)


def control_row(model, ids, theirs) -> dict:
    """mpq.load's Gemma 2 with transformers' default query scale 1/sqrt(256) against the file."""
    import torch

    for layer in model.model.layers:
        layer.self_attn.scaling = 256 ** -0.5
    with torch.no_grad():
        ours = model(ids[None]).logits[0]
    return {"model": "gemma2 (control: query scale 1/sqrt(256))", "recipe": "float",
            **compare(ours, theirs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-gemma"))
    parser.add_argument("--python", default="/tmp/llama-cpp-venv/bin/python",
                        help="the python of benchmarks/peers/setup_llama_cpp.sh's venv")
    args = parser.parse_args()
    rows = []
    for arch in MODELS:
        for recipe in RECIPES:
            row, model, (ids, theirs) = run_row(arch, recipe, args.work, args.python)
            rows.append(row)
            if arch == "gemma2" and recipe == "float":
                rows.append(control_row(model, ids, theirs))
    RESULTS.write_text(json.dumps({"sequence_length": SEQ, "texts": TEXTS, "rows": rows},
                                  indent=1) + "\n")
    print(f"{'model':44} {'recipe':6} {'max|Δ|':>9} {'max|logit|':>10} {'rel RMS':>9} "
          f"{'argmax':>7} tokens")
    for r in rows:
        print(f"{r['model']:44} {r['recipe']:6} {r['max_abs_diff']:9.2e} "
              f"{r['max_abs_logit']:10.3f} {r['rel_rms_diff']:9.2e} {r['argmax_agree']:7.3f} "
              f"{r.get('tokens_equal', '')}")


if __name__ == "__main__":
    main()
