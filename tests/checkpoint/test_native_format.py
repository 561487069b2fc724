"""The native artifact on disk: metadata, atomic writes, sharding and refusal of damaged files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mpq
from mpq.errors import ArtifactError, OutputError
from mpq.checkpoint.native import open_artifact, shard_tensors, write_artifact
from mpq.quantize import quantize
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    save_tiny_model("llama", root / "src")
    quantize(root / "src", "w4a16-asym", root / "w4")
    return root / "w4"


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_header_holds_versioned_string_metadata(artifact_dir):
    with safe_open(str(artifact_dir / "model.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["mpq.format_version"] == "1.0"
    assert all(isinstance(v, str) for v in meta.values())
    plan = json.loads(meta["mpq.plan"])
    q_proj = next(l for l in plan["layers"] if l["name"] == "model.layers.0.self_attn.q_proj")
    assert q_proj["scheme"]["weights"]["bits"] == 4 and q_proj["result"]["rel_mse"] > 0
    assert json.loads(meta["mpq.source"])["sha256"]
    config = json.loads((artifact_dir / "config.json").read_text())
    assert config["mpq"]["format"] == "mpq"
    assert "Plan summary" in (artifact_dir / "README.md").read_text()


def test_codes_are_packed_not_stored_as_floats(artifact_dir):
    tensors = load_file(str(artifact_dir / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    packed = tensors["model.layers.0.self_attn.q_proj.qweight"]
    assert packed.dtype == torch.int32 and packed.numel() * 32 == 64 * 64 * 4


def test_unknown_major_version_is_refused(artifact_dir, tmp_path):
    damaged = _copy(artifact_dir, tmp_path / "v2")
    tensors = load_file(str(damaged / "model.safetensors"))
    with safe_open(str(damaged / "model.safetensors"), framework="pt") as handle:
        meta = dict(handle.metadata())
    meta["mpq.format_version"] = "2.0"
    save_file(tensors, str(damaged / "model.safetensors"), metadata=meta)
    with pytest.raises(ArtifactError, match="version '2.0' is not supported"):
        mpq.load(damaged, verify=False)  # verified, the changed file's sha256 fails first


@pytest.mark.parametrize("damage", ["missing_tensor", "shape_mismatch", "missing_code_tensor"])
def test_damaged_tensors_are_refused(artifact_dir, tmp_path, damage):
    damaged = _copy(artifact_dir, tmp_path / damage)
    file = damaged / "model.safetensors"
    tensors = load_file(str(file))
    with safe_open(str(file), framework="pt") as handle:
        meta = dict(handle.metadata())
    if damage == "missing_tensor":
        del tensors["model.norm.weight"]
        match = "missing tensor"
    elif damage == "shape_mismatch":
        tensors["model.layers.0.input_layernorm.weight"] = torch.ones(3)
        match = "shape"
    else:
        del tensors["model.layers.1.mlp.up_proj.qweight"]
        match = "qweight"
    save_file(tensors, str(file), metadata=meta)
    with pytest.raises(ArtifactError, match="sha256|bytes, recorded"):
        mpq.load(damaged)  # the recorded hashes catch it first
    with pytest.raises(ArtifactError, match=match):
        mpq.load(damaged, verify=False)  # and the loader's own checks, past them


def test_not_an_artifact(tmp_path):
    save_tiny_model("llama", tmp_path / "plain")
    with pytest.raises(ArtifactError, match="not an mpq artifact"):
        open_artifact(tmp_path / "plain")


def test_sharded_artifact_loads_like_a_single_file(artifact_dir, tmp_path):
    single = open_artifact(artifact_dir)
    from mpq.checkpoint.native import read_tensors

    tensors = read_tensors(single)
    config = json.loads((artifact_dir / "config.json").read_text())
    out = write_artifact(tmp_path / "sharded", tensors, dict(single.metadata), config,
                         max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(mpq.load(out)(ids).logits, mpq.load(artifact_dir)(ids).logits)


def test_shards_respect_the_size_limit():
    tensors = {f"t{i}": torch.zeros(100) for i in range(10)}  # 400 bytes each
    shards = shard_tensors(tensors, 1000)
    assert [len(s) for s in shards] == [2, 2, 2, 2, 2]
    assert sum(len(s) for s in shards_tensors_big()) == 1


def shards_tensors_big():
    return shard_tensors({"big": torch.zeros(1000)}, 10)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mpq.checkpoint.native.write_safetensors", boom)
    with pytest.raises(OutputError, match="disk full"):
        write_artifact(tmp_path / "out", {"a": torch.zeros(2)}, {}, {"mpq": {}})
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="--force"):
        write_artifact(tmp_path / "out", {"a": torch.zeros(2)}, {}, {"mpq": {}})
