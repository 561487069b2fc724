"""Calibration statistics of fused MoE experts, one set per expert, from the tokens routed to it.

A forward pre-hook on the experts module (mpq.models.experts) reads what the block's router
chose — ``top_k_index`` [T, k] — and feeds each expert's collectors only its own tokens: for
``gate_up_proj.e`` the block's hidden states routed to e, for ``down_proj.e`` the expert's own
intermediate activation ``act(gate) * up`` of those tokens (computed with its current, possibly
already quantized, gate_up slice).  Each expert thus gets its own Hessian (GPTQ) or activation
statistics.  The hook ends the block's forward (the experts are the last planned layers of a
block: see :func:`expert_steps`).

Routed-token counts are recorded per slice in the run log (``routed_tokens``).  An expert that saw
fewer than the plan's ``min_expert_tokens`` (the recipe's ``experts: {min_tokens: N}``, default
:data:`MIN_EXPERT_TOKENS`) has statistics too poor to trust (a Hessian of rank below its token
count): :func:`mpq.engine.solve.quantize_layer` quantizes it with RTN on the same grid instead,
and records ``fallback`` with the reason.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from mpq.config.experts import DEFAULT_MIN_TOKENS
from mpq.config.plan import LayerPlan
from mpq.engine.collect import StopForward, run_block
from mpq.engine.stats import STATS
from mpq.models.experts import PROJECTIONS, expert_activation, routed_tokens, split_slice

MIN_EXPERT_TOKENS = DEFAULT_MIN_TOKENS  # the default of the recipe's experts: min_tokens


def _routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states [T, H], top_k_index [T, k]) of an experts module's call."""
    names = ("hidden_states", "top_k_index")
    values = list(args[:2]) + [kwargs[name] for name in names[len(args[:2]):]]
    return values[0], values[1]


@contextmanager
def collecting_experts(block: torch.nn.Module, prefix: str,
                       wanted: dict[str, frozenset[str]]
                       ) -> Iterator[tuple[dict[str, dict], dict[str, int]]]:
    """Collectors for ``wanted`` (slice name → stat names) fed with each expert's routed tokens,
    and the routed-token count of every slice of the experts modules concerned.  The hook
    raises StopForward once it has fed them."""
    collectors = {name: {stat: STATS.get(stat)() for stat in stats}
                  for name, stats in wanted.items()}
    modules: dict[str, list[str]] = {}
    for name in wanted:
        modules.setdefault(split_slice(name)[0], []).append(name)
    counts: dict[str, int] = {}
    handles = []

    def hook_for(module_name: str):
        def hook(module, args, kwargs):
            hidden, top_k_index = _routing(args, kwargs)
            for index, tokens in enumerate(routed_tokens(top_k_index, module.num_experts)):
                for projection in PROJECTIONS:
                    name = f"{module_name}.{projection}.{index}"
                    counts[name] = counts.get(name, 0) + int(tokens.numel())
                if not tokens.numel():
                    continue
                x = hidden[tokens]
                up_name, down_name = (f"{module_name}.{p}.{index}" for p in PROJECTIONS)
                for collector in collectors.get(up_name, {}).values():
                    collector.add(x)
                if down_name in collectors:
                    activation = expert_activation(module, x, index)
                    for collector in collectors[down_name].values():
                        collector.add(activation)
            raise StopForward
        return hook

    for module_name in modules:
        module = block.get_submodule(module_name[len(prefix):])
        handles.append(module.register_forward_pre_hook(hook_for(module_name), with_kwargs=True))
    try:
        yield collectors, counts
    finally:
        for handle in handles:
            handle.remove()


def expert_steps(run, turn, layers: list[LayerPlan]):
    """Yield (expert slices to quantize now, their statistics) for one block: the gate_up
    slices, then (with their values final, when ``run.true_sequential``) the down slices."""
    if not layers:
        return
    wanted = {l.name: run.needs[l.name] for l in layers if l.name in run.needs}
    if turn.inputs is None or not wanted:
        yield layers, {}
        return
    by_projection = [[l for l in layers if split_slice(l.name)[1] == p] for p in PROJECTIONS]
    steps = by_projection if run.true_sequential else [layers]
    for step in (s for s in steps if s):
        step_wanted = {l.name: wanted[l.name] for l in step if l.name in wanted}
        stats: dict[str, dict[str, torch.Tensor]] = {}
        if step_wanted:
            with collecting_experts(turn.module, turn.prefix, step_wanted) as (collectors, counts):
                run_block(turn.module, turn.inputs, keep_outputs=False)
            for layer in step:
                run.log.result(layer.name)["routed_tokens"] = counts.get(layer.name, 0)
            stats = {name: {stat: c.result() for stat, c in per_stat.items()}
                     for name, per_stat in collectors.items()
                     if all(c.count for c in per_stat.values())}
        yield step, stats


def fallback_reason(run, layer: LayerPlan) -> str | None:
    """Why expert slice ``layer`` is quantized with RTN instead of its planned algorithm (it
    needs statistics and saw too few tokens), or None."""
    if layer.expert is None or layer.name not in run.needs:
        return None
    tokens = run.log.result(layer.name).get("routed_tokens")
    limit = run.plan.min_expert_tokens
    if tokens is None or (tokens >= limit and tokens > 0):
        return None
    why = f"{tokens} routed calibration tokens < {limit}" if tokens else "no routed calibration token"
    return f"{why}: rtn instead of {layer.scheme.algorithm}"
