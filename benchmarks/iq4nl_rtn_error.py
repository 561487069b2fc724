"""mpq's iq4_nl rounding against llama.cpp's own IQ4_NL quantizer and against q4_0, on the same
float weights: the squared error of each tensor's RTN.

    python -m benchmarks.iq4nl_rtn_error --float F32.gguf --llama LLAMA-IQ4_NL.gguf \\
        [--blocks 0,7,15,29]

``--float``: the F32 GGUF of a model (``benchmarks/gguf_llama_cpp.py --recipes float`` writes
one); ``--llama``: that file quantized by llama.cpp (``llama_model_quantize``, ftype
``MOSTLY_IQ4_NL``, no importance matrix).  For every IQ4_NL tensor of the listed blocks: the
float weights, llama.cpp's dequantized IQ4_NL (the ``gguf`` package), mpq's iq4_nl and q4_0 RTN
of the same weights; prints each tensor's Σ(ŵ − w)² and the totals' ratios.
"""
from __future__ import annotations

import argparse
import json

import gguf
import numpy as np
import torch
from gguf import quants

from mpq.numerics.args import WeightArgs
from mpq.numerics.format import NUMBER_FORMATS


def rtn(name: str, w: torch.Tensor) -> torch.Tensor:
    fmt = NUMBER_FORMATS.get(name)
    return fmt.quantize(w, WeightArgs(format=name, **fmt.implied_weights({}))).dequantize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--float", required=True)
    parser.add_argument("--llama", required=True)
    parser.add_argument("--blocks", default="0,7,15,29")
    args = parser.parse_args()
    prefixes = tuple(f"blk.{b}." for b in args.blocks.split(","))
    floats = {t.name: t for t in gguf.GGUFReader(args.float).tensors}
    totals = np.zeros(3)
    for t in gguf.GGUFReader(args.llama).tensors:
        if not t.name.startswith(prefixes) or t.tensor_type.name != "IQ4_NL":
            continue
        w = torch.from_numpy(np.array(floats[t.name].data, dtype=np.float32))
        theirs = torch.from_numpy(quants.dequantize(t.data, t.tensor_type))
        errors = np.array([float(((x - w) ** 2).sum())
                           for x in (rtn("iq4_nl", w), theirs, rtn("q4_0", w))])
        totals += errors
        print(json.dumps({"tensor": t.name, "mpq_iq4_nl": errors[0], "llama_cpp_iq4_nl": errors[1],
                          "mpq_q4_0": errors[2]}), flush=True)
    print(json.dumps({"mpq_over_llama_cpp": totals[0] / totals[1],
                      "mpq_over_q4_0": totals[0] / totals[2]}))


if __name__ == "__main__":
    main()
