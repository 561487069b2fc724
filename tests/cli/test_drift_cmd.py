"""``mpq drift``: the --json shape, the --max-clipped gate (exit 10), and --recalibrate (weights
byte-identical, scales changed, both calibration sets recorded, clipping gone)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

import mpq
from mpq.analysis.drift import measure
from mpq.cli.main import cli
from tests.helpers import outlier_artifact

SCALE_SUFFIXES = (".input_scale", ".k_scale", ".v_scale")


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift-cli")
    src, art = outlier_artifact(root)
    traffic = root / "traffic.txt"
    traffic.write_text("ab " * 400)  # every third token is the outlier token 0
    return src, art, traffic


def drift(art, traffic, *extra):
    return CliRunner().invoke(cli, ["drift", str(art), "--data", str(traffic), "--num-samples",
                                    "2", "--seq-len", "24", "--decode-tokens", "3", *map(str, extra)])


def test_json_shape_and_gate(outlier):
    src, art, traffic = outlier
    result = drift(art, traffic, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["source"] == str(src.resolve())  # the recorded float source is at hand
    assert set(out["phases"]) == {"prefill", "decode"}
    assert out["phases"]["prefill"]["tokens"] == 48 and out["phases"]["decode"]["tokens"] == 6
    assert out["kl"]["prefill"]["tokens"] == 48 and out["kl"]["decode"]["tokens"] == 6
    assert len(out["scales"]) == 2 * 7 + 2 * 2  # 7 linears and k, v per block
    row = out["scales"][0]
    assert {"tensor", "kind", "format", "limit", "prefill", "decode"} <= set(row)
    assert {"values", "clipped", "clipped_fraction", "fp16_overflow", "absmax"} <= set(
        row["prefill"])
    assert out["traffic"]["num_samples"] == 2 and out["traffic"]["sha256"]
    worst = max(100 * r[p]["clipped_fraction"] for r in out["scales"] for p in ("prefill",
                                                                                "decode"))
    assert worst > 1  # token 0: one of 64 channels of a third (prefill) or all (decode) tokens
    failed = drift(art, traffic, "--max-clipped", worst / 2)
    assert failed.exit_code == 10
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: drift gate failed")
    assert "gate failed" in failed.stdout
    passed = drift(art, traffic, "--max-clipped", worst)
    assert passed.exit_code == 0 and "gate passed" in passed.stdout


def test_recalibrate(outlier, tmp_path):
    _, art, traffic = outlier
    out = tmp_path / "recal"
    result = drift(art, traffic, "--recalibrate", out, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    before, after = load_file(art / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after)
    for key in before:
        if key.endswith(SCALE_SUFFIXES):
            continue
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    q = "model.layers.0.self_attn.q_proj.input_scale"
    assert after[q] > before[q] * 2  # now covers the outlier token's |8|
    o = "model.layers.0.self_attn.o_proj.input_scale"  # the traffic stays within it: kept
    assert torch.equal(after[o], before[o])
    assert after["model.layers.0.self_attn.k_scale"].dtype == torch.float32
    with safe_open(str(art / "model.safetensors"), "pt") as f:
        old = f.metadata()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        new = f.metadata()
    assert new["mpq.calibration"] == old["mpq.calibration"]  # the weights' calibration
    recal = json.loads(new["mpq.recalibration"])
    assert recal["recalibrated"] is True
    assert recal["original_calibration"]["sha256"] == json.loads(old["mpq.calibration"])["sha256"]
    assert recal["calibration"]["sha256"] == record["traffic"]["sha256"]
    assert recal["calibration"]["sha256"] != recal["original_calibration"]["sha256"]
    assert recal["input_scales"] == 14 and recal["kv_tensors"] == 4
    assert "mpq.recalibration" not in old
    shown = CliRunner().invoke(cli, ["inspect", str(out)])
    assert "static scales recalibrated (mpq drift --recalibrate): 14 input scales, 4 KV " \
           "tensors from" in shown.stdout.replace("\n", " ")
    # the recalibrated artifact loads (its manifest checks out) and no longer clips there
    model = mpq.load(out)
    from mpq.calibration import CalibrationOptions, build_calibration_set
    from mpq.models.source import load_tokenizer

    samples = build_calibration_set(CalibrationOptions(source=str(traffic), num_samples=2,
                                                       seq_len=24), load_tokenizer(out)).samples
    report = measure(model, samples, decode_tokens=3)
    for phase in ("prefill", "decode"):
        assert report.clips[phase][q].clipped == 0
        clipped = sum(s.clipped for s in report.clips[phase].values())
        values = sum(s.values for s in report.clips[phase].values())
        # downstream, the served model's quantized activations move a value at a new abs-max
        # by a rounding error, so a few values end just beyond it
        assert clipped / values < 1e-3, (phase, clipped)
        assert clipped * 5 < record["phases"][phase]["clipped"]


def test_no_static_scale_dynamic_inputs(tiny_llama_dir, tmp_path):
    """Dynamic input scales and no KV cache: nothing fixed at calibration time (the weight-only
    case is in the bad-input catalogue)."""
    from mpq.config.recipe import parse_recipe
    from mpq.quantize import quantize

    recipe = parse_recipe("mpq_recipe: 1\nname: dyn\ndefaults:\n  algorithm: rtn\nrules:\n"
                          "  - targets: [Linear]\n    weights: {format: int, bits: 8, "
                          "granularity: channel}\n    input_activations: {format: int, bits: 8, "
                          "dynamic: true}\n", "dyn")
    quantize(tiny_llama_dir, recipe, tmp_path / "dyn")
    result = CliRunner().invoke(cli, ["drift", str(tmp_path / "dyn"), "--data", "x.txt"])
    assert result.exit_code == 7
    assert "has no static scale to check: its 14 layer(s) with input activation " \
           "quantization use dynamic scales; its KV cache is not quantized" in result.stderr
