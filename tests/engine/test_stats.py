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


def test_input_sqmean_is_the_mean_square_per_channel():
    x = torch.tensor([[[1.0, -4.0], [-3.0, 2.0]]])
    collector = STATS.get("input_sqmean")()
    collector.add(x)
    collector.add(2 * x)
    assert collector.count == 4
    torch.testing.assert_close(collector.result(), torch.tensor([(1 + 9 + 4 + 36) / 4,
                                                                 (16 + 4 + 64 + 16) / 4]))


def test_float_cross_is_the_scaled_cross_term_and_zero_without_a_difference():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 6, generator=gen) for _ in range(2)]
    refs = [x + 0.1 * torch.randn(x.shape, generator=gen) for x in xs]
    collector, same = STATS.get("float_cross")(), STATS.get("float_cross")()
    assert getattr(STATS.get("float_cross"), "paired", False)
    for x, ref in zip(xs, refs):
        collector.add(x, ref)
        same.add(x, x.clone())
    flat = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    delta = torch.cat([r.reshape(-1, 6) for r in refs]).double() - flat
    torch.testing.assert_close(collector.result().double(),
                               (2.0 / flat.shape[0]) * delta.t() @ flat, rtol=1e-5, atol=1e-6)
    assert torch.equal(same.result(), torch.zeros(6, 6))


def test_float_cross_refuses_inputs_of_another_shape():
    from mpq.errors import CalibrationError

    with pytest.raises(CalibrationError, match="do not match"):
        STATS.get("float_cross")().add(torch.zeros(4, 6), torch.zeros(3, 6))
