"""A quantized input embedding in each output format: the native format stores it (a shared
tied pair once), ``mpq convert`` re-writes it without change, mpq verify passes it, and the
compressed-tensors and GPTQ writers refuse it before any work (FormatError, exit 9), for
``mpq quantize --format`` and ``mpq convert`` alike."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

import mpq.engine.runner
from mpq.checkpoint.convert import convert
from mpq.cli.main import cli
from mpq.config.recipe import parse_recipe
from mpq.engine.spec import RunOptions
from mpq.errors import FormatError
from mpq.quantize import quantize
from tests.tiny_models import save_tiny_model

TIED_INT8 = """\
mpq_recipe: 1
defaults: {algorithm: rtn}
rules:
  - targets: [Embedding, lm_head]
    weights: {format: int, bits: 8, symmetric: true, granularity: channel}
  - targets: [Linear]
    weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 32}
"""
REASONS = {"compressed-tensors": "mpq does not write one",
           "gptq": "GPTQ v1 stores quantized Linear layers only"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedding-formats")
    save_tiny_model("llama_tied", root / "src")
    quantize(root / "src", parse_recipe(TIED_INT8, "tied.yaml"), root / "native")
    return root


@pytest.mark.parametrize("fmt", sorted(REASONS))
def test_quantize_refuses_before_any_work(artifact, fmt, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("quantization started")

    monkeypatch.setattr(mpq.engine.runner, "quantize_layer", no_work)
    with pytest.raises(FormatError) as info:
        quantize(artifact / "src", parse_recipe(TIED_INT8, "tied.yaml"), tmp_path / "out",
                 RunOptions(output_format=fmt))
    assert "model.embed_tokens: a quantized input embedding" in str(info.value)
    assert REASONS[fmt] in str(info.value) and info.value.exit_code == 9
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", sorted(REASONS))
def test_convert_refuses_with_the_layer_and_writes_nothing(artifact, fmt, tmp_path):
    with pytest.raises(FormatError, match="model.embed_tokens: a quantized input embedding"):
        convert(artifact / "native", tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()
    shown = CliRunner().invoke(cli, ["convert", str(artifact / "native"), "-o",
                                     str(tmp_path / "out"), "--format", fmt], obj={})
    assert shown.exit_code == 9 and "model.embed_tokens" in shown.output


def test_native_convert_keeps_the_shared_tensor_once(artifact, tmp_path):
    convert(artifact / "native", tmp_path / "again", "mpq")
    before = load_file(artifact / "native" / "model.safetensors")
    after = load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(before[key].equal(after[key]) for key in before)
    assert not any(key.startswith("lm_head.") for key in after)


def test_verify_decodes_every_layer(artifact):
    shown = CliRunner().invoke(cli, ["verify", str(artifact / "native")], obj={})
    assert shown.exit_code == 0, shown.output
    assert "16 quantized layers decode" in shown.output
