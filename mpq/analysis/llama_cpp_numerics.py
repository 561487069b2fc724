"""llama.cpp's activation rounding, emulated on a loaded artifact (``mpq eval --numerics llama.cpp``).

llama.cpp's CPU matmuls do not multiply a quantized weight by float activations: each row of
activations is first rounded to the weight type's ``vec_dot_type`` (ggml-cpu's type traits) and
the dot products run on the integers.  So the same GGUF weights score a little differently in
llama.cpp than with float activations — on SmolLM2's Q4_K_M and Q3_K_M mixes about +0.6 % in
perplexity, almost all of it this rounding (`benchmarks/llama_cpp_act_rounding.py`).  Rounding,
per the weight's GGUF type (ggml-quants.c's reference quantizers):

- the legacy types and iq4_nl (``q8_0`` / ``q8_1`` activations): per block of 32 inputs
  d = absmax / 127, q = round(x / d) half away from zero, x̂ = fp16(d)·q (the ``gguf`` package's
  Q8_0 quantizer, bit for bit);
- the K-quants (``q8_K``): per block of 256 inputs, v = the element of largest magnitude (its
  sign kept), iscale = −127 / v, q = min(127, round(iscale·x)) half to even, x̂ = q / iscale.

A quantized layer's GGUF type is the one ``--format gguf`` writes it as (the GGUF grids; int
4/5-bit symmetric g32 with float16 scales are q4_0 / q5_0); a layer with none is refused.  Not
emulated: llama.cpp's float16 KV cache and the float16 rounding inside its attention (about 0.1 %
on those files), and float linears stored as F16/BF16 in the GGUF (mpq writes F32 by default).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from mpq.checkpoint.gguf_writer import gguf_grid
from mpq.errors import OptionError
from mpq.numerics.gguf_kquants import GGUF_KQUANTS, QK

Q8_0_BLOCK = 32
K_QUANT_NAMES = frozenset(f.name for f in GGUF_KQUANTS)


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., K] as llama.cpp's q8_0 activations hold it (K a multiple of 32)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, Q8_0_BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    y = blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.sign(y) * torch.floor(y.abs() + 0.5)  # roundf: half away from zero
    return (d.to(torch.float16).float() * q).reshape(x.shape).to(x.dtype)


def round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., K] as llama.cpp's q8_K activations hold it (K a multiple of 256)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, QK)
    v = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    iscale = torch.where(v != 0, -127 / v, torch.zeros_like(v))
    q = torch.round(iscale * blocks).clamp(max=127)  # nearest_int: half to even
    step = torch.where(iscale != 0, 1 / iscale, torch.zeros_like(iscale))
    return (q * step).reshape(x.shape).to(x.dtype)


def activation_rounding(plan) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Layer name → the rounding llama.cpp applies to its inputs, for every matmul the plan
    quantizes (a tied head uses its embedding's type; a lookup has no matmul).  OptionError
    naming the layers whose scheme has no GGUF type."""
    rounding, missing = {}, []
    for layer in plan.quantized():
        if layer.embedding:
            continue
        source = plan.get(plan.shared_with(layer.name) or layer.name)
        grid = gguf_grid(source.scheme.weights, dict(source.scheme.options))
        if isinstance(grid, str):
            missing.append(f"{layer.name}: {grid}")
            continue
        rounding[layer.name] = round_q8_k if grid.name in K_QUANT_NAMES else round_q8_0
    if missing:
        raise OptionError(f"--numerics llama.cpp needs every quantized layer in a GGUF type; "
                          f"{len(missing)} are not: {'; '.join(missing[:3])}"
                          + (" …" if len(missing) > 3 else ""),
                          hint="quantize with a GGUF recipe (e.g. -r gguf-q4_k_m-gptq), or "
                               "evaluate with the default --numerics mpq")
    return rounding


@contextmanager
def llama_cpp_activations(model) -> Iterator[int]:
    """While open, every quantized matmul of ``model`` (loaded by mpq.load) sees its inputs
    rounded as llama.cpp rounds them; yields the number of layers hooked."""
    artifact = getattr(model, "mpq_artifact", None)
    if artifact is None:
        raise OptionError("--numerics llama.cpp needs an mpq artifact (its plan gives each "
                          "layer's GGUF type)", hint="evaluate an artifact written by mpq")
    hooks = [model.get_submodule(name).register_forward_pre_hook(
                 lambda module, args, fn=fn: (fn(args[0]), *args[1:]))
             for name, fn in activation_rounding(artifact.plan).items()]
    try:
        yield len(hooks)
    finally:
        for hook in hooks:
            hook.remove()
