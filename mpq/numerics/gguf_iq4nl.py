"""llama.cpp's ``iq4_nl`` GGUF type as a number format (ggml's block_iq4_nl; the ``gguf``
package's ``gguf.quants.IQ4_NL`` dequantizes it).

A block is 32 consecutive input columns of a row with a float16 step d and 4-bit indices q into
llama.cpp's fixed non-uniform table ``KVALUES`` (kvalues_iq4nl): x̂ = d·KVALUES[q] (fp32 d times
the fp32 table value, the ``gguf`` package's arithmetic to the bit).  The table has no 0, so only
d = 0 (an all-zero block) gives exact zeros.

Step choice (:meth:`Iq4NlGrid.block_params`): for each block a small set of candidate steps
puts the block's element of largest magnitude m on a table value near either end of the table,
m / (v + t) for v ∈ {−127, 113} and t ∈ [−SEARCH, SEARCH]; each candidate's nearest indices are
refitted by least squares (d = Σ q·x / Σ q²), the refit rounded to float16, the indices taken
again for it, and the step with the least squared error kept (the first on ties).  GPTQ's
clipping search weights both the refit and the error by the columns' error weights (diag H).  Indices are
always the nearest table values for the stored float16 d (ties to the larger value).  A step
beyond float16's range is refused (SchemeError).

``QuantizedWeight``: ``codes`` uint8 [N, K] the indices q (0..15); ``scale`` fp32 [N, K/32] the
float16 steps d; ``zero`` None.

Native tensor (local key): ``blocks`` uint8 [N, K/32 · 18], each row the GGUF row bytes exactly:
per block fp16 d, then 16 bytes qs[j] = q[j] | q[j + 16] << 4 (q4_0's nibble layout).  The GGUF
writer (mpq.checkpoint.gguf_writer) stores them as type IQ4_NL.  GPTQ:
:class:`mpq.numerics.gguf_legacy.GgufLegacyColumns` (a block's d from the current weights when
the solve reaches its first column, each column rounded to the nearest table value); act-order
only with static groups (GGUF has no column permutation).
"""
from __future__ import annotations

import torch

from mpq.numerics.args import WeightArgs
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.gguf_legacy import GGUF_BLOCK, Block32Format, GgufLegacyColumns, _fp16

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
SEARCH = 7  # candidate steps per table end: 2·SEARCH + 1


class Iq4NlGrid(Block32Format):
    """llama.cpp's IQ4_NL (GGUF): 32 inputs share a float16 step times a fixed 16-value table."""

    type_size = 2 + GGUF_BLOCK // 2

    def __init__(self) -> None:
        self._init_type("iq4_nl", 4, with_min=False)
        self.holds_zero = False  # the table has no 0
        self.table = torch.tensor(KVALUES, dtype=torch.float32)
        self.bounds = (self.table[1:] + self.table[:-1]) / 2  # exact midpoints
        self.gptq_columns = GgufLegacyColumns

    # --- the grid --------------------------------------------------------------------------

    def _nearest(self, y: torch.Tensor) -> torch.Tensor:
        """Indices (int64) of the table values nearest to ``y`` (ties to the larger one)."""
        return torch.bucketize(y.contiguous(), self.bounds.to(y.device), right=True)

    def _scaled(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return torch.where(d == 0, torch.zeros_like(x), x / torch.where(d == 0, 1.0, d))

    def block_params(self, blocks: torch.Tensor, weight: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, None]:
        """(d, None): the float16 steps (as fp32) of ``blocks`` [..., 32] (module docstring);
        ``weight`` (≥ 0, broadcast to ``blocks``) weights each element's squared error in the
        refit and the choice."""
        weigh = (lambda t: t) if weight is None else (lambda t: weight * t)  # noqa: E731
        table = self.table.to(blocks.device)
        idx = blocks.abs().argmax(dim=-1, keepdim=True)
        m = blocks.gather(-1, idx)  # [..., 1], signed
        # the step that puts m on the table's longer end: refused if float16 cannot hold it,
        # kept if no candidate below is finite
        best_d = _fp16(m.squeeze(-1) / KVALUES[0], "step")
        best_err = torch.full_like(best_d, float("inf"))
        for end in (KVALUES[0], KVALUES[-1]):
            for t in range(-SEARCH, SEARCH + 1):
                q = table[self._nearest(self._scaled(blocks, m / (end + t)))]
                # least squares for these indices
                d = weigh(q * blocks).sum(-1) / weigh(q * q).sum(-1)
                d = d.to(torch.float16).to(torch.float32)  # inf (never kept) on overflow
                q = table[self._nearest(self._scaled(blocks, d.unsqueeze(-1)))]
                err = weigh((blocks - d.unsqueeze(-1) * q) ** 2).sum(-1)
                better = err < best_err
                best_d = torch.where(better, d, best_d)
                best_err = torch.where(better, err, best_err)
        return best_d, None

    def codes_of(self, x: torch.Tensor, d: torch.Tensor, m: None = None) -> torch.Tensor:
        """Indices uint8 of the nearest table values of ``x`` for (broadcast) steps ``d``."""
        return self._nearest(self._scaled(x, d)).to(torch.uint8)

    def values_of(self, codes: torch.Tensor, d: torch.Tensor, m: None = None) -> torch.Tensor:
        """fp32 x̂ = d·KVALUES[codes] (the ``gguf`` package's arithmetic)."""
        return d * self.table.to(codes.device)[codes.long()]

    # --- GGUF bytes ------------------------------------------------------------------------

    def to_blocks(self, qw: QuantizedWeight) -> torch.Tensor:
        """uint8 [N, K/32 · 18]: the GGUF rows of ``qw`` (module docstring)."""
        n, k = qw.shape
        nb = k // GGUF_BLOCK
        q = qw.codes.to(torch.uint8).reshape(n, nb, GGUF_BLOCK) & 15
        d = qw.scale.to(torch.float16).reshape(n, nb, 1).view(torch.uint8)
        half = GGUF_BLOCK // 2
        return torch.cat([d, q[..., :half] | (q[..., half:] << 4)], dim=-1) \
            .reshape(n, nb * self.type_size).contiguous()

    def from_blocks(self, rows: torch.Tensor, args: WeightArgs, shape: tuple[int, int]
                    ) -> QuantizedWeight:
        """Inverse of :meth:`to_blocks`."""
        n, k = shape
        b, d = self.split_blocks(rows, shape)
        qs = b[..., 2:]
        codes = torch.cat([qs & 15, qs >> 4], dim=-1)
        return QuantizedWeight(args=args, shape=shape, codes=codes.reshape(n, k), scale=d)

    def encode(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {"blocks": self.to_blocks(qw)}


IQ4_NL = Iq4NlGrid()
