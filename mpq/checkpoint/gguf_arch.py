"""What llama.cpp expects of a model family in a GGUF file: its architecture name, the metadata
keys read from the Hugging Face config, the tensor names and the Q/K row permutation.

Architecture knowledge is data (:data:`GGUF_ARCHS`, keyed by the config's ``model_type``); tensor
names come from the ``gguf`` package's own map (``gguf.get_tensor_name_map``).  The ``llama``
architecture applies RoPE to interleaved pairs of a head's dimensions, Hugging Face's Llama to
its two halves, so llama.cpp's converter permutes the rows of ``q_proj`` and ``k_proj`` (and
their biases) within each head: row ``h·D + 2i + j`` of the GGUF tensor is row ``h·D + j·D/2 + i``
of the Hugging Face one (head dim D, i < D/2, j ∈ {0, 1}).  Only rows move, so a quantized
tensor's block rows are permuted as they are, losslessly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from mpq.errors import FormatError


@dataclass(frozen=True)
class GgufArch:
    """One family: llama.cpp's architecture name and whether Q/K rows are permuted."""

    arch: str
    permute_qk: bool


GGUF_ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("llama", permute_qk=True),
    "mistral": GgufArch("llama", permute_qk=True),
    "qwen2": GgufArch("qwen2", permute_qk=False),
    "qwen3": GgufArch("qwen3", permute_qk=False),
}


def arch_of(config: Mapping[str, Any]) -> GgufArch:
    """The record of ``config``'s model type; FormatError naming the supported ones."""
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHS:
        raise FormatError(f"format 'gguf' does not support model type '{model_type}' (it "
                          f"writes {', '.join(sorted(GGUF_ARCHS))})",
                          hint="write the native format (--format mpq)")
    return GGUF_ARCHS[model_type]


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """What in ``config`` the GGUF metadata written here cannot express."""
    problems = []
    if config.get("model_type") not in GGUF_ARCHS:
        problems.append(f"model type '{config.get('model_type')}' (format 'gguf' writes "
                        f"{', '.join(sorted(GGUF_ARCHS))})")
        return problems
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        problems.append(f"RoPE scaling '{kind}' (format 'gguf' writes default RoPE only)")
    if config.get("sliding_window") and config.get("use_sliding_window"):
        problems.append("sliding-window attention (not written to GGUF metadata here)")
    return problems


def rope_theta(config: Mapping[str, Any]) -> float:
    """RoPE base of a config (transformers 4's ``rope_theta`` or 5's ``rope_parameters``)."""
    params = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def add_arch_metadata(writer, config: Mapping[str, Any], name: str) -> None:
    """The ``general.*`` and ``<arch>.*`` keys llama.cpp reads (writer: a gguf.GGUFWriter)."""
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads")
                                 or config["num_attention_heads"]))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    writer.add_key_length(dim)
    writer.add_value_length(dim)


def tensor_name(hf_name: str, arch: GgufArch, num_blocks: int) -> str:
    """The GGUF name of a Hugging Face state-dict tensor; FormatError when llama.cpp's map has
    none for it."""
    import gguf

    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.arch)
    mapped = gguf.get_tensor_name_map(model_arch, num_blocks).get_name(
        hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise FormatError(f"format 'gguf' has no llama.cpp tensor name for '{hf_name}' "
                          f"(architecture {arch.arch})",
                          hint="write the native format (--format mpq)")
    return mapped


def qk_heads(hf_name: str, config: Mapping[str, Any]) -> int | None:
    """Heads whose rows are permuted for ``hf_name`` under llama's RoPE layout: the query heads
    for q_proj, the key/value heads for k_proj, None for any other tensor."""
    owner = hf_name.rsplit(".", 1)[0]
    if owner.endswith("q_proj"):
        return int(config["num_attention_heads"])
    if owner.endswith("k_proj"):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def permute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of ``t`` (any trailing shape) in llama.cpp's interleaved RoPE order (module
    docstring)."""
    rows = t.shape[0]
    return (t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2)
            .reshape(t.shape).contiguous())
