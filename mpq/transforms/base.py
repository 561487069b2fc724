"""The transform contract and registry.

A transform is looked up by the recipe's ``type`` and gets the recipe's other keys as options.
``check(options)`` runs at plan time and raises SchemeError for unknown or bad options;
``select_groups(groups, options)`` says which of a block's exact scale groups it would use, so
a plan on a model that gives it none is refused instead of running as a no-op.
``apply(ctx, options)`` runs once per decoder block, before that block's layers are quantized,
on the block's calibration inputs; it edits the block's weights in place and returns a JSON-able
record of what it did, which goes into the run log (``log.transforms[i]``) and the artifact.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch
from torch import nn

from mpq.config.plan import LayerPlan
from mpq.registry import Registry


class BlockContext(Protocol):
    """What a transform sees of one decoder block (the engine provides it,
    mpq.engine.block_transforms)."""

    model: nn.Module
    block: nn.Module
    index: int
    prefix: str  # full-name prefix of the block's modules, e.g. "model.layers.3."
    layers: Mapping[str, LayerPlan]  # the block's quantized layers by full name

    def input_groups(self, names: list[str]) -> list[list[str]]:
        """The layers ``names`` (full names) grouped by the input they read, in execution
        order (mpq.engine.collect.input_groups)."""
        ...

    def collect(self, wanted: Mapping[str, frozenset[str]], groups: list[list[str]]
                ) -> dict[str, dict[str, torch.Tensor]]:
        """Run the block on its calibration inputs and return the statistics ``wanted`` (layer
        → statistic names, mpq.engine.stats) of each layer; layers in one of ``groups`` share
        their collectors."""
        ...


class BlockTransform(Protocol):
    name: str
    needs_calibration: bool

    def check(self, options: Mapping[str, Any]) -> None: ...

    def select_groups(self, groups: list, options: Mapping[str, Any]) -> list:
        """The scale groups (mpq.models.family.ScaleGroup) of a block this transform folds
        with ``options``; the plan is refused when a model gives it none."""
        ...

    def apply(self, ctx: BlockContext, options: Mapping[str, Any]) -> dict[str, Any]: ...


TRANSFORMS: Registry[BlockTransform] = Registry("transform")
