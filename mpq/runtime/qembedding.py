"""An input embedding whose table stays quantized; a lookup decodes only the rows it reads.

:class:`QuantEmbedding` replaces the model's input embedding (``nn.Embedding`` or a subclass such
as Gemma's scaled embedding) in a loaded model.  It holds the native format's encoded tensors as
buffers under their artifact names (``qweight``, ``scale``, ``zero`` for int; ``weight``,
``scale`` for fp8_e4m3, ``blocks`` for the GGUF grids), the table being a weight [N=vocab, K=hidden].  A forward takes the
distinct ids it is given, slices their rows out of the encoded tensors (zero points are packed
across rows, so they are kept unpacked as well), decodes that [rows, K] piece with the number
format's own decode, and runs the original module's own forward on it with the ids renumbered
into the piece: whatever the class does around the lookup (Gemma multiplies by sqrt(hidden) in
the weight's dtype) happens exactly as in the float model.  Each decoded value equals the full
table's decode (mpq.checkpoint.native_codec) bit for bit: decoding is elementwise per row.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from mpq.checkpoint.native_codec import decode
from mpq.numerics.args import WeightArgs
from mpq.numerics.packing import pack_cols, unpack_cols

ROW_KEYS = ("qweight", "weight", "scale", "blocks")  # encoded tensors with a row per table row


class QuantEmbedding(nn.Module):
    """``original``: the embedding module built from config.json (its weight is not used);
    ``encoded``: the native tensors of the quantized [vocab, hidden] table; ``dtype``: the
    dtype the decoded rows take (the model's compute dtype)."""

    def __init__(self, original: nn.Embedding, args: WeightArgs, shape: tuple[int, int],
                 encoded: dict[str, torch.Tensor], dtype: torch.dtype):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: no state of its own
        self.args = args
        self.num_embeddings, self.embedding_dim = shape
        self.dtype = dtype
        self._keys = tuple(sorted(encoded))
        for key in self._keys:
            self.register_buffer(key, encoded[key])
        zero = None
        if "zero" in encoded:  # packed along the rows: unpacked once to slice by row
            zero = unpack_cols(encoded["zero"], args.bits, self.num_embeddings).to(torch.uint8)
        self.register_buffer("zero_rows", zero, persistent=False)

    def encoded(self) -> dict[str, torch.Tensor]:
        """The stored tensors, by local key (a tied head's QuantLinear shares them)."""
        return {key: getattr(self, key) for key in self._keys}

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole table, decoded ([vocab, hidden] of ``dtype``, default the module's)."""
        qw = decode(self.encoded(), self.args, (self.num_embeddings, self.embedding_dim))
        return qw.dequantize(dtype or self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (1-D int) of the table, decoded to [len(ids), hidden]."""
        qw = decode(self._piece(ids), self.args, (int(ids.numel()), self.embedding_dim))
        return qw.dequantize(self.dtype)

    def check(self, prefix: str = "") -> None:
        """Raise what decoding raises (ArtifactError naming ``prefix`` + the key) when the stored
        tensors do not decode; checked on one row, so loading never unpacks the whole table."""
        decode(self._piece(torch.zeros(1, dtype=torch.long)), self.args,
               (1, self.embedding_dim), prefix=prefix)

    def _piece(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors cut to rows ``ids``."""
        piece = {}
        for key in self._keys:
            tensor = getattr(self, key)
            if key in ROW_KEYS and tensor.shape[0] == self.num_embeddings:
                piece[key] = tensor.index_select(0, ids)
            elif key == "zero":
                piece[key] = pack_cols(self.zero_rows.index_select(0, ids), self.args.bits)
            else:  # one value for the whole table (a per-tensor scale)
                piece[key] = tensor
        return piece

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.numel() and (int(input_ids.min()) < 0
                                  or int(input_ids.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must lie in [0, {self.num_embeddings})")
        unique, inverse = torch.unique(input_ids, return_inverse=True)
        stand_in = copy.copy(self._original)  # the original's attributes, the decoded rows
        stand_in._parameters = {"weight": self.rows(unique.reshape(-1))}
        stand_in.num_embeddings = int(unique.numel())
        stand_in.padding_idx = None  # renumbered ids; padding only matters for gradients
        return type(self._original).forward(stand_in, inverse)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, weights={self.args.describe()}, "
                f"class={type(self._original).__name__}")
