"""Skipping the finished parts of a decoder block in true-sequential calibration passes.

True-sequential quantization runs a block once per step (attention inputs, o_proj, gate/up,
down_proj for a Llama block) and once more for the next block's inputs.  Run naively, each pass
recomputes the block from its start.  But once a step is quantized, everything computed before it
is final for the rest of the block, so later passes may reuse it:

- **output replay**: a direct child of the block (e.g. ``self_attn``) that ran to completion in a
  pass, with every linear inside and before it already quantized, returns its recorded output in
  later passes instead of recomputing it;
- **tail replay**: a child whose output *is* the output of its last linear (``mlp`` returns
  ``down_proj(z)``; ``self_attn`` returns ``o_proj(z)``), once the pass that stopped at that
  linear recorded its input ``z``, is computed in later passes as ``tail(z)`` alone.

For a Llama block this brings the forward work of all passes together down to about one full
forward (from about 2.4).  The replayed values are the very tensors a full recomputation would
give (the same ops on the same inputs), so the quantized result is bit-identical; the test suite
checks this on every supported architecture.  Facts are discovered from one probe sample (which
child ran once, which linear ran last inside it, whether the child returned that linear's output
unmodified); a child that does not qualify simply runs normally.

Valid only for true-sequential passes, whose steps follow execution order: anything that finished
before a step's first layer was fed depends only on layers already quantized.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from mpq.models.layout import is_linear
from mpq.engine.collect import (BlockInputs, input_tokens, inputs_device, module_device,
                         run_block, to_device)
from mpq.engine.stash import Stash

RUN, OUTPUT, TAIL = "run", "output", "tail"


@dataclass
class _Child:
    """A direct child of the block that holds linears, and what the probe found out about it."""

    module: nn.Module
    tail: nn.Module | None  # its last linear, when the child hands on that linear's output as is
    rest: tuple = ()  # the other (tensor-free) elements of a tuple output, e.g. attention's None
    returns_tuple: bool = False
    mode: str = RUN
    store: list | None = None  # per input: recorded outputs (OUTPUT) or tail inputs (TAIL)


class BlockReplay:
    """Replay state of one block across its calibration passes and its final pass."""

    def __init__(self, block: nn.Module, children: list[_Child], tokens: list[int],
                 home: torch.device | None = None) -> None:
        self.block = block
        self.children = children
        self.tokens = tokens  # per input, to size the stashes
        self.num_inputs = len(tokens)
        # records are kept where the block's inputs live (host memory when offloaded) and
        # handed to the block on its device
        self.home = home
        compute = module_device(block)
        self.compute = None if compute in (None, home) else compute

    @classmethod
    def probe(cls, block: nn.Module, inputs: BlockInputs) -> "BlockReplay":
        """Learn, from one forward of ``inputs[0]``, which children of ``block`` can be replayed.

        Candidates are the block's direct children that contain linears but are not linears
        themselves (replaying a bare linear would store its output to save only its own matmul).
        """
        candidates = [child for child in block.children()
                      if not is_linear(child) and any(is_linear(m) for m in child.modules())]
        calls: dict[int, int] = {}
        finished: dict[int, tuple[object, torch.Tensor | None]] = {}
        last_linear: dict[int, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}
        handles = []

        def on_child(module, args, output):
            calls[id(module)] = calls.get(id(module), 0) + 1
            primary = _primary(output)
            finished[id(module)] = (output, None if primary is None else primary.clone())

        def on_linear(child):
            def hook(module, args, output):
                last_linear[id(child)] = (module, output, output.detach().clone())
            return hook

        try:
            for child in candidates:
                handles.append(child.register_forward_hook(on_child))
                handles.extend(m.register_forward_hook(on_linear(child))
                               for m in child.modules() if is_linear(m))
            run_block(block, inputs[:1], keep_outputs=False)
        finally:
            for handle in handles:
                handle.remove()
        children = []
        for child in candidates:
            if calls.get(id(child)) != 1:
                continue  # not run, or run several times per forward: leave it alone
            output, value = finished[id(child)]
            if value is None or not torch.equal(_primary(output), value):
                continue  # hands on several tensors, or the block changed its output in place
            found = _Child(child, None, returns_tuple=not isinstance(output, torch.Tensor))
            if found.returns_tuple:
                found.rest = tuple(output[1:])
            if id(child) in last_linear:
                module, out, value = last_linear[id(child)]
                # identical object and unmodified values: nothing ran on it after the linear
                if _primary(output) is out and torch.equal(out, value):
                    found.tail = module
            children.append(found)
        return cls(block, children, input_tokens(inputs), inputs_device(inputs))

    @contextmanager
    def calibration_pass(self, stop_layer: nn.Module) -> Iterator[None]:
        """Replay what is final during a pass that stops after feeding ``stop_layer``; then keep
        for later passes the outputs of children that completed, and the input of
        ``stop_layer`` when it is a child's tail.  Enter before attaching statistics collectors.
        """
        recorded: dict[int, list] = {}
        handles = []
        try:
            for child in self.children:
                if child.mode != RUN:
                    continue
                store = recorded[id(child)] = []
                stash = Stash(self.tokens, device=self.home)
                if child.tail is stop_layer:
                    handles.append(stop_layer.register_forward_pre_hook(
                        _append_input(store, stash), prepend=True))
                else:
                    handles.append(child.module.register_forward_hook(
                        _append_output(store, stash)))
            with self._replaying(keep=True):
                yield
        finally:
            for handle in handles:
                handle.remove()
        for child in self.children:
            got = recorded.get(id(child))
            if got is None or len(got) != self.num_inputs:
                continue
            child.mode = TAIL if child.tail is stop_layer else OUTPUT
            child.store = got

    def final_pass(self, inputs: BlockInputs) -> BlockInputs:
        """Run the block for the next block's inputs, replaying what it can; frees the state."""
        try:
            with self._replaying(keep=False):
                return run_block(self.block, inputs, in_place=True)
        finally:
            for child in self.children:
                child.mode, child.store = RUN, None

    @contextmanager
    def _replaying(self, keep: bool) -> Iterator[None]:
        """Swap the forward of every replayable child for its replay during one pass.

        ``keep`` (calibration passes): a tail replay's entry is replaced by the child's output,
        so a child replayed for every input moves to output replay.  The final pass leaves the
        entries alone; final_pass drops the whole state afterwards.
        """
        patched = []
        for child in self.children:
            if child.mode != RUN:
                replayed = [0]
                child.module.forward = self._replay_forward(child, keep, replayed,
                                                            Stash(self.tokens, device=self.home))
                patched.append((child, replayed))
        try:
            yield
        finally:
            for child, replayed in patched:
                del child.module.forward
                if child.mode == TAIL and keep and replayed[0]:
                    if replayed[0] == self.num_inputs:
                        child.mode = OUTPUT
                    else:  # entries are mixed: give up replaying this child
                        child.mode, child.store = RUN, None

    def _fetch(self, record):
        """A record (tensor or tuple) on the block's device."""
        return record if self.compute is None else to_device(record, self.compute)

    def _replay_forward(self, child: _Child, keep: bool, replayed: list[int], stash: Stash):
        def forward(*args, **kwargs):
            index = replayed[0]
            replayed[0] += 1
            if index >= self.num_inputs:
                raise RuntimeError(f"replayed {type(child.module).__name__} more often than "
                                   "there are inputs")
            stored = child.store[index]
            if child.mode == OUTPUT:
                out = stored
            else:
                hidden = child.tail(self._fetch(stored))
                if keep:  # becomes this child's recorded output
                    hidden = stash.keep(hidden)
                out = (hidden, *child.rest) if child.returns_tuple else hidden
            if keep:
                child.store[index] = out
            return self._fetch(out)

        return forward


def _primary(output):
    """The tensor a child hands on: the output itself, or the first element of a tuple whose
    other elements hold no tensors (e.g. attention's ``(output, None)``); else None."""
    if isinstance(output, torch.Tensor):
        return output
    if (isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor)
            and not any(isinstance(item, torch.Tensor) for item in output[1:])):
        return output[0]
    return None


def _append_output(store: list, stash: Stash):
    def hook(module, args, output):
        store.append(stash.keep_output(output))
    return hook


def _append_input(store: list, stash: Stash):
    def hook(module, args):
        store.append(stash.keep(args[0]))
    return hook
