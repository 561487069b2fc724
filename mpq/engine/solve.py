"""Solving one step's layers: each planned quantizer on its float weight and statistics.

The dequantized weight is written back into the model (so the error propagates to what runs
next) and the QuantizedWeight kept on CPU; the layer's results go into the run log.  In a
multi-process run each process solves its share of a step and installs the others' results
(mpq.engine.distributed).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from mpq.config.plan import LayerPlan
from mpq.engine.expert_steps import fallback_reason
from mpq.engine.lifecycle import RunState
from mpq.errors import SchemeError
from mpq.memory import page_out
from mpq.models.layout import install_layer_weight, layer_weight
from mpq.numerics.activations import static_scale
from mpq.numerics.base import QuantizedWeight
from mpq.quantizers.base import QUANTIZERS


def quantize_layer(run: RunState, layer: LayerPlan, stats: dict[str, torch.Tensor]
                   ) -> QuantizedWeight:
    """Quantize ``layer`` with its planned quantizer; install its dequantized weight."""
    weight = layer_weight(run.model, layer.name, layer.expert).detach().float()
    quantizer = QUANTIZERS.get(layer.scheme.algorithm)
    result = run.log.result(layer.name)
    scheme = layer.scheme
    fallback = fallback_reason(run, layer)
    if fallback is not None:  # a starved expert: plain RTN on the scheme's grid
        quantizer, stats = QUANTIZERS.get("rtn"), {}
        scheme = replace(scheme, algorithm="rtn", options=())
        result["fallback"] = fallback
    try:
        qw = quantizer.quantize(weight, scheme, stats)
    except SchemeError as exc:
        raise SchemeError(f"{layer.name}: {exc.message}", hint=exc.hint) from exc
    acts = layer.scheme.input_activations
    if acts is not None and not acts.dynamic:
        result["input_scale"] = float(static_scale(stats["input_absmax"], acts))
    dequantized = qw.dequantize(torch.float32)
    rel_error = float(((weight - dequantized).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30)))
    result.update(qw.info)
    result["rel_mse"] = rel_error
    if layer.expert is None:
        page_out([layer_weight(run.model, layer.name, None)])  # not read again
    install_layer_weight(run.model, layer.name, layer.expert, dequantized)
    return qw.to("cpu")


def solve_step(run: RunState, step: list[LayerPlan], stats: dict, first: int
               ) -> list[QuantizedWeight]:
    """Quantize one step's layers (each installs its dequantized weight).  ``first``: the
    work-item number of the step's first layer (it spreads layers over the processes)."""
    ranks = run.ranks
    if ranks is None:
        return [quantize_layer(run, layer, stats.get(layer.name, {})) for layer in step]

    def solve(layer):
        qw = quantize_layer(run, layer, stats.get(layer.name, {}))
        return qw, dict(run.log.result(layer.name))

    solved = ranks.solve_step(step, solve, first)
    for i, (layer, (qw, result)) in enumerate(zip(step, solved)):
        if not ranks.owns(first + i):  # solved by another process
            current = layer_weight(run.model, layer.name, layer.expert)
            if layer.expert is None:
                page_out([current])
            install_layer_weight(run.model, layer.name, layer.expert,
                                 qw.dequantize(torch.float32).to(current.device))
            run.log.layers[layer.name] = dict(result)
    return [qw for qw, _ in solved]
