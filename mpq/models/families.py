"""The model families mpq knows (records of :class:`mpq.models.family.Family`).

Adding a family is adding one record here (and a tiny config to tests/tiny_models.py, which
tests/models/test_families.py then requires).  Check every fact against the installed
transformers source of the architecture.  A model type without a record still quantizes: its
blocks are found by generic discovery (mpq.models.layout) and its attention by the generic
guess (mpq.models.attention), and ``mpq plan`` says which parts were discovered
(mpq.models.discovery); transforms and rotation then refuse it with a ModelError.

Each record either has each optional part (attention / KV-cache location, scale groups,
rotation) or names why not in ``unsupported``; scale groups list only exact folds (a norm or
linear whose output feeds nothing but the group's linears, through scale-commuting ops only).
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
_V_O = ScaleGroup(_ATTENTION.v_proj, (_ATTENTION.o_proj,), "linear")
# down_proj reads act(gate_proj(x)) * up_proj(x): linear in up_proj's output.
_UP_DOWN = ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "linear")

# Why rotation does not hold, per kind of block (QuaRot rotates the residual stream: every op
# between a writer and a reader must commute with an orthogonal Q).
_POST_NORMS = ("post-norms (post_attention_layernorm, post_feedforward_layernorm) normalise "
               "each sublayer's output and scale its channels before the residual add: "
               "RMSNorm(y·Q)·w ≠ (RMSNorm(y)·w)·Q, so the residual stream cannot be rotated "
               "offline")
_LAYERNORM = ("LayerNorm subtracts the mean over channels: LayerNorm(x·Q) ≠ LayerNorm(x)·Q, "
              "so the residual stream cannot be rotated without first turning LayerNorm into "
              "RMSNorm, which mpq does not do")
_MOE = ("the mixture-of-experts block reads the residual stream through its router and fused "
        "3-D expert tensors, which the rotation does not transform")


def _gated_scale_groups(norm: str, mlp_norm: str = "post_attention_layernorm"
                        ) -> tuple[ScaleGroup, ...]:
    return (ScaleGroup("input_layernorm", _QKV, norm), _V_O,
            ScaleGroup(mlp_norm, _GATE_UP, norm), _UP_DOWN)


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

# Gemma 2 and Gemma 3 (text model, model_type gemma3_text) sandwich each sublayer between norms:
# input_layernorm → attention → post_attention_layernorm → residual add, then
# pre_feedforward_layernorm → MLP → post_feedforward_layernorm → residual add.  The pre-norms
# feed only q/k/v and gate/up (exact groups); the post-norms read o_proj's / down_proj's output
# and write the residual stream, so they feed no linear.  Gemma 3's q_norm/k_norm act per head
# after q/k_proj: they do not touch the groups.
_SANDWICH = dict(blocks="model.layers", norm="rmsnorm_plus_one", mlp_down="mlp.down_proj",
                 attention=_ATTENTION,
                 scale_groups=_gated_scale_groups("rmsnorm_plus_one",
                                                  "pre_feedforward_layernorm"),
                 fused=(_QKV, _GATE_UP), unsupported=(("rotation", _POST_NORMS),))
GEMMA2 = FAMILIES.register(Family(name="gemma2", model_types=("gemma2",), **_SANDWICH))
GEMMA3 = FAMILIES.register(Family(name="gemma3", model_types=("gemma3_text",), **_SANDWICH))

# OLMo 2 has post-norms only: q/k/v and gate/up read the raw residual stream (no norm feeds
# them, so no norm scale group exists), post_attention_layernorm / post_feedforward_layernorm
# normalise the sublayer outputs.  q_norm/k_norm normalise the whole q/k projection (not per
# head) and v has none, so v_proj → o_proj stays exact.
OLMO2 = FAMILIES.register(Family(
    name="olmo2", model_types=("olmo2",), blocks="model.layers", norm="rmsnorm",
    mlp_down="mlp.down_proj", attention=_ATTENTION, scale_groups=(_V_O, _UP_DOWN),
    fused=(_QKV, _GATE_UP), unsupported=(("rotation", _POST_NORMS),)))

# Granite: Llama's block with scalar multipliers (embedding_multiplier on the embeddings,
# residual_multiplier on each branch before the residual add, attention_multiplier as the
# softmax scale, logits / logits_scaling).  Scalars commute with per-channel scales and with
# orthogonal rotations, so Llama's scale groups and QuaRot sites are exact.
GRANITE = FAMILIES.register(Family(
    name="granite", model_types=("granite",), blocks="model.layers", norm="rmsnorm",
    mlp_down="mlp.down_proj", attention=_ATTENTION,
    scale_groups=_gated_scale_groups("rmsnorm"), rotation=_ROTATION, fused=(_QKV, _GATE_UP)))

# Mixture-of-experts families: attention (Llama's; Qwen3-MoE adds per-head q_norm/k_norm) and
# the input_layernorm → q/k/v group.  post_attention_layernorm feeds the router and every fused
# expert together (mpq.models.experts), so no scale fold into one expert alone is exact: the
# experts get no smoothing (mpq.models.experts.NO_SMOOTHING) and no rotation record.
_MOE_DENSE = dict(blocks="model.layers", norm="rmsnorm", attention=_ATTENTION,
                  scale_groups=(ScaleGroup("input_layernorm", _QKV, "rmsnorm"), _V_O),
                  fused=(_QKV,), unsupported=(("rotation", _MOE),))
QWEN3_MOE = FAMILIES.register(Family(name="qwen3_moe", model_types=("qwen3_moe",), **_MOE_DENSE))
MIXTRAL = FAMILIES.register(Family(name="mixtral", model_types=("mixtral",), **_MOE_DENSE))

# Phi-3 stores q/k/v as one qkv_proj (q, k, v concatenated) and gate/up as one gate_up_proj
# (already fused); the pre-norms feed only those, and o_proj / down_proj write the residual
# stream as in Llama.  down_proj reads act(gate) * up, the second half of gate_up_proj's rows: a
# fold into all of gate_up_proj's rows is not that, so there is no up → down group.
_PHI3_QKV, _PHI3_GATE_UP = ("self_attn.qkv_proj",), ("mlp.gate_up_proj",)
PHI3 = FAMILIES.register(Family(
    name="phi3", model_types=("phi3",), blocks="model.layers", norm="rmsnorm",
    mlp_down="mlp.down_proj",
    attention=Attention(path="self_attn", qkv_proj="self_attn.qkv_proj",
                        o_proj="self_attn.o_proj"),
    scale_groups=(ScaleGroup("input_layernorm", _PHI3_QKV, "rmsnorm"),
                  ScaleGroup("post_attention_layernorm", _PHI3_GATE_UP, "rmsnorm")),
    rotation=Rotation(readers=(("input_layernorm", _PHI3_QKV),
                               ("post_attention_layernorm", _PHI3_GATE_UP)),
                      writers=("self_attn.o_proj", "mlp.down_proj"), final_norm="model.norm")))

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
    fused=(_OPT_QKV,), unsupported=(("rotation", _LAYERNORM),)))

# GPT-2: Conv1D layers (weights stored [in, out]), q/k/v fused in attn.c_attn.  Fused q/k/v
# hold the KV cache all the same: the attention hands its cache the keys and values.
GPT2 = FAMILIES.register(Family(
    name="gpt2", model_types=("gpt2",), blocks="transformer.h", norm="layernorm",
    mlp_down="mlp.c_proj", attention=Attention(path="attn", qkv_proj="attn.c_attn",
                                               o_proj="attn.c_proj"),
    # pre-LN: ln_1 feeds only c_attn, ln_2 only c_fc; c_proj reads gelu(c_fc(x)), not exact
    scale_groups=(ScaleGroup("ln_1", ("attn.c_attn",), "layernorm"),
                  ScaleGroup("ln_2", ("mlp.c_fc",), "layernorm")),
    unsupported=(("rotation", _LAYERNORM),)))

# GPT-NeoX, Falcon and BLOOM: q/k/v fused in query_key_value, LayerNorm, GELU MLPs (so no
# dense_h_to_4h → dense_4h_to_h group).  GPT-NeoX's two norms each feed one sublayer (also with
# the parallel residual); Falcon-7B's parallel block (not the new decoder architecture) feeds
# attention and MLP from one input_layernorm; BLOOM's post_attention_layernorm feeds the MLP,
# and its norm outputs also become the residual when apply_residual_connection_post_layernorm.
_NEOX_LIKE = dict(norm="layernorm", mlp_down="mlp.dense_4h_to_h")
_FUSED_SELF_ATTENTION = Attention(path="self_attention",
                                  qkv_proj="self_attention.query_key_value",
                                  o_proj="self_attention.dense")
GPT_NEOX = FAMILIES.register(Family(
    name="gpt_neox", model_types=("gpt_neox",), blocks="gpt_neox.layers",
    scale_groups=(ScaleGroup("input_layernorm", ("attention.query_key_value",), "layernorm"),
                  ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "layernorm")),
    attention=Attention(path="attention", qkv_proj="attention.query_key_value",
                        o_proj="attention.dense"),
    unsupported=(("rotation", _LAYERNORM),), **_NEOX_LIKE))
_FALCON_PARALLEL = (Requires("parallel_attn", (True,), True),
                    Requires("new_decoder_architecture", (False,), False))
FALCON = FAMILIES.register(Family(
    name="falcon", model_types=("falcon",), blocks="transformer.h",
    scale_groups=(ScaleGroup("input_layernorm",
                             ("self_attention.query_key_value", "mlp.dense_h_to_4h"),
                             "layernorm", requires=_FALCON_PARALLEL),),
    attention=_FUSED_SELF_ATTENTION, unsupported=(("rotation", _LAYERNORM),), **_NEOX_LIKE))
_BLOOM_PRE_LN = (Requires("apply_residual_connection_post_layernorm", (False,), False),)
BLOOM = FAMILIES.register(Family(
    name="bloom", model_types=("bloom",), blocks="transformer.h",
    scale_groups=(ScaleGroup("input_layernorm", ("self_attention.query_key_value",),
                             "layernorm", requires=_BLOOM_PRE_LN),
                  ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "layernorm",
                             requires=_BLOOM_PRE_LN)),
    attention=_FUSED_SELF_ATTENTION, unsupported=(("rotation", _LAYERNORM),), **_NEOX_LIKE))
