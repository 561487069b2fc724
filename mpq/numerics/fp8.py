"""FP8 grids ``fp8_e4m3`` (torch.float8_e4m3fn) and ``fp8_e5m2`` (torch.float8_e5m2).

Follows compressed-tensors' float-quantized format (FORMATS.md): symmetric,
scale = absmax / finfo.max per tensor ([1, 1]), per output channel ([N, 1]) or, fp8_e4m3 only,
per 128×128 block ([ceil(N/128), ceil(K/128)], DeepSeek-V3 style); codes = w/scale clamped to
±finfo.max (so the cast never produces NaN/inf) and cast with torch's round-to-nearest-even;
x̂ = codes·scale in fp32.  A zero scale becomes fp32 eps.

Blocks: when N or K is not a multiple of 128 the last row/column of blocks is partial and its
scale is the absmax of the elements it has — compressed-tensors zero-pads the weight to whole
blocks (``maybe_pad_tensor_for_block_quant``) before taking min/max and quantizing, and zeros
change neither the absmax nor the other elements' codes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mpq.numerics.base import NUMBER_FORMATS, QuantizedWeight
from mpq.numerics.int_grid import prepare_weight, safe_scale
from mpq.numerics.args import FP8_BLOCK, WeightArgs


def block_absmax(w: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """fp32 absmax of each ``block``×``block`` tile of ``w`` [N, K] → [ceil(N/b), ceil(K/b)]."""
    n, k = w.shape
    a = F.pad(w.to(torch.float32).abs(), (0, -k % block, 0, -n % block))
    nb, kb = a.shape[0] // block, a.shape[1] // block
    return a.reshape(nb, block, kb, block).amax(dim=(1, 3))


def expand_blocks(scale: torch.Tensor, shape: tuple[int, int],
                  block: int = FP8_BLOCK) -> torch.Tensor:
    """Per-element [N, K] view of block values ``scale`` [ceil(N/b), ceil(K/b)]."""
    n, k = shape
    return scale.repeat_interleave(block, dim=0)[:n].repeat_interleave(block, dim=1)[:, :k]


def fp8_params(w: torch.Tensor, args: WeightArgs, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scale [1, 1] (tensor), [N, 1] (channel) or [ceil(N/128), ceil(K/128)] (block)."""
    a = w.to(torch.float32).abs()
    if args.granularity == "block":
        amax = block_absmax(w)
    elif args.granularity == "tensor":
        amax = a.amax().reshape(1, 1)
    else:
        amax = a.amax(dim=1, keepdim=True)
    # divide by a tensor on amax's device: CUDA turns division by a Python number into a
    # multiplication by its reciprocal, one ulp away from compressed-tensors' true division
    fmax = torch.tensor(torch.finfo(dtype).max, dtype=torch.float32, device=amax.device)
    return safe_scale(amax / fmax)


def fp8_codes(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Nearest ``dtype`` value of w/scale, saturating at ±finfo(dtype).max."""
    fmax = torch.finfo(dtype).max
    return (w.to(torch.float32) / scale).clamp_(-fmax, fmax).to(dtype)


def _per_element(scale: torch.Tensor, args: WeightArgs, shape: tuple[int, int]) -> torch.Tensor:
    """fp32 ``scale`` broadcastable against [N, K]."""
    scale = scale.to(torch.float32)
    return expand_blocks(scale, shape) if args.granularity == "block" else scale


class Fp8Grid:
    """One FP8 number format (stateless apart from its name and dtype)."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.dtype = dtype

    def quantize(self, weight: torch.Tensor, args: WeightArgs) -> QuantizedWeight:
        w = prepare_weight(weight, args, self.name)
        scale = fp8_params(w, args, self.dtype)
        codes = fp8_codes(w, _per_element(scale, args, tuple(w.shape)), self.dtype)
        return QuantizedWeight(args=args, shape=tuple(w.shape), codes=codes, scale=scale)

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = _per_element(qw.scale, qw.args, tuple(qw.codes.shape))
        return (qw.codes.to(torch.float32) * scale).to(dtype)


FP8_E4M3 = NUMBER_FORMATS.register("fp8_e4m3")(Fp8Grid("fp8_e4m3", torch.float8_e4m3fn))
FP8_E5M2 = NUMBER_FORMATS.register("fp8_e5m2")(Fp8Grid("fp8_e5m2", torch.float8_e5m2))
