"""What llama.cpp expects of a model family in a GGUF file: its architecture name, the metadata
keys read from the Hugging Face config, the tensor names and the Q/K row permutation.

Architecture knowledge is data (:data:`GGUF_ARCHS`, keyed by the config's ``model_type``); tensor
names come from the ``gguf`` package's own map (``gguf.get_tensor_name_map``).  The ``llama``
architecture applies RoPE to interleaved pairs of a head's dimensions, Hugging Face's Llama to
its two halves, so llama.cpp's converter permutes the rows of ``q_proj`` and ``k_proj`` (and
their biases) within each head: row ``h·D + 2i + j`` of the GGUF tensor is row ``h·D + j·D/2 + i``
of the Hugging Face one (head dim D, i < D/2, j ∈ {0, 1}).  Only rows move, so a quantized
tensor's block rows are permuted as they are, losslessly.

Gemma and Gemma 2 (llama.cpp's ``gemma``/``gemma2``, NEOX RoPE: no permutation) compute their
RMSNorms as x·(1 + w); llama.cpp multiplies by the stored weight, so every ``*norm.weight`` is
stored as 1 + w.  llama.cpp's graphs for them hard-code more than the metadata says (the head is
``token_embd``, GELU's tanh form, Gemma 2's soft-capping, query scale and sliding-window layer
pattern): each record lists those assumptions as :class:`Requirement` s, and a config that
departs from one is refused before any work (:func:`config_problems`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from mpq.errors import FormatError


@dataclass(frozen=True)
class Requirement:
    """A config value llama.cpp's graph for an architecture assumes: ``holds(value, config)``
    is False when the config's ``key`` departs from it; ``assumes`` says what llama.cpp does."""

    key: str
    holds: Callable[[Any, Mapping[str, Any]], bool]
    assumes: str

    def problem(self, config: Mapping[str, Any], arch: str) -> str | None:
        value = config.get(self.key)
        if self.holds(value, config):
            return None
        return f"{self.key} {value!r} (llama.cpp's {arch} {self.assumes})"


@dataclass(frozen=True)
class GgufArch:
    """One family: llama.cpp's architecture name, whether Q/K rows are permuted, whether norm
    weights are stored as 1 + w, whether the output head can only be the embedding, extra
    metadata (GGUFWriter method, config key, type) and what llama.cpp's graph assumes of the
    config."""

    arch: str
    permute_qk: bool
    norm_plus_one: bool = False
    head_from_embedding: bool = False  # llama.cpp's graph has no output tensor of its own
    extra_keys: tuple[tuple[str, str, type], ...] = ()
    requirements: tuple[Requirement, ...] = ()


def _gemma2_query_scale(value: Any, config: Mapping[str, Any]) -> bool:
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for its 46-layer
    # (27B) model; Hugging Face by 1/sqrt(query_pre_attn_scalar)
    layers = int(config["num_hidden_layers"])
    expected = (int(config["hidden_size"]) // int(config["num_attention_heads"])
                if layers == 46 else head_dim(config))
    return value == expected


def _gemma2_layer_types(value: Any, config: Mapping[str, Any]) -> bool:
    # llama.cpp's sliding-window period 2: even layers sliding, odd layers global
    return value is None or list(value) == [
        "sliding_attention" if i % 2 == 0 else "full_attention"
        for i in range(int(config["num_hidden_layers"]))]


NO_ATTENTION_BIAS = Requirement("attention_bias", lambda v, c: not v,
                                "has no q/k/v/o biases")
TANH_GELU = ("gelu_pytorch_tanh", "gelu_tanh")


def _gelu(key: str, legacy: tuple[str, ...] = ()) -> Requirement:
    accepted = TANH_GELU + legacy
    return Requirement(key, lambda v, c: v in accepted, "computes GELU's tanh approximation")


GEMMA2_REQUIREMENTS = (
    NO_ATTENTION_BIAS, _gelu("hidden_activation"),
    Requirement("attn_logit_softcapping", lambda v, c: v is not None,
                "always soft-caps attention logits"),
    Requirement("final_logit_softcapping", lambda v, c: v is not None,
                "always soft-caps the output logits"),
    Requirement("query_pre_attn_scalar", _gemma2_query_scale,
                "scales queries by 1/sqrt(head_dim), by 1/sqrt(hidden_size / "
                "num_attention_heads) at 46 layers"),
    Requirement("layer_types", _gemma2_layer_types,
                "makes even layers sliding-window and odd layers global"),
    Requirement("sliding_window", lambda v, c: isinstance(v, int) and v > 0,
                "always limits its even layers to a sliding window (4096 when not written)"),
)

GGUF_ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("llama", permute_qk=True),
    "mistral": GgufArch("llama", permute_qk=True),
    "qwen2": GgufArch("qwen2", permute_qk=False),
    "qwen3": GgufArch("qwen3", permute_qk=False),
    "gemma": GgufArch("gemma", permute_qk=False, norm_plus_one=True, head_from_embedding=True,
                      # transformers reads Gemma's legacy hidden_act "gelu" as the tanh form
                      requirements=(NO_ATTENTION_BIAS, _gelu("hidden_act", legacy=("gelu",)))),
    "gemma2": GgufArch("gemma2", permute_qk=False, norm_plus_one=True, head_from_embedding=True,
                       extra_keys=(("add_attn_logit_softcapping", "attn_logit_softcapping", float),
                                   ("add_final_logit_softcapping", "final_logit_softcapping",
                                    float),
                                   ("add_sliding_window", "sliding_window", int)),
                       requirements=GEMMA2_REQUIREMENTS),
}


def arch_of(config: Mapping[str, Any]) -> GgufArch:
    """The record of ``config``'s model type; FormatError naming the supported ones."""
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHS:
        raise FormatError(f"format 'gguf' does not support model type '{model_type}' (it "
                          f"writes {', '.join(sorted(GGUF_ARCHS))})",
                          hint="write the native format (--format mpq)")
    return GGUF_ARCHS[model_type]


def config_problems(config: Mapping[str, Any], tying: Any = None) -> list[str]:
    """What in ``config`` the GGUF metadata written here cannot express; ``tying``: the plan's
    record of the tied embedding/head pair (mpq.config.tying.TieRecord), if it has one."""
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
    arch = GGUF_ARCHS[config["model_type"]]
    if not arch.requirements and not arch.head_from_embedding:
        return problems
    full = with_defaults(config)
    problems.extend(p for r in arch.requirements if (p := r.problem(full, arch.arch)))
    if arch.head_from_embedding:
        problems.extend(_head_problems(full, tying, arch.arch))
    return problems


def _head_problems(config: Mapping[str, Any], tying: Any, arch: str) -> list[str]:
    """A separate output head, which an architecture whose head is ``token_embd`` cannot hold:
    the model's own (tie_word_embeddings false), or one the plan unties from the embedding."""
    why = f"llama.cpp's {arch} reads the output head from token_embd"
    if tying is not None:
        if tying.shared:
            return []
        return [f"{tying.head}: untied from {tying.embedding} by the plan ({tying.reason}; "
                f"{why}: quantize both with one scheme by rtn, or neither)"]
    if config.get("tie_word_embeddings") is False:
        return [f"tie_word_embeddings False (the model has its own output head; {why})"]
    return []


def with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (a config.json, which may leave out default values) completed with the
    defaults transformers' config class of its model type fills in."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[config["model_type"]](**config).to_dict()
    except (KeyError, TypeError, ValueError):
        return dict(config)


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
    for method, key, kind in arch_of(config).extra_keys:
        getattr(writer, method)(kind(config[key]))


def stored_norm(hf_name: str, t: torch.Tensor, arch: GgufArch) -> torch.Tensor:
    """A float tensor as llama.cpp multiplies by it: a ``*norm.weight`` of a (1 + w) family as
    1 + w (in float32, as Hugging Face computes it), anything else unchanged."""
    if arch.norm_plus_one and hf_name.endswith("norm.weight"):
        return t.to(torch.float32) + 1.0
    return t


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
