"""The block engine's lifecycle: the order hooks see events in, and what a restoring hook skips."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from mpq.config.recipe import parse_recipe
from mpq.config.run_log import RunLog
from mpq.engine.lifecycle import RunHook, RunState
from mpq.engine.runner import run_blocks
from mpq.engine.spec import needed_stats, plan_model
from tests.tiny_models import tiny_model

GPTQ = ("mpq_recipe: 1\ndefaults:\n  algorithm: gptq\nrules:\n  - targets: [Linear]\n"
        "    weights: {bits: 4, group_size: 32}\n")


class Recorder(RunHook):
    def __init__(self, name, seen, restore=()):
        self.name, self.seen, self.restore = name, seen, set(restore)

    def before_block(self, run, turn):
        self.seen.append((self.name, "before_block", turn.index))
        if turn.index in self.restore:
            turn.restored = True

    def block_start(self, run, turn):
        self.seen.append((self.name, "block_start", turn.index))

    @contextmanager
    def _watch(self, index):
        self.seen.append((self.name, "final_pass_enter", index))
        yield
        self.seen.append((self.name, "final_pass_exit", index))

    def final_pass(self, run, turn):
        return self._watch(turn.index)

    def block_end(self, run, turn):
        self.seen.append((self.name, "block_end", turn.index))


def _run(hooks, events=None):
    model = tiny_model("llama")
    layout, plan = plan_model(model, parse_recipe(GPTQ, "gptq.yaml"))
    run = RunState(model=model, layout=layout, plan=plan, log=RunLog.for_plan(plan),
                   needs=needed_stats(plan),
                   events=(lambda kind, **data: events.append((kind, data))) if events is not None
                   else (lambda kind, **data: None))
    samples = [torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    run_blocks(run, samples, hooks=hooks)
    return run


def test_hooks_see_each_block_in_lifecycle_order():
    seen = []
    _run([Recorder("a", seen), Recorder("b", seen)])
    block0 = [event for event in seen if event[2] == 0]
    assert block0 == [("a", "before_block", 0), ("b", "before_block", 0),
                      ("a", "block_start", 0), ("b", "block_start", 0),
                      ("a", "final_pass_enter", 0), ("b", "final_pass_enter", 0),
                      ("b", "final_pass_exit", 0), ("a", "final_pass_exit", 0),
                      ("b", "block_end", 0), ("a", "block_end", 0)]
    assert [event[2] for event in seen] == [0] * 10 + [1] * 10


def test_a_restored_block_is_neither_started_nor_quantized():
    seen, events = [], []
    run = _run([Recorder("r", seen, restore={0})], events)
    assert ("r", "block_start", 0) not in seen and ("r", "block_start", 1) in seen
    assert ("r", "final_pass_enter", 0) in seen  # its outputs still feed block 1
    layer_blocks = {data["block"] for kind, data in events if kind == "layer"}
    assert layer_blocks == {1}
    assert all(name.startswith("model.layers.1.") for name in run.qweights)


def test_the_run_log_holds_every_quantized_layers_results():
    run = _run([])
    for layer in run.plan.quantized():
        assert {"gptq_loss", "rel_mse"} <= set(run.log.result(layer.name)), layer.name
        assert run.qweights[layer.name].codes.device.type == "cpu"
