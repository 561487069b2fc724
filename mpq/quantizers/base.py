"""The quantizer contract: one entry point, ``quantize(weight, scheme, stats)``, and the
calibration statistics it ``needs``; the engine reads ``needs`` and never branches on names."""
from __future__ import annotations

from typing import Mapping, Protocol

import torch

from mpq.config.scheme import LayerScheme
from mpq.numerics.base import QuantizedWeight
from mpq.registry import Registry


class Quantizer(Protocol):
    """An algorithm producing a QuantizedWeight from a float weight [N, K] and statistics.

    ``check(scheme)`` runs at plan time, before any weight is touched: it raises SchemeError for
    options the algorithm does not know or weight args it cannot produce.  ``needs`` are the
    statistics every scheme of the algorithm needs; one whose options ask for more also defines
    ``needs_for(scheme)`` (read through :func:`scheme_needs`).  Statistics a scheme uses only
    when the run has calibration data (and does without otherwise) come from an optional
    ``wants_for(scheme)`` (read through :func:`scheme_wants`).
    """

    name: str
    needs: frozenset[str]

    def check(self, scheme: LayerScheme) -> None: ...

    def quantize(self, weight: torch.Tensor, scheme: LayerScheme,
                 stats: Mapping[str, torch.Tensor]) -> QuantizedWeight: ...


QUANTIZERS: Registry[Quantizer] = Registry("quantizer")


def scheme_needs(quantizer: Quantizer, scheme: LayerScheme) -> frozenset[str]:
    """The statistics ``quantizer`` needs for ``scheme``: ``needs_for(scheme)`` where the
    quantizer defines it (options that ask for statistics), else its ``needs``."""
    needs_for = getattr(quantizer, "needs_for", None)
    return frozenset(needs_for(scheme)) if needs_for is not None else quantizer.needs


def scheme_wants(quantizer: Quantizer, scheme: LayerScheme) -> frozenset[str]:
    """The statistics ``quantizer`` uses for ``scheme`` when the run has calibration data and
    does without when it has none (``wants_for(scheme)`` where defined, else none)."""
    wants_for = getattr(quantizer, "wants_for", None)
    return frozenset(wants_for(scheme)) if wants_for is not None else frozenset()
