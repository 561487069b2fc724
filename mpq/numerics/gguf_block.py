"""What llama.cpp's block types (mpq.numerics.gguf_legacy, mpq.numerics.gguf_kquants) share as
number formats: one object per GGUF type, named as llama.cpp names it, asymmetric exactly when
the type stores a min, written only by the GGUF writer (compressed-tensors and GPTQ v1 cannot
express it)."""
from __future__ import annotations

from typing import Mapping

import torch

from mpq.errors import SchemeError
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.format import NumberFormat
from mpq.numerics.mappings import NotExpressible
from mpq.numerics.stored import take


class GgufBlockFormat(NumberFormat):
    """Base of the GGUF block types; subclasses set ``block`` (inputs per block), ``type_size``
    (bytes per block), ``from_blocks`` (row bytes → QuantizedWeight), ``kind`` (how the other
    writers' refusal names it) and ``min_note`` (what the min is, for the symmetric-args error).
    The native tensor (local key ``blocks``) holds each row's GGUF bytes."""

    awq_clip = False
    weighted_params = True
    kind = "GGUF block type"
    min_note = "a float16 min per block"

    def _init_type(self, name: str, bits: int, with_min: bool) -> None:
        self.name, self.bits, self.with_min = name, bits, with_min
        self.symmetric_only = not with_min
        self.holds_zero = not with_min
        self.offset = 0 if with_min else 1 << (bits - 1)
        reason = f"{name} weights (a {self.kind}; write --format gguf)"
        self.compressed_tensors = NotExpressible(reason)
        self.gptq_v1 = NotExpressible(reason)

    def check_weight_args(self, args: WeightArgs) -> None:
        super().check_weight_args(args)
        if self.with_min and args.symmetric:
            raise SchemeError(f"{self.name} is asymmetric ({self.min_note})",
                              hint="set symmetric: false")

    def implied_weights(self, merged):
        implied = super().implied_weights(merged)
        if self.with_min:
            implied["symmetric"] = False
        return implied

    def describe(self, args: WeightArgs) -> str:
        return self.name

    def decode(self, tensors: Mapping[str, torch.Tensor], args: WeightArgs,
               shape: tuple[int, int], prefix: str = "") -> QuantizedWeight:
        n, k = shape
        rows = take(tensors, "blocks", (n, k // self.block * self.type_size), (torch.uint8,),
                    prefix)
        return self.from_blocks(rows, args, shape)

    def split_blocks(self, rows: torch.Tensor, shape: tuple[int, int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row bytes as blocks [N, K/block, type_size] and each block's leading float16 step
        d as fp32 [N, K/block] (the blocks that start with one: the legacy types, iq4_nl)."""
        n, k = shape
        blocks = rows.reshape(n, k // self.block, self.type_size)
        step = blocks[..., 0:2].contiguous().view(torch.float16).reshape(n, -1)
        return blocks, step.to(torch.float32)

    def native_bytes(self, args: WeightArgs, shape: tuple[int, int], *,
                     act_order: bool = False) -> int:
        n, k = shape
        return n * (k // self.block) * self.type_size

    def ideal_bits(self, args: WeightArgs, shape: tuple[int, int], *,
                   act_order: bool = False) -> float:
        return 8 * self.type_size / self.block
