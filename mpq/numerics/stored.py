"""Reading stored tensors back: the presence, shape and dtype checks every native decoder makes.

A number format's ``decode`` takes its tensors through :func:`take`, so a damaged or foreign
artifact fails with an :class:`ArtifactError` naming the tensor, never with a torch error later.
"""
from __future__ import annotations

from typing import Mapping

import torch

from mpq.errors import ArtifactError

FLOAT_SCALES = (torch.float32, torch.float16, torch.bfloat16)  # accepted for fp32 scales


def take(tensors: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...],
         dtypes: tuple[torch.dtype, ...], prefix: str) -> torch.Tensor:
    """tensors[key], checked for presence, shape and dtype (``prefix`` names the layer)."""
    name = f"{prefix}{key}"
    if key not in tensors:
        raise ArtifactError(f"missing tensor '{name}'",
                            hint="the artifact is incomplete or from another mpq version; "
                                 "re-run mpq quantize")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise ArtifactError(f"tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}",
                            hint="the tensors do not match the recipe/plan stored with them")
    if t.dtype not in dtypes:
        raise ArtifactError(f"tensor '{name}' has dtype {t.dtype}, expected "
                            f"{' or '.join(str(d) for d in dtypes)}")
    return t
