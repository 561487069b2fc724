"""Native mpq codec: one :class:`QuantizedWeight` <-> named tensors with *local* keys.

The writer prefixes the keys with ``<layer>.``; nothing here does I/O.  Keys by format
(N = out, K = in, G = groups along K, S = scale rows: 1 for tensor granularity, else N):

- int:  ``qweight`` int32 [N, ceil(K·b/32)] = :func:`mpq.numerics.packing.pack_rows` of the unsigned codes;
  ``scale`` fp32 [S, G]; ``zero`` int32 [ceil(S·b/32), G] = :func:`mpq.numerics.packing.pack_cols` of the
  unsigned zero points (asymmetric only); ``g_idx`` int32 [K] (act-order only).
- fp8:  ``weight`` float8_e4m3fn / float8_e5m2 [N, K]; ``scale`` fp32 [S, 1], or with granularity
  ``block`` [ceil(N/128), ceil(K/128)].
- nf4:  ``qweight`` int32 [N, K/8] (4-bit table indices); ``scale`` fp32 [N, K/64] block absmax, or
  with double quant ``absmax_codes`` uint8 [N·K/64], ``absmax_scale`` fp32 [ceil(N·K/64/256)],
  ``absmax_offset`` fp32 [1], from which :func:`mpq.numerics.nf4.double_dequantize` rebuilds the
  same absmax the quantizer used.
- mxfp4: ``packed`` uint8 [N, K/2], the E2M1 codes two per byte (:func:`mpq.numerics.packing.pack_nibbles`:
  element 2j in the low nibble of byte j, compressed-tensors' ``weight_packed``); ``scale`` uint8
  [N, K/32] E8M0 biased exponents (255, E8M0's NaN, is refused).
- mxfp8: ``weight`` float8_e4m3fn [N, K]; ``scale`` uint8 [N, K/32] E8M0 exponents.
- nvfp4: ``packed`` uint8 [N, K/2] as mxfp4; ``scale`` float8_e4m3fn [N, K/16];
  ``global_scale`` fp32 [1] (a divisor: x̂ = value · scale / global_scale; finite and > 0).

Scales are kept fp32 (or in the format's own exact scale dtype) so decode(encode(qw)).dequantize()
is bit-identical to qw.dequantize().
:func:`decode` validates every key, shape and dtype and raises :class:`ArtifactError`.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from mpq.errors import ArtifactError, SchemeError
from mpq.numerics.packing import (pack_cols, pack_nibbles, pack_rows, packed_width, unpack_cols,
                         unpack_nibbles, unpack_rows)
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.microscaling import E8M0_NAN
from mpq.numerics.nf4 import DQ_BLOCK, double_dequantize
from mpq.numerics.args import FP8_BLOCK, NF4_BLOCK, WeightArgs

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP4_FORMATS = ("mxfp4", "nvfp4")
# the 8-bit scale dtype of each microscaled format
_MICRO_SCALES = {"mxfp4": torch.uint8, "mxfp8": torch.uint8, "nvfp4": torch.float8_e4m3fn}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _scale_shape(args: WeightArgs, shape: tuple[int, int]) -> tuple[int, int]:
    n, k = shape
    if args.granularity == "tensor":
        return 1, 1
    if args.granularity == "block":
        return -(-n // FP8_BLOCK), args.num_groups(k)
    return n, args.num_groups(k)


def encode(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Named tensors (local keys) storing ``qw`` losslessly in the native layout."""
    fmt = qw.args.format
    if fmt in FP8_DTYPES:
        return {"weight": qw.codes.contiguous(), "scale": qw.scale.to(torch.float32).contiguous()}
    if fmt in _MICRO_SCALES:
        return _encode_micro(qw)
    bits = 4 if fmt == "nf4" else qw.args.bits
    out = {"qweight": pack_rows(qw.codes.to(torch.uint8), bits)}
    if fmt == "nf4" and qw.args.double_quant:
        out["absmax_codes"] = qw.extras["absmax_codes"].to(torch.uint8).reshape(-1).contiguous()
        out["absmax_scale"] = qw.extras["absmax_scale"].to(torch.float32).reshape(-1).contiguous()
        out["absmax_offset"] = qw.extras["absmax_offset"].to(torch.float32).reshape(1).contiguous()
        return out
    out["scale"] = qw.scale.to(torch.float32).contiguous()
    if fmt == "int" and qw.zero is not None:
        out["zero"] = pack_cols(qw.zero.to(torch.uint8), bits)
    if qw.g_idx is not None:
        out["g_idx"] = qw.g_idx.to(torch.int32).contiguous()
    return out


def _encode_micro(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    fmt = qw.args.format
    out = {"scale": qw.scale.to(_MICRO_SCALES[fmt]).contiguous()}
    if fmt in FP4_FORMATS:
        out["packed"] = pack_nibbles(qw.codes.to(torch.uint8))
    else:
        out["weight"] = qw.codes.to(torch.float8_e4m3fn).contiguous()
    if fmt == "nvfp4":
        out["global_scale"] = qw.extras["global_scale"].to(torch.float32).reshape(1).contiguous()
    return out


def _take(tensors: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...],
          dtypes: tuple[torch.dtype, ...], prefix: str) -> torch.Tensor:
    """tensors[key], checked for presence, shape and dtype."""
    name = f"{prefix}{key}"
    if key not in tensors:
        raise ArtifactError(f"missing tensor '{name}'",
                            hint="the artifact is incomplete or from another mpq version; "
                                 "re-run mpq quantize")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise ArtifactError(f"tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}",
                            hint="the tensors do not match the recipe/plan stored with them")
    if t.dtype not in dtypes:
        raise ArtifactError(f"tensor '{name}' has dtype {t.dtype}, expected "
                            f"{' or '.join(str(d) for d in dtypes)}")
    return t


def decode(tensors: Mapping[str, torch.Tensor], args: WeightArgs, shape: tuple[int, int], *,
           prefix: str = "") -> QuantizedWeight:
    """Rebuild the QuantizedWeight of logical ``shape`` [N, K] from its local-key tensors.

    ``prefix`` (e.g. ``"model.layers.0.mlp.up_proj."``) only decorates error messages.  Keys other
    than the ones the format needs (e.g. ``bias``) are ignored.
    """
    shape = tuple(int(s) for s in shape)
    try:
        args.check_shape(shape, where=prefix.rstrip(".") or "weight")
    except SchemeError as exc:
        raise ArtifactError(f"stored scheme cannot describe the weight: {exc}") from exc
    n, k = shape
    fmt = args.format
    if fmt in FP8_DTYPES:
        codes = _take(tensors, "weight", shape, (FP8_DTYPES[fmt],), prefix)
        scale = _take(tensors, "scale", _scale_shape(args, shape), _FLOATS, prefix)
        return QuantizedWeight(args=args, shape=shape, codes=codes, scale=scale.to(torch.float32))
    if fmt in _MICRO_SCALES:
        return _decode_micro(tensors, args, shape, prefix)

    bits = 4 if fmt == "nf4" else args.bits
    qweight = _take(tensors, "qweight", (n, packed_width(k, bits)), (torch.int32,), prefix)
    codes = unpack_rows(qweight, bits, k)
    if fmt == "nf4":
        return _decode_nf4(tensors, args, shape, codes, prefix)

    sshape = _scale_shape(args, shape)
    scale = _take(tensors, "scale", sshape, _FLOATS, prefix).to(torch.float32)
    zero = None
    if not args.symmetric:
        packed = _take(tensors, "zero", (packed_width(sshape[0], bits), sshape[1]),
                       (torch.int32,), prefix)
        zero = unpack_cols(packed, bits, sshape[0]).to(torch.int32)
    g_idx = None
    if "g_idx" in tensors:
        g_idx = _take(tensors, "g_idx", (k,), (torch.int32, torch.int64), prefix).to(torch.int32)
        if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= sshape[1]):
            raise ArtifactError(f"tensor '{prefix}g_idx' has values outside [0, {sshape[1]})")
    return QuantizedWeight(args=args, shape=shape, codes=codes, scale=scale, zero=zero, g_idx=g_idx)


def _decode_nf4(tensors: Mapping[str, torch.Tensor], args: WeightArgs, shape: tuple[int, int],
                codes: torch.Tensor, prefix: str) -> QuantizedWeight:
    n, k = shape
    g = k // NF4_BLOCK
    if not args.double_quant:
        scale = _take(tensors, "scale", (n, g), _FLOATS, prefix).to(torch.float32)
        return QuantizedWeight(args=args, shape=shape, codes=codes, scale=scale)
    m = n * g
    extras = {
        "absmax_codes": _take(tensors, "absmax_codes", (m,), (torch.uint8,), prefix),
        "absmax_scale": _take(tensors, "absmax_scale", (math.ceil(m / DQ_BLOCK),), (torch.float32,),
                              prefix),
        "absmax_offset": _take(tensors, "absmax_offset", (1,), (torch.float32,), prefix),
    }
    scale = double_dequantize(extras["absmax_codes"], extras["absmax_scale"],
                              extras["absmax_offset"]).reshape(n, g)
    return QuantizedWeight(args=args, shape=shape, codes=codes, scale=scale, extras=extras)


def _decode_micro(tensors: Mapping[str, torch.Tensor], args: WeightArgs, shape: tuple[int, int],
                  prefix: str) -> QuantizedWeight:
    n, k = shape
    fmt = args.format
    scale = _take(tensors, "scale", (n, args.num_groups(k)), (_MICRO_SCALES[fmt],), prefix)
    if fmt in FP4_FORMATS:
        codes = unpack_nibbles(_take(tensors, "packed", (n, k // 2), (torch.uint8,), prefix))
    else:
        codes = _take(tensors, "weight", shape, (torch.float8_e4m3fn,), prefix)
    extras = {}
    if fmt == "nvfp4":
        gs = _take(tensors, "global_scale", (1,), (torch.float32,), prefix)
        if not bool(torch.isfinite(gs).all() and (gs > 0).all()):
            raise ArtifactError(f"tensor '{prefix}global_scale' must be finite and > 0, got "
                                f"{gs.item()}")
        if bool(torch.isnan(scale.to(torch.float32)).any()):
            raise ArtifactError(f"tensor '{prefix}scale' holds fp8 NaN values",
                                hint="the artifact is damaged; re-run mpq quantize")
        extras["global_scale"] = gs
    elif scale.numel() and int(scale.max()) == E8M0_NAN:
        raise ArtifactError(f"tensor '{prefix}scale' holds the E8M0 NaN code {E8M0_NAN}",
                            hint="the artifact is damaged; re-run mpq quantize")
    return QuantizedWeight(args=args, shape=shape, codes=codes, scale=scale, extras=extras)


def split_layer_tensors(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Remove and return layer ``name``'s tensors from ``tensors``, under their local keys."""
    prefix = name + "."
    keys = [k for k in tensors if k.startswith(prefix) and "." not in k[len(prefix):]]
    return {k[len(prefix):]: tensors.pop(k) for k in keys}


def stored_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Total bytes of the tensors' data."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def ideal_bits(args: WeightArgs, shape: tuple[int, int], *, act_order: bool = False) -> float:
    """Bits per weight of an unpadded encoding: codes plus the scale/zero/g_idx bytes we store."""
    n, k = shape
    if args.format == "nf4":
        m = n * (k // NF4_BLOCK)
        side = 8 * m + 32 * math.ceil(m / DQ_BLOCK) + 32 if args.double_quant else 32 * m
        return (4 * n * k + side) / (n * k)
    rows, groups = _scale_shape(args, shape)
    scales = rows * groups
    if args.format in _MICRO_SCALES:
        extra = 32 if args.format == "nvfp4" else 0  # the global scale
        return (args.bits * n * k + 8 * scales + extra) / (n * k)
    total = args.bits * n * k + 32 * scales
    if args.format == "int" and not args.symmetric:
        total += args.bits * scales
    if act_order:
        total += 32 * k
    return total / (n * k)
