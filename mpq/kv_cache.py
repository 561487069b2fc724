"""KV-cache quantization: calibrated FP8 scales for the keys and values an attention layer caches,
and their fake quantization at inference.

Keys are observed *after* the rotary embedding, where a cache stores them: each attention
module's cache argument (``cache``; ``past_key_values`` before transformers 5.24) is replaced,
for one forward, by a :class:`CacheTap` whose ``update(key, value, ...)`` (the call attention
makes right before using K and V) hands the tensors to a callback and then to the real cache, if
any.  Tensors are [batch, kv_heads, seq, head_dim].

Scales (compressed-tensors' ``kv_cache_scheme`` convention, what vLLM reads): ``k_scale`` and
``v_scale`` on the attention module, fp32, shape [1] (``granularity: tensor``) or
[kv_heads, 1, 1] (``granularity: head``), scale = calibration abs-max / 448, and at inference
x̂ = fp8_e4m3(clamp(x / scale, ±448)) · scale.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from mpq.act_quant import EPS, FP8_MAX
from mpq.errors import SchemeError

KV_FORMATS = ("fp8_e4m3",)
KV_GRANULARITIES = ("tensor", "head")
SCALE_NAMES = ("k_scale", "v_scale")


@dataclass(frozen=True)
class KVCacheArgs:
    """How the KV cache is quantized: ``format`` fp8_e4m3, static scales per ``granularity``."""

    format: str = "fp8_e4m3"
    granularity: str = "tensor"

    def __post_init__(self) -> None:
        if self.format not in KV_FORMATS:
            raise SchemeError(f"unknown kv_cache format '{self.format}'",
                              hint=f"use one of {', '.join(KV_FORMATS)}")
        if self.granularity not in KV_GRANULARITIES:
            raise SchemeError(f"unknown kv_cache granularity '{self.granularity}'",
                              hint=f"use one of {', '.join(KV_GRANULARITIES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return f"kv cache: {self.format} static per {self.granularity}"


def attention_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(local name, module) of each attention module in ``block``: it has k_proj and v_proj
    and its forward takes the cache argument."""
    found = []
    for name, module in block.named_modules():
        if hasattr(module, "k_proj") and hasattr(module, "v_proj") and _cache_kwarg(module):
            found.append((name, module))
    return found


def _cache_kwarg(module: nn.Module) -> str | None:
    """The name of the attention forward's cache argument: ``cache`` (transformers ≥ 5.24),
    ``past_key_values`` or ``past_key_value`` (older)."""
    params = inspect.signature(module.forward).parameters
    return next((n for n in ("cache", "past_key_values", "past_key_value") if n in params),
                None)


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


def _reduce_dims(granularity: str) -> tuple[int, ...]:
    return (0, 1, 2, 3) if granularity == "tensor" else (0, 2, 3)


class KVObserver:
    """Running abs-max of one attention module's keys and values."""

    def __init__(self, args: KVCacheArgs):
        self.args = args
        self.absmax: dict[str, torch.Tensor | None] = {"k": None, "v": None}

    def __call__(self, key: torch.Tensor, value: torch.Tensor):
        dims = _reduce_dims(self.args.granularity)
        for which, x in (("k", key), ("v", value)):
            m = x.detach().float().abs().amax(dim=dims)
            old = self.absmax[which]
            self.absmax[which] = m if old is None else torch.maximum(old, m)
        return key, value

    def scales(self) -> dict[str, torch.Tensor]:
        """``k_scale`` / ``v_scale`` fp32 ([1] or [kv_heads, 1, 1])."""
        out = {}
        for which in ("k", "v"):
            m = self.absmax[which]
            if m is None:
                raise SchemeError("an attention layer saw no calibration tokens for its KV scale")
            scale = (m / FP8_MAX).clamp_min(EPS)
            out[f"{which}_scale"] = (scale.reshape(1) if self.args.granularity == "tensor"
                                     else scale.reshape(-1, 1, 1)).cpu()
        return out


def fake_quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] on the fp8 grid of ``scale`` ([1] or [H, 1, 1]), in x's dtype."""
    s = scale.to(device=x.device, dtype=torch.float32)
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * s).to(x.dtype)


def attach_kv_quantization(module: nn.Module, scales: dict[str, torch.Tensor] | None = None,
                           num_kv_heads: int | None = None, granularity: str = "tensor"):
    """Give ``module`` ``k_scale``/``v_scale`` buffers (``scales``, or empty placeholders of the
    right shape to be filled by load_state_dict) and fake-quantize its cached K/V with them."""
    shape = (1,) if granularity == "tensor" else (num_kv_heads, 1, 1)
    for name in SCALE_NAMES:
        value = scales[name] if scales is not None else torch.empty(shape, dtype=torch.float32)
        module.register_buffer(name, value.to(torch.float32).clone())

    def on_kv(key, value):
        return fake_quantize_kv(key, module.k_scale), fake_quantize_kv(value, module.v_scale)

    return tap_kv(module, on_kv)
