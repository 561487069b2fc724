"""llama.cpp's legacy GGUF block types as number formats: ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``,
``q5_1`` (ggml's block_q8_0 … block_q5_1; the ``gguf`` package's ``gguf.quants``).

Every block is 32 consecutive input columns of a row with a float16 step ``d``:

- ``q8_0``: q ∈ [−127, 127], x̂ = d·q; d = absmax/127.
- ``q4_0`` / ``q5_0``: q ∈ [−2^(b−1), 2^(b−1)−1], x̂ = d·q, stored u = q + 2^(b−1).  d = v/−2^(b−1)
  with v the block's element of largest magnitude (its sign included, the first one on ties), so
  that element lands exactly on the grid's lone extra level −2^(b−1) (d may be negative).
- ``q4_1`` / ``q5_1``: q ∈ [0, 2^b−1] with a float16 offset m, x̂ = d·q + m; m = block min,
  d = (max − m)/(2^b − 1).

As mpq's other grids do, d and m are rounded to float16 *before* the codes are computed, so the
codes are the nearest ones for the stored d and m (llama.cpp's reference quantizer divides by the
unrounded d); rounding is half up (q8_0: half away from zero), llama.cpp's.  An all-zero block
gets d = 0 and codes for 0.  A step or min beyond float16's range is refused (SchemeError).
Dequantization is the ``gguf`` package's to the bit: fp32 d·q (plus m, a separate fp32 add).

``QuantizedWeight``: ``codes`` uint8 [N, K] the stored unsigned codes u (q8_0: q + 128);
``scale`` fp32 [N, K/32] the float16 steps d; ``zero`` fp32 [N, K/32] the float16 mins m
(``_1`` types; None for ``_0`` ones: an implicit offset 2^(b−1)).

Native tensor (local key): ``blocks`` uint8 [N, K/32 · type size], each row the GGUF row bytes
exactly (:func:`to_blocks`): fp16 d, [fp16 m], [q5: 4 bytes of high bits, bit j of the
little-endian uint32 is bit 4 of u[j]], then the low bits: q4/q5 byte j = u[j] & 15 | (u[j+16] &
15) << 4 for j < 16, q8 the 32 int8 q.  The GGUF writer (mpq.checkpoint.gguf_writer) stores these
bytes as they are.  GPTQ: :class:`GgufLegacyColumns` (a block's d, m from the current weights at
its first column); act-order only with static groups (GGUF has no column permutation, but a
column processed out of order still lands in its own block when the blocks' steps are fixed up
front).

Clipping search (GPTQ's ``clip_search``; :meth:`GgufLegacyGrid.block_params` with a weight): the
range choice above is tried on the block shrunk by factors 1, 1 − step, …, 0.7 (16 of them), and
per block the (d, m) of least Σ c_j·(x̂_j − x_j)² is kept, c the columns' error weights (diag H:
the importance an importance matrix gives llama.cpp's quantizer); factor 1 first, replaced only
when strictly better.
"""
from __future__ import annotations

import torch

from mpq.errors import SchemeError
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.format import NUMBER_FORMATS, InOrderColumns, ClipSearch
from mpq.numerics.gguf_block import GgufBlockFormat
from mpq.numerics.int_grid import prepare_weight

GGUF_BLOCK = 32
# the clipping search: block ranges shrunk by factors 1, …, CLIP_MIN_SHRINK (CLIP_STEPS of them)
CLIP_MIN_SHRINK, CLIP_STEPS = 0.7, 16
FP16_MAX = torch.finfo(torch.float16).max


def _fp16(t: torch.Tensor, what: str) -> torch.Tensor:
    """fp32 values of ``t`` rounded to float16; SchemeError when one overflows."""
    rounded = t.to(torch.float16)
    if not bool(torch.isfinite(rounded).all()):
        raise SchemeError(f"a GGUF block {what} of {float(t.abs().max()):.6g} overflows float16 "
                          f"(largest {FP16_MAX:.6g})",
                          hint="the weights are too large for llama.cpp's block types")
    return rounded.to(torch.float32)


class Block32Format(GgufBlockFormat):
    """The GGUF types whose blocks are 32 inputs with one float16 step d (and a min m for the
    ``_1`` types): the legacy types and iq4_nl.  Subclasses give ``block_params(blocks,
    weight)``, ``codes_of(x, d, m)`` and ``values_of(codes, d, m)``; RTN and dequantization are
    shared."""

    block = GGUF_BLOCK

    def quantize(self, weight: torch.Tensor, args: WeightArgs,
                 col_weight: torch.Tensor | None = None) -> QuantizedWeight:
        """RTN; with ``col_weight`` [K] (≥ 0) each block's parameters by the format's weighted
        search."""
        w = prepare_weight(weight, args, self.name)
        n, k = w.shape
        blocks = w.reshape(n, k // GGUF_BLOCK, GGUF_BLOCK)
        weight_of = None if col_weight is None else col_weight.to(w).reshape(-1, GGUF_BLOCK)
        d, m = self.block_params(blocks, weight_of)
        codes = self.codes_of(blocks, d.unsqueeze(-1), None if m is None else m.unsqueeze(-1))
        return QuantizedWeight(args=args, shape=(n, k), codes=codes.reshape(n, k), scale=d,
                               zero=m)

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = qw.shape
        codes = qw.codes.reshape(n, k // GGUF_BLOCK, GGUF_BLOCK)
        m = None if qw.zero is None else qw.zero.to(torch.float32).unsqueeze(-1)
        out = self.values_of(codes, qw.scale.to(torch.float32).unsqueeze(-1), m)
        return out.reshape(n, k).to(dtype)


class GgufLegacyGrid(Block32Format):
    """A llama.cpp (GGUF) block type: 32 inputs share a float16 step (the _1 types also a min).

    One object per type: ``bits`` 4, 5 or 8, with (``_1``) or without a min."""

    def __init__(self, name: str, bits: int, with_min: bool):
        self._init_type(name, bits, with_min)
        self.levels = (1 << bits) - 1 if with_min else None
        self.qmin = 0 if with_min else (-127 if bits == 8 else -(1 << (bits - 1)))
        self.qmax = self.levels if with_min else (1 << (bits - 1)) - 1
        # bytes per block: d, m, high bits (q5), codes
        self.type_size = 2 + 2 * with_min + (4 if bits == 5 else 0) + \
            (GGUF_BLOCK if bits == 8 else GGUF_BLOCK // 2)
        self.gptq_columns = GgufLegacyColumns

    # --- the grid --------------------------------------------------------------------------

    def block_params(self, blocks: torch.Tensor, weight: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d, m or None) fp32 (float16 values) of ``blocks`` [..., 32].  With ``weight``
        (≥ 0, broadcast to ``blocks``): the clipping search (module docstring)."""
        d, m = self._range_params(blocks)
        if weight is None:
            return d, m
        best = self._weighted_error(blocks, weight, d, m)
        for i in range(1, CLIP_STEPS):
            factor = 1.0 - (1.0 - CLIP_MIN_SHRINK) * i / (CLIP_STEPS - 1)
            d_f, m_f = self._range_params(blocks * factor)
            err = self._weighted_error(blocks, weight, d_f, m_f)
            better = err < best
            best = torch.where(better, err, best)
            d = torch.where(better, d_f, d)
            if m is not None:
                m = torch.where(better, m_f, m)
        return d, m

    def _range_params(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d, m or None) covering each block's range (llama.cpp's choice)."""
        if self.with_min:
            m = _fp16(blocks.amin(dim=-1), "min")
            d = _fp16((blocks.amax(dim=-1) - m).clamp(min=0) / self.levels, "step")
            return d, m
        if self.bits == 8:
            return _fp16(blocks.abs().amax(dim=-1) / 127, "step"), None
        idx = blocks.abs().argmax(dim=-1, keepdim=True)
        v = blocks.gather(-1, idx).squeeze(-1)
        return _fp16(v / -(1 << (self.bits - 1)), "step"), None

    def _weighted_error(self, blocks: torch.Tensor, weight: torch.Tensor, d: torch.Tensor,
                        m: torch.Tensor | None) -> torch.Tensor:
        """Σ weight·(x̂ − x)² per block, x̂ on the grid of (d, m)."""
        d, m = d.unsqueeze(-1), None if m is None else m.unsqueeze(-1)
        values = self.values_of(self.codes_of(blocks, d, m), d, m)
        return ((values - blocks).square() * weight).sum(dim=-1)

    def codes_of(self, x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """Unsigned codes uint8 of values ``x`` with (broadcast) ``d`` and ``m``."""
        y = x - m if m is not None else x
        y = torch.where(d == 0, torch.zeros_like(y), y / torch.where(d == 0, 1.0, d))
        if self.bits == 8:  # roundf: half away from zero
            q = torch.sign(y) * torch.floor(y.abs() + 0.5)
        else:  # (int)(y + offset + 0.5): half up
            q = torch.floor(y + 0.5)
        return (q.clamp_(self.qmin, self.qmax) + self.offset).to(torch.uint8)

    def values_of(self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None
                  ) -> torch.Tensor:
        """fp32 x̂ of unsigned ``codes`` (the ``gguf`` package's arithmetic)."""
        q = codes.to(torch.float32)
        if m is None:
            return d * (q - self.offset)
        return d * q + m

    # --- GGUF bytes ------------------------------------------------------------------------

    def to_blocks(self, qw: QuantizedWeight) -> torch.Tensor:
        """uint8 [N, K/32 · type_size]: the GGUF rows of ``qw`` (module docstring)."""
        n, k = qw.shape
        nb = k // GGUF_BLOCK
        u = qw.codes.to(torch.uint8).reshape(n, nb, GGUF_BLOCK)
        parts = [qw.scale.to(torch.float16).reshape(n, nb, 1).view(torch.uint8)]
        if self.with_min:
            parts.append(qw.zero.to(torch.float16).reshape(n, nb, 1).view(torch.uint8))
        if self.bits == 8:
            parts.append((u.to(torch.int16) - 128).to(torch.int8).view(torch.uint8))
        else:
            if self.bits == 5:
                high = ((u >> 4) & 1).reshape(n, nb, 4, 8).to(torch.int32)
                weights = torch.tensor([1 << b for b in range(8)], dtype=torch.int32)
                parts.append((high * weights).sum(-1).to(torch.uint8))
            low = u & 15
            parts.append(low[..., :16] | (low[..., 16:] << 4))
        return torch.cat(parts, dim=-1).reshape(n, nb * self.type_size).contiguous()

    def from_blocks(self, rows: torch.Tensor, args: WeightArgs, shape: tuple[int, int]
                    ) -> QuantizedWeight:
        """Inverse of :func:`to_blocks`."""
        n, k = shape
        nb = k // GGUF_BLOCK
        b, d = self.split_blocks(rows, shape)
        pos = 2
        m = None
        if self.with_min:
            m = b[..., 2:4].contiguous().view(torch.float16).reshape(n, nb).to(torch.float32)
            pos = 4
        if self.bits == 8:
            q = b[..., pos:].contiguous().view(torch.int8).to(torch.int16)
            codes = (q + 128).to(torch.uint8)
        else:
            high = None
            if self.bits == 5:
                hb = b[..., pos:pos + 4]
                shifts = torch.arange(8, dtype=torch.uint8)
                high = ((hb.unsqueeze(-1) >> shifts) & 1).reshape(n, nb, GGUF_BLOCK)
                pos += 4
            qs = b[..., pos:]
            codes = torch.cat([qs & 15, qs >> 4], dim=-1)
            if high is not None:
                codes = codes | (high << 4)
        return QuantizedWeight(args=args, shape=shape, codes=codes.reshape(n, k), scale=d,
                               zero=m)

    # --- native encoding and sizes ---------------------------------------------------------

    def encode(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {"blocks": self.to_blocks(qw)}


class GgufLegacyColumns(InOrderColumns):
    """GPTQ on a 32-wide GGUF block grid, the legacy types and iq4_nl
    (:class:`mpq.numerics.format.ColumnGrid`): a block's d (and m) from the current weights when
    the solve reaches its first column (static groups: from the original weights up front, which
    also allows act-order: every column stays in its block); with ``clip``, chosen by the
    format's weighted search (``block_params(blocks, weight)``) with the columns' error weights.
    The format gives ``block_params``, ``codes_of`` and ``values_of``."""

    static_act_order = True
    clip_search = True

    def __init__(self, args: WeightArgs, w0: torch.Tensor, num_groups: int, dynamic: bool,
                 clip: ClipSearch | None = None):
        n, k = w0.shape
        self.fmt = NUMBER_FORMATS.get(args.format)
        self.clip = clip
        self.d = torch.zeros((num_groups, n), dtype=torch.float32, device=w0.device)
        self.m = torch.zeros_like(self.d) if self.fmt.with_min else None
        self.codes = torch.empty((k, n), dtype=torch.uint8, device=w0.device)
        if not dynamic:
            for g in range(num_groups):
                self.set_group(g, w0[:, g * GGUF_BLOCK:(g + 1) * GGUF_BLOCK])

    def set_group(self, g: int, cols: torch.Tensor) -> None:
        weight = None
        if self.clip is not None:
            weight = self.clip.weights(g * GGUF_BLOCK, (g + 1) * GGUF_BLOCK).to(cols.device)
        d, m = self.fmt.block_params(cols, weight)
        self.d[g] = d
        if m is not None:
            self.m[g] = m

    def column(self, p: int, c: int, g: int, w: torch.Tensor) -> torch.Tensor:
        m = None if self.m is None else self.m[g]
        codes = self.fmt.codes_of(w, self.d[g], m)
        self.codes[p] = codes
        return self.fmt.values_of(codes, self.d[g], m)

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = None if self.m is None else self.m.t().contiguous()
        return self.d.t().contiguous(), m


Q8_0 = GgufLegacyGrid("q8_0", 8, with_min=False)
Q4_0 = GgufLegacyGrid("q4_0", 4, with_min=False)
Q4_1 = GgufLegacyGrid("q4_1", 4, with_min=True)
Q5_0 = GgufLegacyGrid("q5_0", 5, with_min=False)
Q5_1 = GgufLegacyGrid("q5_1", 5, with_min=True)
GGUF_LEGACY = (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)
