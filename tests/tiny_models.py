"""Tiny random causal LMs of several architectures, built in-process (no downloads)."""
from __future__ import annotations

import torch
import transformers

COMMON = dict(vocab_size=256, num_hidden_layers=2, max_position_embeddings=128)


def _configs() -> dict[str, transformers.PretrainedConfig]:
    return {
        "llama": transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                          num_attention_heads=4, num_key_value_heads=2, **COMMON),
        "llama_tied": transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=True, **COMMON),
        "qwen2": transformers.Qwen2Config(hidden_size=64, intermediate_size=128,
                                          num_attention_heads=4, num_key_value_heads=2, **COMMON),
        "mistral": transformers.MistralConfig(hidden_size=64, intermediate_size=128,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              **COMMON),
        "gemma": transformers.GemmaConfig(hidden_size=64, intermediate_size=128,
                                          num_attention_heads=4, num_key_value_heads=1,
                                          head_dim=16, **COMMON),
        "opt": transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                      word_embed_proj_dim=64, vocab_size=256,
                                      num_hidden_layers=2, max_position_embeddings=128,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1),
        # Granite's multipliers away from 1 (Granite 3.0's, but attention_multiplier 1/8 so
        # attention is not near-uniform at head_dim 16)
        "granite": transformers.GraniteConfig(hidden_size=64, intermediate_size=128,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              embedding_multiplier=12.0, residual_multiplier=0.22,
                                              attention_multiplier=0.125, logits_scaling=8.0,
                                              **COMMON),
        "gpt2": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256,
                                        n_positions=128, bos_token_id=0, eos_token_id=1),
    }


def _record_configs() -> dict[str, transformers.PretrainedConfig]:
    """One model per model type the family records cover (mpq.models.families) beyond
    ARCHITECTURES; tests/models/test_families.py checks every record on them."""
    return {
        "qwen3": transformers.Qwen3Config(hidden_size=64, intermediate_size=128,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=16, **COMMON),
        "gemma2": transformers.Gemma2Config(hidden_size=64, intermediate_size=128,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=16, **COMMON),
        "phi3": transformers.Phi3Config(hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                        **COMMON),
        "gpt_neox": transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128,
                                               num_attention_heads=4, bos_token_id=0,
                                               eos_token_id=1, **COMMON),
        "falcon": transformers.FalconConfig(hidden_size=64, num_attention_heads=4,
                                            vocab_size=256, num_hidden_layers=2,
                                            bos_token_id=0, eos_token_id=1),
        "bloom": transformers.BloomConfig(hidden_size=64, n_head=4, vocab_size=256, n_layer=2,
                                          bos_token_id=0, eos_token_id=1),
        # the text model (Gemma3ForCausalLM); one global layer and one sliding-window layer
        # whose window is shorter than the test sequences
        "gemma3": transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=128,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=16, sliding_window=8,
                                                layer_types=["full_attention",
                                                             "sliding_attention"],
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                                **COMMON),
        "olmo2": transformers.Olmo2Config(hidden_size=64, intermediate_size=128,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                          **COMMON),
    }


def _moe_configs() -> dict[str, transformers.PretrainedConfig]:
    """Mixture-of-experts models whose experts transformers stores as fused 3-D parameters
    (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]); the
    experts hold most of the weights, as in the real models."""
    return {
        "qwen3_moe": transformers.Qwen3MoeConfig(hidden_size=64, intermediate_size=128,
                                                 moe_intermediate_size=64, num_experts=8,
                                                 num_experts_per_tok=2, num_attention_heads=4,
                                                 num_key_value_heads=2, head_dim=16, **COMMON),
        "mixtral": transformers.MixtralConfig(hidden_size=64, intermediate_size=64,
                                              num_local_experts=8, num_experts_per_tok=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              **COMMON),
    }


def _wide_configs() -> dict[str, transformers.PretrainedConfig]:
    """Models whose linears take multiples of 256 inputs (GGUF's K-quant super-blocks)."""
    return {
        "llama_wide": transformers.LlamaConfig(hidden_size=256, intermediate_size=512,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               **COMMON),
    }


ARCHITECTURES = tuple(_configs())  # the pipeline tests run on each of these
RECORD_ARCHITECTURES = tuple(_record_configs())
MOE_ARCHITECTURES = tuple(_moe_configs())


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    """The config of ``arch``, one of ARCHITECTURES, RECORD_ARCHITECTURES, MOE_ARCHITECTURES or
    the wide ones ("llama_wide")."""
    return {**_configs(), **_record_configs(), **_moe_configs(), **_wide_configs()}[arch]


def tiny_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    return model_from_config(tiny_config(arch), seed)


def model_from_config(config: transformers.PretrainedConfig, seed: int = 0
                      ) -> transformers.PreTrainedModel:
    """A random fp32 model of ``config`` with N(0, 0.05) matrices, in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-init weights so quantization error is visible
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.05)
    return model.eval()


def save_tiny_model(arch: str, path, seed: int = 0) -> transformers.PreTrainedModel:
    model = tiny_model(arch, seed)
    model.save_pretrained(path)
    return model
