"""The transform contract and registry.

A transform is looked up by the recipe's ``type`` and gets the recipe's other keys as options.
``check(options)`` runs at plan time and raises SchemeError for unknown or bad options.
``apply(ctx, options)`` runs once per decoder block, before that block's layers are quantized,
on the block's calibration inputs; it edits the block's weights in place and returns a JSON-able
record of what it did, which goes into the artifact's plan (``plan.transforms[i].applied``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from torch import nn

from mpq.engine.collect import BlockInputs
from mpq.config.plan import LayerPlan
from mpq.registry import Registry


@dataclass
class BlockContext:
    """What a transform sees of one decoder block."""

    model: nn.Module
    block: nn.Module
    index: int
    prefix: str  # full-name prefix of the block's modules, e.g. "model.layers.3."
    inputs: BlockInputs  # the block's calibration inputs
    layers: dict[str, LayerPlan]  # the block's quantized layers by full name


class BlockTransform(Protocol):
    name: str
    needs_calibration: bool

    def check(self, options: Mapping[str, Any]) -> None: ...

    def apply(self, ctx: BlockContext, options: Mapping[str, Any]) -> dict[str, Any]: ...


TRANSFORMS: Registry[BlockTransform] = Registry("transform")
