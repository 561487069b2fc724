"""Round-to-nearest (RTN): quantize each weight on its number format's grid, no calibration data."""
from __future__ import annotations

from typing import Mapping

import torch

from mpq.numerics.base import NUMBER_FORMATS, QuantizedWeight
from mpq.quantizers.base import QUANTIZERS
from mpq.errors import SchemeError
from mpq.numerics.args import WeightArgs
from mpq.config.scheme import LayerScheme


class RTNQuantizer:
    """Delegates to ``NUMBER_FORMATS[scheme.weights.format].quantize``; needs no statistics."""

    name = "rtn"
    needs: frozenset[str] = frozenset()

    def check(self, scheme: LayerScheme) -> None:
        if scheme.options:
            names = ", ".join(name for name, _ in scheme.options)
            raise SchemeError(f"rtn takes no options, got: {names}", hint="remove options")

    def quantize(self, weight: torch.Tensor, scheme: LayerScheme,
                 stats: Mapping[str, torch.Tensor]) -> QuantizedWeight:
        return NUMBER_FORMATS.get(scheme.weights.format).quantize(weight, scheme.weights)


RTN = QUANTIZERS.register("rtn")(RTNQuantizer())


def rtn_dequant(weight: torch.Tensor, args: WeightArgs) -> torch.Tensor:
    """``weight`` [N, K] rounded to nearest on ``args``' grid and dequantized (fp32): what a
    search scores a candidate by."""
    return NUMBER_FORMATS.get(args.format).quantize(weight, args).dequantize(torch.float32)
