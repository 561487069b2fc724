"""Deterministic safetensors headers.

The safetensors writer keeps ``__metadata__`` in a hash map, so the order of its keys (and so
the file's bytes) changes from run to run.  :func:`canonicalize_header` rewrites the header of a
written file with the metadata keys sorted, leaving the tensor entries and data untouched, so
the same inputs give byte-identical files.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

ALIGN = 8  # safetensors pads the header with spaces to a multiple of 8 bytes


def canonicalize_header(path: str | Path) -> None:
    path = Path(path)
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
            header = {"__metadata__": header.pop("__metadata__"), **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= length:  # same content, so the same length but for escaping choices
            handle.seek(8)
            handle.write(text + b" " * (length - len(text)))
            return
        data = handle.read()
    padded = text + b" " * (-len(text) % ALIGN)
    path.write_bytes(struct.pack("<Q", len(padded)) + padded + data)
