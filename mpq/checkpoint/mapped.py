"""An artifact's tensors as views of its memory-mapped tensor files (no copy).

``mpq.load`` reads through this: a tensor's pages are read from the file when first touched and
belong to the page cache, so the loaded model holds no second, anonymous copy of the artifact,
and pages that are no longer needed (the stored codes of a layer packed for a kernel) can be
handed back to the kernel (mpq.memory.page_out) and come back from the file if ever read
again.  The mapping is private (MAP_PRIVATE): writing to a tensor copies its page and never
changes the file.  As with any memory-mapped file, truncating the file while the model is in
use makes reads fail.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mpq.errors import ArtifactError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)


def _header(file: Path) -> tuple[dict, int]:
    """The safetensors header of ``file`` and where its data begins."""
    try:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{file} is unreadable or corrupt: {exc}",
                            hint="re-run mpq quantize") from exc
    if not isinstance(header, dict):
        raise ArtifactError(f"{file}: the safetensors header is not an object",
                            hint="re-run mpq quantize")
    return header, 8 + length


def _view(storage: torch.UntypedStorage, begin: int, entry: dict, where: str) -> torch.Tensor:
    try:
        dtype = DTYPES[entry["dtype"]]
        start, end = (int(x) for x in entry["data_offsets"])
        shape = tuple(int(x) for x in entry["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: unreadable tensor entry ({exc})",
                            hint="re-run mpq quantize") from None
    size = torch.empty((), dtype=dtype).element_size()
    offset = begin + start
    if end - start != math.prod(shape) * size or offset + (end - start) > storage.nbytes():
        raise ArtifactError(f"{where}: its byte range does not match its shape {shape} and "
                            f"dtype", hint="the file is damaged; re-run mpq quantize")
    if offset % size:  # not aligned to its element size: copy its bytes once
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, (end - start,))
        return raw.clone().view(dtype).reshape(shape)
    return torch.empty(0, dtype=dtype).set_(storage, offset // size, shape)


def map_tensors(artifact) -> dict[str, torch.Tensor]:
    """Every tensor of the opened artifact (mpq.checkpoint.native.Artifact) as a view of its
    memory-mapped file."""
    tensors = {}
    for file in artifact.files:
        header, begin = _header(file)
        nbytes = file.stat().st_size
        if nbytes <= begin:
            raise ArtifactError(f"{file} is truncated", hint="re-run mpq quantize")
        storage = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=nbytes)
        for key, entry in header.items():
            if key != "__metadata__":
                tensors[key] = _view(storage, begin, entry, f"{file}: tensor '{key}'")
    return tensors
