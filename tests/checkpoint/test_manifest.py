"""The artifact manifest: every file is recorded, and verify / mpq.load refuse any file that was
edited, deleted or added (mpq.checkpoint.manifest, mpq.checkpoint.verify)."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

import mpq
from mpq.cli.main import cli
from mpq.checkpoint.manifest import (MANIFEST_FILE, ManifestError, file_digest, folder_files,
                                     read_manifest, write_manifest)
from mpq.checkpoint.verify import require_intact, verify_artifact
from mpq.engine.spec import RunOptions
from mpq.errors import ArtifactError
from mpq.quantize import quantize
from tests.helpers import byte_tokenizer
from tests.tiny_models import save_tiny_model

FORMATS = ("mpq", "compressed-tensors", "gptq")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    save_tiny_model("llama", root / "src")
    byte_tokenizer().save_pretrained(root / "src")
    for output_format in FORMATS:
        quantize(root / "src", "w4a16", root / output_format,
                 RunOptions(output_format=output_format))
    return root


def _copy(artifacts, tmp_path, name="mpq"):
    return shutil.copytree(artifacts / name, tmp_path / name)


def _failed(path):
    return [check for check in verify_artifact(path) if not check.ok]


def _edit_json(file, change):
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize("name", FORMATS)
def test_the_manifest_records_every_other_file(artifacts, name):
    path = artifacts / name
    config = json.loads((path / "config.json").read_text())
    assert config["mpq"]["manifest"] == MANIFEST_FILE
    recorded = read_manifest(path / MANIFEST_FILE)
    on_disk = {p.name for p in path.iterdir()} - {MANIFEST_FILE}
    assert set(recorded) == on_disk
    assert {"config.json", "README.md", "tokenizer.json", "generation_config.json",
            "model.safetensors"} <= on_disk
    assert all(recorded[f] == file_digest(path / f) for f in on_disk)
    checks = verify_artifact(path)
    assert all(check.ok for check in checks), checks
    assert {"config.json", MANIFEST_FILE, "README.md"} <= {c.name for c in checks}
    require_intact(path)


EDITS = {
    "config.json": lambda f: _edit_json(f, lambda c: c["rope_parameters"].update(
        rope_theta=1234.0)),
    "tokenizer.json": lambda f: _edit_json(f, lambda t: t["model"]["vocab"].update({"A": 66})),
    "generation_config.json": lambda f: _edit_json(f, lambda g: g.update(temperature=0.1)),
    "tokenizer_config.json": lambda f: _edit_json(f, lambda t: t.update(chat_template="{{x}}")),
    "README.md": lambda f: f.write_text(f.read_text() + "\nedited\n"),
}


@pytest.mark.parametrize("file", sorted(EDITS))
def test_an_edited_file_fails_verify_and_load(artifacts, tmp_path, file):
    """An edited model card fails too: the manifest records it like any other file."""
    path = _copy(artifacts, tmp_path)
    EDITS[file](path / file)
    failed = _failed(path)
    assert [c.name for c in failed] == [file] and "recorded" in failed[0].detail
    with pytest.raises(ArtifactError, match=f"{file}: .*, recorded"):
        mpq.load(path)


def test_an_edited_config_still_loads_when_told_not_to_verify(artifacts, tmp_path):
    path = _copy(artifacts, tmp_path)
    EDITS["config.json"](path / "config.json")
    assert mpq.load(path, verify=False).config.rope_parameters["rope_theta"] == 1234.0


@pytest.mark.parametrize("name", ["compressed-tensors", "gptq"])
def test_other_formats_record_their_config_too(artifacts, tmp_path, name):
    from mpq.cli.eval_cmd import load_for_eval

    path = _copy(artifacts, tmp_path, name)
    EDITS["config.json"](path / "config.json")
    assert [c.name for c in _failed(path)] == ["config.json"]
    with pytest.raises(ArtifactError, match="config.json: .*, recorded"):
        load_for_eval(str(path), dequantize=False)  # mpq eval checks before loading


def _index_to_altered_copy(path):
    """A shard index (not written by mpq) pointing at a changed copy of the tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, str(path / "model-00001-of-00001.safetensors"), metadata=metadata)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {key: "model-00001-of-00001.safetensors"
                                        for key in tensors}}))


ADDITIONS = {
    "index": (_index_to_altered_copy, "model-00001-of-00001.safetensors, "
              "model.safetensors.index.json"),
    "remote code": (lambda p: (p / "modeling_custom.py").write_text("import os\n"),
                    "modeling_custom.py"),
    "added tokens": (lambda p: (p / "added_tokens.json").write_text('{"<x>": 300}'),
                     "added_tokens.json"),
    "tokenizer model": (lambda p: (p / "tokenizer.model.v3").write_bytes(b"\x00spm"),
                        "tokenizer.model.v3"),
    "pickle": (lambda p: (p / "pytorch_model.bin").write_bytes(b"PK\x03\x04"),
               "pytorch_model.bin"),
    "subfolder": (lambda p: (p / "sub").mkdir() or (p / "sub" / "config.json").write_text("{}"),
                  "sub/config.json"),
}


@pytest.mark.parametrize("kind", sorted(ADDITIONS))
def test_an_added_file_a_loader_could_read_fails(artifacts, tmp_path, kind):
    add, named = ADDITIONS[kind]
    path = _copy(artifacts, tmp_path)
    add(path)
    failed = _failed(path)
    assert [c.name for c in failed] == ["unrecorded files"]
    assert failed[0].detail.startswith(named + ": not in the manifest")
    with pytest.raises(ArtifactError, match="unrecorded files"):
        mpq.load(path)


def test_hidden_files_and_documentation_may_be_added(artifacts, tmp_path):
    path = _copy(artifacts, tmp_path)
    (path / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (path / ".cache" / "huggingface").mkdir(parents=True)
    (path / ".cache" / "huggingface" / "x.lock").write_text("")
    (path / "LICENSE").write_text("Apache-2.0\n")
    (path / "USAGE.md").write_text("# how to\n")
    (path / "plot.png").write_bytes(b"\x89PNG")
    assert not _failed(path)


def test_a_deleted_manifest_fails_verify_and_load(artifacts, tmp_path):
    path = _copy(artifacts, tmp_path)
    (path / MANIFEST_FILE).unlink()
    failed = _failed(path)
    assert [c.name for c in failed] == [MANIFEST_FILE] and "missing" in failed[0].detail
    with pytest.raises(ArtifactError, match=f"{MANIFEST_FILE}: missing"):
        mpq.load(path)


def test_an_artifact_from_before_manifests_fails_until_converted(artifacts, tmp_path):
    """What mpq wrote before it recorded every file: no manifest, no name for one."""
    from mpq.checkpoint.convert import convert

    path = _copy(artifacts, tmp_path)
    (path / MANIFEST_FILE).unlink()
    _edit_json(path / "config.json", lambda c: c["mpq"].pop("manifest"))
    failed = _failed(path)
    assert [c.name for c in failed] == ["manifest"]
    assert "re-write it with mpq convert" in failed[0].detail
    with pytest.raises(ArtifactError, match="names no manifest"):
        mpq.load(path)
    convert(path, tmp_path / "rewritten", "mpq")
    assert not _failed(tmp_path / "rewritten")


def test_convert_refuses_a_changed_artifact_instead_of_laundering_it(artifacts, tmp_path):
    """A converted artifact records fresh hashes, so convert checks its source first."""
    from mpq.checkpoint.convert import convert

    path = _copy(artifacts, tmp_path)
    _edit_json(path / "config.json", lambda c: c.update(rope_theta=1234.0))
    with pytest.raises(ArtifactError, match="config.json"):
        convert(path, tmp_path / "laundered", "compressed-tensors")
    assert not (tmp_path / "laundered").exists()
    result = CliRunner().invoke(cli, ["convert", str(path), "-o", str(tmp_path / "laundered"),
                                      "--format", "compressed-tensors"])
    assert result.exit_code == 7 and not (tmp_path / "laundered").exists()
    convert(path, tmp_path / "on-purpose", "compressed-tensors", verify=False)
    assert not _failed(tmp_path / "on-purpose")


@pytest.mark.parametrize("manifest, expected", [
    ("{not json", "unreadable"),
    ('{"mpq_manifest": 2, "files": {}}', "manifest version 2"),
    ('{"mpq_manifest": 1, "files": {"../x": {"bytes": 1, "sha256": "' + "0" * 64 + '"}}}',
     "not a path inside the folder"),
    ('{"mpq_manifest": 1, "files": {"config.json": {"bytes": 1}}}', "no valid sha256"),
])
def test_a_malformed_manifest_fails(artifacts, tmp_path, manifest, expected):
    path = _copy(artifacts, tmp_path)
    (path / MANIFEST_FILE).write_text(manifest)
    failed = _failed(path)
    assert failed[0].name == MANIFEST_FILE and expected in failed[0].detail


def test_tensor_files_outside_the_folder_are_refused(artifacts, tmp_path):
    path = _copy(artifacts, tmp_path)
    _edit_json(path / "config.json", lambda c: c["mpq"]["tensor_files"].update(
        {"../elsewhere.safetensors": {"bytes": 1, "sha256": "0" * 64}}))
    failed = _failed(path)
    assert failed[0].name == "content hashes" and "not a path inside" in failed[0].detail


def test_a_manifest_disagreeing_with_tensor_files_fails(artifacts, tmp_path):
    path = _copy(artifacts, tmp_path)
    _edit_json(path / MANIFEST_FILE,
               lambda m: m["files"]["model.safetensors"].update(bytes=1))
    failed = _failed(path)
    assert failed[0].name == MANIFEST_FILE and "disagrees" in failed[0].detail


def test_verify_json_lists_the_file_checks(artifacts, tmp_path):
    path = _copy(artifacts, tmp_path)
    (path / "modeling_custom.py").write_text("import os\n")
    result = CliRunner().invoke(cli, ["verify", str(path), "--json"], obj={})
    assert result.exit_code == ArtifactError.exit_code
    report = json.loads(result.stdout.splitlines()[-1])
    names = [check["name"] for check in report["checks"]]
    assert report["ok"] is False and MANIFEST_FILE in names and "tokenizer.json" in names
    assert report["checks"][-1] == {"name": "unrecorded files", "ok": False,
                                    "detail": "modeling_custom.py: not in the manifest, and "
                                              "a loader could read them"}


def _set_versions(path, header: str | None, config: str | None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    if header is not None:
        file = path / "model.safetensors"
        with safe_open(str(file), framework="pt") as handle:
            metadata = {**handle.metadata(), "mpq.format_version": header}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        save_file(tensors, str(file), metadata=metadata)
    if config is not None:
        _edit_json(path / "config.json", lambda c: c["mpq"].update(format_version=config))
    _edit_json(path / "config.json", lambda c: c["mpq"]["tensor_files"].update(
        {"model.safetensors": file_digest(path / "model.safetensors")}))
    write_manifest(path)  # recorded again, as a writer of that version would


def test_a_newer_minor_version_reads_everywhere(artifacts, tmp_path):
    path = _copy(artifacts, tmp_path)
    _set_versions(path, "1.7", "1.7")
    assert not _failed(path)
    mpq.load(path)
    mpq.load(path, verify=False)


@pytest.mark.parametrize("header, config", [("2.0", "2.0"), ("1.0", "2.0"), ("2.0", None)])
def test_another_major_version_is_refused_everywhere(artifacts, tmp_path, header, config):
    path = _copy(artifacts, tmp_path)
    _set_versions(path, header, config)
    failed = _failed(path)
    assert failed and ("'2.0'" in failed[0].detail)
    for verify in (True, False):
        with pytest.raises(ArtifactError, match="'2.0'"):
            mpq.load(path, verify=verify)


def test_header_and_config_versions_must_agree(artifacts, tmp_path):
    path = _copy(artifacts, tmp_path)
    _set_versions(path, "1.1", None)
    failed = _failed(path)
    assert [c.name for c in failed] == ["model.safetensors header"]
    assert "config.json records '1.0'" in failed[0].detail


def test_folder_files_rule(tmp_path):
    for name in ("a.json", "b.py", "README.md", "LICENSE", "sub/c.txt", ".hidden",
                 ".git/config", "notes.rst", "tokenizer.model.v3"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "linked").symlink_to(tmp_path / "sub", target_is_directory=True)
    assert folder_files(tmp_path) == ["LICENSE", "README.md", "a.json", "b.py", "linked/",
                                      "notes.rst", "sub/c.txt", "tokenizer.model.v3"]
    assert folder_files(tmp_path, documents=False) == ["a.json", "b.py", "linked/",
                                                       "sub/c.txt", "tokenizer.model.v3"]


def test_write_manifest_is_deterministic_and_skips_itself(tmp_path):
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "a.md").write_text("hi")
    first = write_manifest(tmp_path)
    text = (tmp_path / MANIFEST_FILE).read_text()
    assert write_manifest(tmp_path) == first and (tmp_path / MANIFEST_FILE).read_text() == text
    assert list(first) == ["a.md", "b.json"] and read_manifest(tmp_path / MANIFEST_FILE) == first
    with pytest.raises(ManifestError, match="no 'files'"):
        (tmp_path / "x.json").write_text("[]")
        read_manifest(tmp_path / "x.json")
