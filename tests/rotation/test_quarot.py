"""QuaRot: the rotated float model computes what the original does, on every supported
architecture; the online R4 travels in the artifact; bad combinations are refused."""
from __future__ import annotations

import pytest
import torch
import transformers

import mpq
from mpq.models.families import family_of
from mpq.models.layout import layout_of
from mpq.errors import FormatError, ModelError, RecipeError
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe
from mpq.config.rotation import QuaRotArgs
from mpq.rotation.quarot import apply_quarot
from tests.tiny_models import (ARCHITECTURES, RECORD_ARCHITECTURES, model_from_config,
                               save_tiny_model, tiny_config, tiny_model)

ODD = dict(hidden_size=96, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=256, num_hidden_layers=2, max_position_embeddings=128)  # 96 = 8·12,
# 160 = 8·20, head_dim 24 = 2·12: Paley-based Hadamards, not powers of two


def odd_model(kind: str) -> transformers.PreTrainedModel:
    config = {"llama_odd": transformers.LlamaConfig(**ODD),
              "qwen3_odd": transformers.Qwen3Config(**{**ODD, "head_dim": 24}),
              "gemma_odd": transformers.GemmaConfig(**{**ODD, "head_dim": 24})}[kind]
    return model_from_config(config)


def with_random_norms_and_biases(model):
    """Norm scales and biases far from their init, so a wrong fold would show."""
    plus_one = family_of(model).plus_one_norm
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0 if plus_one else 1.0, 0.3)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


# every tiny model whose family declares rotation support (so each record is checked)
ROTATED = [a for a in ARCHITECTURES + RECORD_ARCHITECTURES if family_of(tiny_config(a)).rotation]


@pytest.mark.parametrize("arch", ROTATED + ["llama_odd", "qwen3_odd", "gemma_odd"])
@pytest.mark.parametrize("r1", ["hadamard", "random"])
def test_rotated_float_model_keeps_its_logits(arch, r1):
    model = odd_model(arch) if arch.endswith("_odd") else tiny_model(arch)
    model = with_random_norms_and_biases(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        record = apply_quarot(model, layout_of(model), QuaRotArgs(r1=r1))
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert set(record["rotations"]) == {"r1", "r2", "r4"}
    assert record["online"] == {"mlp.down_proj": "r4"}
    # the embedding really is rotated (not an identity rotation)
    assert not torch.allclose(model.get_input_embeddings().weight,
                              model.get_output_embeddings().weight)


def test_each_rotation_matters():
    """Dropping the online half of R4 breaks the function: the hook is doing real work."""
    model = with_random_norms_and_biases(tiny_model("llama"))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
        apply_quarot(model, layout_of(model), QuaRotArgs())
        for block in model.model.layers:
            block.mlp.down_proj._forward_pre_hooks.clear()
        broken = model(ids).logits
    assert (broken - before).abs().max() > 1e-2


def recipe(rotation: str = "{type: quarot}", weights: str = "{format: int, bits: 8, "
           "granularity: channel}", acts: str | None = None, extra: str = ""):
    text = "mpq_recipe: 1\nname: rot\ndefaults:\n  algorithm: rtn\n"
    if acts:
        text += f"  input_activations: {acts}\n"
    text += f"rotation: {rotation}\n{extra}rules:\n  - targets: [Linear]\n    weights: {weights}\n"
    return parse_recipe(text, "rot")


def test_artifact_carries_the_online_rotation(tmp_path):
    original = save_tiny_model("llama", tmp_path / "src")
    quantize(tmp_path / "src", recipe(), tmp_path / "rot")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    loaded = mpq.load(tmp_path / "rot", dequantize=True)
    assert loaded.mpq_artifact.log.rotation["online"] == {"mlp.down_proj": "r4"}
    assert not loaded.config.tie_word_embeddings or not original.config.tie_word_embeddings
    with torch.no_grad():
        reference = original(ids).logits
        rotated = loaded(ids).logits
        for block in loaded.model.layers:
            block.mlp.down_proj._forward_pre_hooks.clear()
        without_r4 = loaded(ids).logits
    error = (rotated - reference).abs().max()
    assert error < 0.05 * reference.abs().max()  # int8 weights on the rotated model
    assert (without_r4 - reference).abs().max() > 5 * error


def test_online_rotation_runs_before_input_quantization(tmp_path):
    save_tiny_model("llama", tmp_path / "src")
    acts = "{format: int, bits: 8, dynamic: true, granularity: token}"
    quantize(tmp_path / "src", recipe(acts=acts), tmp_path / "packed")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        packed = mpq.load(tmp_path / "packed")(ids).logits
        dense = mpq.load(tmp_path / "packed", dequantize=True)(ids).logits
    torch.testing.assert_close(packed, dense, rtol=1e-4, atol=1e-4)


def test_bad_rotation_settings_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="r1"):
        recipe("{type: quarot, r1: identity}")
    with pytest.raises(RecipeError, match="unknown rotation type"):
        recipe("{type: spinquant}")
    with pytest.raises(RecipeError, match="transforms"):
        recipe(extra="transforms:\n  - {type: smoothquant}\n")
    save_tiny_model("opt", tmp_path / "opt")
    with pytest.raises(ModelError, match="QuaRot"):
        quantize(tmp_path / "opt", recipe(), tmp_path / "x")
    save_tiny_model("llama", tmp_path / "src")
    with pytest.raises(FormatError, match="r4"):
        quantize(tmp_path / "src", recipe(), tmp_path / "y", RunOptions(output_format="compressed-tensors"))
    config = transformers.LlamaConfig(**{**ODD, "intermediate_size": 184})  # no known H_184
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "no-h")
    with pytest.raises(RecipeError, match="r4: false"):
        quantize(tmp_path / "no-h", recipe(), tmp_path / "z")
    quantize(tmp_path / "no-h", recipe("{type: quarot, r4: false}"), tmp_path / "ok")
    assert mpq.load(tmp_path / "ok").mpq_artifact.log.rotation["online"] == {}
