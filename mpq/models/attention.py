"""Where a block's attention keeps its KV cache, and a tap on the keys and values it caches.

The place comes from the model family's record (``Family.attention``, mpq.models.families); a
model type without a record falls back to :func:`discover_attention`.

Keys are seen *after* the rotary embedding, where a cache stores them: each attention module's
cache argument (``cache``; ``past_key_values`` before transformers 5.24) is replaced, for one
forward, by a :class:`CacheTap` whose ``update(key, value, ...)`` (the call attention makes right
before using K and V) hands the tensors to a callback and then to the real cache, if any.
Tensors are [batch, kv_heads, seq, head_dim].
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from mpq.errors import ModelError
from mpq.models.families import family_of


def attention_modules(model_or_config, block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(block path, module) of each attention module of ``block`` whose KV cache can be tapped.

    ``model_or_config`` (a ``PreTrainedModel`` or its config) picks the family record: its
    ``attention`` part names the module, a record without one gives ``[]`` (not supported),
    and a model type without a record falls back to :func:`discover_attention`.  Raises
    ModelError when the record's module is missing or its forward takes no cache argument.
    """
    family = family_of(model_or_config)
    if family is None:
        return discover_attention(block)
    if family.attention is None:
        return []
    path = family.attention.path
    hint = f"fix the attention of family '{family.name}' in mpq.models.families"
    try:
        module = block.get_submodule(path)
    except AttributeError:
        raise ModelError(f"{type(block).__name__} has no attention module '{path}'",
                         hint=hint) from None
    if _cache_kwarg(module) is None:
        raise ModelError(f"attention module '{path}' ({type(module).__name__}) takes no KV-cache "
                         "argument", hint=hint)
    return [(path, module)]


def kv_geometry(config) -> tuple[int, int]:
    """(kv heads, head_dim) of a model config: ``num_key_value_heads`` (``num_kv_heads``,
    else ``num_attention_heads``) and ``head_dim`` (else hidden_size / heads)."""
    text = getattr(config, "get_text_config", lambda: config)()
    heads = text.num_attention_heads
    kv_heads = (getattr(text, "num_key_value_heads", None) or getattr(text, "num_kv_heads", None)
                or heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return int(kv_heads), int(head_dim)


def discover_attention(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """Generic discovery for model types without a record: (local name, module) of each
    module in ``block`` that has k_proj and v_proj and whose forward takes the cache argument."""
    found = []
    for name, module in block.named_modules():
        if hasattr(module, "k_proj") and hasattr(module, "v_proj") and _cache_kwarg(module):
            found.append((name, module))
    return found


def _cache_kwarg(module: nn.Module) -> str | None:
    """The name of the attention forward's cache argument: ``cache`` (transformers ≥ 5.24),
    ``past_key_values`` or ``past_key_value`` (older), ``layer_past`` (GPT-NeoX, Falcon,
    BLOOM)."""
    params = inspect.signature(module.forward).parameters
    return next((n for n in ("cache", "past_key_values", "past_key_value", "layer_past")
                 if n in params), None)


class CacheTap:
    """Stands in for the cache during one attention forward (see the module docstring)."""

    def __init__(self, on_kv: Callable[[torch.Tensor, torch.Tensor], tuple], real: Any):
        self.on_kv = on_kv
        self.real = real

    def update(self, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        key, value = self.on_kv(key, value)
        if self.real is not None:
            return self.real.update(key, value, *args, **kwargs)
        return key, value

    def __getattr__(self, name: str):  # anything else a model reads from its cache
        real = self.__dict__.get("real")
        if real is None:
            raise AttributeError(name)
        return getattr(real, name)


def tap_kv(module: nn.Module, on_kv: Callable[[torch.Tensor, torch.Tensor], tuple]):
    """Route ``module``'s post-RoPE keys and values through ``on_kv``; returns the hook handle."""
    kwarg = _cache_kwarg(module)

    def hook(mod, args, kwargs):
        kwargs[kwarg] = CacheTap(on_kv, kwargs.get(kwarg))
        return args, kwargs

    return module.register_forward_pre_hook(hook, with_kwargs=True)
