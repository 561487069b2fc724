"""Why llama.cpp's perplexity of an mpq GGUF file sits a little above ``mpq eval``'s: llama.cpp's
CPU matmuls round each quantized weight's *activations* to 8 bits first (the weight type's
``vec_dot_type``), and keeps the KV cache in float16; ``mpq eval`` runs the same weights with
float activations.  This script measures the artifact's perplexity on ``mpq eval``'s windows
three ways — as ``mpq eval`` does, with llama.cpp's activation rounding emulated (``mpq eval
--numerics llama.cpp``'s, mpq.analysis.llama_cpp_numerics), and with the float16 KV cache too —
to see how much of the gap that explains.

    python benchmarks/llama_cpp_act_rounding.py --artifact OUT-native --corpora ../shared/corpora \\
        [--num-windows 40] [--llama-cpp-ppl 27.427] [--out benchmarks/results/NAME.json]

``OUT-native``: the native-format artifact of a GGUF recipe (``benchmarks/gguf_llama_cpp.py``
writes ``<work>/<recipe>-native``): ``mpq.load(dequantize=True)`` gives exactly the weights of its
GGUF file.  The emulation (ggml's reference quantizers, ggml-quants.c):

- weights of a legacy type or iq4_nl (q8_0 / q8_1 activations): per block of 32 inputs
  d = absmax / 127, q = round(x / d) (half away from zero), x̂ = fp16(d)·q;
- K-quant weights (q8_K activations): per block of 256, v = the element of largest magnitude
  (sign kept), iscale = −127 / v, q = min(127, round(iscale·x)) (half to even), x̂ = q / iscale;
- with the float16 KV cache: the outputs of k_proj and v_proj rounded to float16 (llama.cpp
  stores K after RoPE; rounding before RoPE is an approximation).

Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mpq  # noqa: E402
from mpq.analysis.eval import load_eval_ids, perplexity  # noqa: E402
from mpq.analysis.llama_cpp_numerics import activation_rounding  # noqa: E402

def emulate(model, kv_f16: bool) -> list:
    """Forward hooks: llama.cpp's activation rounding on every quantized matmul (mpq's own, as
    ``mpq eval --numerics llama.cpp`` applies it), and the float16 KV cache if asked."""
    hooks = [model.get_submodule(name).register_forward_pre_hook(
                 lambda module, args, fn=fn: (fn(args[0]), *args[1:]))
             for name, fn in activation_rounding(model.mpq_artifact.plan).items()]
    if kv_f16:
        hooks += [module.register_forward_hook(
                      lambda mod, args, out: out.to(torch.float16).to(out.dtype))
                  for name, module in model.named_modules()
                  if name.endswith(("k_proj", "v_proj"))]
    return hooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--corpora", type=Path, required=True)
    parser.add_argument("--num-windows", type=int, default=40)
    parser.add_argument("--llama-cpp-ppl", type=float, default=None,
                        help="llama.cpp's own perplexity of the artifact's GGUF file, for the table")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.artifact)
    ids = load_eval_ids(args.corpora / "enwiki_excerpt.test.txt", tokenizer)
    model = mpq.load(args.artifact, dequantize=True)
    rows = []
    for name, kv in (("float activations (mpq eval)", None), ("8-bit activations", False),
                     ("8-bit activations + fp16 KV", True)):
        hooks = [] if kv is None else emulate(model, kv)
        with torch.no_grad():
            ppl = perplexity(model, ids, window=512, num_windows=args.num_windows).ppl
        for hook in hooks:
            hook.remove()
        row = {"mode": name, "ppl": ppl}
        if args.llama_cpp_ppl:
            row["llama_cpp_rel_diff"] = args.llama_cpp_ppl / ppl - 1
        rows.append(row)
        print(f"{name:32s} {ppl:9.4f}" + (f"  llama.cpp {args.llama_cpp_ppl:.4f} "
                                          f"({row['llama_cpp_rel_diff']:+.3%})"
                                          if args.llama_cpp_ppl else ""), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"artifact": str(args.artifact),
                                        "num_windows": args.num_windows,
                                        "llama_cpp_ppl": args.llama_cpp_ppl, "rows": rows},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
