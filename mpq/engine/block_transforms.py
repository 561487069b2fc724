"""The recipe's block transforms (``transforms:``) as an engine hook: each one rewrites a block's
float weights at ``block_start``, on the block's calibration inputs, before its layers are
quantized, and its record goes into the run log (one per block)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from mpq.config.plan import LayerPlan
from mpq.engine.collect import BlockInputs, collecting, input_groups, results, run_block
from mpq.engine.lifecycle import BlockTurn, RunHook, RunState
from mpq.models.experts import NO_SMOOTHING
from mpq.transforms.base import TRANSFORMS


@dataclass
class EngineBlockContext:
    """mpq.transforms.base.BlockContext over one block's turn in the engine."""

    model: nn.Module
    block: nn.Module
    index: int
    prefix: str
    layers: Mapping[str, LayerPlan]
    inputs: BlockInputs

    def input_groups(self, names: list[str]) -> list[list[str]]:
        local = {name[len(self.prefix):]: name for name in names}
        return input_groups(self.block, local, self.inputs[0])

    def collect(self, wanted: Mapping[str, frozenset[str]], groups: list[list[str]]
                ) -> dict[str, dict[str, torch.Tensor]]:
        with collecting(self.block, self.prefix, dict(wanted), groups) as collectors:
            run_block(self.block, self.inputs, keep_outputs=False)
        return results(collectors)


class TransformHook(RunHook):
    """Applies the plan's transforms, in order, to every block this run quantizes."""

    def block_start(self, run: RunState, turn: BlockTurn) -> None:
        if turn.inputs is None or not run.plan.transforms:
            return
        experts = [layer for layer in turn.layers if layer.expert is not None]
        ctx = EngineBlockContext(model=run.model, block=turn.module, index=turn.index,
                                 prefix=turn.prefix, inputs=turn.inputs,
                                 layers={layer.name: layer for layer in turn.layers
                                         if layer.expert is None})
        for spec, records in zip(run.plan.transforms, run.log.transforms):
            record = TRANSFORMS.get(spec.type).apply(ctx, spec.options)
            if experts:  # said in the record, not skipped in silence
                record["not_transformed"] = {"layers": len(experts), "reason": NO_SMOOTHING}
            records.append(record)
            run.events("transform", type=spec.type, **record)
