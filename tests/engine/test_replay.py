"""Replaying the finished parts of a block gives bit-identical results with less forward work."""
from __future__ import annotations

import pytest
import torch

from mpq.engine.collect import run_block
from mpq.engine.runner import capture_block_inputs
from mpq.config.recipe import parse_recipe
from mpq.engine.replay import OUTPUT, TAIL, BlockReplay
from tests.helpers import run_engine
from tests.tiny_models import ARCHITECTURES, tiny_model

GPTQ_RECIPE = ("mpq_recipe: 1\ndefaults:\n  algorithm: gptq\n  options: {block_size: 16}\n"
               "rules:\n  - targets: [Linear, Conv1D]\n    weights: {bits: 3, group_size: 16}\n")


def _samples(n=3, seq=24):
    return [torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(i))
            for i in range(n)]


def _quantized(arch: str, reuse: bool):
    model = tiny_model(arch)
    run = run_engine(model, parse_recipe(GPTQ_RECIPE, "gptq.yaml"), _samples(), reuse=reuse)
    return model, run.qweights


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reuse_gives_bit_identical_quantization(arch):
    _, plain = _quantized(arch, reuse=False)
    model, reused = _quantized(arch, reuse=True)
    assert plain.keys() == reused.keys()
    for name in plain:
        assert torch.equal(plain[name].codes, reused[name].codes), name
        assert torch.equal(plain[name].scale, reused[name].scale), name


def test_llama_block_replays_attention_and_mlp():
    model = tiny_model("llama")
    block = model.model.layers[0]
    with torch.inference_mode():
        inputs = capture_block_inputs(model, _layout(model), _samples())
        expected = run_block(block, inputs)
        replay = BlockReplay.probe(block, inputs)
        by_module = {id(c.module): c for c in replay.children}
        attn, mlp = by_module[id(block.self_attn)], by_module[id(block.mlp)]
        assert attn.tail is block.self_attn.o_proj and mlp.tail is block.mlp.down_proj

        calls = {"q_proj": 0, "down_proj": 0}
        handles = [getattr(block.self_attn if n == "q_proj" else block.mlp, n)
                   .register_forward_hook(lambda m, a, o, n=n: calls.__setitem__(n, calls[n] + 1))
                   for n in calls]
        for stop in (block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.down_proj):
            with replay.calibration_pass(stop):
                _run_until(block, inputs, stop)
        assert attn.mode == OUTPUT and mlp.mode == TAIL
        calls.update(q_proj=0, down_proj=0)
        outputs = replay.final_pass(inputs)
        for handle in handles:
            handle.remove()
    # attention came from its recorded output; the MLP ran only down_proj on its recorded input
    assert calls == {"q_proj": 0, "down_proj": len(inputs)}
    for (got, _), (want, _) in zip(outputs, expected):
        assert torch.equal(got[0], want[0])
    assert all(c.store is None for c in replay.children)


def _layout(model):
    from mpq.models.layout import layout_of
    return layout_of(model)


def _run_until(block, inputs, stop):
    from mpq.engine.collect import StopForward

    def raise_stop(module, args):
        raise StopForward

    handle = stop.register_forward_pre_hook(raise_stop)
    try:
        run_block(block, inputs, keep_outputs=False)
    finally:
        handle.remove()


def test_batch_samples_groups_equal_lengths_in_order():
    from mpq.engine.runner import batch_samples

    samples = [torch.full((1, 4), i) for i in range(5)] + [torch.full((1, 3), 9)]
    batches = batch_samples(samples, max_tokens=8)
    assert [tuple(b.shape) for b in batches] == [(1, 4), (2, 4), (2, 4), (1, 3)]
    assert torch.equal(torch.cat([b.reshape(-1) for b in batches]),
                       torch.cat([s.reshape(-1) for s in samples]))
    assert [tuple(b.shape) for b in batch_samples(samples[:2], max_tokens=1)] == [(1, 4)] * 2


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_batched_calibration_gives_the_same_statistics(arch, monkeypatch):
    """Batches change only float rounding: every layer's Hessian matches one-at-a-time runs
    (weights are RTN-quantized, so both runs propagate the same quantized blocks)."""
    from mpq.numerics.base import NUMBER_FORMATS
    from mpq.quantizers import base

    seen: dict[int, list] = {1: [], 4096: []}

    class RecordingHessian:
        name, needs = "recording-hessian", frozenset({"hessian"})

        def check(self, scheme):
            pass

        def quantize(self, weight, scheme, stats):
            seen[current[0]].append(stats["hessian"].clone())
            return NUMBER_FORMATS.get("int").quantize(weight, scheme.weights)

    monkeypatch.setitem(base.QUANTIZERS._entries, "recording-hessian", RecordingHessian())
    recipe = parse_recipe(GPTQ_RECIPE.replace("algorithm: gptq\n  options: {block_size: 16}",
                                              "algorithm: recording-hessian"), "r.yaml")
    current = [0]
    for batch_tokens in (1, 4096):
        current[0] = batch_tokens
        run_engine(tiny_model(arch), recipe, _samples(n=4), batch_tokens=batch_tokens)
    assert len(seen[1]) == len(seen[4096]) > 4
    for one, batched in zip(seen[1], seen[4096]):
        torch.testing.assert_close(batched, one, rtol=1e-4, atol=1e-5)


def test_stash_copies_proportional_tensors_into_one_buffer():
    from mpq.engine.stash import Stash

    stash = Stash([1, 3, 2])
    parts = [torch.randn(n, 4) for n in (1, 3, 2)]
    kept = [stash.keep(p) for p in parts]
    assert all(torch.equal(k, p) and k is not p for k, p in zip(kept, parts))
    assert stash.buffer.numel() == 24 and stash.used == 24
    extra = torch.randn(1, 4)
    assert stash.keep(extra) is extra  # full: kept as it is
    assert Stash([2]).keep(torch.randn(3, 1)).numel() == 3  # not divisible: kept as it is


@pytest.mark.parametrize("arch", ["llama_tied", "gpt2"])
def test_dropping_dequantized_weights_changes_no_result(arch):
    results, models = {}, {}
    for keep in (True, False):
        model = tiny_model(arch)
        run = run_engine(model, parse_recipe(GPTQ_RECIPE, "gptq.yaml"), _samples(),
                         keep_dequantized=keep)
        results[keep], models[keep] = run.qweights, model
    for name, qw in results[True].items():
        assert torch.equal(qw.codes, results[False][name].codes), name
        kept = models[True].get_submodule(name).weight
        assert kept.numel() > 0 and models[False].get_submodule(name).weight.numel() == 0
    embed = models[False].get_input_embeddings().weight
    assert torch.equal(embed, tiny_model(arch).get_input_embeddings().weight)


def test_page_out_never_changes_values(tmp_path):
    from safetensors.torch import save_file
    from safetensors import safe_open

    from mpq.memory import page_out

    anon = torch.randn(300_000)
    save_file({"w": anon}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as handle:
        mapped = handle.get_tensor("w")
    copy = anon.clone()
    page_out([anon, mapped, anon[5:], torch.empty(0)])
    assert torch.equal(anon, copy) and torch.equal(mapped, copy)
