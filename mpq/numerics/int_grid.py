"""Integer grid ``int`` (2–8 bits): round-to-nearest with tensor, channel or group scales.

Semantics are those of /work/shared/docs/FORMATS.md ("Integer math"), i.e. compressed-tensors'
``calculate_qparams`` / ``_quantize`` / ``_dequantize``:

- signed range q ∈ [q_min, q_max] = [−2^(b−1), 2^(b−1)−1];
- symmetric: scale = absmax / ((q_max − q_min)/2), zero 0; with ``full_range`` (not
  compressed-tensors' formula, but the same stored form) scale = e / q_min where e is the
  group's extreme weight, the one of largest magnitude with its sign (ties: the positive one),
  so e lands exactly on q_min and every level is used, as llama.cpp's q4_0 does; the scale is
  negative where e is positive;
- asymmetric: lo = min(x_min, 0), hi = max(x_max, 0), scale = (hi − lo)/(q_max − q_min),
  zero = round(q_min − lo/scale) (clamped to the range);
- q = clamp(round(x/scale + zero)), torch.round (half to even); x̂ = (q − zero)·scale.

Storage (see :class:`mpq.numerics.base.QuantizedWeight`): codes are offset-binary
u = q + 2^(b−1) as uint8, zeros int32 in the same unsigned domain (None when symmetric, meaning the
implicit 2^(b−1)).  A zero scale (all-zero group) is replaced by fp32 eps, as compressed-tensors
does, so such groups round-trip to exactly 0.  All arithmetic is fp32 whatever the input dtype.

Note that the symmetric grid is not clipped at absmax: x = −absmax lands on q_min, so |x̂| can
exceed absmax by scale/2.  Every element is reconstructed within scale/2 (plus fp32 rounding).

:func:`int_params`, :func:`int_quantize_codes` and :func:`int_dequantize_codes` are pure functions
of an [N, k] slice so that GPTQ can call them group by group / column by column
(:class:`IntColumns`).

Native tensors (local keys; S = scale rows, 1 for tensor granularity, else N; G groups):
``qweight`` int32 [N, ceil(K·b/32)] = :func:`mpq.numerics.packing.pack_rows` of the unsigned
codes; ``scale`` [S, G] in ``scale_dtype`` (fp32 unless the args say fp16/bf16:
:func:`rounded_scale`); ``zero`` int32 [ceil(S·b/32), G] =
:func:`mpq.numerics.packing.pack_cols` of the unsigned zero points (asymmetric only); ``g_idx``
int32 [K] (act-order only).  compressed-tensors stores int as ``pack-quantized`` (or
``int-quantized`` with quantized inputs), GPTQ v1 as its qweight/qzeros/scales.

As activations (:mod:`mpq.numerics.activations`): b bits symmetric,
scale = absmax/(2^(b−1) − ½), x̂ = clamp(round(x/scale))·scale.
"""
from __future__ import annotations

from typing import Mapping

import torch

from mpq.errors import ArtifactError, SchemeError
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.args import WeightArgs
from mpq.numerics.format import NumberFormat, ClipSearch
from mpq.numerics.mappings import CompressedTensorsMapping, GptqV1Mapping
from mpq.numerics.packing import pack_cols, pack_rows, packed_width, unpack_cols, unpack_rows
from mpq.numerics.stored import FLOAT_SCALES, take

INT_BITS = range(2, 9)


def int_range(bits: int) -> tuple[int, int]:
    """(q_min, q_max) of the signed b-bit grid."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def prepare_weight(weight: torch.Tensor, args: WeightArgs, fmt: str) -> torch.Tensor:
    """Validate ``weight`` [N, K] against ``args`` for number format ``fmt``; return it as fp32."""
    if args.format != fmt:
        raise SchemeError(f"the '{fmt}' number format was given args for '{args.format}'")
    args.check_shape(tuple(weight.shape), where=f"{fmt} weight")
    if not weight.is_floating_point():
        raise SchemeError(f"{fmt} weight must be floating point, got {weight.dtype}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise SchemeError(f"{fmt} weight {tuple(w.shape)} has {bad} NaN/inf values",
                          hint="the source weights or a preceding transform are broken")
    return w


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """Replace zero scales by fp32 eps (compressed-tensors convention) so x/scale stays finite."""
    eps = torch.finfo(torch.float32).eps
    return torch.where(scale == 0, torch.full_like(scale, eps), scale)


SCALE_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rounded_scale(raw: torch.Tensor, args: WeightArgs) -> torch.Tensor:
    """The fp32 scales of ``raw`` (the formula's values) as the grid uses and stores them:
    zero → eps (:func:`safe_scale`), then rounded to ``args.scale_dtype`` (fp16/bf16; values
    below its smallest normal are raised to it, so no scale rounds to 0).  Every int and fp8
    scale (min-max, clip search, GPTQ's groups, fp8's absmax) goes through here, so codes are
    always computed from the scale that is stored.  SchemeError when a scale overflows the
    dtype (fp16: > 65504)."""
    scale = safe_scale(raw)
    if args.scale_dtype == "fp32":
        return scale
    dtype = SCALE_TORCH_DTYPES[args.scale_dtype]
    tiny = torch.finfo(dtype).tiny  # full_range scales may be negative: their magnitude is raised
    rounded = torch.where(scale < 0, scale.clamp(max=-tiny), scale.clamp(min=tiny)).to(dtype)
    if not bool(torch.isfinite(rounded).all()):
        raise SchemeError(f"a weight scale of {float(scale.max()):.6g} overflows "
                          f"scale_dtype {args.scale_dtype} (largest "
                          f"{torch.finfo(dtype).max:.6g})", hint="use scale_dtype: bf16 or fp32")
    return rounded.to(torch.float32)


def _grouped(w: torch.Tensor, args: WeightArgs) -> torch.Tensor:
    """View ``w`` [N, k] as [N or 1, G, g] following ``args.granularity``."""
    n, k = w.shape
    if args.granularity == "tensor":
        return w.reshape(1, 1, n * k)
    if args.granularity == "channel":
        return w.reshape(n, 1, k)
    if k % args.group_size:
        raise SchemeError(f"group_size {args.group_size} does not divide the slice width {k}")
    return w.reshape(n, k // args.group_size, args.group_size)


def signed_extreme(v: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along the last dim of ``v``, with its sign (the
    positive one where ±max tie): the value ``full_range`` puts on q_min."""
    hi = v.amax(dim=-1).clamp(min=0)
    lo = v.amin(dim=-1).clamp(max=0)
    return torch.where(hi >= -lo, hi, lo)


def symmetric_extent(v: torch.Tensor, args: WeightArgs) -> torch.Tensor:
    """What a symmetric scale divides, per group along the last dim of ``v``: the absmax, or
    with ``full_range`` the signed extreme (scale = extent · shrink / :func:`symmetric_divisor`;
    every symmetric int scale — min-max, clip search, tuned rounding — is made this way)."""
    return signed_extreme(v) if args.full_range else v.abs().amax(dim=-1)


def symmetric_divisor(args: WeightArgs) -> float:
    """(q_max − q_min)/2, or with ``full_range`` q_min (the extreme lands on it)."""
    qmin, qmax = int_range(args.bits)
    return float(qmin) if args.full_range else (qmax - qmin) / 2


def int_params(w: torch.Tensor, args: WeightArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero for the slice ``w`` [N, k] under ``args``.

    Returns ``scale`` fp32 [1, 1] (tensor), [N, 1] (channel) or [N, k/g] (group), and ``zero``
    int32 of the same shape in the unsigned domain, or None when symmetric.
    """
    if w.dim() != 2:
        raise SchemeError(f"int_params expects a 2-D slice, got shape {tuple(w.shape)}")
    qmin, qmax = int_range(args.bits)
    v = _grouped(w.to(torch.float32), args)
    if args.symmetric:
        return rounded_scale(symmetric_extent(v, args) / symmetric_divisor(args), args), None
    lo = v.amin(dim=-1).clamp(max=0)
    hi = v.amax(dim=-1).clamp(min=0)
    scale = rounded_scale((hi - lo) / (qmax - qmin), args)
    zero_q = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return scale, (zero_q + (1 << (args.bits - 1))).to(torch.int32)


def _per_column(t: torch.Tensor, k: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Broadcastable [N or 1, k] view of per-group params ``t`` [N or 1, G]."""
    g = t.shape[1]
    if g_idx is not None and g > 1:
        return t[:, g_idx.long()]
    if g in (1, k):
        return t
    if k % g:
        raise SchemeError(f"{g} groups do not divide the input dimension {k}")
    return t.repeat_interleave(k // g, dim=1)


def int_quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero_u: torch.Tensor | None,
                       bits: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Unsigned codes uint8 [N, k] of ``w`` [N, k] on the grid (scale, zero_u).

    ``scale``/``zero_u`` are [N or 1, G] with G dividing k (consecutive groups) or, with ``g_idx``
    int [k], indexed per column.  ``zero_u`` None means symmetric.
    """
    qmin, qmax = int_range(bits)
    off = 1 << (bits - 1)
    k = w.shape[1]
    x = w.to(torch.float32) / _per_column(scale.to(torch.float32), k, g_idx)
    if zero_u is not None:  # add the signed zero, as the reference does
        x = x + (_per_column(zero_u, k, g_idx).to(torch.int32) - off).to(torch.float32)
    q = torch.round(x).clamp_(qmin, qmax)
    return (q + off).to(torch.uint8)


def int_dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero_u: torch.Tensor | None,
                         bits: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 x̂ = (u − zero_u)·scale for codes [N, k]; ``zero_u`` None means 2^(b−1)."""
    k = codes.shape[1]
    u = codes.to(torch.float32)
    if zero_u is None:
        u = u - float(1 << (bits - 1))
    else:
        u = u - _per_column(zero_u, k, g_idx).to(torch.float32)
    return u * _per_column(scale.to(torch.float32), k, g_idx)


class IntColumns:
    """GPTQ's int grid, one column at a time (:class:`mpq.numerics.format.ColumnGrid`).  Params
    are stored as rows [G, N] (transposed); ``clip`` (clip search) replaces :func:`int_params`
    with its searched parameters wherever params are computed."""

    act_order = True
    static_act_order = True
    clip_search = True

    @classmethod
    def check(cls, args: WeightArgs) -> None:
        """Every int args can be solved."""

    def __init__(self, args: WeightArgs, w0: torch.Tensor, num_groups: int, dynamic: bool,
                 clip: ClipSearch | None = None):
        n, k = w0.shape
        self.args, self.off = args, 1 << (args.bits - 1)
        self.qmin, self.qmax = int_range(args.bits)
        self.clip = clip
        self.codes = torch.empty((k, n), dtype=torch.uint8, device=w0.device)
        if dynamic:
            self.scale = torch.empty((num_groups, n), dtype=torch.float32, device=w0.device)
            self.zero = None if args.symmetric else torch.empty_like(self.scale, dtype=torch.int32)
            self.zs = None if args.symmetric else torch.empty_like(self.scale)  # signed zero, fp32
            return
        scale, zero = self._params(w0, 0, k)  # [1|N, 1|G]
        self.scale = scale.t().contiguous()
        self.zero = None if zero is None else zero.t().contiguous()
        self.zs = None if zero is None else (self.zero - self.off).to(torch.float32)

    def _params(self, cols: torch.Tensor, lo: int, hi: int):
        if self.clip is None:
            return int_params(cols, self.args)
        return self.clip.int_params(cols, lo, hi)

    def set_group(self, g: int, cols: torch.Tensor) -> None:
        gs = cols.shape[1]
        scale, zero = self._params(cols, g * gs, (g + 1) * gs)  # [N, 1]
        self.scale[g] = scale[:, 0]
        if zero is not None:
            self.zero[g] = zero[:, 0]
            self.zs[g] = (zero[:, 0] - self.off).to(torch.float32)

    def column(self, p: int, c: int, g: int, w: torch.Tensor) -> torch.Tensor:
        s = self.scale[g]
        x = w / s
        if self.zs is None:  # same ops as int_quantize_codes / int_dequantize_codes
            q = torch.round(x).clamp_(self.qmin, self.qmax)
            self.codes[p] = q + self.off
            return q * s
        zs = self.zs[g]
        q = torch.round(x.add_(zs)).clamp_(self.qmin, self.qmax)
        self.codes[p] = q + self.off
        return (q - zs) * s

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        zero = None if self.zero is None else self.zero.t().contiguous()
        return self.scale.t().contiguous(), zero


class IntGrid(NumberFormat):
    """The ``int`` number format (stateless)."""

    name = "int"
    scale_dtypes = True
    full_range = True
    granularities = ("tensor", "channel", "group")
    symmetric_only = False
    awq_clip = True
    activations = True
    gptq_columns = IntColumns
    compressed_tensors = CompressedTensorsMapping(
        type="int", layout="int", format="pack-quantized", format_with_inputs="int-quantized",
        zero_points=("channel", "group"))
    gptq_v1 = GptqV1Mapping()

    def check_bits(self, bits: int, *, activation: bool = False) -> None:
        if bits in INT_BITS:
            return
        if activation:
            raise SchemeError(f"int activation bits must be 2..8, got {bits}")
        raise SchemeError(f"int bits must be 2..8, got {bits}",
                          hint="e.g. bits: 4 or bits: 8; for other widths choose another "
                               "format (fp8_e4m3, nf4, mxfp4, ...)")

    def bits_label(self, bits: int) -> str:
        return f"int{bits}"

    def describe(self, args: WeightArgs) -> str:
        symmetry = ("sym full-range" if args.full_range else "sym") if args.symmetric else "asym"
        return f"{self.bits_label(args.bits)} {symmetry}" + args.granularity_label()

    def quantize(self, weight: torch.Tensor, args: WeightArgs) -> QuantizedWeight:
        w = prepare_weight(weight, args, self.name)
        scale, zero = int_params(w, args)
        codes = int_quantize_codes(w, scale, zero, args.bits)
        return QuantizedWeight(args=args, shape=tuple(w.shape), codes=codes, scale=scale,
                               zero=zero)

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return int_dequantize_codes(qw.codes, qw.scale, qw.zero, qw.args.bits,
                                    qw.g_idx).to(dtype)

    def activation_half_range(self, bits: int) -> float:
        """(q_max − q_min)/2 = 2^(b−1) − 0.5."""
        return ((1 << (bits - 1)) - 1 + (1 << (bits - 1))) / 2

    def activation_grid(self, y: torch.Tensor, bits: int) -> torch.Tensor:
        qmin, qmax = int_range(bits)
        return torch.round(y).clamp_(qmin, qmax)

    def encode(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        bits = qw.args.bits
        out = {"qweight": pack_rows(qw.codes.to(torch.uint8), bits),
               "scale": qw.scale.to(SCALE_TORCH_DTYPES[qw.args.scale_dtype]).contiguous()}
        if qw.zero is not None:
            out["zero"] = pack_cols(qw.zero.to(torch.uint8), bits)
        if qw.g_idx is not None:
            out["g_idx"] = qw.g_idx.to(torch.int32).contiguous()
        return out

    def decode(self, tensors: Mapping[str, torch.Tensor], args: WeightArgs,
               shape: tuple[int, int], prefix: str = "") -> QuantizedWeight:
        n, k = shape
        bits = args.bits
        qweight = take(tensors, "qweight", (n, packed_width(k, bits)), (torch.int32,), prefix)
        codes = unpack_rows(qweight, bits, k)
        sshape = args.scale_shape(shape)
        scale = take(tensors, "scale", sshape, FLOAT_SCALES, prefix).to(torch.float32)
        zero = None
        if not args.symmetric:
            packed = take(tensors, "zero", (packed_width(sshape[0], bits), sshape[1]),
                          (torch.int32,), prefix)
            zero = unpack_cols(packed, bits, sshape[0]).to(torch.int32)
        g_idx = None
        if "g_idx" in tensors:
            g_idx = take(tensors, "g_idx", (k,), (torch.int32, torch.int64), prefix).to(torch.int32)
            if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= sshape[1]):
                raise ArtifactError(f"tensor '{prefix}g_idx' has values outside [0, {sshape[1]})")
        return QuantizedWeight(args=args, shape=shape, codes=codes, scale=scale, zero=zero,
                               g_idx=g_idx)

    def native_bytes(self, args: WeightArgs, shape: tuple[int, int], *,
                     act_order: bool = False) -> int:
        n, k = shape
        rows, groups = args.scale_shape(shape)
        zero_words = 0 if args.symmetric else packed_width(rows, args.bits) * groups
        g_idx = 4 * k if act_order else 0
        scale_bytes = SCALE_TORCH_DTYPES[args.scale_dtype].itemsize
        return (4 * n * packed_width(k, args.bits) + scale_bytes * rows * groups + 4 * zero_words
                + g_idx)

    def ideal_bits(self, args: WeightArgs, shape: tuple[int, int], *,
                   act_order: bool = False) -> float:
        n, k = shape
        rows, groups = args.scale_shape(shape)
        scales = rows * groups
        total = args.bits * n * k + 8 * SCALE_TORCH_DTYPES[args.scale_dtype].itemsize * scales
        if not args.symmetric:
            total += args.bits * scales
        if act_order:
            total += 32 * k
        return total / (n * k)


INT_GRID = IntGrid()
