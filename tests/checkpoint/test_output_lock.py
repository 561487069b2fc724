"""One run at a time writes an output; half-written folders of killed runs are cleaned up."""
from __future__ import annotations

import fcntl

import pytest

from mpq.errors import OutputError
from mpq.quantize import quantize
from tests.tiny_models import save_tiny_model


@pytest.fixture()
def source(tmp_path):
    save_tiny_model("llama", tmp_path / "src")
    return tmp_path / "src"


def test_a_second_run_on_the_same_output_is_refused(source, tmp_path):
    lock = tmp_path / ".out.mpq-lock"
    with open(lock, "w") as handle:  # another run holds the output
        handle.write("12345")
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputError, match=r"another mpq run \(pid 12345\) is writing"):
            quantize(source, "w4a16", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    quantize(source, "w4a16", tmp_path / "out")  # free again
    assert (tmp_path / "out" / "model.safetensors").is_file() and not lock.exists()


def test_a_killed_runs_half_written_folder_is_removed(source, tmp_path):
    left = tmp_path / ".out.mpq-tmp-99999"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    other = tmp_path / ".other.mpq-tmp-99999"  # another output's: not ours to remove
    other.mkdir()
    quantize(source, "w4a16", tmp_path / "out")
    assert not left.exists() and other.exists()
