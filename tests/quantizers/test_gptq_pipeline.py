"""GPTQ through the whole pipeline on tiny random models: metadata, and better outputs than RTN."""
from __future__ import annotations

import pytest
import torch

import mpq
from mpq.calibration import build_calibration_set
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe
from tests.helpers import byte_tokenizer
from tests.tiny_models import save_tiny_model


def _recipe(algorithm: str) -> str:
    options = "\n  options: {damp: 0.01, block_size: 32}" if algorithm == "gptq" else ""
    return (f"mpq_recipe: 1\ndefaults:\n  algorithm: {algorithm}{options}\nrules:\n"
            "  - targets: [Linear, Conv1D]\n    weights: {bits: 3, group_size: 32}\n")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2", "granite"])
def test_gptq_beats_rtn_on_calibration_logits(arch, tmp_path, calib_text):
    source = save_tiny_model(arch, tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=8, seq_len=64)
    errors = {}
    for algorithm in ("rtn", "gptq"):
        recipe = parse_recipe(_recipe(algorithm), f"{algorithm}.yaml")
        result = quantize(tmp_path / "src", recipe, tmp_path / algorithm, RunOptions(calibration=calibration))
        model = mpq.load(tmp_path / algorithm)
        samples = build_calibration_set(CalibrationOptions(source=str(calib_text), num_samples=8, seq_len=64), byte_tokenizer()).samples
        with torch.no_grad():
            errors[algorithm] = sum(float((model(s).logits - source(s).logits).pow(2).mean())
                                    for s in samples)
        if algorithm == "gptq":
            first = result.log.result(result.plan.quantized()[0].name)
            assert first["gptq_loss"] >= 0 and first["damp"] == pytest.approx(0.01)
    assert errors["gptq"] < 0.8 * errors["rtn"]


def test_gptq_records_loss_and_damping_in_the_artifact(tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    quantize(tmp_path / "src", "w4a16-gptq", tmp_path / "out", RunOptions(calibration=CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=64)))
    from mpq.checkpoint.native import open_artifact

    artifact = open_artifact(tmp_path / "out")
    for layer in artifact.plan.quantized():
        assert {"gptq_loss", "damp", "damp_retries", "act_order",
                "rel_mse"} <= set(artifact.log.result(layer.name))
    assert artifact.json_field("pipeline") == {"true_sequential": True, "batch_tokens": 2048}


def test_act_order_artifact_round_trips_g_idx(tmp_path, calib_text):
    source = save_tiny_model("llama", tmp_path / "src")
    recipe = parse_recipe("mpq_recipe: 1\ndefaults:\n  algorithm: gptq\n  options: {act_order: true}"
                          "\nrules:\n  - targets: Linear\n    weights: {bits: 4, group_size: 16}\n",
                          "ao.yaml")
    quantize(tmp_path / "src", recipe, tmp_path / "out", RunOptions(calibration=CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=64)))
    loaded = mpq.load(tmp_path / "out")
    q_proj = loaded.model.layers[0].self_attn.q_proj
    g_idx = q_proj.quantized_weight().g_idx
    assert g_idx is not None and not torch.equal(g_idx, torch.arange(64) // 16)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all()
    assert (q_proj.dequantized_weight() - source.model.layers[0].self_attn.q_proj.weight).abs().max() < 0.1


def test_gptq_without_calibration_is_a_clear_error(tmp_path):
    from mpq.errors import CalibrationError

    save_tiny_model("llama", tmp_path / "src")
    with pytest.raises(CalibrationError, match="--calib"):
        quantize(tmp_path / "src", "w4a16-gptq", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_gptq_option_fails_at_plan_time(tmp_path):
    from mpq.errors import RecipeError

    save_tiny_model("llama", tmp_path / "src")
    recipe = parse_recipe("mpq_recipe: 1\ndefaults:\n  algorithm: gptq\n  options: {dmap: 0.1}\n"
                          "rules:\n  - targets: Linear\n    weights: {group_size: 32}\n", "bad.yaml")
    with pytest.raises(RecipeError, match="dmap"):
        quantize(tmp_path / "src", recipe, tmp_path / "out")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_on_cuda_matches_cpu(tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=64)
    quantize(tmp_path / "src", "w4a16-gptq", tmp_path / "cpu", RunOptions(calibration=calibration))
    quantize(tmp_path / "src", "w4a16-gptq", tmp_path / "gpu", RunOptions(calibration=calibration, device="cuda"))
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        cpu = mpq.load(tmp_path / "cpu")(ids).logits
        gpu = mpq.load(tmp_path / "gpu")(ids).logits
    assert (cpu - gpu).abs().max() < 0.05
