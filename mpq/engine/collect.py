"""Running one decoder block on the calibration inputs and collecting per-layer statistics.

Two facts are discovered from one sample, with no per-architecture data:
- which linears read the *same* input tensor (q/k/v; gate/up): they share one collector per
  statistic, so e.g. one Hessian is computed for q, k and v together;
- the order in which the linears execute: the groups in that order are the steps of
  true-sequential quantization (attention inputs, o_proj, gate/up, down_proj for a Llama block).
A collection pass stops the block's forward as soon as the last layer it needs has been fed.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from mpq.engine.distributed import Ranks
from mpq.errors import CalibrationError
from mpq.engine.stash import Stash
from mpq.engine.stats import STATS

BlockInputs = list[tuple[tuple, dict]]


class StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


def run_block(block: nn.Module, inputs: BlockInputs, *, keep_outputs: bool = True,
              in_place: bool = False) -> BlockInputs | None:
    """Run ``block`` on every input; return the inputs of the next block (or None).

    A StopForward raised by a hook ends that sample's pass; its output is then unavailable.
    The outputs are kept in one Stash, or with ``in_place`` (for the last pass over ``inputs``)
    written over each input's hidden states once the block is done with them.  Inputs may live
    on another device than the block (offloaded activations): each one is moved to the block's
    device for its forward, and the outputs are kept where the inputs are.
    """
    home = inputs_device(inputs)
    compute = module_device(block)
    outputs = [] if keep_outputs else None
    stash = Stash(input_tokens(inputs), device=home) if keep_outputs else None
    for args, kwargs in inputs:
        run_args, run_kwargs = (args, kwargs) if compute in (None, home) else to_device(
            (args, kwargs), compute)
        try:
            out = block(*run_args, **run_kwargs)
        except StopForward:
            continue
        if outputs is None:
            continue
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        old = _hidden_states(args, kwargs)
        if in_place and old.shape == hidden.shape and old.dtype == hidden.dtype:
            hidden = old.copy_(hidden)
        else:
            hidden = stash.keep(hidden)
        if args:
            outputs.append(((hidden, *args[1:]), kwargs))
        else:
            outputs.append(((), {**kwargs, "hidden_states": hidden}))
    return outputs


def inputs_device(inputs: BlockInputs) -> torch.device | None:
    """Where block inputs live (their first hidden states'), None for no inputs."""
    return _hidden_states(*inputs[0]).device if inputs else None


def module_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter (None for a module without any)."""
    first = next(iter(module.parameters()), None)
    return None if first is None else first.device


def to_device(obj, device: torch.device):
    """Move the tensors inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(item, device) for item in obj)
    if isinstance(obj, dict):
        return {key: to_device(value, device) for key, value in obj.items()}
    return obj


def input_tokens(inputs: BlockInputs) -> list[int]:
    """The number of tokens in each block input (its hidden states' rows)."""
    counts = []
    for args, kwargs in inputs:
        hidden = _hidden_states(args, kwargs)
        counts.append(hidden.numel() // hidden.shape[-1])
    return counts


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block receives: its first positional argument, or by keyword."""
    return args[0] if args else kwargs["hidden_states"]


def input_groups(block: nn.Module, names: dict[str, str], sample: tuple[tuple, dict]
                 ) -> list[list[str]]:
    """Layers of ``block`` (local name → full name) grouped by shared input, in execution order.

    Layers that did not run on the sample (e.g. unrouted experts) come last, one group each.
    """
    groups: list[list[str]] = []
    last: list = [None]

    def hook(full_name):
        def record(module, args):
            if groups and args[0] is last[0]:
                groups[-1].append(full_name)
            else:
                groups.append([full_name])
            last[0] = args[0]
        return record

    handles = [block.get_submodule(local).register_forward_pre_hook(hook(full))
               for local, full in names.items()]
    try:
        run_block(block, [sample], keep_outputs=False)
    finally:
        for handle in handles:
            handle.remove()
    seen = {name for group in groups for name in group}
    groups.extend([full] for full in names.values() if full not in seen)
    return groups


@contextmanager
def collecting(block: nn.Module, prefix: str, wanted: dict[str, frozenset[str]],
               groups: Sequence[Sequence[str]], stop_after: str | None = None,
               reference: Mapping[str, list[torch.Tensor]] | None = None
               ) -> Iterator[dict[str, dict]]:
    """Attach collectors for ``wanted`` (full layer name → stat names) to layers of ``block``.

    Layers in one group share collectors: the group's first wanted layer feeds them.  Yields
    full name → {stat → collector}; raises StopForward once ``stop_after`` has been fed, that
    is at its group's first wanted layer (the others read the same input, so running them
    would be wasted work).  ``reference``: full name → the float model's inputs of that layer,
    one per forward call in order (mpq.engine.float_stream), for paired statistics; a paired
    statistic without them raises CalibrationError.
    """
    collectors: dict[str, dict] = {}
    handles = []
    for group in groups:
        members = [name for name in group if name in wanted]
        if not members:
            continue
        stats = sorted(set().union(*(wanted[name] for name in members)))
        shared = {stat: STATS.get(stat)() for stat in stats}
        for name in members:
            collectors[name] = {stat: shared[stat] for stat in wanted[name]}
        leader = members[0]
        refs = None
        if any(getattr(collector, "paired", False) for collector in shared.values()):
            refs = next((reference[name] for name in group if reference and name in reference),
                        None)
            if refs is None:
                raise CalibrationError(f"layer {leader} needs the float model's inputs, which "
                                       "this run does not carry",
                                       hint="error feedback works on the layers inside the "
                                            "decoder blocks of an mpq quantize run")
        handles.append(_module(block, prefix, leader).register_forward_pre_hook(
            _feeder(list(shared.values()), stop=stop_after in members, reference=refs)))
    try:
        yield collectors
    finally:
        for handle in handles:
            handle.remove()


def _module(block: nn.Module, prefix: str, full_name: str) -> nn.Module:
    return block.get_submodule(full_name[len(prefix):])


def _feeder(collectors: list, stop: bool, reference: list[torch.Tensor] | None = None):
    calls = [0]

    def hook(module, args):
        ref = None
        if reference is not None:
            if calls[0] >= len(reference):
                raise CalibrationError("a layer ran on more calibration batches than the float "
                                       "stream holds",
                                       hint="this is a bug in the float stream; please report it")
            ref, calls[0] = reference[calls[0]], calls[0] + 1
        for collector in collectors:
            if getattr(collector, "paired", False):
                collector.add(args[0], ref)
            else:
                collector.add(args[0])
        if stop:
            raise StopForward
    return hook


def results(collectors: dict[str, dict], ranks: Ranks | None = None
            ) -> dict[str, dict[str, torch.Tensor]]:
    """Compute every collector once, even when several layers share it.  With ``ranks`` (a
    multi-process run, mpq.engine.distributed) every collector is first combined over the
    processes, in the same order on each."""
    if ranks is not None:
        reduced: set[int] = set()
        for per_stat in collectors.values():
            for stat in sorted(per_stat):  # not set order: it differs between processes
                collector = per_stat[stat]
                if id(collector) not in reduced:
                    reduced.add(id(collector))
                    collector.reduce(ranks)
    cache: dict[int, torch.Tensor] = {}
    out = {}
    for name, per_stat in collectors.items():
        out[name] = {}
        for stat, collector in per_stat.items():
            if collector.count == 0:  # e.g. a mixture-of-experts expert no token was routed to
                raise CalibrationError(
                    f"layer {name} saw no calibration tokens (its {stat} is empty)",
                    hint="use more or more varied calibration samples (--num-samples), or give "
                         "this layer a rule with algorithm: rtn")
            if id(collector) not in cache:
                cache[id(collector)] = collector.result()
            out[name][stat] = cache[id(collector)]
    return out
