"""llama.cpp's K-quant GGUF types as number formats: ``q4_k``, ``q5_k``, ``q6_k``, ``q3_k``
(ggml's block_q4_K … block_q3_K; the ``gguf`` package's ``gguf.quants`` dequantizes them).

A super-block is 256 consecutive input columns of a row with a float16 step d, cut into S
sub-blocks whose own steps are d times a small integer:

- ``q4_k`` / ``q5_k``: 8 sub-blocks of 32, 6-bit scales sc and mins m (0..63), a float16 dmin;
  codes q ∈ [0, 2^b − 1], x̂ = (d·sc)·q − dmin·m;
- ``q6_k``: 16 sub-blocks of 16, int8 scales sc; q ∈ [−32, 31], x̂ = (d·sc)·q;
- ``q3_k``: 16 sub-blocks of 16, 6-bit signed scales sc ∈ [−32, 31]; q ∈ [−4, 3], x̂ = (d·sc)·q.

Parameter choice (:mod:`mpq.numerics.gguf_kquant_params`, simpler than llama.cpp's search):
min-max per sub-block, the sub-block steps (and mins) quantized to integers against the
super-block's float16 d (and dmin), then a few integer moves per sub-block tried for the least
squared error; every code is computed for the stored, quantized steps — so the codes are the
nearest ones for what llama.cpp will use.  Dequantization is the ``gguf`` package's to the bit:
fp32 d·sc, then times q (minus the fp32 dmin·m).

``QuantizedWeight``: ``codes`` uint8 [N, K] unsigned codes u (q6_k: q + 32, q3_k: q + 4);
``scale`` fp32 [N, K/256, 1 + S]: [..., 0] the float16 d, [..., 1:] the integer sub-block scales;
``zero`` fp32 [N, K/256, 1 + S] alike with dmin and the integer mins (q4_k, q5_k; else None).

Native tensor (local key): ``blocks`` uint8 [N, K/256 · type size], each row the GGUF row bytes
exactly (:mod:`mpq.numerics.gguf_kquant_pack`); the GGUF writer stores them as they are.  GPTQ:
:class:`KQuantColumns` (a super-block's parameters from the current weights at its first
column, as the legacy types' blocks); act-order only with static groups (GGUF has no column
permutation); the clipping search weights the parameter search by the columns' diag H.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from mpq.numerics import gguf_kquant_pack as pack
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.format import NUMBER_FORMATS, InOrderColumns, ClipSearch
from mpq.numerics.gguf_block import GgufBlockFormat
from mpq.numerics.gguf_kquant_params import KParams, asym_params, sym_params
from mpq.numerics.int_grid import prepare_weight

QK = pack.QK


class BlockLayout(NamedTuple):
    """A K-quant type's bytes: ``type_size`` bytes per 256-wide block, and the functions that
    pack codes and scales into them and unpack them (mpq.numerics.gguf_kquant_pack)."""

    type_size: int
    packer: Callable
    unpacker: Callable


class KQuantGrid(GgufBlockFormat):
    """A llama.cpp (GGUF) K-quant type: 256 inputs share a float16 scale times small integers.

    ``bits`` per code, ``sub`` columns per sub-block, with (q4_k, q5_k) or without a min;
    ``scale_neg``: the sub-block scales' range is [−scale_neg, scale_neg − 1] (symmetric types)
    or [0, 63] (with a min); ``fallback``: llama.cpp's type for rows 256 does not divide."""

    block = QK
    kind = "GGUF K-quant type"
    min_note = "6-bit mins per sub-block"

    def __init__(self, name: str, bits: int, sub: int, with_min: bool, layout: "BlockLayout",
                 fallback: str, scale_neg: int = 0):
        self._init_type(name, bits, with_min)
        self.sub = sub
        self.fallback_format = fallback  # llama.cpp's, for rows 256 does not divide
        self.type_size, self.packer, self.unpacker = layout
        self.scale_neg = scale_neg
        self.subs = QK // sub
        self.gptq_columns = KQuantColumns

    # --- the grid --------------------------------------------------------------------------

    def params(self, blocks: torch.Tensor, weight: torch.Tensor | None = None) -> KParams:
        """Parameters of super-blocks ``blocks`` [..., 256] (module docstring); ``weight``
        [..., 256] (≥ 0, broadcast to ``blocks``) weights each column's squared error in the
        search."""
        sub = blocks.reshape(*blocks.shape[:-1], self.subs, self.sub)
        if weight is not None:
            weight = weight.reshape(*weight.shape[:-1], self.subs, self.sub)
        if self.with_min:
            return asym_params(sub, (1 << self.bits) - 1, self.name, weight)
        return sym_params(sub, 1 << (self.bits - 1), self.scale_neg, self.name, weight)

    def codes_of(self, x: torch.Tensor, step: torch.Tensor, off: torch.Tensor | None
                 ) -> torch.Tensor:
        """Unsigned codes uint8 of values ``x`` with (broadcast) sub-block ``step`` and
        ``off`` (the subtracted dmin·m); nearest, ties to even (llama.cpp's nearest_int)."""
        y = x + off if off is not None else x
        y = torch.where(step == 0, torch.zeros_like(y), y / torch.where(step == 0, 1.0, step))
        hi = (1 << self.bits) - 1
        return (torch.round(y) + self.offset).clamp_(0, hi).to(torch.uint8)

    def values_of(self, codes: torch.Tensor, step: torch.Tensor, off: torch.Tensor | None
                  ) -> torch.Tensor:
        """fp32 x̂ of unsigned ``codes`` (the ``gguf`` package's arithmetic)."""
        q = codes.to(torch.float32)
        if off is None:
            return step * (q - self.offset)
        return step * q - off

    def _steps(self, qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d·sc, dmin·m or None) fp32 [N, K/256, S] of ``qw``."""
        scale = qw.scale.to(torch.float32)
        step = scale[..., :1] * scale[..., 1:]
        if qw.zero is None:
            return step, None
        zero = qw.zero.to(torch.float32)
        return step, zero[..., :1] * zero[..., 1:]

    def quantize(self, weight: torch.Tensor, args: WeightArgs,
                 col_weight: torch.Tensor | None = None) -> QuantizedWeight:
        """RTN; with ``col_weight`` [K] (≥ 0) the search weighted by it."""
        w = prepare_weight(weight, args, self.name)
        n, k = w.shape
        weight_of = None if col_weight is None else col_weight.to(w).reshape(-1, QK)
        p = self.params(w.reshape(n, k // QK, QK), weight_of)
        sub = w.reshape(n, k // QK, self.subs, self.sub)
        off = None if p.off is None else p.off.unsqueeze(-1)
        codes = self.codes_of(sub, p.step.unsqueeze(-1), off)
        return QuantizedWeight(args=args, shape=(n, k), codes=codes.reshape(n, k), scale=p.scale,
                               zero=p.zero)

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = qw.shape
        step, off = self._steps(qw)
        codes = qw.codes.reshape(n, k // QK, self.subs, self.sub)
        out = self.values_of(codes, step.unsqueeze(-1), None if off is None else off.unsqueeze(-1))
        return out.reshape(n, k).to(dtype)

    # --- GGUF bytes ------------------------------------------------------------------------

    def to_blocks(self, qw: QuantizedWeight) -> torch.Tensor:
        """uint8 [N, K/256 · type_size]: the GGUF rows of ``qw``."""
        n, k = qw.shape
        u = qw.codes.to(torch.uint8).reshape(n, k // QK, QK)
        scale = qw.scale.to(torch.float32)
        if self.with_min:
            zero = qw.zero.to(torch.float32)
            return self.packer(u, scale[..., 0], zero[..., 0], scale[..., 1:], zero[..., 1:])
        return self.packer(u, scale[..., 0], scale[..., 1:])

    def from_blocks(self, rows: torch.Tensor, args: WeightArgs, shape: tuple[int, int]
                    ) -> QuantizedWeight:
        """Inverse of :meth:`to_blocks`."""
        n, k = shape
        parts = self.unpacker(rows, n, k // QK)
        u, d = parts[0], parts[1]
        if self.with_min:
            dmin, sc, m = parts[2:]
            zero = torch.cat([dmin.unsqueeze(-1), m.to(torch.float32)], dim=-1)
        else:
            sc, zero = parts[2], None
        scale = torch.cat([d.unsqueeze(-1), sc.to(torch.float32)], dim=-1)
        return QuantizedWeight(args=args, shape=shape, codes=u.reshape(n, k), scale=scale,
                               zero=zero)

    # --- native encoding and sizes ---------------------------------------------------------

    def encode(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {"blocks": self.to_blocks(qw)}


class KQuantColumns(InOrderColumns):
    """GPTQ on a K-quant grid (:class:`mpq.numerics.format.ColumnGrid`): a super-block's d,
    sub-block scales (and dmin, mins) from the current weights when the solve reaches its first
    column (static groups: from the original weights up front, which also allows act-order);
    with ``clip``, the search weighted by the columns' error weights."""

    static_act_order = True
    clip_search = True

    def __init__(self, args: WeightArgs, w0: torch.Tensor, num_groups: int, dynamic: bool,
                 clip: ClipSearch | None = None):
        n, k = w0.shape
        self.fmt: KQuantGrid = NUMBER_FORMATS.get(args.format)
        self.clip = clip
        subs, device = self.fmt.subs, w0.device
        self.step = torch.zeros((num_groups, n, subs), dtype=torch.float32, device=device)
        self.off = torch.zeros_like(self.step) if self.fmt.with_min else None
        self.scale = torch.zeros((num_groups, n, 1 + subs), dtype=torch.float32, device=device)
        self.zero = torch.zeros_like(self.scale) if self.fmt.with_min else None
        self.codes = torch.empty((k, n), dtype=torch.uint8, device=device)
        if not dynamic:
            for g in range(num_groups):
                self.set_group(g, w0[:, g * QK:(g + 1) * QK])

    def set_group(self, g: int, cols: torch.Tensor) -> None:
        weight = None
        if self.clip is not None:
            weight = self.clip.weights(g * QK, (g + 1) * QK).to(cols.device)
        p = self.fmt.params(cols, weight)
        self.step[g], self.scale[g] = p.step, p.scale
        if p.off is not None:
            self.off[g], self.zero[g] = p.off, p.zero

    def column(self, p: int, c: int, g: int, w: torch.Tensor) -> torch.Tensor:
        j = (c % QK) // self.fmt.sub
        step = self.step[g, :, j]
        off = None if self.off is None else self.off[g, :, j]
        codes = self.fmt.codes_of(w, step, off)
        self.codes[p] = codes
        return self.fmt.values_of(codes, step, off)

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        zero = None if self.zero is None else self.zero.transpose(0, 1).contiguous()
        return self.scale.transpose(0, 1).contiguous(), zero


# llama.cpp's fallbacks (src/llama-quant.cpp of llama-cpp-python 0.3.36's llama.cpp, and measured
# on SmolLM2: benchmarks/results/llama_cpp_q3_k_m_types.md): q4_k → q5_0, q5_k → q5_1,
# q6_k → q8_0, q3_k → q4_0 (iq4_nl is the fallback of its i-quants iq1–iq3 and iq4_xs)
Q4_K = KQuantGrid("q4_k", 4, 32, True, BlockLayout(144, pack.pack_q4_k, pack.unpack_q4_k),
                  "q5_0")
Q5_K = KQuantGrid("q5_k", 5, 32, True, BlockLayout(176, pack.pack_q5_k, pack.unpack_q5_k),
                  "q5_1")
Q6_K = KQuantGrid("q6_k", 6, 16, False, BlockLayout(210, pack.pack_q6_k, pack.unpack_q6_k),
                  "q8_0", scale_neg=128)
Q3_K = KQuantGrid("q3_k", 3, 16, False, BlockLayout(110, pack.pack_q3_k, pack.unpack_q3_k),
                  "q4_0", scale_neg=32)
GGUF_KQUANTS = (Q4_K, Q5_K, Q6_K, Q3_K)
