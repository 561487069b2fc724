"""Writing a safetensors file one tensor at a time, with a deterministic header.

The safetensors library's ``save_file`` needs every tensor of the file in memory at once and
then builds the file's bytes in memory too (about 2-3× the file at its peak), and it keeps
``__metadata__`` in a hash map, so the order of its keys changes from run to run.
:func:`write_safetensors` writes the same format (8-byte little-endian header length, the JSON
header padded with spaces to a multiple of 8, then the tensors' bytes back to back) from the
tensors' shapes and dtypes alone, then asks for each tensor in turn and writes its bytes, so at
most one tensor (one group of a mpq.checkpoint.lazy.LazyTensors) is held.  Tensors are laid out
by decreasing element size, then name (the library's order, so every tensor is aligned), and
the metadata keys are sorted: the same inputs give the same bytes.  Files are read back with
the safetensors library (tests/formats).
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch

ALIGN = 8
DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
               torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
               torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
               torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
               torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}


def tensor_order(specs: Mapping[str, torch.Tensor]) -> list[str]:
    """The names in file order: decreasing element size, then name."""
    return sorted(specs, key=lambda name: (-specs[name].element_size(), name))


def header_bytes(specs: Mapping[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """The length prefix and padded JSON header for tensors with these shapes and dtypes."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in tensor_order(specs):
        spec = specs[name]
        if spec.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {name}: dtype {spec.dtype} has no safetensors code")
        size = spec.numel() * spec.element_size()
        header[name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % ALIGN)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str | Path, specs: Mapping[str, torch.Tensor],
                      produce: Callable[[str], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``path`` holding one tensor per name of ``specs`` (tensors, meta ones allowed,
    giving each one's shape and dtype); ``produce(name)`` gives the tensor's values when its
    turn comes and must match its spec (ValueError otherwise)."""
    with open(path, "wb") as handle:
        handle.write(header_bytes(specs, metadata))
        for name in tensor_order(specs):
            tensor = produce(name)
            spec = specs[name]
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
                raise ValueError(f"tensor {name}: produced {tensor.dtype} "
                                 f"{tuple(tensor.shape)}, announced {spec.dtype} "
                                 f"{tuple(spec.shape)}")
            if tensor.numel():
                flat = tensor.detach().to("cpu").contiguous().reshape(-1)
                handle.write(memoryview(flat.view(torch.uint8).numpy()))
