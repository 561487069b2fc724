"""Calibration statistics that quantizers declare in ``needs``.

A collector sees every input batch of one linear layer (shape [..., K]) through ``add`` and
returns one tensor from ``result``.  The engine attaches collectors by name; it never knows
which algorithm asked for them.  In a multi-process run (mpq.engine.distributed) each process sees its
share of the batches and ``reduce`` combines the shares on every process before ``result``.
Sums are accumulated in float64 from each batch's float32 terms: exact (so the same whatever the
split) unless the terms span more than about 2^25 in magnitude.
"""
from __future__ import annotations

from typing import Protocol

import torch

from mpq.errors import CalibrationError
from mpq.registry import Registry


class StatCollector(Protocol):
    """``paired`` collectors (class attribute true) compare a layer's inputs with the float
    model's inputs of the same layer on the same tokens: they get ``add(x, reference)`` with the
    float inputs from the engine's float stream (mpq.engine.float_stream)."""

    count: int  # calibration tokens seen so far

    def add(self, x: torch.Tensor) -> None: ...

    def reduce(self, ranks) -> None: ...  # combine every process's share (mpq.engine.distributed)

    def result(self) -> torch.Tensor: ...


def _reduce_tensor(ranks, value: torch.Tensor | None, count: int, combine) -> tuple:
    """(value combined over ranks with ``combine`` (Ranks.all_sum/all_max), total count);
    ranks that saw no token contribute zeros (neutral for sums and for maxima of |x|)."""
    shapes = ranks.gather((count, None if value is None else
                           (tuple(value.shape), value.dtype, str(value.device))))
    known = next((shape for _, shape in shapes if shape is not None), None)
    total = sum(c for c, _ in shapes)
    if known is None:
        return value, total
    if value is None:
        value = torch.zeros(known[0], dtype=known[1], device=known[2])
    return combine(value), total


STATS: Registry[type] = Registry("statistic")


@STATS.register("input_absmax")
class InputAbsMax:
    """Per-input-channel max |x| over all calibration tokens (fp32 [K])."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        batch_max = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        self.value = batch_max if self.value is None else torch.maximum(self.value, batch_max)
        self.count += x.numel() // x.shape[-1]

    def reduce(self, ranks) -> None:
        self.value, self.count = _reduce_tensor(ranks, self.value, self.count, ranks.all_max)

    def result(self) -> torch.Tensor:
        return self.value


class _ChannelMean:
    """Per-input-channel mean of ``value(x)`` over all calibration tokens (fp32 [K])."""

    @staticmethod
    def value(x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        flat = self.value(x.detach().reshape(-1, x.shape[-1]).float())
        total = flat.sum(dim=0).double()
        self.total = total if self.total is None else self.total + total
        self.count += flat.shape[0]

    def reduce(self, ranks) -> None:
        self.total, self.count = _reduce_tensor(ranks, self.total, self.count, ranks.all_sum)

    def result(self) -> torch.Tensor:
        return (self.total / max(self.count, 1)).float()


@STATS.register("input_absmean")
class InputAbsMean(_ChannelMean):
    """Per-input-channel mean |x| over all calibration tokens (fp32 [K])."""

    value = staticmethod(torch.abs)


@STATS.register("input_sqmean")
class InputSqMean(_ChannelMean):
    """Per-input-channel mean x² over all calibration tokens (fp32 [K]): the diagonal of GPTQ's
    Hessian up to its factor 2, without the [K, K] work; the importance of each input column
    (an "importance matrix" in llama.cpp's words)."""

    value = staticmethod(torch.square)


@STATS.register("input_sample")
class InputSample:
    """The first ``ROWS`` calibration tokens' inputs, in order (fp32 [≤ ROWS, K]): for searches
    that must run the real (non-linear) quantized computation, e.g. SmoothQuant's alpha."""

    ROWS = 4096

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        if self.rows >= self.ROWS:
            return
        flat = x.detach().reshape(-1, x.shape[-1])[:self.ROWS - self.rows].float().clone()
        self.parts.append(flat)
        self.rows += flat.shape[0]

    @property
    def count(self) -> int:
        return self.rows

    def reduce(self, ranks) -> None:
        mine = torch.cat(self.parts).cpu() if self.parts else None
        device = self.parts[0].device if self.parts else "cpu"
        parts = [p for p in ranks.gather(mine) if p is not None]
        self.parts = [torch.cat(parts)[:self.ROWS].to(device)] if parts else []
        self.rows = self.parts[0].shape[0] if self.parts else 0

    def result(self) -> torch.Tensor:
        return torch.cat(self.parts)


@STATS.register("hessian")
class Hessian:
    """GPTQ's layer Hessian H = (2/T)·Σ_t x_t x_tᵀ over all T calibration tokens (fp32 [K, K]).

    Each batch's xᵀx is computed in fp32 and added to an fp64 running sum (see the module
    docstring); ``result`` is fp32.  The scale does not change GPTQ's solution (damping is
    relative to mean diag H) but keeps the reference's error measure comparable.  Only the
    upper triangle is computed (row bands of BAND columns), about 0.6× the work of a full xᵀx;
    ``result`` mirrors it, so H is exactly symmetric.
    """

    BAND = 192

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        k = flat.shape[1]
        if self.total is None:
            self.total = torch.zeros(k, k, dtype=torch.float64, device=flat.device)
        for start in range(0, k, self.BAND):
            band = flat[:, start:start + self.BAND]
            self.total[start:start + self.BAND, start:] += band.t() @ flat[:, start:]
        self.count += flat.shape[0]

    def reduce(self, ranks) -> None:
        self.total, self.count = _reduce_tensor(ranks, self.total, self.count, ranks.all_sum)

    def result(self) -> torch.Tensor:
        upper = torch.triu(self.total)
        return ((upper + torch.triu(upper, diagonal=1).t()) * (2.0 / max(self.count, 1))).float()


@STATS.register("float_cross")
class FloatCross:
    """GPTAQ's cross term (2/T)·Σ_t (x̃_t − x_t) x_tᵀ (fp32 [K, K]), x̃ the float model's input
    of the layer and x its input in the partially quantized model, on the same token; scaled
    like :class:`Hessian`, so the two combine without a factor.  Sums are fp64 (module
    docstring)."""

    paired = True

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor, reference: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        ref = reference.detach().to(flat.device).reshape(-1, x.shape[-1]).float()
        if ref.shape != flat.shape:
            raise CalibrationError(f"the float model's inputs ({tuple(ref.shape)}) do not match "
                                   f"the quantized model's ({tuple(flat.shape)}) for a layer",
                                   hint="this is a bug in the float stream; please report it")
        cross = (ref - flat).t() @ flat
        if self.total is None:
            self.total = torch.zeros_like(cross, dtype=torch.float64)
        self.total += cross
        self.count += flat.shape[0]

    def reduce(self, ranks) -> None:
        self.total, self.count = _reduce_tensor(ranks, self.total, self.count, ranks.all_sum)

    def result(self) -> torch.Tensor:
        return (self.total * (2.0 / max(self.count, 1))).float()


@STATS.register("input_outliers")
class InputOutliers:
    """Outlier statistics of a layer's input over all its elements (every channel of every
    calibration token), for the calibration coverage report (mpq.calibration.coverage):
    ``result`` is fp64 [tokens, max|x|, p99 |x|, p99.9 |x|, kurtosis].

    The percentiles come from a histogram of |x| over the float32 bit patterns: a bin is the
    exponent and the top :data:`MANTISSA_BITS` mantissa bits (16 bins per octave, each at most
    6.25 % wide), a percentile is its bin's upper edge, capped at max|x|.  The kurtosis
    (Pearson's, 3 for a Gaussian) comes from the sums of x, x², x³, x⁴: float32 per batch, added
    in float64 (as the other statistics, the module docstring)."""

    MANTISSA_BITS = 4
    SHIFT = 23 - MANTISSA_BITS
    BINS = 1 << (31 - SHIFT)  # every non-negative float32 bit pattern, inf and NaN included

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # fp64 [elements, Σx, Σx², Σx³, Σx⁴, histogram...]
        self.absmax: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float().contiguous()
        bins = flat.view(torch.int32).bitwise_and(0x7FFFFFFF).bitwise_right_shift_(self.SHIFT)
        histogram = torch.bincount(bins, minlength=self.BINS)
        del bins
        square = flat * flat
        moments = torch.stack([flat.sum(), square.sum(), (square * flat).sum(),
                               square.mul_(square).sum()])
        elements = torch.full((1,), flat.numel(), dtype=torch.float64, device=flat.device)
        sums = torch.cat([elements, moments.double(), histogram.double()])
        batch_max = flat.abs().amax().reshape(1)
        self.sums = sums if self.sums is None else self.sums + sums
        self.absmax = batch_max if self.absmax is None else torch.maximum(self.absmax, batch_max)
        self.count += x.numel() // x.shape[-1]

    def reduce(self, ranks) -> None:
        tokens = self.count
        self.sums, self.count = _reduce_tensor(ranks, self.sums, tokens, ranks.all_sum)
        self.absmax, _ = _reduce_tensor(ranks, self.absmax, tokens, ranks.all_max)

    def result(self) -> torch.Tensor:
        n, s1, s2, s3, s4 = self.sums[:5].tolist()
        absmax = float(self.absmax.item())
        mean = s1 / n
        variance = s2 / n - mean * mean
        fourth = s4 / n - 4 * mean * s3 / n + 6 * mean * mean * s2 / n - 3 * mean ** 4
        kurtosis = fourth / (variance * variance) if variance > 0 else 0.0
        cumulative = torch.cumsum(self.sums[5:].cpu(), 0)

        def percentile(q: float) -> float:
            index = int(torch.searchsorted(cumulative, torch.tensor(q * n, dtype=torch.float64)))
            if index + 1 >= self.BINS:
                return absmax
            edge = torch.tensor([(index + 1) << self.SHIFT], dtype=torch.int32)
            return min(float(edge.view(torch.float32)), absmax)

        return torch.tensor([self.count, absmax, percentile(0.99), percentile(0.999), kurtosis],
                            dtype=torch.float64)
