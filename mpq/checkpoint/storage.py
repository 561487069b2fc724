"""The dtype an artifact keeps its float tensors in (the recipe's ``storage_dtype``).

Tensors that stay in floating point (embeddings and a head left unquantized, norms, biases, ...)
are stored in one dtype, resolved before any weight is read (:func:`resolve_storage_dtype`):

- ``source`` (default): the source checkpoint's dtype, read from its safetensors headers: the
  floating-point dtype holding most of the stored elements (F32, BF16 or F16; F64 counts as
  F32, fp8 tensors are not counted).  The files win over config.json's ``torch_dtype``/``dtype``
  because they are what the checkpoint actually holds; config.json decides only when the files
  hold no float tensor, fp32 when it says nothing either.
- ``fp32`` / ``bf16`` / ``fp16``: that dtype.

The run computes in its load dtype (``--dtype``; config.json's ``dtype`` in the artifact stays
that one, so loaders compute as the run did and upcast the stored tensors).  Writers convert
each dense tensor when they produce it (:func:`stored_dense`, mpq.checkpoint.writers.dense_group):
a value the storage dtype cannot hold (fp16 beyond ±65504) raises :class:`RecipeError` before
anything is written; nothing is ever stored as inf.  Integer and fp8 tensors are left as they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from mpq.errors import RecipeError

STORAGE_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CODES = {"F32": "fp32", "F64": "fp32", "BF16": "bf16", "F16": "fp16"}
_CONFIG_NAMES = {"float32": "fp32", "float": "fp32", "float64": "fp32", "bfloat16": "bf16",
                 "float16": "fp16", "half": "fp16"}


def source_storage_dtype(path: Path, weight_map: Mapping[str, Path], config: dict) -> str:
    """The source checkpoint's float dtype name (see the module docstring)."""
    from mpq.models.stored_tensors import stored_tensors

    counts: dict[str, int] = {}
    for code, shape in stored_tensors(path, weight_map).values():
        name = _CODES.get(code)
        if name is not None:
            numel = 1
            for dim in shape:
                numel *= int(dim)
            counts[name] = counts.get(name, 0) + numel
    if counts:
        return max(counts, key=lambda name: (counts[name], name == "fp32"))
    value = config.get("torch_dtype") or config.get("dtype")
    if isinstance(value, str):
        return _CONFIG_NAMES.get(value.replace("torch.", ""), "fp32")
    return "fp32"


def resolve_storage_dtype(requested: str, path: Path, weight_map: Mapping[str, Path],
                          config: dict) -> str:
    """``requested`` (a recipe's storage_dtype) as fp32, bf16 or fp16."""
    if requested == "source":
        return source_storage_dtype(path, weight_map, config)
    return requested


def _keeps_own_dtype(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or tensor.dtype.itemsize == 1  # ints, fp8


def stored_dense(name: str, tensor: torch.Tensor, storage: str | None) -> torch.Tensor:
    """``tensor`` (state-dict ``name``) as the artifact stores it: in ``storage``'s dtype (None:
    as it is).  RecipeError when a finite value would overflow that dtype."""
    if storage is None or _keeps_own_dtype(tensor):
        return tensor
    dtype = STORAGE_TORCH[storage]
    if tensor.dtype == dtype:
        return tensor
    out = tensor.to(dtype)
    overflow = torch.isinf(out) & torch.isfinite(tensor)
    if bool(overflow.any()):
        worst = float(tensor[overflow].abs().max())
        raise RecipeError(f"storage_dtype {storage}: tensor '{name}' holds {worst:.6g}, beyond "
                          f"{storage}'s largest value {torch.finfo(dtype).max:.6g}",
                          hint="set storage_dtype: bf16 or fp32 in the recipe (a rerun resumes "
                               "the finished blocks)")
    return out


def storage_bytes(storage: str) -> int:
    """Bytes per element of a storage dtype name."""
    return STORAGE_TORCH[storage].itemsize
