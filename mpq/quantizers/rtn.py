"""Round-to-nearest (RTN): quantize each weight on its number format's grid.

Option (recipe ``options:``, optional): ``scale_search`` — ``none`` (default: min-max scales, no
calibration data), ``auto`` (``activations`` when the run has calibration data, else ``none``:
the RTN presets' setting, so ``--calib`` is all it takes to get the better scales), ``mse`` (each scale's clipping range searched for the smallest squared
rounding error, :func:`mpq.quantizers.clip_search.searched_int_params`; no calibration data) or
``activations`` (the same search with each input column's error weighted by its importance,
the mean x² of its calibration inputs, statistic ``input_sqmean``: llama.cpp's importance
matrix, llm-compressor's imatrix-MSE observer; needs calibration data).  A search keeps min-max
wherever no shrunk range is strictly better, so it is never worse than min-max on the error it
measures.  Searches apply to the int grid (its clipping search) and to the formats that choose
their block parameters by a weighted error (``weighted_params``: the GGUF block types, whose
own search then takes the importance; ``mse`` weights every column 1).
"""
from __future__ import annotations

from typing import Mapping

import torch

from mpq.config.scheme import LayerScheme
from mpq.errors import SchemeError, did_you_mean
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import NUMBER_FORMATS, QuantizedWeight
from mpq.numerics.format import format_names
from mpq.numerics.int_grid import int_quantize_codes, prepare_weight
from mpq.quantizers.base import QUANTIZERS
from mpq.quantizers.clip_search import searched_int_params

SCALE_SEARCHES = ("none", "auto", "mse", "activations")
IMPORTANCE = "input_sqmean"


def _searchable(fmt: str) -> bool:
    return fmt == "int" or NUMBER_FORMATS.get(fmt).weighted_params


def scale_search_of(scheme: LayerScheme) -> str:
    """The scheme's validated ``scale_search`` (SchemeError for unknown options or values)."""
    options = dict(scheme.options)
    for name in options:
        if name != "scale_search":
            raise SchemeError(f"unknown rtn option '{name}'",
                              hint=did_you_mean(name, ["scale_search"]) or "known: scale_search")
    search = options.get("scale_search", "none")
    if search not in SCALE_SEARCHES:
        raise SchemeError(f"rtn scale_search must be one of {', '.join(SCALE_SEARCHES)}, got "
                          f"{search!r}", hint="e.g. scale_search: activations")
    if search not in ("none", "auto") and not _searchable(scheme.weights.format):
        names = ", ".join(format_names(lambda f: _searchable(f.name)))
        raise SchemeError(f"rtn scale_search supports the {names} formats only, not "
                          f"{scheme.weights.format}", hint="remove scale_search")
    return search


class RTNQuantizer:
    """Delegates to ``NUMBER_FORMATS[scheme.weights.format].quantize``, or searches the int
    scales (module docstring); needs ``input_sqmean`` only with ``scale_search: activations``,
    and uses it with ``auto`` when the run has calibration data."""

    name = "rtn"
    needs: frozenset[str] = frozenset()

    def check(self, scheme: LayerScheme) -> None:
        scale_search_of(scheme)

    def needs_for(self, scheme: LayerScheme) -> frozenset[str]:
        return frozenset({IMPORTANCE}) if scale_search_of(scheme) == "activations" else self.needs

    def wants_for(self, scheme: LayerScheme) -> frozenset[str]:
        auto = scale_search_of(scheme) == "auto" and _searchable(scheme.weights.format)
        return frozenset({IMPORTANCE}) if auto else frozenset()

    def quantize(self, weight: torch.Tensor, scheme: LayerScheme,
                 stats: Mapping[str, torch.Tensor]) -> QuantizedWeight:
        search = scale_search_of(scheme)
        if search == "auto":  # the statistic is there when the run has calibration data
            usable = _searchable(scheme.weights.format) and IMPORTANCE in stats
            search = "activations" if usable else "none"
        if search == "none":
            return NUMBER_FORMATS.get(scheme.weights.format).quantize(weight, scheme.weights)
        importance = None
        if search == "activations":
            importance = stats.get(IMPORTANCE)
            if importance is None:
                raise SchemeError(f"rtn scale_search: activations needs the '{IMPORTANCE}' "
                                  "calibration statistic", hint="run with calibration data")
        return searched_rtn(weight, scheme.weights, importance)


def searched_rtn(weight: torch.Tensor, args: WeightArgs,
                 importance: torch.Tensor | None) -> QuantizedWeight:
    """``weight`` [N, K] rounded to nearest on scales searched against the rounding error (int: the
    clipping search; the GGUF block types: their weighted parameter search),
    each input column's error weighted by ``importance`` [K] (None: all 1)."""
    w = prepare_weight(weight, args, args.format)
    if importance is not None and tuple(importance.shape) != (w.shape[1],):
        raise SchemeError(f"rtn: importance shape {tuple(importance.shape)} does not match the "
                          f"weight's input dimension {w.shape[1]}")
    info = {"scale_search": "activations" if importance is not None else "mse"}
    fmt = NUMBER_FORMATS.get(args.format)
    if fmt.weighted_params:
        col_weight = importance if importance is not None else torch.ones(w.shape[1])
        qw = fmt.quantize(w, args, col_weight=col_weight)
        qw.info.update(info)
        return qw
    scale, zero = searched_int_params(w, args, importance)
    codes = int_quantize_codes(w, scale, zero, args.bits)
    return QuantizedWeight(args=args, shape=tuple(w.shape), codes=codes, scale=scale, zero=zero,
                           info=info)


RTN = QUANTIZERS.register("rtn")(RTNQuantizer())


def rtn_dequant(weight: torch.Tensor, args: WeightArgs) -> torch.Tensor:
    """``weight`` [N, K] rounded to nearest on ``args``' grid and dequantized (fp32): what a
    search scores a candidate by."""
    return NUMBER_FORMATS.get(args.format).quantize(weight, args).dequantize(torch.float32)
