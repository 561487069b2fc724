"""KV-cache quantization: calibrated FP8 scales for the keys and values an attention layer caches,
and their fake quantization at inference.

Keys are observed after the rotary embedding, through mpq.models.attention's tap on the cache;
tensors are [batch, kv_heads, seq, head_dim].

Scales (compressed-tensors' ``kv_cache_scheme`` convention, what vLLM reads): ``k_scale`` and
``v_scale`` on the attention module, fp32, shape [1] (``granularity: tensor``) or
[kv_heads, 1, 1] (``granularity: head``), scale = calibration abs-max / 448, and at inference
x̂ = fp8_e4m3(clamp(x / scale, ±448)) · scale.
"""
from __future__ import annotations


import torch
from torch import nn

from mpq.numerics.activations import EPS, FP8_MAX
from mpq.config.kv_cache import KVCacheArgs
from mpq.errors import SchemeError
from mpq.models.attention import tap_kv

SCALE_NAMES = ("k_scale", "v_scale")


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
