"""The same inputs give byte-identical artifact folders, in every output format."""
from __future__ import annotations

import pytest

from mpq.calibration import CalibrationOptions

from mpq.engine.spec import RunOptions

from mpq.quantize import quantize
from tests.helpers import folder_bytes
from tests.tiny_models import save_tiny_model


@pytest.mark.parametrize("recipe, output_format", [("w4a16-gptq", "mpq"),
                                                   ("w4a16-gptq", "compressed-tensors"),
                                                   ("w4a16-gptq", "gptq"),
                                                   ("w8a8-int8", "mpq")])
def test_two_runs_write_identical_bytes(recipe, output_format, tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=32)
    for run in ("a", "b"):
        quantize(tmp_path / "src", recipe, tmp_path / run, RunOptions(calibration=calibration, output_format=output_format))
    first, second = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")
    assert first.keys() == second.keys()
    different = [name for name in first if first[name] != second[name]]
    assert not different
