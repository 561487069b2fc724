"""QuaRot on the real SmolLM2-135M (576 = 16·36, 1536 = 128·12): the rotated float artifact
scores the original's perplexity."""
from __future__ import annotations

import pytest

import mpq
from mpq.analysis.eval import load_eval_ids, perplexity
from mpq.models.source import load_model
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe

pytestmark = pytest.mark.slow


def test_rotated_float_smollm2_keeps_its_perplexity(smollm2_dir, corpora, tmp_path):
    from transformers import AutoTokenizer

    recipe = parse_recipe("mpq_recipe: 1\nname: rotate-only\nrotation: {type: quarot}\n"
                          "rules:\n  - {targets: [Linear], skip: true}\n", "rotate-only")
    result = quantize(smollm2_dir, recipe, tmp_path / "rotated")
    record = result.log.rotation
    assert record["rotations"]["r1"]["construction"] == "kron(sylvester(16), paley2(17))"
    assert record["rotations"]["r4"]["construction"] == "kron(sylvester(128), paley1(11))"
    ids = load_eval_ids(corpora / "enwiki_excerpt.test.txt",
                        AutoTokenizer.from_pretrained(smollm2_dir))
    rotated = perplexity(mpq.load(tmp_path / "rotated"), ids, window=256, num_windows=2).ppl
    original = perplexity(load_model(smollm2_dir), ids, window=256, num_windows=2).ppl
    assert rotated == pytest.approx(original, rel=1e-3)
