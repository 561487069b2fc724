"""A source that changes under a run is caught before anything is written, and a shard index may
only name files inside the model folder."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from mpq.engine.spec import resolve_run
from mpq.engine.resume import work_dir_for
from mpq.engine.streaming import BlockStreamer
from mpq.errors import ModelError
from mpq.quantize import quantize
from tests.helpers import save_sharded_model


def test_a_shard_replaced_mid_run_is_refused(tmp_path, monkeypatch):
    save_sharded_model(tmp_path / "src")
    shards = sorted((tmp_path / "src").glob("model-*.safetensors"))
    load = BlockStreamer.load

    def replace_a_shard_after_block_0(self, index, block):
        if index == 1:
            last = shards[-1]
            tensors = load_file(last)
            for tensor in tensors.values():
                tensor.mul_(1.5)
            save_file(tensors, str(last.with_suffix(".new")), metadata={"format": "pt"})
            last.with_suffix(".new").replace(last)
        return load(self, index, block)

    monkeypatch.setattr(BlockStreamer, "load", replace_a_shard_after_block_0)
    with pytest.raises(ModelError, match="changed while the run read them"):
        quantize(tmp_path / "src", "w4a16", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not work_dir_for(tmp_path / "out").exists()


def test_an_index_naming_a_shard_outside_the_folder_is_refused(tmp_path):
    save_sharded_model(tmp_path / "src")
    index = tmp_path / "src" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    outside = tmp_path / "elsewhere.safetensors"
    (tmp_path / "src" / data["weight_map"][name]).rename(outside)
    data["weight_map"] = {k: ("../elsewhere.safetensors" if v == data["weight_map"][name] else v)
                          for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="outside the model folder"):
        resolve_run(tmp_path / "src", "w4a16")


def test_the_source_hash_covers_the_tokenizer_mpq_reads(tmp_path):
    from mpq.models.source import fingerprint

    save_sharded_model(tmp_path / "src")
    before = fingerprint(tmp_path / "src")
    assert "tokenizer.json" in before["files"]
    tokenizer = tmp_path / "src" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + "\n")
    assert fingerprint(tmp_path / "src")["sha256"] != before["sha256"]


def test_a_tokenizer_replaced_mid_run_is_refused(tmp_path, monkeypatch):
    save_sharded_model(tmp_path / "src")
    load = BlockStreamer.load

    def touch_the_tokenizer_after_block_0(self, index, block):
        if index == 1:
            tokenizer = tmp_path / "src" / "tokenizer_config.json"
            tokenizer.write_text(tokenizer.read_text() + "\n")
        return load(self, index, block)

    monkeypatch.setattr(BlockStreamer, "load", touch_the_tokenizer_after_block_0)
    with pytest.raises(ModelError, match="tokenizer_config.json"):
        quantize(tmp_path / "src", "w4a16", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not work_dir_for(tmp_path / "out").exists()
