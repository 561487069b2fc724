"""mpq.runtime.planned_paths and `mpq inspect`: the kernel path of each layer, read from the
artifact without loading it, is the one mpq.load(kernels=True) takes."""
from __future__ import annotations

import json

import pytest

import mpq
from mpq.checkpoint.native import open_artifact
from mpq.config.recipe import parse_recipe
from mpq.quantize import quantize
from mpq.runtime import kernels
from mpq.runtime.planned_paths import decode_reasons, path_counts, planned_paths
from mpq.runtime.qlinear import layer_paths
from tests.helpers import run_cli
from tests.runtime.test_kernels import RECIPE
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.skipif(not all(kernels.available().values()),
                                reason="this torch build has no packed int4/int8 CPU kernels")

TIED = """mpq_recipe: 1
name: tied
defaults: {algorithm: rtn}
rules:
  - targets: [Embedding, lm_head]
    weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 32}
  - targets: [Linear]
    weights: {format: int, bits: 4, symmetric: false, granularity: group, group_size: 32}
"""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("planned")
    save_tiny_model("llama", root / "src")
    quantize(root / "src", parse_recipe(RECIPE, "paths.yaml"), root / "mixed")
    save_tiny_model("llama_tied", root / "tied-src")
    quantize(root / "tied-src", parse_recipe(TIED, "tied.yaml"), root / "tied")
    return root / "mixed", root / "tied"


@pytest.mark.parametrize("which", [0, 1])
def test_planned_paths_are_the_loaded_ones(artifacts, which):
    path = artifacts[which]
    planned = planned_paths(open_artifact(path))
    loaded = layer_paths(mpq.load(path, kernels=True))
    assert {name: p.path for name, p in planned.items() if name in loaded} == loaded
    assert set(planned) - set(loaded) <= {"model.embed_tokens"}  # the lookup is no QuantLinear


def test_the_tied_head_and_embedding(artifacts):
    planned = planned_paths(open_artifact(artifacts[1]))
    assert planned["lm_head"].path == "int4pack" and planned["model.embed_tokens"].path == "lookup"
    assert set(decode_reasons(planned)) == {"asymmetric (zero points)"}


def test_reasons_of_the_mixed_artifact(artifacts):
    planned = planned_paths(open_artifact(artifacts[0]))
    assert path_counts(planned) == {"int4pack": 8, "decode": 4, "int8pack": 2}
    reasons = decode_reasons(planned)
    assert sorted(reasons) == ["asymmetric (zero points)", "input activations are quantized"]
    assert reasons["asymmetric (zero points)"] == ["model.layers.0.self_attn.k_proj",
                                                   "model.layers.1.self_attn.k_proj"]


def test_inspect_shows_the_paths(artifacts):
    result = run_cli("inspect", artifacts[0])
    assert result.exit_code == 0, result.output
    assert "kernel paths under mpq.load(kernels=True): int4pack 8, decode 4, int8pack 2" in (
        result.stdout)
    assert ("decode (2): input activations are quantized: model.layers.0.self_attn.o_proj, "
            "model.layers.1.self_attn.o_proj") in result.stdout
    record = json.loads(run_cli("inspect", artifacts[0], "--json").stdout)["kernel_paths"]
    assert record["counts"] == {"int4pack": 8, "decode": 4, "int8pack": 2}
    assert record["layers"]["model.layers.0.self_attn.v_proj"] == {
        "path": "int8pack", "reason": "int8 per channel"}
