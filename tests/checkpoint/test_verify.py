"""`mpq verify`: artifacts record the sha256 of their tensor files, and damage is found."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from mpq.cli.main import cli
from mpq.errors import ArtifactError
from mpq.checkpoint.manifest import write_manifest
from mpq.checkpoint.native import file_digest
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from mpq.checkpoint.verify import verify_artifact
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    save_tiny_model("llama", root / "src")
    for output_format in ("mpq", "compressed-tensors", "gptq"):
        quantize(root / "src", "w4a16-asym", root / output_format, RunOptions(output_format=output_format))
    return root


def _copy(artifacts, tmp_path, name="mpq"):
    import shutil

    return shutil.copytree(artifacts / name, tmp_path / name)


@pytest.mark.parametrize("name", ["mpq", "compressed-tensors", "gptq"])
def test_fresh_artifacts_pass_and_record_their_hashes(artifacts, name):
    path = artifacts / name
    recorded = json.loads((path / "config.json").read_text())["mpq"]["tensor_files"]
    assert recorded == {"model.safetensors": file_digest(path / "model.safetensors")}
    checks = verify_artifact(path)
    assert all(check.ok for check in checks), checks
    assert (checks[-1].name == "tensors") == (name == "mpq")  # native: every layer decoded


def _flip_one_byte(file):
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x01
    file.write_bytes(bytes(data))


def _missing_tensor(file):
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != "model.layers.0.mlp.down_proj.scale"}
    save_file(tensors, str(file), metadata=metadata)


@pytest.mark.parametrize("damage, expected", [
    (_flip_one_byte, "sha256"),
    (lambda f: f.write_bytes(f.read_bytes()[:-100]), "bytes, recorded"),
    (lambda f: f.unlink(), "missing"),
])
def test_damaged_tensor_file_fails(artifacts, tmp_path, damage, expected):
    path = _copy(artifacts, tmp_path)
    damage(path / "model.safetensors")
    failed = [c for c in verify_artifact(path) if not c.ok]
    assert failed and expected in failed[0].detail


def test_cli_exit_codes_and_json(artifacts, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", str(artifacts / "mpq"), "--json"], obj={})
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout.splitlines()[-1])["ok"] is True
    path = _copy(artifacts, tmp_path)
    _flip_one_byte(path / "model.safetensors")
    bad = runner.invoke(cli, ["verify", str(path)], obj={})
    assert bad.exit_code == ArtifactError.exit_code
    assert "FAILED" in bad.stdout and "model.safetensors: sha256" in bad.stderr


def _rehash(path):
    """Record the folder's present bytes as a writer would (tensor_files, then the manifest)."""
    config = json.loads((path / "config.json").read_text())
    config["mpq"]["tensor_files"]["model.safetensors"] = file_digest(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    write_manifest(path)


def test_rehashed_but_incomplete_artifact_fails_decoding(artifacts, tmp_path):
    """Hashes only prove the files are the ones written; decoding proves they are complete."""
    path = _copy(artifacts, tmp_path)
    _missing_tensor(path / "model.safetensors")
    _rehash(path)
    checks = verify_artifact(path)
    assert [c.name for c in checks if not c.ok] == ["tensors"]


@pytest.mark.parametrize("key", ["model.layers.0.mlp.down_proj.scale",
                                 "model.layers.1.self_attn.q_proj.scale"])
def test_a_nan_scale_fails_verify_even_when_rehashed(artifacts, tmp_path, key):
    path = _copy(artifacts, tmp_path)
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(file), metadata=metadata)
    _rehash(path)
    failed = [c for c in verify_artifact(path) if not c.ok]
    assert [c.name for c in failed] == ["tensors"]
    assert key.rsplit(".", 1)[0] in failed[0].detail and "NaN/Inf" in failed[0].detail


def test_load_checks_the_recorded_hashes_unless_told_not_to(artifacts, tmp_path):
    import mpq

    path = _copy(artifacts, tmp_path)
    _flip_one_byte(path / "model.safetensors")
    with pytest.raises(ArtifactError, match="model.safetensors: sha256"):
        mpq.load(path)
    mpq.load(path, verify=False)  # a flipped bit in a tensor's data still loads when asked
