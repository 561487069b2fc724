"""``scale_search: auto`` (the RTN presets' setting): the activation-weighted search when the run
has calibration data, plain min-max (today's bytes, no calibration pass) when it has none."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from mpq.calibration import CalibrationOptions
from mpq.config.recipe import load_recipe, parse_recipe
from mpq.engine.spec import RunOptions, needed_stats, plan_model
from mpq.quantize import quantize
from tests.helpers import save_sharded_model
from tests.tiny_models import tiny_model

RULES = ("rules:\n  - targets: [Linear]\n"
         "    weights: {format: int, bits: 4, symmetric: true, granularity: group, "
         "group_size: 32}\n")


def _recipe(search: str):
    return parse_recipe(f"mpq_recipe: 1\ndefaults:\n  algorithm: rtn\n"
                        f"  options: {{scale_search: {search}}}\n" + RULES, f"{search}.yaml")


def _same_tensors(a, b) -> bool:
    """The artifacts' tensors are equal (their metadata names the recipe, which differs)."""
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def _run(src, recipe, out, calib=None):
    events = []
    calibration = CalibrationOptions(source=None if calib is None else str(calib),
                                     num_samples=4, seq_len=32)
    quantize(src, recipe, out, RunOptions(calibration=calibration),
             events=lambda kind, **data: events.append((kind, data)))
    return events


def test_auto_wants_the_importance_only_when_the_run_is_calibrated():
    _, plan = plan_model(tiny_model("llama"), load_recipe("w4a16"))
    assert needed_stats(plan) == {}
    calibrated = needed_stats(plan, calibrated=True)
    assert set(calibrated) == {layer.name for layer in plan.quantized()}
    assert set(calibrated.values()) == {frozenset({"input_sqmean"})}


def test_auto_is_the_activation_search_with_calibration_data(tmp_path, calib_text):
    save_sharded_model(tmp_path / "src")
    events = _run(tmp_path / "src", _recipe("auto"), tmp_path / "auto", calib_text)
    assert any(kind == "calibration" for kind, _ in events)
    layers = [data for kind, data in events if kind == "layer"]
    assert layers and all(data["scale_search"] == "activations" for data in layers)
    _run(tmp_path / "src", _recipe("activations"), tmp_path / "activations", calib_text)
    assert _same_tensors(tmp_path / "auto", tmp_path / "activations")


def test_auto_without_calibration_data_is_min_max(tmp_path):
    save_sharded_model(tmp_path / "src")
    events = _run(tmp_path / "src", _recipe("auto"), tmp_path / "auto")
    assert not any(kind == "calibration" for kind, _ in events)
    assert all("scale_search" not in data for kind, data in events if kind == "layer")
    _run(tmp_path / "src", _recipe("none"), tmp_path / "none")
    assert _same_tensors(tmp_path / "auto", tmp_path / "none")
