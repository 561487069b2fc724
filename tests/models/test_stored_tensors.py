"""A source whose weight files do not fit config.json's architecture is refused, naming the tensor:
an integer dtype, another shape, a tensor the architecture does not use; what transformers itself
ignores on loading (old buffers) is accepted.  Both the run spec (quantize, plan) and load_model
(eval, whole-model runs) check it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mpq.engine.spec import resolve_run
from mpq.errors import ModelError
from mpq.models.source import load_model
from tests.tiny_models import save_tiny_model

UP = "model.layers.1.mlp.up_proj.weight"


def edited(tmp_path: Path, change, arch: str = "llama") -> Path:
    path = tmp_path / arch
    save_tiny_model(arch, path)
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def both_refuse(path: Path, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        resolve_run(path, "w4a16")
    with pytest.raises(ModelError, match=match):
        load_model(path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_a_weight_stored_as_integers_is_refused(tmp_path, dtype):
    path = edited(tmp_path, lambda t: t.update({UP: (t[UP] * 100).to(dtype)}))
    both_refuse(path, f"tensor '{UP}' is stored as [A-Z0-9]+, not as floating point")


def test_a_weight_of_another_shape_is_refused(tmp_path):
    path = edited(tmp_path, lambda t: t.update({UP: t[UP].t().contiguous()}))
    both_refuse(path, rf"tensor '{UP}' has shape \(64, 128\), the config expects \(128, 64\)")


@pytest.mark.parametrize("name", ["model.layers.1.mlp.extra_proj.weight",
                                  "model.layers.2.mlp.up_proj.weight"])
def test_a_tensor_the_architecture_does_not_use_is_refused(tmp_path, name):
    path = edited(tmp_path, lambda t: t.update({name: torch.zeros(4, 4)}))
    both_refuse(path, f"1 tensor\\(s\\) in the weight files are not part of config.json's "
                      f"architecture: {name}")


def test_half_precision_weights_are_float(tmp_path):
    path = edited(tmp_path, lambda t: t.update({UP: t[UP].half()}))
    resolve_run(path, "w4a16")
    assert load_model(path).get_parameter(UP).dtype == torch.float32


def test_buffers_transformers_ignores_are_accepted(tmp_path):
    """GPT-2 checkpoints keep each layer's causal mask (attn.bias; attn.masked_bias in older
    ones), Llama ones the rotary inv_freq: not weights, skipped by transformers."""
    def old_buffers(tensors):
        for layer in range(2):
            tensors[f"transformer.h.{layer}.attn.bias"] = torch.ones(1, 1, 128, 128)
            tensors[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)

    resolve_run(edited(tmp_path, old_buffers, "gpt2"), "w4a16")
    load_model(tmp_path / "gpt2")
    path = edited(tmp_path, lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    resolve_run(path, "w4a16")
    load_model(path)


def test_names_transformers_remaps_are_left_to_its_report(tmp_path):
    """A GPT-2 checkpoint saved from the base model (no ``transformer.`` prefix) loads; an unused
    tensor in it is still refused, from transformers' loading report."""
    def base_model_names(tensors):
        for name in list(tensors):
            if name.startswith("transformer."):
                tensors[name[len("transformer."):]] = tensors.pop(name)
        tensors.pop("lm_head.weight", None)

    path = edited(tmp_path, base_model_names, "gpt2")
    load_model(path)
    extra = load_file(path / "model.safetensors")
    extra["h.0.mlp.extra.weight"] = torch.zeros(2, 2)
    save_file(extra, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="not part of config.json's architecture: "
                                         "h.0.mlp.extra.weight"):
        load_model(path)
