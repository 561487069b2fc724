"""Scale folding (mpq.transforms.scale_fold) keeps the float model's output unchanged."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from mpq.errors import ModelError, SchemeError
from mpq.models.families import FAMILIES, family_of
from mpq.models.family import ScaleGroup
from mpq.transforms.scale_fold import fold_scales, group_weight_absmax, scale_groups
from tests.tiny_models import (ARCHITECTURES, COMMON, MOE_ARCHITECTURES, RECORD_ARCHITECTURES,
                               model_from_config, tiny_config, tiny_model)

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)


def _extra_model(arch: str) -> transformers.PreTrainedModel:
    """Variants tiny_models lacks: full multi-head attention (so v→o folds) with biases,
    post-LN OPT."""
    if arch == "llama_mha":
        config = transformers.LlamaConfig(num_key_value_heads=4, attention_bias=True,
                                          mlp_bias=True, **SMALL, **COMMON)
    elif arch == "opt_post_ln":
        config = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                        word_embed_proj_dim=64, do_layer_norm_before=False,
                                        **COMMON)
    else:
        return tiny_model(arch)
    return model_from_config(config)


def _randomize_1d(model) -> None:
    """Non-trivial norm weights and biases, so every part of the fold is exercised."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 1:
                continue
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif family_of(model).plus_one_norm:  # weight is an offset from 1
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            else:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)


def _blocks(model):
    return list(model.get_submodule(family_of(model).blocks))


# every tiny model whose family records scale groups (so each record is checked), plus MHA
FOLDABLE = [a for a in ARCHITECTURES + RECORD_ARCHITECTURES + MOE_ARCHITECTURES
            if family_of(tiny_config(a)).scale_groups] + ["llama_mha"]


@pytest.mark.parametrize("arch", FOLDABLE)
def test_fold_keeps_logits(arch):
    model = _extra_model(arch)
    _randomize_1d(model)
    ids = torch.randint(2, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
    gen = torch.Generator().manual_seed(3)
    kinds = set()
    for block in _blocks(model):
        for group in scale_groups(model, block):
            kinds.add(group.prev_kind)
            paths = (group.prev, *group.linears)
            old = {p: block.get_submodule(p).weight.detach().clone() for p in paths}
            scales = torch.exp(torch.randn(group_weight_absmax(block, group).shape,
                                           generator=gen) * 0.5)
            fold_scales(block, group, scales)
            for p in paths:  # not vacuous: every touched weight changed
                assert not torch.allclose(block.get_submodule(p).weight, old[p]), (arch, p)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert kinds, "no group folded"


def test_gqa_drops_v_to_o_and_mha_keeps_it():
    gqa, mha = tiny_model("llama"), _extra_model("llama_mha")
    prevs = lambda m: [g.prev for g in scale_groups(m, _blocks(m)[0])]  # noqa: E731
    assert prevs(gqa) == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    assert prevs(mha) == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                          "mlp.up_proj"]
    # the config works as well as the model
    assert scale_groups(mha.config, _blocks(mha)[0]) == scale_groups(mha, _blocks(mha)[0])
    # folding the dropped group directly is refused, not silently wrong
    v_to_o = family_of(gqa).scale_groups[1]
    with pytest.raises(SchemeError, match="v_proj"):
        fold_scales(_blocks(gqa)[0], v_to_o, torch.ones(64))


def test_opt_groups_pre_and_post_ln():
    pre, post = tiny_model("opt"), _extra_model("opt_post_ln")
    assert [g.prev for g in scale_groups(pre, _blocks(pre)[0])] == [
        "self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", "fc1"]
    assert [g.prev_kind for g in scale_groups(post, _blocks(post)[0])] == ["linear", "linear"]


@pytest.mark.parametrize("bad", [torch.ones(63), torch.ones(1, 64), torch.zeros(64),
                                 -torch.ones(64), torch.full((64,), float("nan")),
                                 torch.full((64,), float("inf"))],
                         ids=["length", "2d", "zero", "negative", "nan", "inf"])
def test_bad_scales_raise(bad):
    model = tiny_model("llama")
    block = _blocks(model)[0]
    group = scale_groups(model, block)[0]
    before = block.input_layernorm.weight.detach().clone()
    with pytest.raises(SchemeError, match="input_layernorm"):
        fold_scales(block, group, bad)
    assert torch.equal(block.input_layernorm.weight, before)


def test_a_family_without_scale_groups_is_refused_with_its_reason(monkeypatch):
    gpt2 = FAMILIES.get("gpt2")
    bare = dataclasses.replace(gpt2, scale_groups=(), unsupported=gpt2.unsupported + (
        ("scale_groups", "its scale groups were removed for this test"),))
    monkeypatch.setitem(FAMILIES._by_type, "gpt2", bare)
    model = tiny_model("gpt2")
    with pytest.raises(ModelError, match="not supported for model type 'gpt2' \\(family "
                                         "'gpt2'\\): its scale groups were removed") as info:
        scale_groups(model, model.transformer.h[0])
    assert "awq" in info.value.hint


def test_a_model_type_without_a_record_is_refused():
    config = transformers.Starcoder2Config(hidden_size=64, intermediate_size=128,
                                           num_attention_heads=4, num_key_value_heads=2, **COMMON)
    model = model_from_config(config)
    with pytest.raises(ModelError, match="no scale-folding data for model_type 'starcoder2'"):
        scale_groups(model, model.model.layers[0])


def test_group_weight_absmax_by_hand():
    model = tiny_model("qwen2")
    block = _blocks(model)[0]
    group = ScaleGroup("input_layernorm",
                       ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "rmsnorm")
    attn = block.self_attn
    stacked = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    expected = torch.tensor([stacked[:, j].abs().max().item() for j in range(stacked.shape[1])])
    got = group_weight_absmax(block, group)
    assert got.dtype == torch.float32 and got.shape == (64,)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_fold_writes_new_memory_in_param_dtype():
    model = tiny_model("llama").to(torch.bfloat16)
    block = _blocks(model)[0]
    group = scale_groups(model, block)[0]
    old_norm = block.input_layernorm.weight.data
    old_q = block.self_attn.q_proj.weight.data
    norm_copy, q_copy = old_norm.clone(), old_q.clone()
    scales = torch.linspace(0.5, 2.0, 64, dtype=torch.float64)
    fold_scales(block, group, scales)
    assert block.input_layernorm.weight.dtype == torch.bfloat16
    assert block.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(old_norm, norm_copy) and torch.equal(old_q, q_copy)  # old storage intact
    expected = (q_copy.float() * scales.float()).to(torch.bfloat16)
    assert torch.equal(block.self_attn.q_proj.weight, expected)
