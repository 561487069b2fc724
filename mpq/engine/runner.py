"""The layer-by-layer quantization pipeline: the only code that walks a model.

For each decoder block in order: collect the statistics its layers' quantizers declare they need
(hooks on the block's linears while the block runs on the calibration inputs), quantize every
planned layer, write the dequantized weights back (so the error propagates), and re-run the block
to produce the next block's inputs.  Only one block's activations are held at a time.  When no
planned quantizer needs statistics, no calibration forward pass runs at all.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import nn

from mpq.models.layout import ModelLayout, blocks_of, set_weight, weight_of
from mpq.engine.collect import (StopForward, collecting, input_groups, results, run_block,
                         to_device)
from mpq.engine.distributed import check_supported as check_distributed_support
from mpq.engine.distributed import current as current_ranks
from mpq.errors import Interrupted, SchemeError
from mpq.engine.interrupt import StopRequest
from mpq.memory import page_out, release_free_memory
from mpq.config.plan import LayerPlan, Plan
from mpq.numerics.base import QuantizedWeight
from mpq.quantizers.base import QUANTIZERS
from mpq.numerics.activations import FP8_MAX, static_scale
from mpq.engine.replay import BlockReplay
from mpq.engine.resume import Checkpoint
from mpq.engine.spec import needed_stats
from mpq.transforms.base import TRANSFORMS, BlockContext
from mpq.quantizers.kv_cache import KVObserver, attach_kv_quantization
from mpq.config.kv_cache import KVCacheArgs
from mpq.models.attention import attention_modules, tap_kv

Events = Callable[..., None]


def no_events(kind: str, **data: Any) -> None:
    return None


def untie_head_if_quantized(model: nn.Module, layout: ModelLayout, plan: Plan) -> bool:
    """Give a quantized output head its own weight when it is tied to the input embedding."""
    if layout.head_name is None or plan.get(layout.head_name) is None:
        return False
    if plan.get(layout.head_name).scheme is None:
        return False
    head = model.get_submodule(layout.head_name)
    embed = model.get_input_embeddings()
    if embed is None or head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return True


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


def _quantize_layer(model: nn.Module, layer: LayerPlan, stats: dict[str, torch.Tensor]
                    ) -> QuantizedWeight:
    module = model.get_submodule(layer.name)
    weight = weight_of(module).detach().float()
    quantizer = QUANTIZERS.get(layer.scheme.algorithm)
    try:
        qw = quantizer.quantize(weight, layer.scheme, stats)
    except SchemeError as exc:
        raise SchemeError(f"{layer.name}: {exc.message}", hint=exc.hint) from exc
    acts = layer.scheme.input_activations
    if acts is not None and not acts.dynamic:
        layer.result["input_scale"] = float(static_scale(stats["input_absmax"], acts))
    dequantized = qw.dequantize(torch.float32)
    rel_error = float(((weight - dequantized).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30)))
    layer.result.update(qw.info)
    layer.result["rel_mse"] = rel_error
    page_out([weight_of(module)])  # the original values are not read again
    set_weight(module, dequantized)
    return qw.to("cpu")


def _solve_step(model: nn.Module, step: list[LayerPlan], stats: dict, first: int) -> list:
    """Quantize one step's layers (each installs its dequantized weight); in a multi-process run
    each process solves its share and installs the others' results (mpq.engine.distributed).
    ``first``: the work-item number of the step's first layer (it spreads layers over ranks)."""
    ranks = current_ranks()
    if ranks is None:
        return [_quantize_layer(model, layer, stats.get(layer.name, {})) for layer in step]

    def solve(layer):
        qw = _quantize_layer(model, layer, stats.get(layer.name, {}))
        return qw, dict(layer.result)

    solved = ranks.solve_step(step, solve, first)
    for i, (layer, (qw, result)) in enumerate(zip(step, solved)):
        if not ranks.owns(first + i):  # solved by another process
            module = model.get_submodule(layer.name)
            page_out([weight_of(module)])
            set_weight(module, qw.dequantize(torch.float32).to(weight_of(module).device))
            layer.result.clear()
            layer.result.update(result)
    return [qw for qw, _ in solved]


def run_pipeline(model: nn.Module, layout: ModelLayout, plan: Plan,
                 samples: list[torch.Tensor] | None, *, true_sequential: bool = True,
                 device: str | torch.device = "cpu", events: Events = no_events,
                 reuse: bool = True, batch_tokens: int = 2048,
                 keep_dequantized: bool = True, checkpoint: Checkpoint | None = None,
                 stop: StopRequest | None = None, streamer=None,
                 offload_activations: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize every planned layer of ``model`` in place (weights become their dequantized
    values) and return the QuantizedWeight of each (on CPU); per-layer results go into ``plan``.

    ``true_sequential``: inside a block, layers are quantized in steps of execution order
    (layers sharing an input form one step), each step's statistics collected with its
    predecessors already quantized.  ``device``: where each block runs while it is processed;
    the model stays on CPU and one block at a time is moved.  ``offload_activations``: the
    calibration activations (each block's inputs, replay records) stay in host memory and each
    batch visits ``device`` only while a block runs on it (same results; less device memory,
    more transfers).  ``reuse``: in true-sequential
    passes, replay the parts of a block that are already final instead of recomputing them
    (mpq.engine.replay; bit-identical results, about 2.4× less forward work on a Llama block).
    ``batch_tokens``: calibration samples of equal length run through a block in batches of up
    to this many tokens (statistics are sums over tokens, so only float rounding differs).
    ``keep_dequantized=False``: once a block is done, its quantized layers' weights are emptied
    (the returned QuantizedWeights hold them) to save memory; kept anyway when a layer outside
    the blocks needs statistics (the whole model runs then).  Weight pages of the source
    checkpoint are paged out while not in use (mpq.memory.page_out).

    ``checkpoint``: each finished block is saved there, and the blocks it already holds are
    restored instead of quantized (their outputs recomputed for the next block's inputs), so a
    resumed run gives the same results as an uninterrupted one.  ``stop``: when a stop was
    requested (SIGINT/SIGTERM), raise Interrupted after the current block is saved.

    ``streamer`` (mpq.engine.streaming.BlockStreamer; needs ``checkpoint`` and
    ``keep_dequantized=False``): the model's blocks are on the meta device; each is read from
    the source files when its turn comes and sent back to meta once saved in ``checkpoint``.
    Its QuantizedWeights are then not returned (they are in the checkpoint): the result holds
    only the layers outside the blocks.
    """
    if streamer is not None and (checkpoint is None or keep_dequantized):
        raise ValueError("streaming needs a checkpoint and keep_dequantized=False")
    wanted = needed_stats(plan)
    ranks = current_ranks()
    if ranks is not None:
        check_distributed_support(plan)
    device = torch.device(device)
    blocks = blocks_of(model, layout)
    by_block: dict[int | None, list[LayerPlan]] = {}
    for layer in plan.quantized():
        by_block.setdefault(layer.block, []).append(layer)
    events("start", blocks=len(blocks), layers=len(plan.quantized()),
           calibration_passes=bool(wanted), streaming=streamer is not None)
    qweights: dict[str, QuantizedWeight] = {}
    started = time.perf_counter()
    with torch.inference_mode():
        inputs = None
        if wanted or plan.transforms or plan.kv_cache:
            batches = batch_samples(samples, batch_tokens)
            if ranks is not None:  # this process's share of the calibration tokens
                batches = ranks.share(batches, weights=[b.numel() for b in batches])
            inputs = to_device(capture_block_inputs(model, layout, batches),
                               "cpu" if offload_activations else device)
            page_out(model.parameters())  # each block's weights come back when it is processed
        keep = keep_dequantized or any(l.name in wanted for l in by_block.get(None, []))
        finished = checkpoint.finished_blocks() if checkpoint else 0
        if ranks is not None:  # rank 0's view of the work directory, before it writes to it
            finished = ranks.gather(finished)[0]
        for index, block in enumerate(blocks):
            layers, last = by_block.get(index, []), index + 1 == len(blocks)
            if streamer is not None:
                streamer.load(index, block)
            if index < finished:
                inputs = _restore_block(model, block, index, layers, checkpoint, inputs,
                                        qweights, plan.transforms, plan.kv_cache, last=last,
                                        device=device, events=events, keep_dequantized=keep)
                _release(streamer, index, block, layers, qweights)
                continue
            inputs = _quantize_block(model, block, index, layout, layers,
                                     wanted, inputs, qweights, plan.transforms, plan.kv_cache,
                                     last=last, true_sequential=true_sequential, reuse=reuse,
                                     device=device, events=events, keep_dequantized=keep)
            if checkpoint and (ranks is None or ranks.writer):
                checkpoint.save_block(index, block, qweights, layers,
                                      [spec["applied"][-1] for spec in plan.transforms])
            _release(streamer, index, block, layers, qweights)
            if _stop_requested(stop, ranks) and not last:
                raise Interrupted(
                    f"stopped by {stop.signal_name} after block {index + 1} of {len(blocks)}",
                    signal_number=stop.signal_number,
                    hint="rerun the same command to resume from block "
                         f"{index + 2}" if checkpoint else "nothing was saved")
        inputs = None
        outside_samples = samples if ranks is None or not samples else ranks.share(samples)
        qweights.update(_quantize_outside_blocks(model, by_block.get(None, []), wanted,
                                                 outside_samples, events))
    events("done", seconds=time.perf_counter() - started)
    return qweights


def _stop_requested(stop: StopRequest | None, ranks) -> bool:
    """Whether to stop after this block: on a signal to any process (all stop together)."""
    requested = stop is not None and stop.requested
    return any(ranks.gather(requested)) if ranks is not None else requested


def _release(streamer, index, block, layers, qweights) -> None:
    """Streaming: drop a saved block's weights (back to meta) and its QuantizedWeights."""
    if streamer is None:
        return
    for layer in layers:
        qweights.pop(layer.name, None)
    streamer.release(index, block)
    release_free_memory()


def _quantize_block(model, block, index, layout, layers, wanted, inputs, qweights, transforms,
                    kv_cache, *, last, true_sequential, reuse, device, events, keep_dequantized):
    """Quantize one block's planned layers; return the next block's inputs (None for the last).

    The plan's transforms run first, each appending its record to ``transforms[i]["applied"]``.
    With ``kv_cache``, the pass computing the next block's inputs (with this block quantized,
    without replay, so attention runs) also observes the cached keys/values; their scales then
    become ``k_scale``/``v_scale`` buffers of the attention modules, which fake-quantize K/V from
    then on (mpq.quantizers.kv_cache).
    """
    events("block_start", index=index, layers=len(layers))
    block.to(device)
    prefix = f"{layout.blocks_path}.{index}."
    if inputs is not None:
        ctx = BlockContext(model=model, block=block, index=index, prefix=prefix, inputs=inputs,
                           layers={layer.name: layer for layer in layers})
        for spec in transforms:
            record = TRANSFORMS.get(spec["type"]).apply(ctx, spec["options"])
            spec["applied"].append(record)
            events("transform", type=spec["type"], **record)
    replay = (BlockReplay.probe(block, inputs)
              if inputs is not None and true_sequential and reuse else None)
    position = index  # successive blocks start on successive ranks
    for step, stats in _block_steps(block, prefix, layers, wanted, inputs, replay,
                                    true_sequential):
        for layer, qw in zip(step, _solve_step(model, step, stats, position)):
            qweights[layer.name] = qw
            events("layer", name=layer.name, block=index, **layer.result)
        position += len(step)
    inputs = _next_inputs(model, block, index, inputs, kv_cache, replay, last=last,
                          events=events)
    _finish_block(model, block, index, layers, keep_dequantized, events)
    return inputs


def _next_inputs(model, block, index, inputs, kv_cache, replay: BlockReplay | None, *, last,
                 events):
    """The next block's inputs from this (quantized) block; with ``kv_cache`` the same pass
    calibrates and attaches the block's KV scales.  None after the last block."""
    if inputs is not None and kv_cache:
        return _calibrate_kv(model, block, inputs, KVCacheArgs(**kv_cache), last, events,
                             index)
    if inputs is not None and not last:
        return replay.final_pass(inputs) if replay else run_block(block, inputs, in_place=True)
    return None


def _finish_block(model, block, index, layers, keep_dequantized, events) -> None:
    """Move the block back to CPU, drop its dequantized weights unless kept, free memory."""
    block.to("cpu")
    if not keep_dequantized:
        for layer in layers:
            weight = model.get_submodule(layer.name).weight
            weight.data = torch.empty(0, dtype=weight.dtype)
    page_out(block.parameters())
    release_free_memory()
    events("block_done", index=index)


def _restore_block(model, block, index, layers, checkpoint, inputs, qweights, transforms,
                   kv_cache, *, last, device, events, keep_dequantized):
    """Put a block saved by an earlier run back (weights, tensors changed by transforms,
    results, transform records) and compute the next block's inputs exactly as the earlier run
    did after quantizing it (KV scales are recalibrated: the same pass gives the same scales)."""
    record = checkpoint.load_block(index, layers)
    events("block_resumed", index=index, layers=len(layers))
    block.to(device)
    current = block.state_dict()
    with torch.no_grad():
        for name, value in record.state.items():
            if name in current and current[name].numel():
                owner, _, attr = name.rpartition(".")
                tensor = getattr(block.get_submodule(owner) if owner else block, attr)
                tensor.data = value.to(device=tensor.device, dtype=tensor.dtype)
    for layer in layers:
        qw = record.qweights[layer.name]
        set_weight(model.get_submodule(layer.name), qw.dequantize(torch.float32))
        layer.result.update(record.layer_results[layer.name])
        qweights[layer.name] = qw
    for spec, applied in zip(transforms, record.transform_records):
        spec["applied"].append(applied)
    inputs = _next_inputs(model, block, index, inputs, kv_cache, None, last=last,
                          events=events)
    _finish_block(model, block, index, layers, keep_dequantized, events)
    return inputs


def _calibrate_kv(model, block, inputs, args: KVCacheArgs, last: bool, events, index: int):
    """Run ``block`` once observing its attention K/V; attach the scales; next inputs."""
    modules = attention_modules(model, block)
    observers = [KVObserver(args) for _ in modules]
    handles = [tap_kv(module, observer) for (_, module), observer in zip(modules, observers)]
    try:
        out = run_block(block, inputs, in_place=True, keep_outputs=not last)
    finally:
        for handle in handles:
            handle.remove()
    for (name, module), observer in zip(modules, observers):
        scales = observer.scales()
        attach_kv_quantization(module, scales, granularity=args.granularity)
        events("kv_cache", block=index, module=name,
               k_absmax=float(scales["k_scale"].max()) * FP8_MAX,
               v_absmax=float(scales["v_scale"].max()) * FP8_MAX)
    return out


def _block_steps(block: nn.Module, prefix: str, layers: list[LayerPlan],
                 wanted: dict[str, frozenset[str]], inputs, replay: BlockReplay | None,
                 true_sequential: bool):
    """Yield (layers to quantize now, their statistics) for one block, in order."""
    block_wanted = {l.name: wanted[l.name] for l in layers if l.name in wanted}
    if not block_wanted:
        yield layers, {}
        return
    by_name = {l.name: l for l in layers}
    groups = input_groups(block, {n[len(prefix):]: n for n in by_name}, inputs[0])
    steps = groups if true_sequential else [[n for g in groups for n in g]]
    for step in steps:
        step_wanted = {n: block_wanted[n] for n in step if n in block_wanted}
        stats = {}
        if step_wanted:
            last = [n for n in step if n in step_wanted][-1]
            with (replay.calibration_pass(block.get_submodule(last[len(prefix):]))
                  if replay else nullcontext()):
                with collecting(block, prefix, step_wanted, groups,
                                stop_after=last) as collectors:
                    run_block(block, inputs, keep_outputs=False)
            stats = results(collectors)
            release_free_memory()  # the pass's temporaries
        yield [by_name[n] for n in step], stats


def _quantize_outside_blocks(model, layers, wanted, samples, events):
    """Layers outside the decoder blocks (e.g. lm_head), with the whole model run for stats."""
    outside_wanted = {l.name: wanted[l.name] for l in layers if l.name in wanted}
    stats = {}
    if outside_wanted:
        groups = [[name] for name in outside_wanted]
        with collecting(model, "", outside_wanted, groups) as collectors:
            for ids in samples:
                model(input_ids=ids, use_cache=False)
        stats = results(collectors)
    qweights = {}
    for layer in layers:
        qweights[layer.name] = _quantize_layer(model, layer, stats.get(layer.name, {}))
        events("layer", name=layer.name, block=None, **layer.result)
    return qweights
