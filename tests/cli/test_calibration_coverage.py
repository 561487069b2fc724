"""The calibration coverage report through the CLI: recorded in a calibrated artifact, shown by
mpq quantize and mpq inspect (--json too), the eval warning for a window longer than the
calibration samples, and artifacts written before the report."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mpq.checkpoint.native import open_artifact
from mpq.cli.main import cli
from tests.helpers import write_tokenizer
from tests.tiny_models import save_tiny_model

SEQ_LEN = 32


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], obj={})


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny Llama quantized with GPTQ on 32-token samples; its `mpq quantize` output."""
    root = tmp_path_factory.mktemp("calib_coverage")
    save_tiny_model("llama", root / "src")
    write_tokenizer(root / "src")
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(f"document {d}: " + "the cat sat on the mat. " * (d + 3)
                                 for d in range(12)), encoding="utf-8")
    result = invoke("quantize", root / "src", "-r", "w4a16-gptq", "-o", root / "g", "--calib",
                    calib, "--num-samples", 6, "--seq-len", SEQ_LEN)
    assert result.exit_code == 0, result.output
    data = root / "eval.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return root, result.stdout


def test_report_is_in_the_artifact_and_in_inspect_json(calibrated):
    root, quantize_output = calibrated
    report = open_artifact(root / "g").json_field("calibration_coverage")
    assert report["samples"] == 6 and report["sample_tokens"]["max"] == SEQ_LEN
    assert report["mode"] == "concat" and report["documents"]["cut"] >= 1
    assert 0 < report["vocabulary"]["share"] <= 1 and report["vocabulary"]["vocab_size"] == 256
    assert set(report["scripts"]) <= {"Latin", "digits", "punctuation"}
    plan = open_artifact(root / "g").plan
    quantized = {layer.name for layer in plan.quantized()}
    assert set(report["activations"]) == quantized  # every layer: GPTQ collects for each
    for record in report["activations"].values():
        assert record["tokens"] == 6 * SEQ_LEN
        assert 0 < record["p99"] <= record["p99_9"] <= record["absmax"]
        assert record["kurtosis"] > 1
    # not in the plan record: the report is its own key
    assert all("input_outliers" not in open_artifact(root / "g").log.result(name)
               for name in quantized)
    shown = invoke("inspect", root / "g", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["calibration_coverage"] == report
    text = invoke("inspect", root / "g")
    assert "calibration coverage: 6 samples × 32 tokens" in text.stdout
    assert "layer inputs (14 layers)" in text.stdout
    scripts = sorted(report["scripts"].items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{name} {100 * share:.1f}%" for name, share in scripts)
    assert f"characters): {shown}" in text.stdout  # largest first, as mpq quantize prints them
    assert f"characters): {shown}" in quantize_output
    assert "calibration coverage: 6 samples × 32 tokens" in quantize_output
    assert "vocabulary seen:" in quantize_output and "scripts (" in quantize_output


def test_eval_warns_for_a_window_longer_than_the_samples(calibrated):
    root, _ = calibrated
    longer = invoke("eval", root / "g", "--data", root / "eval.txt", "--window", 64)
    assert longer.exit_code == 0, longer.output
    warnings = [line for line in longer.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "32 tokens" in warnings[0] and "64 tokens" in warnings[0]
    equal = invoke("eval", root / "g", "--data", root / "eval.txt", "--window", SEQ_LEN,
                   "--json")
    assert equal.exit_code == 0, equal.output
    assert "warning:" not in equal.stderr and json.loads(equal.stdout)["warnings"] == []


def test_artifact_without_the_report_inspects_and_warns_from_its_provenance(calibrated, tmp_path):
    root, _ = calibrated
    old = tmp_path / "old"
    shutil.copytree(root / "g", old)
    shard = old / "model.safetensors"
    metadata = open_artifact(old).metadata
    tensors = load_file(str(shard))
    save_file(tensors, str(shard), metadata={k: v for k, v in metadata.items()
                                             if k != "mpq.calibration_coverage"})
    assert open_artifact(old).json_field("calibration_coverage") is None
    shown = invoke("inspect", old, "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["calibration_coverage"] is None
    text = invoke("inspect", old)
    assert text.exit_code == 0 and "calibration coverage: not recorded" in text.stdout
    warned = invoke("eval", old, "--data", root / "eval.txt", "--window", 64, "--no-verify")
    assert warned.exit_code == 0, warned.output
    assert "samples of at most 32 tokens" in warned.stderr  # the provenance's seq_len


def test_no_report_without_calibration(calibrated, tmp_path):
    root, _ = calibrated
    result = invoke("quantize", root / "src", "-r", "w4a16", "-o", tmp_path / "rtn")
    assert result.exit_code == 0, result.output
    assert "mpq.calibration_coverage" not in open_artifact(tmp_path / "rtn").metadata
    assert "calibration coverage" not in result.stdout
    text = invoke("inspect", tmp_path / "rtn")
    assert "calibration: none" in text.stdout and "calibration coverage" not in text.stdout
    quiet = invoke("eval", tmp_path / "rtn", "--data", root / "eval.txt", "--window", 64)
    assert quiet.exit_code == 0 and "warning:" not in quiet.stderr


def test_convert_keeps_the_report(calibrated, tmp_path):
    from mpq.cli.calibration_view import recorded_calibration, short_calibration_warning

    root, _ = calibrated
    result = invoke("convert", root / "g", "-o", tmp_path / "ct", "--format", "compressed-tensors")
    assert result.exit_code == 0, result.output
    coverage, calibration = recorded_calibration(tmp_path / "ct")
    assert coverage == open_artifact(root / "g").json_field("calibration_coverage")
    assert calibration["seq_len"] == SEQ_LEN
    assert "at most 32 tokens" in short_calibration_warning(tmp_path / "ct", 64)
    assert short_calibration_warning(tmp_path / "ct", SEQ_LEN) is None


def test_quantize_json_result_holds_the_report(calibrated, tmp_path):
    root, _ = calibrated
    calib = tmp_path / "mixed.txt"
    calib.write_text("Hello world, привет мир. " * 20, encoding="utf-8")
    result = invoke("quantize", root / "src", "-r", "w4a16-gptq", "-o", tmp_path / "j", "--calib",
                    calib, "--num-samples", 2, "--seq-len", 16, "--calib-mode", "document",
                    "--json")
    assert result.exit_code == 0, result.output
    final = json.loads(result.stdout.splitlines()[-1])
    report = final["calibration_coverage"]
    assert report == open_artifact(tmp_path / "j").json_field("calibration_coverage")
    # one document (no blank line: one line), truncated at 16 tokens
    assert report["documents"] == {"in_samples": 1, "cut": 1} and report["mode"] == "document"
