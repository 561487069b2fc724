"""A GGUF folder mpq wrote, read back by mpq itself: ``mpq verify`` (manifest, files, the GGUF's
mpq metadata, every tensor finite) and ``mpq inspect`` (plan, GGUF type and bytes per layer)."""
from __future__ import annotations

import json
import shutil

import pytest

from mpq.checkpoint.gguf_folder import GGUF_FILE, is_gguf_folder, open_gguf_folder
from mpq.checkpoint.verify import verify_artifact
from tests.checkpoint.test_gguf_writer import MIXED, TYPES, model_dir
from tests.helpers import run_cli

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf-folder")
    src = model_dir(tmp, "llama_tied")
    (tmp / "mixed.yaml").write_text(MIXED)
    out = tmp / "gguf"
    result = run_cli("quantize", src, "-r", tmp / "mixed.yaml", "-o", out, "--format", "gguf")
    assert result.exit_code == 0, result.output
    return out


def test_verify_passes_on_the_folder_as_written(folder):
    assert is_gguf_folder(folder)
    checks = verify_artifact(folder)
    assert [c.name for c in checks] == ["mpq-manifest.json", "README.md", GGUF_FILE,
                                        f"{GGUF_FILE} header", "tensors"]
    assert all(c.ok for c in checks), checks
    assert run_cli("verify", folder).exit_code == 0


def test_verify_catches_a_changed_or_added_file(folder, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    data = bytearray((changed / GGUF_FILE).read_bytes())
    data[-1] ^= 0xFF
    (changed / GGUF_FILE).write_bytes(bytes(data))
    failed = [c for c in verify_artifact(changed) if not c.ok]
    assert [c.name for c in failed] == [GGUF_FILE] and "recorded" in failed[0].detail
    assert run_cli("verify", changed).exit_code == 7
    added = tmp_path / "added"
    shutil.copytree(folder, added)
    (added / "extra.gguf").write_bytes(b"GGUF")
    failed = [c for c in verify_artifact(added) if not c.ok]
    assert [c.name for c in failed] == ["unrecorded files"]


def test_inspect_shows_the_plan_and_each_layers_gguf_type(folder):
    art = open_gguf_folder(folder)
    assert art.metadata["mpq.format"] == "gguf" and len(art.plan.quantized()) == 16
    result = run_cli("inspect", folder, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "gguf" and info["sizes"]["files_bytes"] == \
        (folder / GGUF_FILE).stat().st_size
    types = info["gguf_types"]
    for name, kind in types.items():
        local = name.rsplit(".", 1)[-1]
        assert kind == TYPES.get(local, "Q8_0"), name
    assert "model.layers.1.mlp.down_proj" in types and "lm_head" not in types  # tied: one tensor
    assert all(info["layer_bytes"][name] > 0 for name in types)
    human = run_cli("inspect", folder)
    assert human.exit_code == 0 and "gguf format" in human.output and "(Q4_1)" in human.output
