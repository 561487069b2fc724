"""The run spec is resolved once, reads no weight, and is what both a run and a dry run use."""
from __future__ import annotations

import pytest

import mpq.engine.spec as spec_module
from mpq.analysis.estimate import estimate_run
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions, resolve_run
from mpq.errors import CalibrationError
from mpq.quantize import quantize
from tests.helpers import REPO
from tests.tiny_models import save_tiny_model


@pytest.fixture()
def source(tmp_path):
    save_tiny_model("llama", tmp_path / "src")
    return tmp_path / "src"


def test_resolving_reads_no_weight(source):
    spec = resolve_run(source, "w4a16-gptq")
    assert all(p.device.type == "meta" for p in spec.skeleton.parameters())
    assert spec.streams and set(spec.needs) == {layer.name for layer in spec.plan.quantized()}
    assert spec.writer.name == "mpq" and spec.device.type == "cpu"


def test_a_run_resolves_its_plan_once(source, tmp_path, calib_text, monkeypatch):
    calls = []
    original = spec_module.plan_model
    monkeypatch.setattr(spec_module, "plan_model",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    quantize(source, "w4a16-gptq", tmp_path / "out", RunOptions(
        calibration=CalibrationOptions(source=str(calib_text), num_samples=2, seq_len=32)))
    assert len(calls) == 1  # the memory check and the run share the resolved spec


def test_missing_calibration_is_the_specs_verdict(source, calib_text):
    spec = resolve_run(source, "w4a16-gptq")
    with pytest.raises(CalibrationError, match="needs calibration statistics"):
        spec.require_calibration()
    resolve_run(source, "w4a16").require_calibration()  # round to nearest needs none
    estimate = estimate_run(spec, probe=False)  # a dry run reports it instead
    assert any("--calib" in warning for warning in estimate.warnings)


def test_the_recipe_file_is_an_input_a_preset_is_not(source, tmp_path, calib_text):
    """-o must not be (or hold) the recipe file: --force would delete it with the folder."""
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text((REPO / "mpq" / "config" / "presets" / "w4a16.yaml").read_text())
    calibration = CalibrationOptions(source=str(calib_text))
    spec = resolve_run(source, str(recipe), RunOptions(calibration=calibration))
    assert spec.inputs == [source, recipe, calib_text]
    assert resolve_run(source, "w4a16").inputs == [source]
