"""Streaming (mpq.engine.streaming): blocks read from the source shards one at a time, the artifact
written from the work directory — byte-identical to the whole-model path, with only one block's
weights resident at a time."""
from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from mpq.errors import ModelError
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe
from mpq.engine.resume import work_dir_for
from mpq.engine.streaming import BlockStreamer
from tests.helpers import KV, TRANSFORMS, folder_bytes, resume_recipe, save_sharded_model

LAYERS = 4


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "src"
    save_sharded_model(path)
    return path


CASES = {"rtn": ("", "rtn"), "gptq": ("", "gptq"), "awq": (TRANSFORMS, "rtn"),
         "kv": (KV, "gptq"),
         "kv-int4-group": ("kv_cache: {format: int4, granularity: group, group_size: 8}\n", "gptq"),
         "kv-int8-dynamic": ("kv_cache: {format: int8, dynamic: true}\n", "gptq")}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_artifact_is_byte_identical(case, sharded, tmp_path, calib_text):
    extra, algorithm = CASES[case]
    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=32)
    events = []
    quantize(sharded, resume_recipe(extra, algorithm), tmp_path / "streamed", RunOptions(calibration=calibration), events=lambda kind, **data: events.append((kind, data)))
    assert [data["streaming"] for kind, data in events if kind == "start"] == [True]
    quantize(sharded, resume_recipe(extra, algorithm), tmp_path / "whole", RunOptions(calibration=calibration, stream=False))
    assert folder_bytes(tmp_path / "streamed") == folder_bytes(tmp_path / "whole")
    assert not work_dir_for(tmp_path / "streamed").exists()


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_streamed_other_formats_byte_identical(fmt, sharded, tmp_path, calib_text):
    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=32)
    rec = parse_recipe("mpq_recipe: 1\nname: s\ndefaults:\n  algorithm: gptq\nrules:\n"
                       "  - targets: [Linear]\n    weights: {format: int, bits: 4, "
                       "symmetric: true, granularity: group, group_size: 32}\n", "s.yaml")
    quantize(sharded, rec, tmp_path / "streamed", RunOptions(calibration=calibration, output_format=fmt))
    quantize(sharded, rec, tmp_path / "whole", RunOptions(calibration=calibration, output_format=fmt, stream=False))
    assert folder_bytes(tmp_path / "streamed") == folder_bytes(tmp_path / "whole")


@pytest.mark.parametrize("tied,dtype", [(True, torch.float32), (False, torch.bfloat16)],
                         ids=["tied-fp32", "untied-bf16"])
def test_streamed_dtype_and_ties_match_the_loaded_model(tied, dtype, tmp_path):
    save_sharded_model(tmp_path / "src", tied=tied, dtype=dtype)
    events = []
    for name in ("streamed", "whole"):
        quantize(tmp_path / "src", "w4a16", tmp_path / name, RunOptions(stream=name == "streamed"), events=lambda kind, **data: events.append((kind, data)))
    assert [data["streaming"] for kind, data in events if kind == "start"] == [True, False]
    assert folder_bytes(tmp_path / "streamed") == folder_bytes(tmp_path / "whole")


def test_only_one_block_is_resident(sharded, tmp_path, calib_text, monkeypatch):
    """At each block_start only that block's parameters are off the meta device."""
    streamers = []
    init = BlockStreamer.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        streamers.append(self)

    monkeypatch.setattr(BlockStreamer, "__init__", record)
    resident = []

    def events(kind, **data):
        if kind == "block_start":
            streamer = streamers[0]
            resident.append((data["index"], streamer.resident_bytes(),
                             sorted(streamer.loaded_blocks)))

    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=32)
    quantize(sharded, resume_recipe("", "gptq"), tmp_path / "out", RunOptions(calibration=calibration), events=events)
    model = transformers.AutoModelForCausalLM.from_pretrained(sharded)
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    assert [index for index, _, _ in resident] == list(range(LAYERS))
    for index, nbytes, loaded in resident:
        assert loaded == [index]
        assert nbytes == block_bytes  # one block, not the model's LAYERS blocks


def test_nan_in_one_block_is_a_model_error(tmp_path, calib_text):
    save_sharded_model(tmp_path / "src")
    name = "model.layers.2.mlp.up_proj.weight"
    for file in sorted((tmp_path / "src").glob("model-*.safetensors")):
        tensors = load_file(str(file))
        if name in tensors:
            tensors[name][3, 5] = float("nan")
            save_file(tensors, str(file), metadata={"format": "pt"})
    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=32)
    with pytest.raises(ModelError, match=f"tensor '{name}' holds NaN or Inf"):
        quantize(tmp_path / "src", resume_recipe("", "gptq"), tmp_path / "out", RunOptions(calibration=calibration))
    assert not (tmp_path / "out").exists()
    assert not work_dir_for(tmp_path / "out").exists()
