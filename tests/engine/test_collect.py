"""Shared-input statistics and true-sequential steps, discovered from a real block's execution."""
from __future__ import annotations

import pytest
import torch

from mpq.engine.collect import collecting, input_groups, results, run_block
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe
from tests.helpers import byte_tokenizer, register_recording_quantizer
from tests.tiny_models import save_tiny_model, tiny_model

LLAMA_STEPS = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def _block_inputs(model, n=3, seq=16):
    from mpq.models.layout import layout_of
    from mpq.engine.runner import capture_block_inputs

    samples = [torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(i))
               for i in range(n)]
    with torch.inference_mode():
        return capture_block_inputs(model, layout_of(model), samples)


def test_groups_follow_execution_order_and_shared_inputs():
    model = tiny_model("llama")
    block = model.model.layers[0]
    names = {local: f"model.layers.0.{local}" for local, m in block.named_modules()
             if isinstance(m, torch.nn.Linear)}
    with torch.inference_mode():
        groups = input_groups(block, names, _block_inputs(model)[0])
    assert [[n.rsplit(".", 1)[1] for n in g] for g in groups] == LLAMA_STEPS


def test_gpt2_groups():
    model = tiny_model("gpt2")
    block = model.transformer.h[0]
    names = {local: f"transformer.h.0.{local}" for local in
             ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    with torch.inference_mode():
        groups = input_groups(block, names, _block_inputs(model)[0])
    assert len(groups) == 4 and groups[0] == ["transformer.h.0.attn.c_attn"]


def test_shared_hessian_is_computed_once_and_equals_a_direct_computation():
    model = tiny_model("llama")
    block = model.model.layers[0]
    prefix = "model.layers.0."
    names = {local: prefix + local for local in ("self_attn.q_proj", "self_attn.k_proj",
                                                 "self_attn.v_proj", "mlp.down_proj")}
    inputs = _block_inputs(model)
    wanted = {name: frozenset({"hessian"}) for name in names.values()}
    with torch.inference_mode():
        groups = input_groups(block, names, inputs[0])
        with collecting(block, prefix, wanted, groups) as collectors:
            run_block(block, inputs, keep_outputs=False)
        stats = results(collectors)
        seen = []
        handle = block.self_attn.q_proj.register_forward_pre_hook(
            lambda m, a: seen.append(a[0].reshape(-1, 64)))
        run_block(block, inputs, keep_outputs=False)
        handle.remove()
    q, k = stats[prefix + "self_attn.q_proj"]["hessian"], stats[prefix + "self_attn.k_proj"]["hessian"]
    assert q is k  # one tensor shared by q/k/v
    x = torch.cat(seen)
    torch.testing.assert_close(q, 2 * x.t() @ x / x.shape[0])
    assert stats[prefix + "mlp.down_proj"]["hessian"].shape == (128, 128)


def test_stop_after_ends_the_forward_early():
    model = tiny_model("llama")
    block = model.model.layers[0]
    prefix = "model.layers.0."
    names = {"self_attn.q_proj": prefix + "self_attn.q_proj"}
    calls = []
    handle = block.mlp.down_proj.register_forward_pre_hook(lambda m, a: calls.append(1))
    inputs = _block_inputs(model)
    with torch.inference_mode():
        groups = input_groups(block, names, inputs[0])
        calls.clear()
        with collecting(block, prefix, {prefix + "self_attn.q_proj": frozenset({"hessian"})},
                        groups, stop_after=prefix + "self_attn.q_proj"):
            run_block(block, inputs, keep_outputs=False)
    handle.remove()
    assert calls == []


def test_a_pass_stops_at_the_first_layer_of_the_stop_group():
    """q/k/v share one input: stopping after v_proj need not run q_proj or k_proj."""
    model = tiny_model("llama")
    block = model.model.layers[0]
    prefix = "model.layers.0."
    names = {local: prefix + local for local in ("self_attn.q_proj", "self_attn.k_proj",
                                                 "self_attn.v_proj")}
    ran = []
    handles = [block.get_submodule(local).register_forward_hook(lambda m, a, o, n=local: ran.append(n))
               for local in names]
    inputs = _block_inputs(model)
    wanted = {name: frozenset({"hessian"}) for name in names.values()}
    with torch.inference_mode():
        groups = input_groups(block, names, inputs[0])
        ran.clear()
        with collecting(block, prefix, wanted, groups,
                        stop_after=prefix + "self_attn.v_proj") as collectors:
            run_block(block, inputs, keep_outputs=False)
    for handle in handles:
        handle.remove()
    assert ran == [] and results(collectors)[prefix + "self_attn.v_proj"]["hessian"].shape == (64, 64)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_true_sequential_feeds_o_proj_with_quantized_predecessors(tmp_path, monkeypatch,
                                                                  true_sequential):
    """o_proj's statistics differ between modes exactly because v_proj was quantized first."""
    absmax = register_recording_quantizer(monkeypatch)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained",
                        lambda *a, **k: byte_tokenizer())
    source = save_tiny_model("llama", tmp_path / "src")
    recipe = parse_recipe(
        "mpq_recipe: 1\nrules:\n  - targets: ['re:model\\.layers\\.0\\.self_attn\\.(v|o)_proj']\n"
        "    algorithm: recording\n    weights: {bits: 2, group_size: 16}\n", "t.yaml")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 37}" for i in range(3000)))
    quantize(tmp_path / "src", recipe, tmp_path / "out", RunOptions(true_sequential=true_sequential, calibration=CalibrationOptions(source=str(text), num_samples=2, seq_len=32)))
    # float o_proj inputs, from the unquantized source model
    from mpq.calibration import build_calibration_set

    float_max = []
    handle = source.model.layers[0].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: float_max.append(a[0].abs().amax(dim=(0, 1))))
    with torch.no_grad():
        for ids in build_calibration_set(CalibrationOptions(source=str(text), num_samples=2, seq_len=32), byte_tokenizer()).samples:
            source(ids)
    handle.remove()
    float_absmax = torch.stack(float_max).amax(dim=0)
    o_proj_stats = absmax[1]
    if true_sequential:
        assert not torch.allclose(o_proj_stats, float_absmax)
    else:
        torch.testing.assert_close(o_proj_stats, float_absmax)


@pytest.mark.parametrize("stat", ["hessian", "input_absmax", "input_absmean", "input_sample"])
def test_a_layer_that_saw_no_tokens_is_named(stat):
    """E.g. a mixture-of-experts expert no calibration token was routed to: its statistics
    are empty, and the error names the layer instead of failing inside the statistic."""
    from mpq.errors import CalibrationError
    from mpq.engine.stats import STATS

    collectors = {"model.layers.3.mlp.experts.7.down_proj": {stat: STATS.get(stat)()}}
    with pytest.raises(CalibrationError, match=r"experts\.7\.down_proj saw no calibration tokens"):
        results(collectors)
