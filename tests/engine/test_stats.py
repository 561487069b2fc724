"""Calibration statistics against direct computations."""
from __future__ import annotations

import pytest
import torch

from mpq.engine.stats import STATS


@pytest.mark.parametrize("k", [7, 192, 450])
def test_hessian_is_the_exactly_symmetric_scaled_gram_matrix(k):
    gen = torch.Generator().manual_seed(k)
    batches = [torch.randn(2, 5, k, generator=gen) for _ in range(3)]
    collector = STATS.get("hessian")()
    for batch in batches:
        collector.add(batch)
    h = collector.result()
    flat = torch.cat([b.reshape(-1, k) for b in batches]).double()
    expected = (2.0 / flat.shape[0]) * flat.t() @ flat
    assert torch.equal(h, h.t())
    torch.testing.assert_close(h.double(), expected, rtol=1e-5, atol=1e-5)


def test_input_absmax_and_absmean():
    x = torch.tensor([[[1.0, -4.0], [-3.0, 2.0]]])
    absmax, absmean = STATS.get("input_absmax")(), STATS.get("input_absmean")()
    for collector in (absmax, absmean):
        collector.add(x)
        collector.add(-2 * x)
    assert absmax.result().tolist() == [6.0, 8.0]
    assert absmean.result().tolist() == pytest.approx([3.0, 4.5])
