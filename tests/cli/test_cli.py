"""The mpq command through click's runner: every command, --json, gates (bad inputs: see
tests/cli/test_bad_input_catalogue.py)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mpq.cli.main import cli
from mpq.errors import EvalGateError
from tests.helpers import write_tokenizer
from tests.tiny_models import save_tiny_model


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny Llama quantized once for the read-only commands."""
    from mpq.quantize import quantize

    root = tmp_path_factory.mktemp("cli")
    save_tiny_model("llama", root / "src")
    write_tokenizer(root / "src")
    quantize(root / "src", "w4a16", root / "w4")
    return root


def invoke(runner, *args):
    return runner.invoke(cli, [str(a) for a in args], obj={})


def test_list_json_names_every_kind(runner):
    result = invoke(runner, "list", "--json")
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)
    assert {"rtn"} <= set(entries["quantizers"])
    assert {"int", "fp8_e4m3", "fp8_e5m2", "nf4"} <= set(entries["number formats"])
    assert "mpq" in entries["formats"]
    assert {"text", "jsonl", "parquet", "disk", "hub"} <= set(entries["calibration loaders"])
    assert {"w8a16", "w4a16", "w4a16-asym", "w3a16", "fp8-weights", "nf4"} <= set(entries["presets"])
    architectures = entries["architectures"]
    assert architectures["gemma3_text"] == ("family gemma3: blocks model.layers; KV cache yes, "
                                            "scale groups yes, QuaRot no")
    assert architectures["mistral"].startswith("family llama:")


def test_plan_json_and_table(runner, artifact):
    result = invoke(runner, "plan", artifact / "src", "--recipe", "w8a16", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    layers = {l["name"]: l for l in plan["layers"]}
    assert layers["lm_head"]["scheme"] is None
    assert layers["model.layers.0.mlp.down_proj"]["scheme"]["weights"]["bits"] == 8
    table = invoke(runner, "plan", artifact / "src", "--recipe", "w8a16")
    assert table.exit_code == 0 and "14 layers quantized, 1 kept" in table.stdout


def test_quantize_json_events_and_inspect(runner, artifact, tmp_path):
    out = tmp_path / "nf4"
    result = invoke(runner, "quantize", artifact / "src", "-r", "nf4", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["coverage", "start"] and kinds[-1] == "result"
    assert kinds.count("layer") == 14
    shown = invoke(runner, "inspect", out, "--json")
    info = json.loads(shown.stdout)
    assert info["format_version"].startswith("1.")
    assert info["recipe"]["name"] == "nf4"
    assert len(info["layer_bytes"]) == 14
    text = invoke(runner, "inspect", out)
    assert text.exit_code == 0 and "nf4" in text.stdout


def test_eval_with_reference_and_gates(runner, artifact, tmp_path):
    data = tmp_path / "eval.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = ["eval", artifact / "w4", "--data", data, "--reference", artifact / "src",
            "--window", 64, "--json"]
    ok = invoke(runner, *args, "--max-kl", 10, "--max-ppl-delta", "50%")
    assert ok.exit_code == 0, ok.output
    result = json.loads(ok.stdout)
    assert result["kl_mean"] > 0 and 0 <= result["top1_agreement"] <= 1
    strict = invoke(runner, *args, "--max-kl", 0)
    assert strict.exit_code == EvalGateError.exit_code
    assert "mean KL" in strict.stderr
    no_ref = invoke(runner, "eval", artifact / "w4", "--data", data, "--max-kl", 1)
    assert no_ref.exit_code == 2


def test_force_replaces_existing_output(runner, artifact, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    result = invoke(runner, "quantize", artifact / "src", "-r", "w8a16", "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_quantize_gptq_with_calibration_options(runner, artifact, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    result = invoke(runner, "quantize", artifact / "src", "--recipe", "w4a16-gptq", "-o",
                    tmp_path / "g", "--calib", calib, "--num-samples", 4, "--seq-len", 32,
                    "--calib-batch-tokens", 64, "--json")
    assert result.exit_code == 0, result.output
    from mpq.checkpoint.native import open_artifact

    artifact_out = open_artifact(tmp_path / "g")
    assert artifact_out.json_field("pipeline") == {"true_sequential": True, "batch_tokens": 64}
    assert all("gptq_loss" in artifact_out.log.result(layer.name)
               for layer in artifact_out.plan.quantized())
    bad = invoke(runner, "quantize", artifact / "src", "--recipe", "w4a16-gptq", "-o",
                 tmp_path / "h", "--calib", calib, "--calib-batch-tokens", 0)
    assert bad.exit_code == 2 and not (tmp_path / "h").exists()
