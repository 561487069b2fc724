"""The block engine: walks a model's decoder blocks and quantizes each one's layers.

For each decoder block in order: collect the statistics its layers' quantizers declare they need
(hooks on the block's linears while the block runs on the calibration inputs; the same passes
feed the input outlier statistics of the calibration coverage report, kept in the run log under
``input_outliers``), quantize every planned layer, write the dequantized weights back (so the
error propagates), and re-run the block to produce the next block's inputs.  Only one block's activations are held at a time.  A
quantized input embedding (RTN only: a table needs no statistics) is quantized first, so the
calibration inputs of block 0 already carry its error; the output head last, with the whole
model run for its statistics when it needs some (a tied head sharing the embedding's scheme
reuses the embedding's quantized tensor: mpq.config.tying).  When no
planned quantizer needs statistics, no calibration forward pass runs at all.  Streaming,
resume, transforms, KV-cache calibration and stopping on signals attach to the lifecycle
events of mpq.engine.lifecycle as hooks.
"""
from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from mpq.calibration.coverage import OUTLIER_STAT, outlier_record
from mpq.config.plan import LayerPlan
from mpq.engine.block_tuning import tune_block, tuned_layers
from mpq.engine.collect import StopForward, collecting, input_groups, results, run_block, to_device
from mpq.engine.expert_steps import expert_steps
from mpq.engine.lifecycle import BlockTurn, RunHook, RunState
from mpq.engine.replay import BlockReplay
from mpq.engine.solve import quantize_layer, solve_step
from mpq.memory import page_out, release_free_memory
from mpq.models.layout import ModelLayout, blocks_of
from mpq.numerics.base import QuantizedWeight


def batch_samples(samples: list[torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    """Stack consecutive samples ([1, L] each) of equal length into batches of at most
    ``max_tokens`` tokens, keeping their order.  The first batch holds one sample: the probes
    that learn a block's structure (collect.input_groups, replay.BlockReplay.probe) run on it."""
    batches: list[list[torch.Tensor]] = []
    for ids in samples:
        last = batches[-1] if len(batches) > 1 else None
        if (last and last[0].shape[-1] == ids.shape[-1]
                and (len(last) + 1) * ids.shape[-1] <= max_tokens):
            last.append(ids)
        else:
            batches.append([ids])
    return [torch.cat(batch) for batch in batches]


def capture_block_inputs(model: nn.Module, layout: ModelLayout,
                         samples: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """Run the model up to block 0 for each sample (or batch of samples); return the
    (args, kwargs) block 0 received for each."""
    first = blocks_of(model, layout)[0]
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, dict(kwargs)))
        raise StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for ids in samples:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_blocks(run: RunState, samples: list[torch.Tensor] | None, *,
               batch_tokens: int = 2048, hooks: Sequence[RunHook] = ()
               ) -> dict[str, QuantizedWeight]:
    """Quantize every planned layer of ``run.model`` in place (weights become their dequantized
    values) and return the QuantizedWeight of each (on CPU; ``run.qweights``); per-layer results
    go into ``run.log``.  ``hooks`` attach to the lifecycle events (mpq.engine.lifecycle).

    ``run.true_sequential``: inside a block, layers are quantized in steps of execution order
    (layers sharing an input form one step), each step's statistics collected with its
    predecessors already quantized.  ``run.device``: where each block runs while it is
    processed; the model stays on CPU and one block at a time is moved.
    ``run.offload_activations``: the calibration activations (each block's inputs, replay
    records) stay in host memory and each batch visits the device only while a block runs on it.
    ``batch_tokens``: calibration samples of equal length run through a block in batches of up
    to this many tokens (statistics are sums over tokens, so only float rounding differs).
    Weight pages of the source checkpoint are paged out while not in use (mpq.memory.page_out).
    A hook that releases a finished block (streaming) also drops its QuantizedWeights: they
    are in the work directory then.
    """
    plan, events, ranks = run.plan, run.events, run.ranks
    blocks = blocks_of(run.model, run.layout)
    by_block: dict[int | None, list[LayerPlan]] = {}
    for layer in plan.quantized():
        by_block.setdefault(layer.block, []).append(layer)
    events("start", blocks=len(blocks), layers=len(plan.quantized()),
           calibration_passes=bool(run.needs), streaming=run.streamed)
    started = time.perf_counter()
    outside = [layer for layer in by_block.get(None, []) if not layer.embedding]
    embeddings = [layer for layer in by_block.get(None, []) if layer.embedding]
    if any(layer.name in run.needs for layer in outside):  # the whole model runs for them
        run.keep_dequantized = True
    with torch.inference_mode():
        for layer in embeddings:  # before block 0's inputs are captured
            run.qweights[layer.name] = quantize_layer(run, layer, {})
            events("layer", name=layer.name, block=None, **run.log.result(layer.name))
        inputs = None
        if run.needs_calibration_pass:
            batches = batch_samples(samples, batch_tokens)
            if ranks is not None:  # this process's share of the calibration tokens
                batches = ranks.share(batches, weights=[b.numel() for b in batches])
            inputs = to_device(capture_block_inputs(run.model, run.layout, batches),
                               "cpu" if run.offload_activations else run.device)
            page_out(run.model.parameters())  # each block's weights return when it is processed
        for index, block in enumerate(blocks):
            turn = BlockTurn(index=index, module=block,
                             prefix=f"{run.layout.blocks_path}.{index}.",
                             layers=by_block.get(index, []), inputs=inputs,
                             last=index + 1 == len(blocks))
            inputs = _run_block_turn(run, turn, hooks)
        inputs = None
        outside_samples = samples if ranks is None or not samples else ranks.share(samples)
        run.qweights.update(_quantize_outside_blocks(run, outside, outside_samples))
    events("done", seconds=time.perf_counter() - started)
    return run.qweights


def _run_block_turn(run: RunState, turn: BlockTurn, hooks: Sequence[RunHook]):
    """One block through the lifecycle; returns the next block's inputs (None after the last)."""
    for hook in hooks:
        hook.before_block(run, turn)
    replay = None
    if not turn.restored:
        run.events("block_start", index=turn.index, layers=len(turn.layers))
        turn.module.to(run.device)
        for hook in hooks:
            hook.block_start(run, turn)
        tuned = tuned_layers(turn.layers)  # block-level quantizers: mpq.engine.block_tuning
        replay = (BlockReplay.probe(turn.module, turn.inputs) if turn.inputs is not None
                  and run.true_sequential and run.reuse and not tuned else None)
        if tuned:
            rest = replace(turn, layers=[l for l in turn.layers if l not in tuned])
            tune_block(run, turn, tuned, lambda: _quantize_block(run, rest, None))
        else:
            _quantize_block(run, turn, replay)
    inputs = _next_inputs(run, turn, replay, hooks)
    _finish_block(run, turn)
    for hook in reversed(hooks):
        hook.block_end(run, turn)
    return inputs


def _quantize_block(run: RunState, turn: BlockTurn, replay: BlockReplay | None) -> None:
    """Quantize the block's planned layers, step by step."""
    position = turn.index  # successive blocks start on successive ranks
    for step, stats in _block_steps(run, turn, replay):
        for layer, qw in zip(step, solve_step(run, step, stats, position)):
            run.qweights[layer.name] = qw
            run.events("layer", name=layer.name, block=turn.index, **run.log.result(layer.name))
        position += len(step)


def _next_inputs(run: RunState, turn: BlockTurn, replay: BlockReplay | None,
                 hooks: Sequence[RunHook]):
    """The next block's inputs from this (final) block, with the hooks that watch the pass
    (their passes run the whole block, without replay).  None after the last block."""
    if turn.inputs is None:
        return None
    watchers = [cm for cm in (hook.final_pass(run, turn) for hook in hooks) if cm is not None]
    if watchers:
        with ExitStack() as stack:
            for watcher in watchers:
                stack.enter_context(watcher)
            return run_block(turn.module, turn.inputs, in_place=True, keep_outputs=not turn.last)
    if turn.last:
        return None
    if replay is not None:
        return replay.final_pass(turn.inputs)
    return run_block(turn.module, turn.inputs, in_place=True)


def _finish_block(run: RunState, turn: BlockTurn) -> None:
    """Move the block back to CPU, drop its dequantized weights unless kept, free memory."""
    turn.module.to("cpu")
    if not run.keep_dequantized:
        for key in dict.fromkeys(layer.weight_key for layer in turn.layers):
            weight = run.model.get_parameter(key)  # fused experts: once for all their slices
            weight.data = torch.empty(0, dtype=weight.dtype)
    page_out(turn.module.parameters())
    release_free_memory()
    run.events("block_done", index=turn.index)


def _block_steps(run: RunState, turn: BlockTurn, replay: BlockReplay | None):
    """Yield (layers to quantize now, their statistics) for one block, in order."""
    block, prefix, inputs = turn.module, turn.prefix, turn.inputs
    layers = [l for l in turn.layers if l.expert is None]
    experts = [l for l in turn.layers if l.expert is not None]  # last: they end MoE blocks
    block_wanted = {l.name: run.needs[l.name] for l in layers if l.name in run.needs}
    if not block_wanted:
        if layers:
            yield layers, {}
        yield from expert_steps(run, turn, experts)
        return
    by_name = {l.name: l for l in layers}
    groups = input_groups(block, {n[len(prefix):]: n for n in by_name}, inputs[0])
    steps = groups if run.true_sequential else [[n for g in groups for n in g]]
    for step in steps:
        # the calibration coverage report's outlier statistics ride on passes that run anyway
        step_wanted = {n: block_wanted[n] | {OUTLIER_STAT} for n in step if n in block_wanted}
        stats = {}
        if step_wanted:
            last = [n for n in step if n in step_wanted][-1]
            with (replay.calibration_pass(block.get_submodule(last[len(prefix):]))
                  if replay else nullcontext()):
                with collecting(block, prefix, step_wanted, groups, stop_after=last,
                                reference=run.reference_inputs) as collectors:
                    run_block(block, inputs, keep_outputs=False)
            stats = results(collectors, run.ranks)
            for name, per_stat in stats.items():  # kept in the log (resume, other processes)
                run.log.result(name)[OUTLIER_STAT] = outlier_record(per_stat.pop(OUTLIER_STAT))
            release_free_memory()  # the pass's temporaries
        yield [by_name[n] for n in step], stats
    yield from expert_steps(run, turn, experts)


def _quantize_outside_blocks(run: RunState, layers: list[LayerPlan], samples):
    """Layers outside the decoder blocks (e.g. lm_head), with the whole model run for stats."""
    outside_wanted = {l.name: run.needs[l.name] for l in layers if l.name in run.needs}
    stats = {}
    if outside_wanted:
        groups = [[name] for name in outside_wanted]
        with collecting(run.model, "", outside_wanted, groups) as collectors:
            for ids in samples:
                run.model(input_ids=ids, use_cache=False)
        stats = results(collectors, run.ranks)
    qweights = {}
    for layer in layers:
        source = run.plan.shared_with(layer.name)
        if source is not None:  # the tied head: the embedding's tensor, already in the model
            qweights[layer.name] = run.qweights[source]
            run.log.result(layer.name).update({**run.log.result(source), "shared_with": source})
        else:
            qweights[layer.name] = quantize_layer(run, layer, stats.get(layer.name, {}))
        run.events("layer", name=layer.name, block=None, **run.log.result(layer.name))
    return qweights
