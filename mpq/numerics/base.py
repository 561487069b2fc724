"""The canonical quantized weight: :class:`QuantizedWeight` is the quantized state of one weight,
independent of any file format, so one state feeds the native, compressed-tensors and GPTQ
writers.  Int codes are *unsigned* (offset-binary, u = q + 2^(b-1)).

The number-format contract and its registry live in :mod:`mpq.numerics.format`
(``NUMBER_FORMATS`` is re-exported here).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mpq.numerics.args import WeightArgs
from mpq.numerics.format import NUMBER_FORMATS


@dataclass
class QuantizedWeight:
    """One quantized weight of logical shape [N=out, K=in].

    The number format's module (mpq/numerics/) documents its fields; the built-in ones
    (G = number of groups along K, 1 for tensor/channel):
    - int: ``codes`` uint8 [N, K] in 0..2^b-1; ``scale`` fp32 [N, G] (tensor: [1, 1]);
      ``zero`` None when symmetric (implicit 2^(b-1)), else int32 [N, G] in the unsigned domain.
      x̂ = (u − zero) · scale.
    - fp8_*: ``codes`` torch.float8_e4m3fn / float8_e5m2 [N, K]; ``scale`` fp32 [1, 1], [N, 1]
      or, granularity block (fp8_e4m3), [ceil(N/128), ceil(K/128)] (one per 128×128 tile).
    - nf4: ``codes`` uint8 [N, K] indices 0..15 into the NF4 table; ``scale`` fp32 [N, K/64] block
      absmax; with double quant, ``scale`` holds the dequantized absmax and ``extras`` the 8-bit
      codes and their fp32 scales/offset so a writer can store them.
    - mxfp4: ``codes`` uint8 [N, K] FP4 E2M1 codes 0..15 (bits sign|exp2|man1, the magnitude index
      0..7 of {0, .5, 1, 1.5, 2, 3, 4, 6} plus 8 when negative); ``scale`` uint8 [N, K/32] E8M0
      biased exponents E, x̂ = value · 2^(E−127).  (compressed-tensors' ``weight_scale`` as is.)
    - mxfp8: ``codes`` torch.float8_e4m3fn [N, K]; ``scale`` uint8 [N, K/32] as mxfp4.
    - nvfp4: ``codes`` uint8 [N, K] E2M1 codes as mxfp4; ``scale`` torch.float8_e4m3fn [N, K/16];
      ``extras["global_scale"]`` fp32 [1], a divisor: x̂ = value · (scale / global_scale).
    ``g_idx`` (int32 [K], optional) maps each input column to its group when columns were processed
    out of order (act-order).  ``info`` carries per-layer numbers for the plan (e.g. error, loss).
    """

    args: WeightArgs
    shape: tuple[int, int]
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return NUMBER_FORMATS.get(self.args.format).dequantize(self, dtype)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """The same weight with every tensor on ``device``."""
        def move(t):
            return t.to(device) if t is not None else None

        return replace(self, codes=move(self.codes), scale=move(self.scale), zero=move(self.zero),
                       g_idx=move(self.g_idx),
                       extras={k: v.to(device) for k, v in self.extras.items()})

