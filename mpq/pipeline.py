"""The layer-by-layer quantization pipeline: the only code that walks a model.

For each decoder block in order: collect the statistics its layers' quantizers declare they need
(hooks on the block's linears while the block runs on the calibration inputs), quantize every
planned layer, write the dequantized weights back (so the error propagates), and re-run the block
to produce the next block's inputs.  Only one block's activations are held at a time.  When no
planned quantizer needs statistics, no calibration forward pass runs at all.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from mpq.arch import ModelLayout, blocks_of, set_weight, weight_of
from mpq.errors import CalibrationError
from mpq.plan import LayerPlan, Plan
from mpq.quantizers import base as qbase
from mpq.stats import STATS

Events = Callable[..., None]


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


def no_events(kind: str, **data: Any) -> None:
    return None


def needed_stats(plan: Plan) -> dict[str, frozenset[str]]:
    """Layer name → the statistics its quantizer needs (only layers that need some)."""
    needs = {}
    for layer in plan.quantized():
        quantizer_needs = qbase.QUANTIZERS.get(layer.scheme.algorithm).needs
        if quantizer_needs:
            needs[layer.name] = frozenset(quantizer_needs)
    return needs


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


@contextmanager
def _collecting(model: nn.Module, wanted: dict[str, frozenset[str]]) -> Iterator[dict]:
    """Attach stat collectors to the named linears; yields name → {stat → collector}."""
    collectors = {name: {stat: STATS.get(stat)() for stat in sorted(stats)}
                  for name, stats in wanted.items()}
    handles = []
    for name, per_stat in collectors.items():
        def hook(module, args, per_stat=per_stat):
            for collector in per_stat.values():
                collector.add(args[0])
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        yield collectors
    finally:
        for handle in handles:
            handle.remove()


def capture_block_inputs(model: nn.Module, layout: ModelLayout,
                         samples: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """Run the model up to block 0 for each sample; return (args, kwargs) block 0 received."""
    first = blocks_of(model, layout)[0]
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, dict(kwargs)))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for ids in samples:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    outputs = []
    for args, kwargs in inputs:
        out = block(*args, **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        if args:
            outputs.append(((hidden, *args[1:]), kwargs))
        else:
            outputs.append(((), {**kwargs, "hidden_states": hidden}))
    return outputs


def _quantize_layer(model: nn.Module, layer: LayerPlan, stats: dict[str, torch.Tensor]
                    ) -> qbase.QuantizedWeight:
    module = model.get_submodule(layer.name)
    weight = weight_of(module).detach().float()
    quantizer = qbase.QUANTIZERS.get(layer.scheme.algorithm)
    qw = quantizer.quantize(weight, layer.scheme, stats)
    dequantized = qw.dequantize(torch.float32)
    rel_error = float(((weight - dequantized).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30)))
    layer.result.update(qw.info)
    layer.result["rel_mse"] = rel_error
    set_weight(module, dequantized)
    return qw


def run_pipeline(model: nn.Module, layout: ModelLayout, plan: Plan,
                 samples: list[torch.Tensor] | None, *, events: Events = no_events
                 ) -> dict[str, qbase.QuantizedWeight]:
    """Quantize every planned layer of ``model`` in place (weights become their dequantized
    values) and return the QuantizedWeight of each; per-layer results go into ``plan``.
    """
    wanted = needed_stats(plan)
    if wanted and not samples:
        first = next(iter(wanted))
        raise CalibrationError(f"layer {first} needs calibration statistics "
                               f"({', '.join(sorted(wanted[first]))}) but no calibration data "
                               "was given", hint="pass --calib FILE")
    blocks = blocks_of(model, layout)
    by_block: dict[int | None, list[LayerPlan]] = {}
    for layer in plan.quantized():
        by_block.setdefault(layer.block, []).append(layer)
    events("start", blocks=len(blocks), layers=len(plan.quantized()),
           calibration_passes=bool(wanted))
    qweights: dict[str, qbase.QuantizedWeight] = {}
    started = time.perf_counter()
    with torch.inference_mode():
        inputs = capture_block_inputs(model, layout, samples) if wanted else None
        for index, block in enumerate(blocks):
            layers = by_block.get(index, [])
            events("block_start", index=index, layers=len(layers))
            block_wanted = {l.name: wanted[l.name] for l in layers if l.name in wanted}
            stats = {}
            if block_wanted:
                with _collecting(model, block_wanted) as collectors:
                    _run_block(block, inputs)
                stats = {n: {s: c.result() for s, c in per.items()}
                         for n, per in collectors.items()}
            for layer in layers:
                qweights[layer.name] = _quantize_layer(model, layer, stats.get(layer.name, {}))
                events("layer", name=layer.name, block=index, **layer.result)
            if inputs is not None and index + 1 < len(blocks):
                inputs = _run_block(block, inputs)
            events("block_done", index=index)
        inputs = None
        outside = by_block.get(None, [])
        outside_wanted = {l.name: wanted[l.name] for l in outside if l.name in wanted}
        stats = {}
        if outside_wanted:
            with _collecting(model, outside_wanted) as collectors:
                for ids in samples:
                    model(input_ids=ids, use_cache=False)
            stats = {n: {s: c.result() for s, c in per.items()} for n, per in collectors.items()}
        for layer in outside:
            qweights[layer.name] = _quantize_layer(model, layer, stats.get(layer.name, {}))
            events("layer", name=layer.name, block=None, **layer.result)
    events("done", seconds=time.perf_counter() - started)
    return qweights
