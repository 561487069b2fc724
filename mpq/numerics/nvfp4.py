"""NVIDIA NVFP4 grid ``nvfp4``: FP4 E2M1 elements, an FP8 E4M3 scale per 16 input columns and
one fp32 global scale per tensor.

Semantics are compressed-tensors 0.20's NVFP4 (strategy tensor_group, group_size 16,
scale_dtype float8_e4m3fn): ``generate_gparam`` for the global scale, ``calculate_qparams`` with
it for the block scales, ``fake_quantize`` for the codes.  All arithmetic is fp32:

- global scale gs = (1 / max(absmax(W), fp32 tiny)) · 448·6 (reciprocal then product, as torch
  evaluates compressed-tensors' ``2688 / absmax``), replaced by 1.0 when that overflows (an
  all-zero or subnormal tensor).  gs is a *divisor*: scales are stored multiplied by it;
- block scale s = fp8_e4m3(clamp(gs · (block absmax / 6), ±448)) (round to nearest even), and a
  block scale that rounds to 0 becomes 0.125 (compressed-tensors' fp8 eps);
- effective scale of a block: s / gs (fp32 division); codes = E2M1 of w / (s / gs) (see
  :mod:`mpq.numerics.fp4`); x̂ = value · (s / gs).

``QuantizedWeight``: ``codes`` uint8 [N, K] E2M1 codes, ``scale`` torch.float8_e4m3fn [N, K/16]
(compressed-tensors' ``weight_scale``), ``extras["global_scale"]`` fp32 [1] (its
``weight_global_scale``, same convention: dequantize with ``weight_scale / weight_global_scale``).

Native tensors (local keys), also compressed-tensors' own ``nvfp4-pack-quantized`` (renamed
``weight_packed`` / ``weight_scale`` / ``weight_global_scale``): ``packed`` uint8 [N, K/2] as
mxfp4; ``scale`` float8_e4m3fn [N, K/16]; ``global_scale`` fp32 [1] (finite and > 0).  RTN only;
GPTQ v1 cannot store it.
"""
from __future__ import annotations

from typing import Mapping

import torch

from mpq.errors import ArtifactError
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.fp4 import E2M1_MAX, e2m1_decode, e2m1_encode
from mpq.numerics.int_grid import prepare_weight
from mpq.numerics.args import WeightArgs
from mpq.numerics.format import NumberFormat
from mpq.numerics.mappings import CompressedTensorsMapping, NotExpressible
from mpq.numerics.packing import pack_nibbles, unpack_nibbles
from mpq.numerics.stored import take

NVFP4_BLOCK = 16

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
FP8_SCALE_EPS = 0.125  # compressed-tensors' replacement for an fp8 scale of 0


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 [1] global scale for a tensor whose absmax is ``amax``."""
    a = amax.to(torch.float32).reshape(1).clamp(min=torch.finfo(torch.float32).tiny)
    # compressed-tensors writes 2688 / a, which torch evaluates as reciprocal(a) · 2688
    # (Tensor.__rtruediv__): one ulp away from a true division for ~1/4 of the inputs
    gs = a.reciprocal() * (FP8_MAX * E2M1_MAX)
    return torch.where(torch.isfinite(gs), gs, torch.ones_like(gs))


def nvfp4_block_scales(absmax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn block scales for block absmax values ``absmax``."""
    a = absmax.to(torch.float32)
    # a true division (a device tensor, not a Python number: see mpq.numerics.fp8.fp8_params)
    s = global_scale * (a / torch.tensor(E2M1_MAX, dtype=torch.float32, device=a.device))
    s8 = s.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    return torch.where(s8 == 0, FP8_SCALE_EPS, s8).to(torch.float8_e4m3fn)


def effective_scale(scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """fp32 per-block multiplier s / gs."""
    return scale.to(torch.float32) / global_scale.to(torch.float32)


class Nvfp4Grid(NumberFormat):
    """The ``nvfp4`` number format (stateless)."""

    name = "nvfp4"
    bits = 4
    block = NVFP4_BLOCK
    compressed_tensors = CompressedTensorsMapping(
        type="float", layout="native", format="nvfp4-pack-quantized", strategy="tensor_group",
        scale_dtype="torch.float8_e4m3fn",
        names=(("scale", "weight_scale"), ("packed", "weight_packed"),
               ("global_scale", "weight_global_scale")))
    gptq_v1 = NotExpressible("nvfp4 weights (GPTQ stores int codes)")

    def describe(self, args: WeightArgs) -> str:
        return self.name

    def quantize(self, weight: torch.Tensor, args: WeightArgs) -> QuantizedWeight:
        w = prepare_weight(weight, args, self.name)
        n, k = w.shape
        blocks = w.reshape(n, k // NVFP4_BLOCK, NVFP4_BLOCK)
        gs = nvfp4_global_scale(w.abs().amax())
        scale = nvfp4_block_scales(blocks.abs().amax(dim=-1), gs)
        codes = e2m1_encode(blocks / effective_scale(scale, gs).unsqueeze(-1)).reshape(n, k)
        return QuantizedWeight(args=args, shape=(n, k), codes=codes, scale=scale,
                               extras={"global_scale": gs})

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = qw.codes.shape
        vals = e2m1_decode(qw.codes).reshape(n, -1, NVFP4_BLOCK)
        eff = effective_scale(qw.scale, qw.extras["global_scale"])
        return (vals * eff.unsqueeze(-1)).reshape(n, k).to(dtype)


    def encode(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {"scale": qw.scale.to(torch.float8_e4m3fn).contiguous(),
                "packed": pack_nibbles(qw.codes.to(torch.uint8)),
                "global_scale": qw.extras["global_scale"].to(torch.float32).reshape(1).contiguous()}

    def decode(self, tensors: Mapping[str, torch.Tensor], args: WeightArgs,
               shape: tuple[int, int], prefix: str = "") -> QuantizedWeight:
        n, k = shape
        scale = take(tensors, "scale", (n, k // NVFP4_BLOCK), (torch.float8_e4m3fn,), prefix)
        codes = unpack_nibbles(take(tensors, "packed", (n, k // 2), (torch.uint8,), prefix))
        gs = take(tensors, "global_scale", (1,), (torch.float32,), prefix)
        if not bool(torch.isfinite(gs).all() and (gs > 0).all()):
            raise ArtifactError(f"tensor '{prefix}global_scale' must be finite and > 0, got "
                                f"{gs.item()}")
        if bool(torch.isnan(scale.to(torch.float32)).any()):
            raise ArtifactError(f"tensor '{prefix}scale' holds fp8 NaN values",
                                hint="the artifact is damaged; re-run mpq quantize")
        return QuantizedWeight(args=args, shape=shape, codes=codes, scale=scale,
                               extras={"global_scale": gs})

    def native_bytes(self, args: WeightArgs, shape: tuple[int, int], *,
                     act_order: bool = False) -> int:
        n, k = shape
        return n * k // 2 + n * (k // NVFP4_BLOCK) + 4

    def ideal_bits(self, args: WeightArgs, shape: tuple[int, int], *,
                   act_order: bool = False) -> float:
        n, k = shape
        return (4 * n * k + 8 * n * (k // NVFP4_BLOCK) + 32) / (n * k)


NVFP4 = Nvfp4Grid()
