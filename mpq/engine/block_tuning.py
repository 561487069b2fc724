"""The block step for block-level quantizers (``block_level``, e.g. autoround): all of a block's
layers that use one are tuned together against the float block's output.

The runner calls :func:`tune_block` in place of its per-step quantization when a block has such
layers (after the block's transforms, on rotated weights).  In order:

1. the float block runs on the block's calibration inputs: its outputs are the targets (with
   ``error_feedback``, the float model's outputs of the block are, carried by the float stream
   in ``RunState.reference_outputs``);
2. ``quantize_rest`` quantizes the block's other planned layers the usual way (their weights are
   then fixed at their dequantized values);
3. the tuned layers' rounding is learnt (mpq.quantizers.autoround_solve) on mini-batches of
   calibration samples (runs of consecutive samples of one input batch, as many as a step
   takes; gradients accumulate over a step's runs), the block running through
   ``torch.func.functional_call`` on plain (autograd-capable) copies of its tensors, its
   inputs and its targets;
4. each tuned layer's QuantizedWeight is exported, its dequantized weight installed in the model
   and its results logged, as mpq.engine.solve does for the per-layer quantizers.

Deterministic: the sample order of block i is seeded with (options' seed, i), so a rerun gives
the same bytes on one machine and a resumed run continues exactly where the first one stopped.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from mpq.config.plan import LayerPlan, Plan
from mpq.engine.collect import BlockInputs, module_device, run_block, to_device
from mpq.engine.lifecycle import BlockTurn, RunState
from mpq.errors import CalibrationError, SchemeError
from mpq.models.layout import Conv1D, install_layer_weight, layer_weight
from mpq.quantizers.autoround import is_block_level
from mpq.quantizers.autoround_grid import TunedIntWeight
from mpq.quantizers.autoround_options import AutoRoundOptions
from mpq.quantizers.autoround_solve import sign_descent

def tuned_layers(layers: list[LayerPlan]) -> list[LayerPlan]:
    """The layers of ``layers`` whose quantizer is block-level."""
    return [layer for layer in layers if is_block_level(layer.scheme.algorithm)]


def check_plan(plan: Plan) -> None:
    """SchemeError (with the layer's name) for a block-level layer outside the decoder blocks,
    a fused MoE expert slice, or a block whose block-level layers disagree on options."""
    options: dict[int, tuple[str, tuple]] = {}
    for layer in tuned_layers(plan.quantized()):
        if layer.block is None:
            raise SchemeError(f"{layer.name}: {layer.scheme.algorithm} tunes decoder blocks; "
                              "this layer is outside them",
                              hint="give it a rule with algorithm: rtn or gptq")
        if layer.expert is not None:
            raise SchemeError(f"{layer.name}: {layer.scheme.algorithm} does not support fused "
                              "mixture-of-experts experts", hint="give the experts a rule with "
                              "algorithm: rtn or gptq")
        key = (layer.scheme.algorithm, layer.scheme.options)
        first = options.setdefault(layer.block, (layer.name, key))
        if first[1] != key:
            raise SchemeError(f"{layer.name}: block {layer.block}'s {layer.scheme.algorithm} "
                              f"layers must share one algorithm and options ({first[0]} has "
                              "others)", hint="use the same options for all of a block's layers")


def tune_block(run: RunState, turn: BlockTurn, tuned: list[LayerPlan],
               quantize_rest: Callable[[], None]) -> None:
    """Quantize ``tuned`` (layers of ``turn``) jointly; ``quantize_rest`` quantizes the block's
    other layers once the float targets are taken (see the module docstring)."""
    if run.ranks is not None:
        raise SchemeError(f"{tuned[0].scheme.algorithm} is not supported across several "
                          "processes yet", hint="run it in one process (without torchrun)")
    block, inputs = turn.module, turn.inputs
    opts = AutoRoundOptions.from_scheme(tuned[0].scheme)
    targets = _targets(run, block, inputs, opts)
    quantize_rest()
    units = _units(inputs, opts.batch_size)
    per_step = -(-opts.batch_size // max(len(rows) for _, rows in units))
    with torch.inference_mode(False), torch.enable_grad():
        weights = [TunedIntWeight(_plain(layer_weight(run.model, layer.name, None)),
                                  layer.scheme.weights, clip=opts.clip) for layer in tuned]
        step_loss = _step_loss(block, turn.prefix, tuned, weights, units, inputs, targets)
        result = sign_descent(weights, step_loss, len(units), per_step, opts,
                              seed=opts.seed * 1_000_003 + turn.index)
        info = {"autoround_iters": result.iters}
        if result.iters:
            info.update(autoround_init_loss=result.init_loss, autoround_loss=result.best_loss,
                        autoround_best_iter=result.best_iter)
        qweights = [w.export(info) for w in weights]
    del targets
    for layer, qw in zip(tuned, qweights):
        _install(run, turn, layer, qw)


def _targets(run: RunState, block: nn.Module, inputs: BlockInputs,
             opts: AutoRoundOptions) -> BlockInputs:
    """The float block's outputs on the block's inputs (its layers are not quantized yet), or
    with error feedback the float model's outputs of the block."""
    if not opts.error_feedback:
        return run_block(block, inputs)
    targets = run.reference_outputs
    if targets is None or len(targets) != len(inputs):
        raise CalibrationError("autoround error_feedback needs the float model's outputs of "
                               "the block, which this run does not carry",
                               hint="run it with calibration data in an mpq quantize run")
    return targets


Unit = tuple[int, range]  # an input batch's index and some of its rows (samples)


def _units(inputs: BlockInputs, batch_size: int) -> list[Unit]:
    """The calibration inputs cut into runs of at most ``batch_size`` consecutive samples of
    one input batch: what one forward pass of a step takes."""
    units = []
    for index, (args, kwargs) in enumerate(inputs):
        size = _hidden(args, kwargs).shape[0]
        units.extend((index, range(start, min(start + batch_size, size)))
                     for start in range(0, size, batch_size))
    return units


def _step_loss(block: nn.Module, prefix: str, tuned: list[LayerPlan],
               weights: list[TunedIntWeight], units: list[Unit], inputs: BlockInputs,
               targets: BlockInputs):
    """The closure sign_descent calls: mean squared error over the step's units, backward.
    The quantizer's graph is built once per step; each unit's forward and backward stop at the
    dequantized weights, whose gradients are then sent through it."""
    state = {name: _plain(t) for name, t in
             [*block.named_parameters(remove_duplicate=False),
              *block.named_buffers(remove_duplicate=False)]}
    device = module_device(block)
    keys, transposed = [], []
    for layer in tuned:
        local = layer.name[len(prefix):]
        keys.append(f"{local}.weight")
        transposed.append(isinstance(block.get_submodule(local), Conv1D))
    dtype = state[keys[0]].dtype

    def piece(records: BlockInputs, unit: Unit):
        index, rows = unit
        args, kwargs = records[index]
        return _rows((args, kwargs), _hidden(args, kwargs).shape[0], rows)

    def step_loss(indices: list[int]) -> float:
        fakes = [w.dequantized() for w in weights]
        leaves = [f.detach().to(dtype).requires_grad_() for f in fakes]
        tensors = {key: (leaf.t() if t else leaf)
                   for key, leaf, t in zip(keys, leaves, transposed)}
        count = sum(_hidden(*piece(targets, units[i])).numel() for i in indices)
        total = 0.0
        for i in indices:
            args, kwargs = _plain(to_device(piece(inputs, units[i]), device))
            out = functional_call(block, {**state, **tensors}, args, kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            target = _hidden(*piece(targets, units[i])).to(hidden.device)
            loss = (hidden.float() - target.float()).pow(2).sum() / count
            loss.backward()
            total += float(loss.detach())
        torch.autograd.backward(fakes, [leaf.grad.to(f.dtype) for f, leaf in zip(fakes, leaves)])
        return total

    return step_loss


def _install(run: RunState, turn: BlockTurn, layer: LayerPlan, qw) -> None:
    """Install ``layer``'s dequantized weight, keep its QuantizedWeight, log its results."""
    weight = layer_weight(run.model, layer.name, None).detach().float()
    dequantized = qw.dequantize(torch.float32)
    result = run.log.result(layer.name)
    result.update(qw.info)
    result["rel_mse"] = float(((weight - dequantized).pow(2).sum()
                               / weight.pow(2).sum().clamp_min(1e-30)))
    install_layer_weight(run.model, layer.name, None, dequantized.to(weight.device))
    run.qweights[layer.name] = qw.to("cpu")
    run.events("layer", name=layer.name, block=turn.index, **result)


def _rows(obj, size: int, rows: range):
    """``obj`` (nested args/kwargs) for some samples of a batch of ``size``: tensors of 2 or
    more dimensions whose first one is the batch size are cut; the others, shared by the batch,
    are kept as they are."""
    if len(rows) == size:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj[rows.start:rows.stop] if obj.dim() >= 2 and obj.shape[0] == size else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rows(item, size, rows) for item in obj)
    if isinstance(obj, dict):
        return {key: _rows(value, size, rows) for key, value in obj.items()}
    return obj


def _plain(obj):
    """Copies of the tensors in ``obj`` that autograd may use (calibration tensors are made in
    inference mode, which autograd refuses to save)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(item) for item in obj)
    if isinstance(obj, dict):
        return {key: _plain(value) for key, value in obj.items()}
    return obj


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]
