"""Solving one step's layers: each planned quantizer on its float weight and statistics.

The dequantized weight is written back into the model (so the error propagates to what runs
next) and the QuantizedWeight kept on CPU; the layer's results go into the run log.  In a
multi-process run each process solves its share of a step and installs the others' results
(mpq.engine.distributed).
"""
from __future__ import annotations

import torch

from mpq.config.plan import LayerPlan
from mpq.engine.lifecycle import RunState
from mpq.errors import SchemeError
from mpq.memory import page_out
from mpq.models.layout import set_weight, weight_of
from mpq.numerics.activations import static_scale
from mpq.numerics.base import QuantizedWeight
from mpq.quantizers.base import QUANTIZERS


def quantize_layer(run: RunState, layer: LayerPlan, stats: dict[str, torch.Tensor]
                   ) -> QuantizedWeight:
    """Quantize ``layer`` with its planned quantizer; install its dequantized weight."""
    module = run.model.get_submodule(layer.name)
    weight = weight_of(module).detach().float()
    quantizer = QUANTIZERS.get(layer.scheme.algorithm)
    try:
        qw = quantizer.quantize(weight, layer.scheme, stats)
    except SchemeError as exc:
        raise SchemeError(f"{layer.name}: {exc.message}", hint=exc.hint) from exc
    result = run.log.result(layer.name)
    acts = layer.scheme.input_activations
    if acts is not None and not acts.dynamic:
        result["input_scale"] = float(static_scale(stats["input_absmax"], acts))
    dequantized = qw.dequantize(torch.float32)
    rel_error = float(((weight - dequantized).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30)))
    result.update(qw.info)
    result["rel_mse"] = rel_error
    page_out([weight_of(module)])  # the original values are not read again
    set_weight(module, dequantized)
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
            module = run.model.get_submodule(layer.name)
            page_out([weight_of(module)])
            set_weight(module, qw.dequantize(torch.float32).to(weight_of(module).device))
            run.log.layers[layer.name] = dict(result)
    return [qw for qw, _ in solved]
