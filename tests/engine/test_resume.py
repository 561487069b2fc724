"""Resumable runs: a run stopped after some blocks and rerun writes the same bytes as one that
was never stopped — in-process (a failure after a block), and for a real `mpq quantize` process
killed with SIGKILL or stopped with SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from mpq.errors import OutputError, ResumeError
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from mpq.engine.resume import Checkpoint, work_dir_for
from tests.helpers import (KV, REPO, TRANSFORMS, byte_tokenizer, disk_full_at_block, folder_bytes,
                           resume_recipe)
from tests.tiny_models import model_from_config

LAYERS = 6
ROTATION = "rotation: {type: quarot}\n"


def save_deep_model(path: Path, layers: int = LAYERS, hidden: int = 64) -> None:
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=256, num_hidden_layers=layers,
                                      max_position_embeddings=128)
    model_from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


class Crash(Exception):
    pass


@pytest.mark.parametrize("extra", ["", TRANSFORMS, KV, ROTATION], ids=["gptq", "awq", "kv", "quarot"])
def test_resumed_run_writes_the_same_bytes(extra, tmp_path, calib_text, monkeypatch):
    save_deep_model(tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=32)
    algorithm = "rtn" if extra == TRANSFORMS else "gptq"
    quantize(tmp_path / "src", resume_recipe(extra, algorithm), tmp_path / "whole", RunOptions(calibration=calibration))
    assert not work_dir_for(tmp_path / "whole").exists()  # removed once written

    save_block = Checkpoint.save_block

    def crash_after_block_2(self, index, *args, **kwargs):
        save_block(self, index, *args, **kwargs)
        if index == 2:
            raise Crash

    monkeypatch.setattr(Checkpoint, "save_block", crash_after_block_2)
    with pytest.raises(Crash):
        quantize(tmp_path / "src", resume_recipe(extra, algorithm), tmp_path / "resumed", RunOptions(calibration=calibration))
    assert not (tmp_path / "resumed").exists()
    assert Checkpoint(work_dir_for(tmp_path / "resumed"), {}).finished_blocks() == 3
    monkeypatch.setattr(Checkpoint, "save_block", save_block)

    events = []
    quantize(tmp_path / "src", resume_recipe(extra, algorithm), tmp_path / "resumed", RunOptions(calibration=calibration), events=lambda kind, **data: events.append(kind))
    assert events.count("block_resumed") == 3
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")
    assert not work_dir_for(tmp_path / "resumed").exists()


def test_an_edited_saved_block_is_refused_on_resume(tmp_path, calib_text, monkeypatch):
    save_deep_model(tmp_path / "src", layers=3)
    calibration = CalibrationOptions(source=str(calib_text), num_samples=2, seq_len=32)
    save_block = Checkpoint.save_block

    def crash_after_block_1(self, index, *args, **kwargs):
        save_block(self, index, *args, **kwargs)
        if index == 1:
            raise Crash

    monkeypatch.setattr(Checkpoint, "save_block", crash_after_block_1)
    with pytest.raises(Crash):
        quantize(tmp_path / "src", resume_recipe(), tmp_path / "out",
                 RunOptions(calibration=calibration))
    monkeypatch.setattr(Checkpoint, "save_block", save_block)
    block = Checkpoint(work_dir_for(tmp_path / "out"), {}).block_file(0)
    data = bytearray(block.read_bytes())
    data[-3] ^= 0x01  # one bit of a saved tensor
    block.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match="block 0 .* is not the file that was saved"):
        quantize(tmp_path / "src", resume_recipe(), tmp_path / "out",
                 RunOptions(calibration=calibration))
    assert not (tmp_path / "out").exists()


def test_mismatching_work_directory_is_refused(tmp_path, calib_text, monkeypatch):
    save_deep_model(tmp_path / "src", layers=3)
    calibration = CalibrationOptions(source=str(calib_text), num_samples=2, seq_len=32)
    monkeypatch.setattr(Checkpoint, "save_block", _crash)
    with pytest.raises(Crash):
        quantize(tmp_path / "src", resume_recipe(), tmp_path / "out", RunOptions(calibration=calibration))
    monkeypatch.undo()
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained",
                        lambda *a, **k: byte_tokenizer())
    with pytest.raises(ResumeError, match=r"different run \(recipe changed") as info:
        quantize(tmp_path / "src", resume_recipe(group=16), tmp_path / "out", RunOptions(calibration=calibration))
    assert "--no-resume" in info.value.one_line()
    other = CalibrationOptions(source=str(calib_text), num_samples=2, seq_len=32, seed=1)
    with pytest.raises(ResumeError, match=r"calibration changed"):
        quantize(tmp_path / "src", resume_recipe(), tmp_path / "out", RunOptions(calibration=other))
    quantize(tmp_path / "src", resume_recipe(group=16), tmp_path / "out", RunOptions(calibration=calibration), resume="fresh")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(ResumeError, match="nothing to resume"):
        quantize(tmp_path / "src", resume_recipe(), tmp_path / "other", RunOptions(calibration=calibration), resume="require")


def _crash(self, *args, **kwargs):
    raise Crash


# --- a real `mpq quantize` process -------------------------------------------------------------

def _command(src: Path, out: Path, calib: Path, recipe_file: Path) -> list[str]:
    return [sys.executable, "-c", "from mpq.cli.main import main; main()",
            "quantize", str(src), "-r", str(recipe_file), "-o", str(out), "--calib", str(calib),
            "--num-samples", "8", "--seq-len", "64", "--json"]


@pytest.fixture(scope="module")
def cli_case(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume-cli")
    src = tmp_path / "src"
    save_deep_model(src, layers=10, hidden=128)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % 23}{'xyz'[i % 3]}" for i in range(6000)))
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(resume_recipe(TRANSFORMS).text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(_command(src, tmp_path / "whole", calib, recipe_file), check=True, env=env,
                   capture_output=True)
    return src, calib, recipe_file, env, tmp_path / "whole"


def _run_until_block(command, env, block: int, sig: int) -> subprocess.Popen:
    """Start ``command``; send ``sig`` once it reports block ``block`` done; wait for it."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    for line in process.stdout:
        event = json.loads(line)
        if event.get("event") == "block_done" and event.get("index") == block:
            process.send_signal(sig)
            break
    _, process.stderr = process.communicate()
    return process


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killed_process_resumes_to_identical_artifact(sig, tmp_path, cli_case):
    src, calib, recipe_file, env, whole = cli_case
    out = tmp_path / "out"
    stopped = _run_until_block(_command(src, out, calib, recipe_file), env, 2, sig)
    assert stopped.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig)
    finished = Checkpoint(work_dir_for(out), {}).finished_blocks()
    assert 2 <= finished < 10, "the process must stop in the middle of the block loop"
    if sig == signal.SIGTERM:  # a clean stop right after the block in progress was saved
        assert finished == 3 and "stopped by SIGTERM after block 3 of 10" in stopped.stderr
    assert not out.exists()
    resumed = subprocess.run(_command(src, out, calib, recipe_file), env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    kinds = [json.loads(line).get("event") for line in resumed.stdout.splitlines()]
    assert kinds.count("block_resumed") == finished
    assert folder_bytes(out) == folder_bytes(whole)
    assert not work_dir_for(out).exists()


# --- a disk that fills up while a block is saved ------------------------------------------------

def test_a_full_disk_while_saving_a_block_keeps_the_finished_ones(tmp_path, monkeypatch):
    """safetensors reports a failed write as its own SafetensorError: one OutputError, the
    partial block file removed, the finished blocks kept; a rerun resumes to the same bytes."""
    import mpq.engine.resume as resume

    save_deep_model(tmp_path / "src", layers=3)
    quantize(tmp_path / "src", "w4a16", tmp_path / "whole")
    save_file = resume.save_file
    disk_full_at_block(monkeypatch, 1)
    with pytest.raises(OutputError, match=r"cannot save block 1 .*No space left") as info:
        quantize(tmp_path / "src", "w4a16", tmp_path / "out")
    assert "free disk space" in info.value.one_line()
    work = work_dir_for(tmp_path / "out")
    assert sorted(p.name for p in work.iterdir()) == [
        "block-00000.json", "block-00000.safetensors", "run.json"]
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(resume, "save_file", save_file)
    events = []
    quantize(tmp_path / "src", "w4a16", tmp_path / "out",
             events=lambda kind, **data: events.append(kind))
    assert events.count("block_resumed") == 1
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "whole")


def test_a_real_write_failure_of_a_block_is_one_error_line(tmp_path):
    """A real `mpq quantize` process whose files may not exceed 8 KiB (RLIMIT_FSIZE): the
    operating system refuses the block file's write, safetensors raises, mpq prints one line."""
    import resource

    save_deep_model(tmp_path / "src", layers=2)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killing signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    out = tmp_path / "out"
    command = [sys.executable, "-c", "from mpq.cli.main import main; main()", "quantize",
               str(tmp_path / "src"), "-r", "w4a16", "-o", str(out)]
    result = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=limit_file_size, capture_output=True, text=True)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == OutputError.exit_code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: cannot save block 0"), result.stderr
    assert "File too large" in lines[0]
    assert not out.exists()
    assert sorted(p.name for p in work_dir_for(out).iterdir()) == ["run.json"]


def test_a_resumed_moe_run_writes_the_same_bytes_streamed_or_not(tmp_path, calib_text,
                                                                  monkeypatch):
    """Fused experts (mpq.models.experts) through the work directory: a run stopped after block
    0 and resumed, a streamed run and a whole-model run write the same bytes."""
    from tests.tiny_models import save_tiny_model

    save_tiny_model("qwen3_moe", tmp_path / "src")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=32)
    quantize(tmp_path / "src", "w4a16-gptq", tmp_path / "whole",
             RunOptions(calibration=calibration))
    quantize(tmp_path / "src", "w4a16-gptq", tmp_path / "loaded",
             RunOptions(calibration=calibration, stream=False))
    save_block = Checkpoint.save_block

    def crash_after_block_0(self, index, *args, **kwargs):
        save_block(self, index, *args, **kwargs)
        raise Crash

    monkeypatch.setattr(Checkpoint, "save_block", crash_after_block_0)
    with pytest.raises(Crash):
        quantize(tmp_path / "src", "w4a16-gptq", tmp_path / "resumed",
                 RunOptions(calibration=calibration))
    monkeypatch.setattr(Checkpoint, "save_block", save_block)
    events = []
    quantize(tmp_path / "src", "w4a16-gptq", tmp_path / "resumed",
             RunOptions(calibration=calibration), events=lambda kind, **data: events.append(kind))
    assert events.count("block_resumed") == 1
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")
    assert folder_bytes(tmp_path / "loaded") == folder_bytes(tmp_path / "whole")
