"""Offloaded calibration activations (``--offload-activations``): block inputs and replay records
stay in host memory while the block runs on the GPU, and the artifact is the same, byte for byte,
as with the activations on the GPU."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import mpq.engine.collect
from mpq.cli.main import cli
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from tests.helpers import folder_bytes
from tests.tiny_models import save_tiny_model

# GPTQ with static int8 input scales: Hessians, maxima and true-sequential replay all run
RECIPE = """mpq_recipe: 1
defaults:
  algorithm: gptq
rules:
  - targets: [Linear]
    weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 32}
    input_activations: {format: int, bits: 8, dynamic: false, granularity: tensor}
"""
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _run(src, out, calib, **kwargs):
    recipe = src.parent / "recipe.yaml"
    recipe.write_text(RECIPE)
    quantize(src, str(recipe), out, RunOptions(calibration=CalibrationOptions(source=str(calib), num_samples=6, seq_len=48,
                                            batch_tokens=96)), check_memory=False, **kwargs)
    return folder_bytes(out)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_offloaded_activations_give_the_same_bytes_and_stay_on_the_host(
        arch, tmp_path, calib_text, monkeypatch):
    save_tiny_model(arch, tmp_path / "src")
    on_gpu = _run(tmp_path / "src", tmp_path / "gpu", calib_text, device="cuda")
    seen = []
    real = mpq.engine.collect.inputs_device

    def spy(inputs):
        seen.append(real(inputs))
        return seen[-1]

    monkeypatch.setattr(mpq.engine.collect, "inputs_device", spy)
    offloaded = _run(tmp_path / "src", tmp_path / "off", calib_text, device="cuda",
                     offload_activations=True)
    assert offloaded == on_gpu
    assert seen and {d.type for d in seen} == {"cpu"}


def test_the_flag_reaches_the_run_and_changes_nothing_on_cpu(tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    base = ["quantize", str(tmp_path / "src"), "--recipe", str(tmp_path / "recipe.yaml"),
            "--calib", str(calib_text), "--num-samples", "6", "--seq-len", "48",
            "--calib-batch-tokens", "96", "--no-memory-check", "-o"]
    runner = CliRunner()
    plain = runner.invoke(cli, [*base, str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    offloaded = runner.invoke(cli, [*base, str(tmp_path / "off"), "--offload-activations"])
    assert offloaded.exit_code == 0, offloaded.output
    assert folder_bytes(tmp_path / "off") == folder_bytes(tmp_path / "plain")
    dry = runner.invoke(cli, [*base, str(tmp_path / "dry"), "--offload-activations",
                              "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert '"offload_activations": true' in dry.output
