"""The mpq command through click's runner: every command, --json, gates, bad inputs."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mpq.cli.main import cli
from mpq.errors import (CalibrationError, EvalGateError, ModelError, OutputError, RecipeError)
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
    _write_tokenizer(root / "src")
    quantize(root / "src", "w4a16", root / "w4")
    return root


def _write_tokenizer(path):
    from tests.test_pipeline import _byte_tokenizer

    _byte_tokenizer().save_pretrained(path)


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
    assert kinds[0] == "start" and kinds[-1] == "result" and kinds.count("layer") == 14
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


@pytest.mark.parametrize("case", ["bad_recipe_key", "missing_model", "empty_calib", "existing_out",
                                  "no_config", "truncated_weights", "unknown_arch", "nan_weights",
                                  "unknown_preset"])
def test_bad_input_exits_with_one_line_and_no_output(runner, artifact, tmp_path, case):
    out = tmp_path / "out"
    model, recipe, calib = artifact / "src", "w4a16", None
    expected = None
    if case == "bad_recipe_key":
        recipe = tmp_path / "r.yaml"
        recipe.write_text("mpq_recipe: 1\nrules:\n  - targets: Linear\n    weights: {bitz: 4}\n")
        expected = RecipeError
    elif case == "missing_model":
        model, expected = tmp_path / "nope", ModelError
    elif case == "no_config":
        model, expected = tmp_path / "empty_dir", ModelError
        model.mkdir()
    elif case in ("truncated_weights", "unknown_arch", "nan_weights"):
        model, expected = _damaged_copy(artifact / "src", tmp_path / "bad", case), ModelError
    elif case == "unknown_preset":
        recipe, expected = "w4a17", RecipeError
    elif case == "empty_calib":
        calib, expected = tmp_path / "empty.txt", CalibrationError
        calib.write_text("")
    elif case == "existing_out":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
        expected = OutputError
    args = ["quantize", model, "-r", recipe, "-o", out]
    if calib is not None:
        args += ["--calib", calib]
    result = invoke(runner, *args)
    assert result.exit_code == expected.exit_code, result.output
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    if case == "existing_out":
        assert (out / "keep.txt").read_text() == "user data"
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out.mpq-tmp-*"))


def _damaged_copy(src, dst, case):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if case == "truncated_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif case == "unknown_arch":
        (dst / "config.json").write_text('{"model_type": "no-such-arch"}')
    else:
        tensors = load_file(str(weights))
        tensors["model.norm.weight"][0] = torch.nan
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return dst


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
    from mpq.formats.native import open_artifact

    artifact_out = open_artifact(tmp_path / "g")
    assert artifact_out.json_field("pipeline") == {"true_sequential": True, "batch_tokens": 64}
    assert all("gptq_loss" in layer.result for layer in artifact_out.plan.quantized())
    bad = invoke(runner, "quantize", artifact / "src", "--recipe", "w4a16-gptq", "-o",
                 tmp_path / "h", "--calib", calib, "--calib-batch-tokens", 0)
    assert bad.exit_code == 2 and not (tmp_path / "h").exists()
