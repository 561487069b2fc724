"""mpq validate: activation ranges against a precision policy (tiny models, seconds)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from mpq.cli.main import cli
from mpq.errors import RecipeError
from mpq.analysis.ranges import FP16_MAX, RangeStats
from mpq.analysis.validate import parse_policy_overrides
from tests.tiny_models import tiny_model

SAMPLES = ("--num-samples", "2", "--seq-len", "32")
OVERFLOW_SCALE = 1e6  # down_proj of block 0 × 1e6: the residual stream reaches ~2e5


def _save(model, path):
    from tests.helpers import byte_tokenizer

    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    _save(tiny_model("llama"), root / "normal")
    big = tiny_model("llama")
    with torch.no_grad():
        big.model.layers[0].mlp.down_proj.weight.mul_(OVERFLOW_SCALE)
    _save(big, root / "overflow")
    (root / "calib.txt").write_text(" ".join(f"word{i % 50} text." for i in range(3000)))
    return root


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], obj={})


def validate_json(root, model, *extra):
    result = invoke("validate", model, "--calib", root / "calib.txt", *SAMPLES, "--json", *extra)
    return result, json.loads(result.stdout)


def test_overflowing_residual_is_unsafe_under_an_fp16_residual_policy(root):
    result = invoke("validate", root / "overflow", "--calib", root / "calib.txt", *SAMPLES,
                    "--policy", "residual=fp16")
    assert result.exit_code == 13, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: precision policy unsafe")
    assert "model.layers." in message and "(residual)" in message and "fp16" in message
    assert "precision_policy: {residual: bf16}" in message
    assert "unsafe" in result.stdout and "residual=fp16" in result.stdout


def test_default_policy_passes_but_warns_that_fp16_would_overflow(root):
    result, report = validate_json(root, root / "overflow")
    assert result.exit_code == 0, result.output
    assert report["safe"] and report["verdict"] == "warning"
    assert report["policy_source"] == "default" and report["policy"]["residual"] == "fp32"
    residual = next(k for k in report["kinds"] if k["kind"] == "residual")
    assert residual["absmax"] > FP16_MAX and residual["fp16_overflow_ops"] == 2
    assert residual["verdict"] == "warning" and residual["dtype"] == "fp32"
    assert any("fp16 would overflow" in issue for op in report["offenders"]
               for issue in op["issues"])


def test_a_normal_model_is_ok_and_masked_logits_are_ignored(root):
    result, report = validate_json(root, root / "normal", "--policy", "all=fp16")
    assert result.exit_code == 0, result.output
    assert all(k["fp16_overflow_ops"] == 0 for k in report["kinds"])
    logits = [op for op in report["ops"] if op["kind"] == "attn_logits"]
    assert [op["name"] for op in logits] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for op in logits:
        assert 0 < op["absmax"] < 10 and op["nonfinite"] == 0
        assert op["count"] == 2 * 4 * (32 * 33 // 2)  # samples × heads × causal entries


def test_json_shape(root):
    _, report = validate_json(root, root / "normal")
    assert {"model", "source", "model_dtype", "policy", "policy_source", "calibration", "verdict",
            "safe", "thresholds", "not_checked", "kinds", "offenders", "ops",
            "notes"} <= set(report)
    assert report["thresholds"]["fp16_min_normal"] == 2.0 ** -14
    assert report["thresholds"]["underflow_warning_fraction"] == 0.01
    assert report["calibration"]["num_samples"] == 2 and report["model_dtype"] == "float32"
    kinds = {k["kind"]: k for k in report["kinds"]}
    assert set(kinds) == {"residual", "norm_input", "norm_output", "attn_logits", "linear_input",
                          "linear_output", "mlp_intermediate", "kv_key", "kv_value"}
    assert kinds["residual"]["ops"] == 3  # embedding + 2 blocks
    assert kinds["norm_input"]["ops"] == 5  # 2 per block + final norm
    assert kinds["linear_output"]["ops"] == 15  # 7 per block + lm_head
    assert {k["part"] for k in kinds.values()} == {"residual", "norms", "softmax", "activations",
                                                   "kv_cache"}
    op = report["ops"][0]
    assert {"name", "kind", "part", "dtype", "verdict", "issues", "absmax", "min_nonzero",
            "fp16_underflow_fraction", "fp16_flush_fraction", "exceeds_fp16", "exceeds_bf16",
            "exceeds_fp8_e4m3"} <= set(op)


def test_an_artifacts_recorded_policy_is_checked(root, tmp_path):
    from mpq.quantize import quantize
    from mpq.config.recipe import parse_recipe

    recipe = parse_recipe("mpq_recipe: 1\nrules:\n  - targets: lm_head\n    skip: true\n"
                          "  - targets: Linear\n    weights: {bits: 8, granularity: channel}\n"
                          "precision_policy: {residual: fp16}\n", "fp16-residual.yaml")
    quantize(root / "overflow", recipe, tmp_path / "art")
    result, report = validate_json(root, tmp_path / "art")
    assert result.exit_code == 13, result.output
    assert report["source"] == "artifact" and report["policy_source"] == "recorded in the artifact"
    assert report["policy"]["residual"] == "fp16" and not report["safe"]
    assert "model.layers." in result.stderr and "(residual)" in result.stderr
    result, report = validate_json(root, tmp_path / "art", "--policy", "residual=bf16")
    assert result.exit_code == 0, result.output
    assert report["policy_source"] == "recorded in the artifact + --policy residual=bf16"


def test_a_scaled_fp8_kv_cache_is_judged_by_its_scale(root, tmp_path):
    from mpq.calibration import CalibrationOptions
    from mpq.engine.spec import RunOptions
    from mpq.quantize import quantize
    from mpq.config.recipe import parse_recipe

    recipe = parse_recipe("mpq_recipe: 1\nrules:\n  - targets: lm_head\n    skip: true\n"
                          "  - targets: Linear\n    weights: {bits: 8, granularity: channel}\n"
                          "kv_cache: {format: fp8_e4m3}\n", "kv.yaml")
    quantize(root / "normal", recipe, tmp_path / "kv", RunOptions(calibration=CalibrationOptions(
        source=str(root / "calib.txt"), num_samples=2, seq_len=32)))
    result, report = validate_json(root, tmp_path / "kv")
    assert result.exit_code == 0, result.output
    assert report["policy"]["kv_cache"] == "fp8_e4m3"
    kv = [op for op in report["ops"] if op["kind"] in ("kv_key", "kv_value")]
    assert len(kv) == 4 and all(op["dtype"] == "fp8_e4m3 (scaled)" for op in kv)
    # calibrated on the same tokens: abs-max ≈ 448 × scale (block 1 sees block 0's fp8 K/V)
    assert all(op["absmax"] <= op["scaled_limit"] * 1.01 for op in kv)
    assert all(op["verdict"] == "ok" for op in kv)


def test_missing_calib_is_a_calibration_error(root):
    result = invoke("validate", root / "normal")
    assert result.exit_code == 5
    assert "--calib" in result.stderr


@pytest.mark.parametrize("policy, expected", [
    ("residul=fp16", "did you mean 'residual'?"),
    ("residual=fp61", "did you mean 'fp16'?"),
    ("kv_cache=fp8_e4m4", "did you mean 'fp8_e4m3'?"),
    ("residual", "PART=DTYPE"),
])
def test_bad_policy_is_a_recipe_error(root, policy, expected):
    result = invoke("validate", root / "normal", "--calib", root / "calib.txt", "--policy", policy)
    assert result.exit_code == RecipeError.exit_code == 3, result.output
    assert expected in result.stderr


def test_policy_overrides():
    assert parse_policy_overrides(["all=fp16"]) == {p: "fp16" for p in (
        "norms", "softmax", "residual", "rope", "activations", "kv_cache")}
    mixed = parse_policy_overrides(["residual=bf16", "all=fp16", "kv_cache=fp8_e4m3"])
    assert mixed["residual"] == "bf16" and mixed["kv_cache"] == "fp8_e4m3"
    assert mixed["norms"] == "fp16"
    with pytest.raises(RecipeError):
        parse_policy_overrides(["all=fp8_e4m3"])


def test_range_stats_count_fp16_underflow():
    stats = RangeStats()
    stats.update(torch.tensor([0.0, 1.0, -3.0, 2.0 ** -20, 2.0 ** -30, 1e-3]))
    stats.update(torch.tensor([float("inf")]))
    assert stats.absmax == float("inf") and stats.nonfinite == 1
    assert stats.nonzero == 5 and stats.below_fp16_normal == 2 and stats.below_fp16_subnormal == 1
    assert stats.min_nonzero == 2.0 ** -30
    assert stats.underflow_fraction == pytest.approx(0.4)


def _stats(absmax, nonzero=1000, below=0):
    return RangeStats(absmax=absmax, min_nonzero=1e-6 if below else 0.01, count=nonzero,
                      nonzero=nonzero, below_fp16_normal=below)


def test_judge_thresholds():
    from mpq.config.recipe import PrecisionPolicy
    from mpq.analysis.validate import judge

    default = PrecisionPolicy().to_dict()
    fp16 = parse_policy_overrides(["all=fp16"])
    assert judge("r", "residual", _stats(7e4), default).verdict == "warning"
    assert judge("r", "residual", _stats(7e4), fp16).verdict == "unsafe"
    assert judge("r", "residual", _stats(6e4), fp16).verdict == "ok"
    # underflow: more than 1% of the nonzero values below 2^-14 warns, 1% exactly does not
    assert judge("l", "linear_output", _stats(1.0, below=10), default).verdict == "ok"
    assert judge("l", "linear_output", _stats(1.0, below=11), default).verdict == "warning"
    # an fp16 norm squares its input: above 256 it warns
    assert judge("n", "norm_input", _stats(300.0), fp16).verdict == "warning"
    assert judge("n", "norm_input", _stats(300.0), default).verdict == "ok"
    # an unscaled fp8 KV cache overflows at 448; a scaled one only clips (warning beyond 10%)
    fp8 = {**default, "kv_cache": "fp8_e4m3"}
    assert judge("a", "kv_key", _stats(500.0), fp8).verdict == "unsafe"
    assert judge("a", "kv_key", _stats(500.0), fp8, kv_scale=2.0).verdict == "ok"
    assert judge("a", "kv_key", _stats(500.0), fp8, kv_scale=2.0).dtype == "fp8_e4m3 (scaled)"
    assert judge("a", "kv_key", _stats(500.0), fp8, kv_scale=1.0 / 448).verdict == "warning"


def test_a_float16_checkpoint_that_would_overflow_gets_a_note():
    from mpq.config.recipe import PrecisionPolicy
    from mpq.analysis.validate import ValidationReport, judge

    policy = PrecisionPolicy().to_dict()
    ops = [judge("model.layers.0", "residual", _stats(1e5), policy)]
    report = ValidationReport("m", "model", "float16", policy, "default", {}, ops)
    assert report.safe and report.verdict == "warning"
    assert "float16" in report.notes()[0]
    assert ValidationReport("m", "model", "bfloat16", policy, "default", {}, ops).notes() == []


@pytest.mark.slow
def test_smollm2_passes_the_default_policy(smollm2_dir, corpora):
    result = invoke("validate", smollm2_dir, "--calib", corpora / "enwiki_excerpt.train.txt",
                    "--num-samples", "4", "--seq-len", "256", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["safe"] and report["policy_source"] == "default"
    kinds = {k["kind"]: k for k in report["kinds"]}
    assert kinds["attn_logits"]["absmax"] < 1e3
    assert all(op["nonfinite"] == 0 for op in report["ops"])
