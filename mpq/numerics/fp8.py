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

Native tensors (local keys): ``weight`` float8_e4m3fn / float8_e5m2 [N, K] (the codes);
``scale`` fp32 [1, 1], [N, 1] or, with granularity ``block``, [ceil(N/128), ceil(K/128)].
compressed-tensors stores fp8_e4m3 as ``naive-quantized`` (``float-quantized`` with quantized
inputs) with scales in the model dtype; it has no fp8_e5m2 format.  GPTQ: tensor/channel scales
fixed up front (:class:`Fp8Columns`).  fp8_e4m3 also quantizes activations (scale = absmax/448,
x̂ = fp8(clamp(x/scale, ±448))·scale).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from mpq.numerics.base import QuantizedWeight
from mpq.numerics.int_grid import SCALE_TORCH_DTYPES, prepare_weight, rounded_scale
from mpq.numerics.args import FP8_BLOCK, WeightArgs
from mpq.numerics.format import InOrderColumns, NumberFormat, ClipSearch
from mpq.numerics.mappings import CompressedTensorsMapping, NotExpressible
from mpq.numerics.stored import FLOAT_SCALES, take


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
    return rounded_scale(amax / fmax, args)  # in args.scale_dtype (fp32 by default)


def fp8_codes(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Nearest ``dtype`` value of w/scale, saturating at ±finfo(dtype).max."""
    fmax = torch.finfo(dtype).max
    return (w.to(torch.float32) / scale).clamp_(-fmax, fmax).to(dtype)


def _per_element(scale: torch.Tensor, args: WeightArgs, shape: tuple[int, int]) -> torch.Tensor:
    """fp32 ``scale`` broadcastable against [N, K]."""
    scale = scale.to(torch.float32)
    return expand_blocks(scale, shape) if args.granularity == "block" else scale


class Fp8Columns(InOrderColumns):
    """GPTQ's fp8 grid (:class:`mpq.numerics.format.ColumnGrid`) with the scale fixed up front
    ([1, 1] tensor or [N, 1] channel)."""

    def __init__(self, args: WeightArgs, w0: torch.Tensor, num_groups: int, dynamic: bool,
                 clip: ClipSearch | None = None):
        self.dtype = FP8_FORMATS[args.format].dtype
        self.fmax = torch.finfo(self.dtype).max
        self.scale = fp8_params(w0, args, self.dtype)
        self.s = self.scale.reshape(-1)
        n, k = w0.shape
        self.codes = torch.empty((k, n), dtype=self.dtype, device=w0.device)

    def set_group(self, g: int, cols: torch.Tensor) -> None:
        """fp8 scales are never per group."""

    def column(self, p: int, c: int, g: int, w: torch.Tensor) -> torch.Tensor:
        c = (w / self.s).clamp_(-self.fmax, self.fmax).to(self.dtype)
        self.codes[p] = c
        return c.to(torch.float32) * self.s

    def params(self) -> tuple[torch.Tensor, None]:
        return self.scale, None


class Fp8Grid(NumberFormat):
    """One FP8 number format (stateless apart from its name and dtype)."""

    bits = 8
    scale_dtypes = True
    gptq_columns = Fp8Columns

    def __init__(self, name: str, dtype: torch.dtype, granularities: tuple[str, ...],
                 compressed_tensors: CompressedTensorsMapping | NotExpressible,
                 activations: bool = False):
        self.name = name
        self.dtype = dtype
        self.granularities = granularities
        self.activations = activations
        self.compressed_tensors = compressed_tensors
        self.gptq_v1 = NotExpressible(f"{name} weights (GPTQ stores int codes)")

    def quantize(self, weight: torch.Tensor, args: WeightArgs) -> QuantizedWeight:
        w = prepare_weight(weight, args, self.name)
        scale = fp8_params(w, args, self.dtype)
        codes = fp8_codes(w, _per_element(scale, args, tuple(w.shape)), self.dtype)
        return QuantizedWeight(args=args, shape=tuple(w.shape), codes=codes, scale=scale)

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = _per_element(qw.scale, qw.args, tuple(qw.codes.shape))
        return (qw.codes.to(torch.float32) * scale).to(dtype)

    def activation_half_range(self, bits: int) -> float:
        return float(torch.finfo(self.dtype).max)

    def activation_grid(self, y: torch.Tensor, bits: int) -> torch.Tensor:
        fmax = float(torch.finfo(self.dtype).max)
        return y.clamp_(-fmax, fmax).to(self.dtype).to(torch.float32)

    def encode(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        scale = qw.scale.to(SCALE_TORCH_DTYPES[qw.args.scale_dtype]).contiguous()
        return {"weight": qw.codes.contiguous(), "scale": scale}

    def decode(self, tensors: Mapping[str, torch.Tensor], args: WeightArgs,
               shape: tuple[int, int], prefix: str = "") -> QuantizedWeight:
        codes = take(tensors, "weight", shape, (self.dtype,), prefix)
        scale = take(tensors, "scale", args.scale_shape(shape), FLOAT_SCALES, prefix)
        return QuantizedWeight(args=args, shape=shape, codes=codes, scale=scale.to(torch.float32))

    def native_bytes(self, args: WeightArgs, shape: tuple[int, int], *,
                     act_order: bool = False) -> int:
        n, k = shape
        rows, groups = args.scale_shape(shape)
        return n * k + SCALE_TORCH_DTYPES[args.scale_dtype].itemsize * rows * groups

    def ideal_bits(self, args: WeightArgs, shape: tuple[int, int], *,
                   act_order: bool = False) -> float:
        n, k = shape
        rows, groups = args.scale_shape(shape)
        scale_bits = 8 * SCALE_TORCH_DTYPES[args.scale_dtype].itemsize
        return (8 * n * k + scale_bits * rows * groups + (32 * k if act_order else 0)) / (n * k)


FP8_E4M3 = Fp8Grid("fp8_e4m3", torch.float8_e4m3fn, ("tensor", "channel", "block"),
                   CompressedTensorsMapping(type="float", layout="float", format="naive-quantized",
                                            format_with_inputs="float-quantized"),
                   activations=True)
FP8_E5M2 = Fp8Grid("fp8_e5m2", torch.float8_e5m2, ("tensor", "channel"),
                   NotExpressible("fp8_e5m2 weights have no compressed-tensors format mpq writes"))
FP8_FORMATS = {f.name: f for f in (FP8_E4M3, FP8_E5M2)}
