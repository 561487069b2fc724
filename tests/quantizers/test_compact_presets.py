"""The whole-model presets (``*-compact``): GPTQ body, input embedding and output head int8 per
row, fp16 scales.  On a tied tiny Llama the pair stays one stored tensor, the artifact is far
smaller than the plain GPTQ preset's, it loads, and its logits stay close to the float model."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import mpq
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from tests.helpers import logits_error, samples_of
from tests.tiny_models import save_tiny_model

def stored(folder) -> int:
    return (folder / "model.safetensors").stat().st_size


COMPACT = ("w4a16-gptq-compact", "w4a16-gptq-g32-compact", "w5a16-gptq-compact")


@pytest.fixture()
def runs(tmp_path, calib_text):
    save_tiny_model("llama_tied", tmp_path / "src")
    options = RunOptions(calibration=CalibrationOptions(source=str(calib_text), num_samples=4,
                                                        seq_len=64))

    def run(preset):
        result = quantize(tmp_path / "src", preset, tmp_path / preset, options)
        return result, tmp_path / preset

    return run


@pytest.mark.parametrize("preset", COMPACT)
def test_compact_preset_shares_the_tied_pair_and_shrinks_the_file(runs, preset, calib_text,
                                                                  tmp_path):
    plain, plain_dir = runs("w4a16-gptq")
    result, folder = runs(preset)
    assert result.plan.tying is not None and result.plan.tying.shared
    with safe_open(folder / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("model.embed_tokens.scale").dtype == torch.float16
        assert handle.get_tensor("model.layers.0.mlp.up_proj.scale").dtype == torch.float16
    assert "model.embed_tokens.qweight" in keys and not any(k.startswith("lm_head") for k in keys)
    assert stored(folder) < 0.8 * stored(plain_dir)
    model, source = mpq.load(folder), mpq.load(plain_dir)
    assert model.get_output_embeddings() is not None
    samples = samples_of(calib_text)
    float_model = save_tiny_model("llama_tied", tmp_path / "again")
    # int8 embedding/head cost little next to the 4/5-bit body: within 1.5× plain GPTQ's error
    assert logits_error(model, float_model, samples) < 1.5 * logits_error(source, float_model,
                                                                          samples)
