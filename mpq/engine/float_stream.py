"""The float model's block inputs, carried beside the quantized ones for paired statistics.

GPTQ with error feedback (GPTAQ, mpq.quantizers.gptq) compares each layer's inputs in the
partially quantized model with its inputs in the float model on the same tokens (statistic
``float_cross``).  The engine's calibration stream holds the quantized model's block inputs only;
this module keeps a second stream, the float model's, and before a block's layers are collected
it runs the *float* block on it, recording the inputs of every layer that needs them (one tensor
per calibration batch, in ``RunState.reference_inputs``) and the float stream's next block inputs.
That doubles the activation memory, so the hooks exist only when some layer needs a paired
statistic (:func:`float_stream_hooks`) or the float block outputs themselves: tuned rounding
with error feedback (mpq.quantizers.autoround) targets them, and for such a run the float
block's outputs are kept in ``RunState.reference_outputs`` during the block's turn (the last
block's too).

Two hooks share one :class:`FloatStream` and sit at two places of the hook list:

- ``before`` (before the resume hook, after a streamer): ``before_block`` runs the block while
  its weights are still float, even when the resume hook is about to restore its quantized
  weights; without transforms this one pass also records the layers' inputs;
- ``after`` (after the transform hook): with transforms, ``block_start`` records the layers'
  inputs in a second pass over the transformed float block (the inputs of the layers change
  with the transform, its block output does not); ``block_end`` moves the stream on.

The stream starts from block 0's calibration inputs, which already carry an input embedding the
plan quantizes (RTN, before them): that error is not corrected.  Layers outside the blocks and
fused experts cannot ask for paired statistics (:func:`check_paired`, at plan time).
"""
from __future__ import annotations

from torch import nn

from mpq.config.plan import Plan
from mpq.engine.collect import BlockInputs, inputs_device, run_block
from mpq.engine.lifecycle import BlockTurn, RunHook, RunState
from mpq.engine.stats import STATS
from mpq.errors import SchemeError
from mpq.quantizers.autoround import FLOAT_BLOCK_OUTPUT


def paired_layers(needs) -> list[str]:
    """The layers (of ``needs``: layer → statistic names) that need a paired statistic (a
    block-level algorithm's need, e.g. autoround's block outputs, is no collected statistic)."""
    return [name for name, stats in needs.items()
            if any(stat in STATS and getattr(STATS.get(stat), "paired", False)
                   for stat in stats)]


def target_layers(needs) -> list[str]:
    """The layers (of ``needs``) tuned against the float model's block outputs."""
    return [name for name, stats in needs.items() if FLOAT_BLOCK_OUTPUT in stats]


def check_paired(plan: Plan, needs) -> None:
    """SchemeError for a layer outside the decoder blocks, or a fused expert, whose algorithm
    asks for a statistic compared with the float model (the float stream covers the blocks'
    ordinary linears only)."""
    for name in paired_layers(needs):
        layer = plan.get(name)
        if layer.block is None or layer.expert is not None:
            where = "outside the decoder blocks" if layer.block is None else "a fused expert"
            raise SchemeError(f"{name}: error feedback needs the float model's inputs of the "
                              "layer, which are carried for the linears inside the decoder "
                              f"blocks only (this layer is {where})",
                              hint=f"give {name} a rule without error_feedback")


def _copy(inputs: BlockInputs) -> BlockInputs:
    """``inputs`` with their hidden states cloned (passes overwrite those in place)."""
    out = []
    for args, kwargs in inputs:
        if args:
            out.append(((args[0].clone(), *args[1:]), kwargs))
        else:
            out.append(((), {**kwargs, "hidden_states": kwargs["hidden_states"].clone()}))
    return out


class FloatStream:
    """The float model's inputs of the current block, the layers that read them, and whether
    the block's float outputs are the run's targets (``targets``)."""

    def __init__(self, layers: list[str], targets: bool = False) -> None:
        self.layers = set(layers)
        self.targets = targets
        self.inputs: BlockInputs | None = None
        self.next: BlockInputs | None = None

    def block_float(self, run: RunState, turn: BlockTurn) -> None:
        """The block with float weights: the next inputs, and without transforms the layers'."""
        if turn.inputs is None:
            return
        if self.inputs is None:
            self.inputs = _copy(turn.inputs)
        turn.module.to(run.device)
        keep = self.targets or not turn.last
        if run.plan.transforms:  # layers' inputs after the transforms: at block_start
            self.next = run_block(turn.module, self.inputs) if keep else None
        else:
            with self._recording(run, turn):
                self.next = run_block(turn.module, self.inputs, in_place=True,
                                      keep_outputs=keep)
        if self.targets:
            run.reference_outputs = self.next

    def record(self, run: RunState, turn: BlockTurn) -> None:
        """The layers' inputs from the (transformed) float block, before it is quantized."""
        if turn.inputs is None or not run.plan.transforms or not self.layers:
            return
        with self._recording(run, turn):
            run_block(turn.module, self.inputs, keep_outputs=False)

    def advance(self, run: RunState) -> None:
        self.inputs, self.next = self.next, None
        run.reference_inputs.clear()
        run.reference_outputs = None

    def _recording(self, run: RunState, turn: BlockTurn):
        names = {name[len(turn.prefix):]: name for name in
                 (layer.name for layer in turn.layers) if name in self.layers}
        return _Recorder(turn.module, names, inputs_device(self.inputs), run.reference_inputs)


class _Recorder:
    """Forward pre-hooks keeping each named layer's input per call (layers reading one tensor
    share the kept copy)."""

    def __init__(self, block: nn.Module, names: dict[str, str], home, into: dict) -> None:
        self.block, self.names, self.home, self.into = block, names, home, into
        self.handles = []
        self.last = (None, None)  # the tensor last seen and its kept copy

    def __enter__(self):
        for full in self.names.values():
            self.into[full] = []
        for local, full in self.names.items():
            self.handles.append(self.block.get_submodule(local).register_forward_pre_hook(
                self._hook(full)))
        return self

    def _hook(self, full: str):
        def keep(module, args):
            x = args[0]
            if self.last[0] is not x:
                self.last = (x, x.detach().to(self.home, copy=True))
            self.into[full].append(self.last[1])
        return keep

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.last = (None, None)
        return False


class _Before(RunHook):
    def __init__(self, stream: FloatStream) -> None:
        self.stream = stream

    def before_block(self, run: RunState, turn: BlockTurn) -> None:
        self.stream.block_float(run, turn)


class _After(RunHook):
    def __init__(self, stream: FloatStream) -> None:
        self.stream = stream

    def block_start(self, run: RunState, turn: BlockTurn) -> None:
        self.stream.record(run, turn)

    def block_end(self, run: RunState, turn: BlockTurn) -> None:
        self.stream.advance(run)


def float_stream_hooks(needs) -> tuple[list[RunHook], list[RunHook]]:
    """(hooks to put before the resume hook, hooks to put after the transform hook) carrying
    the float stream; both empty when no layer of ``needs`` needs a paired statistic or the
    float block outputs."""
    layers, targets = paired_layers(needs), bool(target_layers(needs))
    if not layers and not targets:
        return [], []
    stream = FloatStream(layers, targets)
    return [_Before(stream)], [_After(stream)]
