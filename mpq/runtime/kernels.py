"""Packed low-bit CPU matmuls for quantized linears (torch's int4/int8 weight-only kernels).

A :class:`~mpq.runtime.qlinear.QuantLinear` loaded with ``kernels=True`` asks :func:`select`
whether its stored weight is one a kernel computes exactly up to float rounding; if so the
weight is packed ONCE into the kernel's layout (:func:`pack`) and every forward runs the kernel
instead of decoding the weight.  Two kernels, both in stock torch on CPU:

- ``int4pack``: ``aten._weight_int4pack_mm_for_cpu``.  It computes x·Ŵᵀ with
  Ŵ[n, k] = (c − 8)·s + z per group of ``g`` ∈ {32, 64, 128, 256} input columns, c ∈ 0..15.
  mpq's symmetric int with b ≤ 4 bits stores u ∈ 0..2^b−1 meaning (u − 2^(b−1))·scale, so
  c = u − 2^(b−1) + 8 and z = 0 give the same values exactly.  Needs N % 16 == 0 (the
  kernel's packing) and no act-order permutation (a g_idx other than k // g).
- ``int8pack``: ``aten._weight_int8pack_mm`` (one scale per output row): symmetric int with
  per-channel scales and b ≤ 8 bits, int8 value u − 2^(b−1).

Numerics: the kernels are fast only with bf16 activations (their fp32 path is a slow scalar
loop), so the kernel path always computes in bf16 — inputs and scales rounded to bf16, products
accumulated in fp32 inside the kernel, the output rounded to bf16 and cast back to the input's
dtype.  Per output that is within about 3·2⁻⁹·Σ|x_k·ŵ_k| of the exact product (bf16's unit
roundoff 2⁻⁹ on x, on the scale and on the result), the same order as running the layer in bf16.

Everything else — asymmetric grids, other formats and bit widths, tensor or other group sizes,
act-order, quantized input activations (their fake quantization stays on the reference path so
the ints the scheme promises are what the matmul sees) — stays on the reference decode path;
:func:`select` says why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from mpq.checkpoint.native_codec import decode
from mpq.numerics.args import WeightArgs

INT4_GROUPS = (32, 64, 128, 256)
INT4_ROWS = 16  # the int4 packing works on blocks of 16 output rows
PACK_ROWS = 1024  # rows packed at a time: a multiple of the int4 packing's 64-row blocks
COMPUTE_DTYPE = torch.bfloat16
DECODE = "decode"  # the reference path's name


def available() -> dict[str, bool]:
    """Which kernels this torch build has (by name)."""
    ops = torch.ops.aten
    return {"int4pack": hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
            and hasattr(ops, "_weight_int4pack_mm_for_cpu"),
            "int8pack": hasattr(ops, "_weight_int8pack_mm")}


def _trivial_order(args: WeightArgs, k: int, g_idx: torch.Tensor | None) -> bool:
    if g_idx is None:
        return True
    if args.granularity != "group":
        return False
    expected = torch.arange(k, dtype=torch.int64) // args.group_size
    return bool(torch.equal(g_idx.to(torch.int64), expected))


def select(args: WeightArgs, shape: tuple[int, int], g_idx: torch.Tensor | None = None,
           input_args=None) -> tuple[str, str]:
    """(path, reason): ``int4pack``/``int8pack`` when a kernel computes the weight of ``shape``
    [N, K] stored under ``args`` (with act-order ``g_idx``) exactly up to float rounding, else
    ``decode`` and the first reason it does not."""
    have = available()
    if input_args is not None:
        return DECODE, "input activations are quantized"
    if args.format != "int":
        return DECODE, f"format {args.format}"
    if not args.symmetric:
        return DECODE, "asymmetric (zero points)"
    n, k = shape
    if not _trivial_order(args, k, g_idx):
        return DECODE, "act-order permutation (g_idx)"
    if args.granularity == "channel":
        if not have["int8pack"]:
            return DECODE, "no int8pack kernel in this torch"
        return "int8pack", f"int{args.bits} per channel"
    if args.granularity != "group":
        return DECODE, f"{args.granularity} granularity"
    if args.bits > 4:
        return DECODE, f"int{args.bits} groups (the int4 kernel takes at most 4 bits)"
    if args.group_size not in INT4_GROUPS or k % args.group_size:
        return DECODE, f"group size {args.group_size} (the int4 kernel takes {INT4_GROUPS})"
    if n % INT4_ROWS:
        return DECODE, f"{n} output rows (the int4 kernel needs a multiple of {INT4_ROWS})"
    if not have["int4pack"]:
        return DECODE, "no int4pack kernel in this torch"
    return "int4pack", f"int{args.bits} g{args.group_size}"


@dataclass
class Int4Packed:
    """``weight``: the kernel's packed uint8 layout; ``scales_and_zeros`` bf16 [G, N, 2]."""

    weight: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size,
                                                          self.scales_and_zeros)


@dataclass
class Int8Packed:
    """``weight`` int8 [N, K]; ``scales`` bf16 [N]."""

    weight: torch.Tensor
    scales: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)


def pack(encoded: Mapping[str, torch.Tensor], args: WeightArgs, shape: tuple[int, int],
         path: str):
    """The packed form for ``path`` (as :func:`select` chose) of the weight stored as the
    native tensors ``encoded``.  It is decoded and converted PACK_ROWS rows at a time (the int4
    layout packs blocks of 64 rows independently; int8 rows are independent), so a large head
    never needs a full-size copy of its codes."""
    offset = 1 << (args.bits - 1)  # the implicit symmetric zero point
    n, k = shape
    weights, scales = [], []
    for start in range(0, n, PACK_ROWS):
        rows = min(PACK_ROWS, n - start)
        local = {key: encoded[key][start:start + rows] for key in ("qweight", "scale")}
        qw = decode(local, args, (rows, k))
        if path == "int4pack":
            codes = (qw.codes.to(torch.int32) + (8 - offset)).contiguous()
            weights.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        elif path == "int8pack":
            weights.append((qw.codes.to(torch.int16) - offset).to(torch.int8))
        else:
            raise ValueError(f"no kernel named {path!r}")
        scales.append(qw.scale)
    weight, scale = torch.cat(weights).contiguous(), torch.cat(scales).to(torch.float32)
    if path == "int8pack":
        return Int8Packed(weight, scale.reshape(-1).to(COMPUTE_DTYPE).contiguous())
    scale = scale.t().contiguous()  # [G, N]
    scales_and_zeros = torch.stack([scale, torch.zeros_like(scale)], dim=-1)
    return Int4Packed(weight, scales_and_zeros.to(COMPUTE_DTYPE).contiguous(), args.group_size)


def run(kernel, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] (any float dtype) → [..., N] in x's dtype, computed in bf16 by ``kernel``."""
    flat = x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE)
    out = kernel(flat)
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)
