"""Why llama.cpp's perplexity of an mpq GGUF file sits a little above ``mpq eval``'s: llama.cpp's
CPU matmuls round each quantized weight's *activations* to 8 bits first (the weight type's
``vec_dot_type``), and keeps the KV cache in float16; ``mpq eval`` runs the same weights with
float activations.  This script measures the artifact's perplexity on ``mpq eval``'s windows
three ways — as ``mpq eval`` does, with llama.cpp's activation rounding emulated, and with the
float16 KV cache too — to see how much of the gap that explains.

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

K_QUANTS = {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}
Q8_0_BLOCK, Q8_K_BLOCK = 32, 256


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] rounded as ggml's quantize_row_q8_0_ref, dequantized."""
    shape = x.shape
    b = x.float().reshape(*shape[:-1], -1, Q8_0_BLOCK)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    y = b * inv
    q = torch.sign(y) * torch.floor(y.abs() + 0.5)  # roundf
    return (d.to(torch.float16).float() * q).reshape(shape).to(x.dtype)


def q8_k(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] rounded as ggml's quantize_row_q8_K_ref, dequantized."""
    shape = x.shape
    b = x.float().reshape(*shape[:-1], -1, Q8_K_BLOCK)
    v = b.gather(-1, b.abs().argmax(-1, keepdim=True))
    iscale = torch.where(v != 0, -127 / v, torch.zeros_like(v))
    q = torch.round(iscale * b).clamp(max=127)  # nearest_int: half to even
    scale = torch.where(iscale != 0, 1 / iscale, torch.zeros_like(iscale))
    return (q * scale).reshape(shape).to(x.dtype)


def emulate(model, kv_f16: bool) -> list:
    """Forward hooks on every quantized linear (and the tied head) of the loaded artifact."""
    plan, hooks = model.mpq_artifact.plan, []
    for layer in plan.quantized():
        source = plan.get(plan.shared_with(layer.name) or layer.name)
        if layer.embedding:
            continue  # a lookup: no matmul
        fmt = source.scheme.weights.format
        rounding = q8_k if fmt in K_QUANTS else q8_0
        module = model.get_submodule(layer.name)
        hooks.append(module.register_forward_pre_hook(
            lambda mod, args, rounding=rounding: (rounding(args[0]),) + tuple(args[1:])))
        if kv_f16 and layer.name.endswith(("k_proj", "v_proj")):
            hooks.append(module.register_forward_hook(
                lambda mod, args, out: out.to(torch.float16).to(out.dtype)))
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
