"""Whole-model size figures of an artifact: bytes and bits per weight over every parameter.

``bits_per_weight`` is the artifact's tensor bytes × 8 over **all** the model's weights: the
quantized layers' weights plus every float tensor kept (embeddings, norms, biases, a kept head;
tied tensors once, as stored).  ``quantized_bits_per_weight`` is the quantized layers' own
tensors (codes, scales, zero points, g_idx, input scales) × 8 over their weights only, the
figure a "4-bit" label speaks of.  Both come from tensor names, dtypes and shapes only
(:func:`size_summary`); :func:`header_entries` reads them from safetensors headers (mpq inspect),
writers pass their tensors' specs (mpq.checkpoint.writers.write_state).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

from mpq.config.plan import Plan


class Entry(NamedTuple):
    numel: int
    nbytes: int
    floating: bool


def entries_of(tensors: Mapping) -> dict[str, Entry]:
    """Entries of torch tensors (meta ones included)."""
    return {name: Entry(t.numel(), t.numel() * t.element_size(), t.is_floating_point())
            for name, t in tensors.items()}


def header_entries(files: Iterable[Path]) -> dict[str, Entry]:
    """Entries of every tensor of the safetensors ``files``, from their headers only."""
    from safetensors import safe_open

    out: dict[str, Entry] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                sliced = handle.get_slice(name)
                numel = 1
                for dim in sliced.get_shape():
                    numel *= int(dim)
                code = sliced.get_dtype()
                out[name] = Entry(numel, numel * _CODE_BYTES.get(code, 1),
                                  code.startswith(("F", "BF")))
    return out


_CODE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
               "I16": 2, "U16": 2}  # the rest (I8, U8, BOOL, F8_*) one byte


def size_summary(plan: Plan, entries: Mapping[str, Entry]) -> dict[str, float | int]:
    """``total_weights``, ``dense_bytes``, ``quantized_bytes``, ``bits_per_weight`` (whole
    model) and ``quantized_bits_per_weight`` (quantized layers only) of an artifact whose
    tensors are ``entries`` (see the module docstring).  A quantized layer's ``bias`` is a kept
    float tensor; its other tensors (``<layer>.<key>``) are the layer's encoding."""
    quantized = {layer.name for layer in plan.quantized()}
    quantized_weights = sum(l.shape[0] * l.shape[1] for l in plan.quantized())
    dense_weights = dense_bytes = quantized_bytes = 0
    for name, entry in entries.items():
        owner, _, local = name.rpartition(".")
        if owner in quantized and local != "bias":
            quantized_bytes += entry.nbytes
            continue
        dense_bytes += entry.nbytes
        if entry.floating:
            dense_weights += entry.numel
    total = quantized_weights + dense_weights
    return {"total_weights": total, "dense_bytes": dense_bytes,
            "quantized_bytes": quantized_bytes,
            "bits_per_weight": round(8 * (dense_bytes + quantized_bytes) / total, 4)
            if total else 0.0,
            "quantized_bits_per_weight": round(8 * quantized_bytes / quantized_weights, 4)
            if quantized_weights else 0.0}
