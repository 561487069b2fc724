"""The model families mpq knows (records of :class:`mpq.models.family.Family`).

Adding a family is adding one record here (and a tiny config to tests/tiny_models.py, which
tests/models/test_families.py then requires).  Check every fact against the installed
transformers source of the architecture.  A model type without a record still quantizes: its
blocks are found by generic discovery (mpq.models.layout) and its attention by the generic
guess (mpq.models.attention); transforms and rotation then refuse it with a ModelError.
"""
from __future__ import annotations

from mpq.models.family import Attention, Family, FamilyRegistry, Requires, Rotation, ScaleGroup

FAMILIES = FamilyRegistry()


def family_of(model_or_config) -> Family | None:
    """The record covering a ``PreTrainedModel``'s (or a config's) ``model_type``; None if no
    record covers it."""
    config = getattr(model_or_config, "config", model_or_config)
    return FAMILIES.for_model_type(getattr(config, "model_type", None))


# Llama-style decoder block: pre-norm attention with separate q/k/v/o projections and a gated
# MLP, down_proj(act(gate_proj(x)) * up_proj(x)).
_ATTENTION = Attention(path="self_attn", q_proj="self_attn.q_proj", k_proj="self_attn.k_proj",
                       v_proj="self_attn.v_proj", o_proj="self_attn.o_proj")
_QKV = (_ATTENTION.q_proj, _ATTENTION.k_proj, _ATTENTION.v_proj)
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_ROTATION = Rotation(readers=(("input_layernorm", _QKV), ("post_attention_layernorm", _GATE_UP)),
                     writers=(_ATTENTION.o_proj, "mlp.down_proj"), final_norm="model.norm")


def _gated_scale_groups(norm: str) -> tuple[ScaleGroup, ...]:
    return (
        ScaleGroup("input_layernorm", _QKV, norm),
        ScaleGroup(_ATTENTION.v_proj, (_ATTENTION.o_proj,), "linear"),
        ScaleGroup("post_attention_layernorm", _GATE_UP, norm),
        # down_proj reads act(gate_proj(x)) * up_proj(x): linear in up_proj's output.
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "linear"),
    )


# Qwen2 adds q/k/v biases; Qwen3's q_norm/k_norm act on q/k_proj outputs (per head, after the
# projection), so what reads the residual stream and what writes it is Llama's.
LLAMA = FAMILIES.register(Family(
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), blocks="model.layers",
    norm="rmsnorm", mlp_down="mlp.down_proj", attention=_ATTENTION,
    scale_groups=_gated_scale_groups("rmsnorm"), rotation=_ROTATION, fused=(_QKV, _GATE_UP)))

# Gemma: RMSNorm computes norm(x) * (1 + w); the embedding is scaled by sqrt(hidden) (a scalar).
GEMMA = FAMILIES.register(Family(
    name="gemma", model_types=("gemma",), blocks="model.layers", norm="rmsnorm_plus_one",
    mlp_down="mlp.down_proj", attention=_ATTENTION,
    scale_groups=_gated_scale_groups("rmsnorm_plus_one"), rotation=_ROTATION,
    fused=(_QKV, _GATE_UP)))

# Gemma 2 normalises the attention and MLP outputs too (post_*_layernorm before the residual
# add): no scale groups or rotation recorded.
GEMMA2 = FAMILIES.register(Family(
    name="gemma2", model_types=("gemma2",), blocks="model.layers", norm="rmsnorm_plus_one",
    mlp_down="mlp.down_proj", attention=_ATTENTION, fused=(_QKV, _GATE_UP)))

# Granite: Llama's block with scalar multipliers (embedding_multiplier on the embeddings,
# residual_multiplier on each branch before the residual add, attention_multiplier as the
# softmax scale, logits / logits_scaling).  Scalars commute with per-channel scales and with
# orthogonal rotations, so Llama's scale groups and QuaRot sites are exact.
GRANITE = FAMILIES.register(Family(
    name="granite", model_types=("granite",), blocks="model.layers", norm="rmsnorm",
    mlp_down="mlp.down_proj", attention=_ATTENTION,
    scale_groups=_gated_scale_groups("rmsnorm"), rotation=_ROTATION, fused=(_QKV, _GATE_UP)))

# Qwen3-MoE and Mixtral: Llama's attention (Qwen3-MoE with Qwen3's q_norm/k_norm) and a sparse
# MoE MLP whose experts are fused 3-D parameters (mpq.models.experts).  The post-attention norm
# feeds the router and every expert together, so only the attention's scale groups are exact
# per block; the experts get no smoothing (mpq.models.experts.NO_SMOOTHING) and no QuaRot record
# (its down-projection site is inside the experts module).
QWEN3_MOE = FAMILIES.register(Family(
    name="qwen3_moe", model_types=("qwen3_moe", "mixtral"), blocks="model.layers",
    norm="rmsnorm", attention=_ATTENTION,
    scale_groups=_gated_scale_groups("rmsnorm")[:2], fused=(_QKV,)))

# Phi-3 stores q/k/v as one qkv_proj and gate/up as one gate_up_proj (already fused).
PHI3 = FAMILIES.register(Family(
    name="phi3", model_types=("phi3",), blocks="model.layers", norm="rmsnorm",
    mlp_down="mlp.down_proj"))

# OPT: LayerNorm with bias, fc2(relu(fc1(x))); post-LN variants (do_layer_norm_before False)
# normalise after the residual add, so the norm's output is not the linears' input there.
_OPT_ATTENTION = Attention(path="self_attn", q_proj="self_attn.q_proj",
                           k_proj="self_attn.k_proj", v_proj="self_attn.v_proj",
                           o_proj="self_attn.out_proj")
_PRE_LN = Requires("do_layer_norm_before", (True,), True)
# fc2 reads act(fc1(x)): exact only for f with f(x / s) == f(x) / s for s > 0.
_POSITIVE_HOMOGENEOUS = Requires("activation_function", ("relu",), "relu")
_OPT_QKV = (_OPT_ATTENTION.q_proj, _OPT_ATTENTION.k_proj, _OPT_ATTENTION.v_proj)
OPT = FAMILIES.register(Family(
    name="opt", model_types=("opt",), blocks="model.decoder.layers", norm="layernorm",
    mlp_down="fc2", attention=_OPT_ATTENTION,
    scale_groups=(
        ScaleGroup("self_attn_layer_norm", _OPT_QKV, "layernorm", requires=(_PRE_LN,)),
        ScaleGroup(_OPT_ATTENTION.v_proj, (_OPT_ATTENTION.o_proj,), "linear"),
        ScaleGroup("final_layer_norm", ("fc1",), "layernorm", requires=(_PRE_LN,)),
        ScaleGroup("fc1", ("fc2",), "linear", requires=(_POSITIVE_HOMOGENEOUS,)),
    ),
    fused=(_OPT_QKV,)))

# GPT-2 (Conv1D layers, q/k/v fused in c_attn), GPT-NeoX, Falcon and BLOOM (q/k/v fused in
# query_key_value): block lists and MLP down projections only.
GPT2 = FAMILIES.register(Family(
    name="gpt2", model_types=("gpt2",), blocks="transformer.h", norm="layernorm",
    mlp_down="mlp.c_proj"))
GPT_NEOX = FAMILIES.register(Family(
    name="gpt_neox", model_types=("gpt_neox",), blocks="gpt_neox.layers", norm="layernorm",
    mlp_down="mlp.dense_4h_to_h"))
FALCON = FAMILIES.register(Family(
    name="falcon", model_types=("falcon",), blocks="transformer.h", norm="layernorm",
    mlp_down="mlp.dense_4h_to_h"))
BLOOM = FAMILIES.register(Family(
    name="bloom", model_types=("bloom",), blocks="transformer.h", norm="layernorm",
    mlp_down="mlp.dense_4h_to_h"))
