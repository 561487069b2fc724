"""The block engine's state and the lifecycle events that hooks attach to.

The runner (mpq.engine.runner) walks the decoder blocks; everything that is not quantizing a
block's layers attaches to its events as a :class:`RunHook`: reading a streamed block from the
source files and releasing it (mpq.engine.streaming), saving and restoring finished blocks
(mpq.engine.resume), block transforms (mpq.engine.block_transforms), KV-cache calibration
(mpq.engine.kv_calibration) and stopping on a signal (mpq.engine.interrupt).

For each block, in order:

1. ``before_block`` (hooks in order): the block's weights become available; a hook may restore a
   finished block instead of quantizing it (``turn.restored``).
2. ``block_start`` (hooks in order, blocks being quantized only): the block is on its device
   with its calibration inputs; a hook may rewrite its float weights.
3. the runner quantizes the block's layers, step by step.
4. ``final_pass`` (hooks in order): context managers around the pass that computes the next
   block's inputs with this block final (they see the real attention, not a replay).
5. ``block_end`` (hooks in reverse order): the block is back on the host and finished.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from mpq.config.plan import LayerPlan, Plan
from mpq.config.run_log import RunLog
from mpq.engine.collect import BlockInputs
from mpq.engine.distributed import Ranks
from mpq.models.layout import ModelLayout
from mpq.numerics.base import QuantizedWeight

Events = Callable[..., None]


def no_events(kind: str, **data: Any) -> None:
    return None


def calibration_pass_needed(plan: Plan, needs: Mapping[str, frozenset[str]]) -> bool:
    """Whether a run of ``plan`` runs calibration data through the blocks: some layer needs
    statistics, or the plan has transforms or KV-cache scales to calibrate (a dynamic KV scheme
    has none)."""
    return bool(needs or plan.transforms or (plan.kv_cache and plan.kv_cache.calibrated))


@dataclass
class RunState:
    """One run of the engine: the model (quantized in place), its plan, what the run produced
    (``log``, ``qweights`` on CPU) and how to run.

    ``needs``: layer → the statistics it needs (mpq.engine.spec.needed_stats); ``ranks``: the
    processes of a torchrun run (None: one process); ``keep_dequantized``: keep each finished
    block's dequantized weights (else emptied; the QuantizedWeights hold them); ``reuse``:
    replay the finished parts of a block in true-sequential passes (mpq.engine.replay).
    """

    model: nn.Module
    layout: ModelLayout
    plan: Plan
    log: RunLog
    needs: Mapping[str, frozenset[str]]
    device: torch.device = torch.device("cpu")
    events: Events = no_events
    ranks: Ranks | None = None
    true_sequential: bool = True
    reuse: bool = True
    offload_activations: bool = False
    keep_dequantized: bool = True
    streamed: bool = False  # blocks are read from the source files in turn (mpq.engine.streaming)
    qweights: dict[str, QuantizedWeight] = field(default_factory=dict)
    # layer → the float model's inputs of the current block's layer, per calibration batch
    # (mpq.engine.float_stream; only for layers whose statistics compare with the float model)
    reference_inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    # the float model's outputs of the current block (its next inputs), when a block-level
    # quantizer targets them (autoround's error_feedback; mpq.engine.float_stream)
    reference_outputs: BlockInputs | None = None

    @property
    def needs_calibration_pass(self) -> bool:
        """Whether calibration data runs through the blocks (statistics, transforms, KV)."""
        return calibration_pass_needed(self.plan, self.needs)

    @property
    def writer(self) -> bool:
        """Whether this process writes (the only one, or rank 0)."""
        return self.ranks is None or self.ranks.writer


@dataclass
class BlockTurn:
    """One decoder block's turn: ``layers`` are its planned quantized layers, ``inputs`` its
    calibration inputs (None when no calibration pass runs), ``restored`` is set by a hook that
    put back a block finished by an earlier run."""

    index: int
    module: nn.Module
    prefix: str  # full-name prefix of the block's modules, e.g. "model.layers.3."
    layers: list[LayerPlan]
    inputs: BlockInputs | None
    last: bool
    restored: bool = False


class RunHook:
    """Base of the engine's hooks: every event does nothing unless overridden."""

    def before_block(self, run: RunState, turn: BlockTurn) -> None:
        return None

    def block_start(self, run: RunState, turn: BlockTurn) -> None:
        return None

    def final_pass(self, run: RunState, turn: BlockTurn) -> AbstractContextManager | None:
        """A context manager around the next-inputs pass (None: this hook does not watch it)."""
        return None

    def block_end(self, run: RunState, turn: BlockTurn) -> None:
        return None
