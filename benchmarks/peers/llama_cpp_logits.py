"""llama.cpp's logits and token ids for a GGUF file (run with the venv of setup_llama_cpp.sh).

    $PY benchmarks/peers/llama_cpp_logits.py --gguf model.gguf --ids 2,17,40 --out logits.npy
        [--text "some text" ...]

Loads the file in llama.cpp (llama-cpp-python, float32 KV cache so that only the weights' and
llama.cpp's own arithmetic differ), evaluates ``--ids`` with all logits kept and saves them
[len(ids), vocab] to ``--out``; prints one JSON line with llama.cpp's token ids of each
``--text`` (BOS as the file's add_bos_token says, special tokens not parsed).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import llama_cpp

GGML_TYPE_F32 = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--ids", required=True, help="comma-separated token ids")
    parser.add_argument("--out", required=True, help=".npy file for the logits")
    parser.add_argument("--text", action="append", default=[])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    ids = [int(i) for i in args.ids.split(",")]
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=max(64, len(ids)), logits_all=True,
                          n_threads=args.threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                          verbose=False)
    llm.eval(ids)
    np.save(args.out, np.asarray(llm.scores[:len(ids)], dtype=np.float32))
    tokens = [llm.tokenize(t.encode(), add_bos=llm.metadata.get(
        "tokenizer.ggml.add_bos_token") == "true", special=False) for t in args.text]
    print(json.dumps({"tokens": tokens, "llama_cpp_python": llama_cpp.__version__}))


if __name__ == "__main__":
    main()
