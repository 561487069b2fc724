"""The engine's block step for block-level quantizers (autoround) on tiny random models: lower
output error than RTN, reproducible bytes, resume, composition with transforms and rotation,
mixed blocks, the recipe in the artifact and the plan-time refusals."""
from __future__ import annotations

import pytest
import torch
import transformers

import mpq
from mpq.calibration import CalibrationOptions
from mpq.checkpoint.native import open_artifact
from mpq.config.recipe import parse_recipe
from mpq.engine import block_tuning
from mpq.engine.collect import run_block
from mpq.engine.resume import Checkpoint, work_dir_for
from mpq.engine.spec import RunOptions
from mpq.errors import RecipeError
from mpq.quantize import quantize
from tests.engine.test_resume import ROTATION, Crash, save_deep_model
from tests.helpers import TRANSFORMS, folder_bytes, logits_error, samples_of
from tests.tiny_models import save_tiny_model

FAST = "{iters: 8, batch_size: 2}"


def recipe(algorithm: str = "autoround", options: str = FAST, extra: str = "",
           weights: str = "{bits: 3, group_size: 32}", rules: str = ""):
    opts = f"    options: {options}\n" if algorithm == "autoround" and options else ""
    text = (f"mpq_recipe: 1\n{extra}defaults:\n  algorithm: {algorithm}\nrules:\n{rules}"
            f"  - targets: [Linear, Conv1D]\n{opts}    weights: {weights}\n")
    return parse_recipe(text, f"{algorithm}.yaml")


def calibration(calib_text, samples: int = 4, seq_len: int = 32) -> RunOptions:
    return RunOptions(calibration=CalibrationOptions(source=str(calib_text),
                                                     num_samples=samples, seq_len=seq_len))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tuned_rounding_beats_rtn_on_the_outputs(arch, tmp_path, calib_text):
    source = save_tiny_model(arch, tmp_path / "src")
    samples = samples_of(calib_text)
    errors = {}
    for name, rec in (("rtn", recipe("rtn")), ("autoround", recipe(options="{iters: 30}"))):
        result = quantize(tmp_path / "src", rec, tmp_path / name, calibration(calib_text))
        errors[name] = logits_error(mpq.load(tmp_path / name), source, samples)
        if name == "autoround":
            first = result.log.result(result.plan.quantized()[0].name)
            assert first["autoround_iters"] == 30
            assert first["autoround_loss"] <= first["autoround_init_loss"]
    assert errors["autoround"] < 0.75 * errors["rtn"]


def test_zero_iterations_give_the_round_to_nearest_tensors(tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    quantize(tmp_path / "src", recipe("rtn"), tmp_path / "rtn", calibration(calib_text))
    quantize(tmp_path / "src", recipe(options="{iters: 0}"), tmp_path / "ar",
             calibration(calib_text))
    rtn, tuned = mpq.load(tmp_path / "rtn"), mpq.load(tmp_path / "ar")
    for name, module in rtn.named_modules():
        if hasattr(module, "quantized_weight"):
            a, b = module.quantized_weight(), tuned.get_submodule(name).quantized_weight()
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def test_reruns_write_the_same_bytes_and_the_seed_matters(tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    for name, options in (("a", FAST), ("b", FAST), ("c", "{iters: 8, batch_size: 2, seed: 1}")):
        quantize(tmp_path / "src", recipe(options=options), tmp_path / name,
                 calibration(calib_text))
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    a, c = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "c")
    weights = [key for key in a if key.endswith(".safetensors")]
    assert any(a[key] != c[key] for key in weights)


NO_FEEDBACK = "{iters: 8, batch_size: 2, error_feedback: false}"


@pytest.mark.parametrize("extra, options", [("", FAST), (TRANSFORMS, FAST), (ROTATION, FAST),
                                            ("", NO_FEEDBACK), (ROTATION, NO_FEEDBACK)],
                         ids=["plain", "awq", "quarot", "no-feedback", "quarot-no-feedback"])
def test_resumed_run_writes_the_same_bytes(extra, options, tmp_path, calib_text, monkeypatch):
    save_deep_model(tmp_path / "src", layers=3)
    rec = recipe(extra=extra, options=options,
                 weights="{bits: 4, symmetric: false, group_size: 32}")
    options = calibration(calib_text)
    quantize(tmp_path / "src", rec, tmp_path / "whole", options)
    save_block = Checkpoint.save_block

    def crash_after_block_0(self, index, *args, **kwargs):
        save_block(self, index, *args, **kwargs)
        if index == 0:
            raise Crash

    monkeypatch.setattr(Checkpoint, "save_block", crash_after_block_0)
    with pytest.raises(Crash):
        quantize(tmp_path / "src", rec, tmp_path / "resumed", options)
    assert Checkpoint(work_dir_for(tmp_path / "resumed"), {}).finished_blocks() == 1
    monkeypatch.setattr(Checkpoint, "save_block", save_block)
    events = []
    quantize(tmp_path / "src", rec, tmp_path / "resumed", options,
             events=lambda kind, **data: events.append(kind))
    assert events.count("block_resumed") == 1
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")


def tuned_targets(tmp_path, calib_text, monkeypatch, extra: str, options: str):
    """Quantize a 3-block model; per tuned block (its inputs, the hidden states of its
    targets), and the float model's blocks."""
    save_deep_model(tmp_path / "src", layers=3)
    seen = []
    targets_of = block_tuning._targets

    def spy(run, block, inputs, opts):
        targets = targets_of(run, block, inputs, opts)
        copies = [((args[0].clone(), *args[1:]), kwargs) for args, kwargs in inputs]
        seen.append((copies, [args[0].clone() for args, _ in targets]))
        return targets

    monkeypatch.setattr(block_tuning, "_targets", spy)
    quantize(tmp_path / "src", recipe(extra=extra, options=options), tmp_path / "out",
             calibration(calib_text))
    assert len(seen) == 3
    return seen, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src").model.layers


def hidden_after(block, inputs) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [args[0] for args, _ in run_block(block, inputs)]


@pytest.mark.parametrize("extra", ["", TRANSFORMS], ids=["plain", "awq"])
def test_error_feedback_targets_the_float_models_block_outputs(extra, tmp_path, calib_text,
                                                               monkeypatch):
    """By default block i is tuned against the float blocks 0..i run on the float calibration
    inputs, not against the float block i on the partly quantized model's inputs."""
    seen, blocks = tuned_targets(tmp_path, calib_text, monkeypatch, extra, FAST)
    float_inputs = seen[0][0]  # block 0's inputs are the float model's
    for index, (inputs, targets) in enumerate(seen):
        if index:  # later blocks see the quantized blocks' outputs, which differ
            assert not torch.allclose(inputs[0][0][0], float_inputs[0][0][0], atol=1e-3)
        with torch.inference_mode():
            float_inputs = run_block(blocks[index], float_inputs)
        expected = [args[0] for args, _ in float_inputs]
        assert len(targets) == len(expected)
        for target, want in zip(targets, expected):
            torch.testing.assert_close(target, want, rtol=1e-4, atol=1e-4)


def test_without_error_feedback_the_target_is_the_float_block_on_its_own_inputs(
        tmp_path, calib_text, monkeypatch):
    seen, blocks = tuned_targets(tmp_path, calib_text, monkeypatch, "", NO_FEEDBACK)
    for index, (inputs, targets) in enumerate(seen):
        for target, want in zip(targets, hidden_after(blocks[index], inputs)):
            torch.testing.assert_close(target, want, rtol=1e-4, atol=1e-4)


def test_a_block_mixing_gptq_and_autoround(tmp_path, calib_text):
    source = save_tiny_model("llama", tmp_path / "src")
    attention = "  - targets: ['re:.*self_attn\\..*']\n    algorithm: gptq\n" \
                "    weights: {bits: 3, group_size: 32}\n"
    result = quantize(tmp_path / "src", recipe(rules=attention), tmp_path / "mixed",
                      calibration(calib_text))
    logs = {layer.name: result.log.result(layer.name) for layer in result.plan.quantized()}
    assert "gptq_loss" in logs["model.layers.0.self_attn.q_proj"]
    assert "autoround_loss" in logs["model.layers.0.mlp.down_proj"]
    error = logits_error(mpq.load(tmp_path / "mixed"), source, samples_of(calib_text))
    quantize(tmp_path / "src", recipe("rtn"), tmp_path / "rtn", calibration(calib_text))
    assert error < logits_error(mpq.load(tmp_path / "rtn"), source, samples_of(calib_text))


def test_the_recipe_and_options_travel_in_the_artifact(tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    rec = recipe(options="{effort: light, iters: 5, clip: false}")
    quantize(tmp_path / "src", rec, tmp_path / "out", calibration(calib_text, samples=2))
    artifact = open_artifact(tmp_path / "out")
    layer = artifact.plan.quantized()[0]
    assert layer.scheme.algorithm == "autoround"
    assert dict(layer.scheme.options) == {"effort": "light", "iters": 5, "clip": False}
    stored = artifact.json_field("recipe")
    again = parse_recipe(stored["text"], "autoround.yaml")
    assert again.to_dict() == rec.to_dict() == {k: v for k, v in stored.items()
                                                if k not in ("source", "text")}
    assert again.rules[-1].scheme.options == (("clip", False), ("effort", "light"), ("iters", 5))
    assert artifact.log.result(layer.name)["autoround_iters"] == 5


@pytest.mark.parametrize("weights, rules, message", [
    ("{format: mxfp4, bits: 4, group_size: 32}", "", "autoround supports the int grid only, "
     "not mxfp4"),
    ("{format: nvfp4, bits: 4, group_size: 16}", "", "int grid only, not nvfp4"),
    ("{bits: 4, group_size: 32}", "  - targets: [lm_head]\n    weights: {bits: 8, granularity: "
     "channel, group_size: null}\n", "lm_head: autoround tunes decoder blocks"),
    ("{bits: 4, group_size: 32}", "  - targets: ['re:.*mlp\\..*']\n    options: {iters: 3}\n"
     "    weights: {bits: 4, group_size: 32}\n", "must share one algorithm and options"),
], ids=["mxfp4", "nvfp4", "head", "options"])
def test_plan_time_refusals(weights, rules, message, tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    with pytest.raises(RecipeError, match=message):
        quantize(tmp_path / "src", recipe(weights=weights, rules=rules), tmp_path / "out",
                 calibration(calib_text))
    assert not (tmp_path / "out").exists()
