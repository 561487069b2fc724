"""KV-cache quantization: the ranges of the keys and values an attention layer caches (calibrated,
or taken per token at run time), and their fake quantization as they are cached.

Keys are observed after the rotary embedding, through mpq.models.attention's tap on the cache;
tensors are [batch, kv_heads, seq, head_dim].  The tap changes K/V *before* the real cache stores
them, so generation with a DynamicCache keeps quantized values and attention reads them in prefill
and decode alike.

Tensors on the attention module (what the artifact stores, fp32):

- ``fp8_e4m3`` (compressed-tensors' ``kv_cache_scheme`` convention, what vLLM reads): ``k_scale``
  and ``v_scale``, shape [1] (``granularity: tensor``) or [kv_heads, 1, 1] (``head``), scale =
  calibration abs-max / 448, x̂ = fp8_e4m3(clamp(x / scale, ±448)) · scale.
- ``int8`` / ``int4`` static: ``k_scale``, ``k_zero``, ``v_scale``, ``v_zero``, shape
  [kv_heads, 1, 1] (``head``) or [kv_heads, 1, head_dim / group_size] (``group``), from the
  calibration min/max (mpq.numerics.kv_int: float zero point in code units).
- ``int8`` / ``int4`` dynamic: none; each token's range per head (or group) is its own.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mpq.numerics.activations import EPS, FP8_MAX
from mpq.numerics import kv_int
from mpq.config.kv_cache import KVCacheArgs
from mpq.errors import SchemeError
from mpq.models.attention import tap_kv

SCALE_NAMES = ("k_scale", "v_scale")
INT_NAMES = ("k_scale", "k_zero", "v_scale", "v_zero")


def tensor_names(args: KVCacheArgs) -> tuple[str, ...]:
    """The tensors a scheme keeps on each attention module (none when dynamic)."""
    if not args.is_int:
        return SCALE_NAMES
    return () if args.dynamic else INT_NAMES


def tensor_shape(args: KVCacheArgs, kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """The shape of each of those tensors (see the module docstring)."""
    if not args.is_int:
        return (1,) if args.granularity == "tensor" else (kv_heads, 1, 1)
    return (kv_heads, 1, head_dim // args.group_of(head_dim))


def _reduce_dims(granularity: str) -> tuple[int, ...]:
    return (0, 1, 2, 3) if granularity == "tensor" else (0, 2, 3)


class KVObserver:
    """Running range of one attention module's keys and values: abs-max (fp8) or min/max per
    head or head × group (int)."""

    def __init__(self, args: KVCacheArgs):
        self.args = args
        self.stats: dict[str, tuple[torch.Tensor, ...] | None] = {"k": None, "v": None}

    def __call__(self, key: torch.Tensor, value: torch.Tensor):
        for which, x in (("k", key), ("v", value)):
            if self.args.is_int:
                new = kv_int.static_range(x, self.args.group_of(x.shape[-1]))
                old = self.stats[which]
                self.stats[which] = new if old is None else (torch.minimum(old[0], new[0]),
                                                             torch.maximum(old[1], new[1]))
            else:
                m = x.detach().float().abs().amax(dim=_reduce_dims(self.args.granularity))
                old = self.stats[which]
                self.stats[which] = (m,) if old is None else (torch.maximum(old[0], m),)
        return key, value

    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's tensors (names and shapes: the module docstring), fp32 on CPU."""
        out = {}
        for which in ("k", "v"):
            stats = self.stats[which]
            if stats is None:
                raise SchemeError("an attention layer saw no calibration tokens for its KV scale")
            if self.args.is_int:
                scale, zero = kv_int.params_from_range(*stats, self.args.bits)
                out[f"{which}_scale"], out[f"{which}_zero"] = scale.cpu(), zero.cpu()
                continue
            scale = (stats[0] / FP8_MAX).clamp_min(EPS)
            out[f"{which}_scale"] = (scale.reshape(1) if self.args.granularity == "tensor"
                                     else scale.reshape(-1, 1, 1)).cpu()
        return out

    def summary(self) -> dict[str, float]:
        """What a calibration event reports: abs-max (fp8) or the widest range (int)."""
        if not self.args.is_int:
            return {f"{w}_absmax": float(self.stats[w][0].max()) for w in ("k", "v")}
        return {f"{w}_{end}": float(f(self.stats[w][i])) for w in ("k", "v")
                for i, (end, f) in enumerate((("min", torch.min), ("max", torch.max)))}


def fake_quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] on the fp8 grid of ``scale`` ([1] or [H, 1, 1]), in x's dtype."""
    s = scale.to(device=x.device, dtype=torch.float32)
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * s).to(x.dtype)


def kv_fake_quantizer(args: KVCacheArgs, module: nn.Module
                      ) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """The ``on_kv`` callback of ``args``; static schemes read ``module``'s tensors at call time."""
    if not args.is_int:
        return lambda k, v: (fake_quantize_kv(k, module.k_scale),
                             fake_quantize_kv(v, module.v_scale))
    bits = args.bits
    if args.dynamic:
        def dynamic(k, v):
            return (kv_int.fake_quantize_dynamic(k, bits, args.group_of(k.shape[-1])),
                    kv_int.fake_quantize_dynamic(v, bits, args.group_of(v.shape[-1])))
        return dynamic

    def static(k, v):
        return (kv_int.fake_quantize_static(k, module.k_scale, module.k_zero, bits,
                                            args.group_of(k.shape[-1])),
                kv_int.fake_quantize_static(v, module.v_scale, module.v_zero, bits,
                                            args.group_of(v.shape[-1])))
    return static


def attach_kv_quantization(module: nn.Module, args: KVCacheArgs,
                           tensors: dict[str, torch.Tensor]):
    """Give ``module`` the scheme's buffers (``tensors``, by name: tensor_names(args)) and
    fake-quantize the keys and values it caches from then on; returns the tap's hook handle."""
    for name in tensor_names(args):
        module.register_buffer(name, tensors[name].to(torch.float32).clone())
    return tap_kv(module, kv_fake_quantizer(args, module))
