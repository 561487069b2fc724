"""The float stream (mpq.engine.float_stream): carried only for layers that need the float
model's inputs, recorded in the right basis with transforms, and resumable."""
from __future__ import annotations

import pytest

from mpq.calibration import CalibrationOptions
from mpq.config.recipe import parse_recipe
from mpq.engine.float_stream import float_stream_hooks
from mpq.engine.resume import Checkpoint, work_dir_for
from mpq.engine.spec import RunOptions, needed_stats, plan_model
from mpq.errors import RecipeError
from mpq.quantize import quantize
from tests.engine.test_resume import Crash, save_deep_model
from tests.helpers import TRANSFORMS, folder_bytes, run_engine, samples_of
from tests.tiny_models import tiny_model

BODY = ("rules:\n  - targets: [Linear]\n"
        "    weights: {format: int, bits: 4, symmetric: false, granularity: group, "
        "group_size: 32}\n")


def _recipe(options: str = "error_feedback: true", extra: str = ""):
    return parse_recipe(f"mpq_recipe: 1\n{extra}defaults:\n  algorithm: gptq\n"
                        f"  options: {{{options}}}\n" + BODY, "ef.yaml")


def test_hooks_exist_only_when_a_layer_needs_the_float_inputs():
    model = tiny_model("llama")
    for options, wanted in (("", False), ("error_feedback: true", True)):
        _, plan = plan_model(model, _recipe(options))
        before, after = float_stream_hooks(needed_stats(plan))
        assert bool(before) == bool(after) == wanted


@pytest.mark.parametrize("extra", ["", TRANSFORMS], ids=["plain", "awq"])
def test_first_layers_see_no_difference_from_the_float_model(extra, calib_text):
    """Block 0's first layers read the same tokens in both streams: the cross term is zero
    exactly, which also shows the inputs are recorded after the transforms."""
    run = run_engine(tiny_model("llama"), _recipe(extra=extra), samples_of(calib_text))
    first = run.log.result("model.layers.0.self_attn.q_proj")
    assert first["feedback_shift"] == 0.0
    assert run.log.result("model.layers.1.self_attn.q_proj")["feedback_shift"] > 0


def test_the_head_cannot_take_error_feedback():
    recipe = parse_recipe("mpq_recipe: 1\ndefaults:\n  algorithm: gptq\n"
                          "  options: {error_feedback: true}\nrules:\n"
                          "  - targets: [lm_head]\n    weights: {bits: 4, group_size: 32}\n",
                          "head.yaml")
    with pytest.raises(RecipeError, match="lm_head: error feedback needs the float model's"):
        plan_model(tiny_model("llama"), recipe)


@pytest.mark.parametrize("extra", ["", TRANSFORMS], ids=["plain", "awq"])
def test_a_resumed_run_writes_the_same_bytes(extra, tmp_path, calib_text, monkeypatch):
    save_deep_model(tmp_path / "src")
    options = RunOptions(calibration=CalibrationOptions(source=str(calib_text), num_samples=4,
                                                        seq_len=32))
    recipe = _recipe(extra=extra)
    quantize(tmp_path / "src", recipe, tmp_path / "whole", options)
    save_block = Checkpoint.save_block

    def crash_after_block_2(self, index, *args, **kwargs):
        save_block(self, index, *args, **kwargs)
        if index == 2:
            raise Crash

    monkeypatch.setattr(Checkpoint, "save_block", crash_after_block_2)
    with pytest.raises(Crash):
        quantize(tmp_path / "src", recipe, tmp_path / "resumed", options)
    monkeypatch.setattr(Checkpoint, "save_block", save_block)
    events = []
    quantize(tmp_path / "src", recipe, tmp_path / "resumed", options,
             events=lambda kind, **data: events.append(kind))
    assert events.count("block_resumed") == 3
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")
    assert not work_dir_for(tmp_path / "resumed").exists()
