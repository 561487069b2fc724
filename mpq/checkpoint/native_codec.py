"""Native mpq codec: one :class:`QuantizedWeight` <-> named tensors with *local* keys.

The writer prefixes the keys with ``<layer>.``; nothing here does I/O.  What the tensors of a
layer are is its number format's business (``encode`` / ``decode`` of the registered
:class:`mpq.numerics.format.NumberFormat`; each format's module in mpq/numerics/ lists its keys,
e.g. int: ``qweight`` int32 [N, ceil(K·b/32)], ``scale`` fp32 [S, G], ``zero`` (asymmetric),
``g_idx`` (act-order)).  Scales are kept fp32, in the args' ``scale_dtype`` (int: fp16/bf16
scales were rounded before the codes were computed) or in the format's own exact scale dtype, so
decode(encode(qw)).dequantize() is bit-identical to qw.dequantize().
:func:`decode` validates every key, shape and dtype and raises :class:`ArtifactError`.
"""
from __future__ import annotations

from typing import Mapping

import torch

from mpq.errors import ArtifactError, SchemeError
from mpq.numerics.base import NUMBER_FORMATS, QuantizedWeight
from mpq.numerics.args import WeightArgs


def encode(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Named tensors (local keys) storing ``qw`` losslessly in the native layout."""
    return NUMBER_FORMATS.get(qw.args.format).encode(qw)


def decode(tensors: Mapping[str, torch.Tensor], args: WeightArgs, shape: tuple[int, int], *,
           prefix: str = "") -> QuantizedWeight:
    """Rebuild the QuantizedWeight of logical ``shape`` [N, K] from its local-key tensors.

    ``prefix`` (e.g. ``"model.layers.0.mlp.up_proj."``) only decorates error messages.  Keys other
    than the ones the format needs (e.g. ``bias``) are ignored.
    """
    shape = tuple(int(s) for s in shape)
    try:
        args.check_shape(shape, where=prefix.rstrip(".") or "weight")
    except SchemeError as exc:
        raise ArtifactError(f"stored scheme cannot describe the weight: {exc}") from exc
    return NUMBER_FORMATS.get(args.format).decode(tensors, args, shape, prefix)


def split_layer_tensors(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Remove and return layer ``name``'s tensors from ``tensors``, under their local keys."""
    prefix = name + "."
    keys = [k for k in tensors if k.startswith(prefix) and "." not in k[len(prefix):]]
    return {k[len(prefix):]: tensors.pop(k) for k in keys}


def stored_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Total bytes of the tensors' data."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def ideal_bits(args: WeightArgs, shape: tuple[int, int], *, act_order: bool = False) -> float:
    """Bits per weight of an unpadded encoding: codes plus the scale/zero/g_idx bytes we store."""
    return NUMBER_FORMATS.get(args.format).ideal_bits(args, shape, act_order=act_order)
