"""mpq.checkpoint.mapped: an artifact's tensors as views of the mapped files are the tensors
safetensors reads, writing to one never changes the file, and a damaged entry is an
ArtifactError."""
from __future__ import annotations

import json

import pytest
import torch

from mpq.checkpoint.mapped import map_tensors
from mpq.checkpoint.native import open_artifact, read_tensors
from mpq.errors import ArtifactError
from mpq.quantize import quantize
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("mapped")
    save_tiny_model("llama", root / "src")
    quantize(root / "src", "w4a16", root / "w4")
    return root / "w4"


def test_mapped_tensors_are_the_stored_ones(artifact):
    art = open_artifact(artifact)
    stored, mapped = read_tensors(art), map_tensors(art)
    assert stored.keys() == mapped.keys()
    for key, tensor in stored.items():
        assert mapped[key].dtype == tensor.dtype and torch.equal(mapped[key], tensor), key


def test_writing_a_mapped_tensor_leaves_the_file_alone(artifact):
    art = open_artifact(artifact)
    before = (artifact / "model.safetensors").read_bytes()
    mapped = map_tensors(art)
    mapped["model.norm.weight"].add_(1.0)
    assert (artifact / "model.safetensors").read_bytes() == before
    assert not torch.equal(map_tensors(art)["model.norm.weight"], mapped["model.norm.weight"])


def test_a_damaged_entry_is_an_artifact_error(artifact, tmp_path):
    data = (artifact / "model.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [header[key]["shape"][0] + 1, *header[key]["shape"][1:]]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    if len(text) != length:
        pytest.skip("the edited header does not fit in place")
    damaged = tmp_path / "model.safetensors"
    damaged.write_bytes(data[:8] + text + data[8 + length:])
    art = open_artifact(artifact)
    art.files = [damaged]
    with pytest.raises(ArtifactError, match="byte range does not match"):
        map_tensors(art)
