"""Formats that cannot hold fused MoE experts or a quantized router refuse them (FormatError,
exit 9) before any weight is read, and ``mpq convert`` refuses a native MoE artifact the same way;
a plan that keeps the experts writes."""
from __future__ import annotations

import pytest

from mpq.errors import FormatError
from tests.helpers import run_cli, write_tokenizer
from tests.tiny_models import save_tiny_model

ROUTER_ONLY = """\
mpq_recipe: 1
rules:
  - targets: ['re:.*experts.*']
    skip: true
  - targets: [model.layers.0.mlp.gate]
    weights: {bits: 4, group_size: 32}
  - targets: [Linear]
    weights: {bits: 4, group_size: 32}
"""


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / "src"
    save_tiny_model("mixtral", path)
    write_tokenizer(path)
    return path


@pytest.mark.parametrize("output_format, reason", [
    ("compressed-tensors", "its compressed-tensors loader cannot decompress"),
    ("gptq", "GPTQ v1 loaders replace nn.Linear modules only")])
def test_fused_experts_are_refused_by_name_and_why(moe_dir, tmp_path, output_format, reason):
    out = tmp_path / "out"
    refused = run_cli("quantize", moe_dir, "-r", "w4a16", "-o", out, "--format", output_format)
    assert refused.exit_code == FormatError.exit_code == 9
    message = refused.stderr
    assert message.count("error:") == 1
    assert ("32 fused MoE expert slices of model.layers.*.mlp.experts.gate_up_proj, "
            "model.layers.*.mlp.experts.down_proj") in message
    assert reason in message and "--format mpq" in message
    assert not out.exists()


def test_convert_refuses_a_native_moe_artifact(moe_dir, tmp_path):
    assert run_cli("quantize", moe_dir, "-r", "w4a16", "-o", tmp_path / "native").exit_code == 0
    refused = run_cli("convert", tmp_path / "native", "-o", tmp_path / "ct",
                      "--format", "compressed-tensors")
    assert refused.exit_code == FormatError.exit_code
    assert "fused MoE expert slices" in refused.stderr and not (tmp_path / "ct").exists()


def test_a_quantized_router_is_refused_and_kept_experts_write(moe_dir, tmp_path):
    (tmp_path / "r.yaml").write_text(ROUTER_ONLY)
    refused = run_cli("quantize", moe_dir, "-r", tmp_path / "r.yaml", "-o", tmp_path / "out",
                      "--format", "compressed-tensors")
    assert refused.exit_code == FormatError.exit_code
    assert "model.layers.0.mlp.gate: a MoE router (MixtralTopKRouter" in refused.stderr
    (tmp_path / "k.yaml").write_text(ROUTER_ONLY.replace(
        "  - targets: [model.layers.0.mlp.gate]\n    weights: {bits: 4, group_size: 32}\n", ""))
    written = run_cli("quantize", moe_dir, "-r", tmp_path / "k.yaml", "-o", tmp_path / "ok",
                      "--format", "compressed-tensors")
    assert written.exit_code == 0, written.output
