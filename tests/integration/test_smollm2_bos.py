"""SmolLM2-135M's tokenizer adds no BOS: its calibration hash and its eval figures stay as they were."""
from __future__ import annotations

import json

import pytest

from mpq.analysis.eval import load_eval_ids, perplexity
from mpq.calibration import CalibrationOptions, build_calibration_set
from mpq.calibration.conventions import eval_bos, token_conventions
from mpq.models.source import load_model, load_tokenizer
from tests.helpers import run_cli

pytestmark = pytest.mark.slow

# README's quantize command (128 × 512 tokens of enwiki_excerpt.train.txt, seed 0), before BOS
# handling existed
README_HASH = "54e10337fd7f34b7b791474d10c6b35277db6b44e7ff8dc8344ec8e980454fd2"


def test_no_bos_and_the_calibration_hash_of_the_readme(smollm2_dir, corpora):
    tokenizer = load_tokenizer(smollm2_dir)
    assert token_conventions(tokenizer).bos_id is None
    calib = build_calibration_set(
        CalibrationOptions(source=str(corpora / "enwiki_excerpt.train.txt")), tokenizer)
    assert calib.sha256 == README_HASH and "bos_token_id" not in calib.provenance


def test_eval_windows_without_bos_by_convention(smollm2_dir, corpora):
    data = corpora / "enwiki_excerpt.test.txt"
    tokenizer = load_tokenizer(smollm2_dir)
    ids = load_eval_ids(data, tokenizer)
    model = load_model(smollm2_dir)
    before = perplexity(model, ids, window=128, num_windows=2)  # no bos_id: the former windows
    result = run_cli("eval", smollm2_dir, "--data", data, "--window", 128, "--num-windows", 2,
                     "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["protocol"] == {"window": 128, "stride": 128, "bos": False, "bos_token_id": None,
                                  "numerics": "mpq"}
    assert record["ppl"] == before.ppl and record["tokens_scored"] == 2 * 127
    assert eval_bos(tokenizer, None) is None
