"""Score GGUF files with llama.cpp itself (run with the venv of setup_llama_cpp.sh).

    PY=$(bash benchmarks/peers/setup_llama_cpp.sh | tail -1)
    $PY benchmarks/peers/llama_cpp_ppl.py --windows windows.json --gguf a.gguf [--gguf b.gguf]
        [--quantize f32.gguf:Q4_0:out.gguf] [--prompt TEXT] [--threads 2]

``--windows``: a JSON list of token-id windows (benchmarks/gguf_llama_cpp.py writes the first
40 × 512 tokens of the evaluation text as ``mpq eval`` forms them).  For each GGUF: load it in
llama.cpp (llama-cpp-python), generate a few greedy tokens from ``--prompt``, then evaluate each
window with all logits kept and score the token at position p from the logits at p − 1 (the
window's first token is not scored, as in ``mpq eval``); perplexity = exp(mean NLL), the NLL
summed in float64 from llama.cpp's float32 logits.  ``--quantize IN:TYPE:OUT`` first runs
llama.cpp's own quantizer (``llama_model_quantize``, no importance matrix) on IN.  One JSON line
per file on stdout.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import time

import numpy as np
import llama_cpp


def quantize(src: str, kind: str, dst: str, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if code != 0:
        raise SystemExit(f"llama_model_quantize({src} → {kind}) failed with {code}")


def log_softmax_nll(logits: np.ndarray, targets: list[int]) -> float:
    """Σ −log p(target) over rows of float32 ``logits`` [T, vocab], in float64."""
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return float((lse - x[np.arange(len(targets)), targets]).sum())


def score(path: str, windows: list[list[int]], prompt: str, threads: int) -> dict:
    n_ctx = max(len(w) for w in windows)
    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                          logits_all=True, n_threads=threads, verbose=False)
    text = llm(prompt, max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
    nll, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:len(window) - 1], dtype=np.float32)
        nll += log_softmax_nll(logits, window[1:])
        count += len(window) - 1
    return {"gguf": path, "ppl": math.exp(nll / count), "tokens": count,
            "generated": prompt + text, "seconds": time.perf_counter() - started,
            "llama_cpp_python": llama_cpp.__version__}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", required=True)
    parser.add_argument("--gguf", action="append", default=[])
    parser.add_argument("--quantize", action="append", default=[])
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with open(args.windows, encoding="utf-8") as handle:
        windows = json.load(handle)
    paths = list(args.gguf)
    for spec in args.quantize:
        src, kind, dst = spec.split(":")
        quantize(src, kind, dst, args.threads)
        paths.append(dst)
    for path in paths:
        print(json.dumps(score(path, windows, args.prompt, args.threads)), flush=True)


if __name__ == "__main__":
    main()
