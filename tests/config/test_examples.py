"""Example recipes parse and resolve on a SmolLM2-shaped skeleton (meta weights, no download)."""
from __future__ import annotations

import pytest
import transformers

from mpq.models.source import build_skeleton
from mpq.engine.spec import as_recipe, plan_model
from tests.helpers import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_the_examples_folder_is_found():
    assert EXAMPLES, f"no recipe under {REPO / 'examples'}"


def smollm2_shaped_skeleton():
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=30, num_attention_heads=9,
                                      num_key_value_heads=3, tie_word_embeddings=True)
    return build_skeleton(config)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_recipe_resolves(path):
    _, plan = plan_model(smollm2_shaped_skeleton(), as_recipe(str(path)))
    assert len(plan.quantized()) == 210
    bits = {l.name: l.scheme.weights.bits for l in plan.quantized()}
    assert bits["model.layers.0.self_attn.q_proj"] == 8
    assert bits["model.layers.5.mlp.down_proj"] == 8
    assert bits["model.layers.5.mlp.up_proj"] == 4


def test_skeleton_has_no_real_weights():
    model = smollm2_shaped_skeleton()
    assert all(p.is_meta for p in model.parameters())
