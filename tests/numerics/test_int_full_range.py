"""The symmetric int grid with ``full_range`` (signed-extreme scales): the extreme weight lands on
q_min exactly, every level is used, the error beats absmax scales at low bits, and the solvers
(RTN's and GPTQ's clip search, autoround's tuned grid) follow it."""
from __future__ import annotations

import pytest
import torch

from mpq.errors import SchemeError
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import NUMBER_FORMATS
from mpq.numerics.int_grid import (int_dequantize_codes, int_quantize_codes, int_range,
                                     signed_extreme)
from mpq.quantizers.autoround_grid import TunedIntWeight
from mpq.quantizers.clip_search import searched_int_params

GRID = NUMBER_FORMATS.get("int")


def full(bits: int, **kw) -> WeightArgs:
    return WeightArgs(bits=bits, full_range=True, **{"granularity": "group", "group_size": 16,
                                                      **kw})


def weights(n=8, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gran, gs", [("group", 16), ("channel", None), ("tensor", None)])
def test_the_extreme_lands_on_q_min_and_the_error_is_within_one_step(bits, gran, gs):
    w = weights(seed=bits)
    args = full(bits, granularity=gran, group_size=gs)
    qw = GRID.quantize(w, args)
    x = GRID.dequantize(qw)
    groups = w.reshape(qw.scale.shape[0], qw.scale.shape[1], -1)
    extreme = signed_extreme(groups)
    assert torch.equal(qw.scale, extreme / int_range(bits)[0])
    assert bool(((qw.scale < 0) == (extreme > 0)).all())  # negative where the extreme is positive
    lowest = qw.codes.reshape(groups.shape).amin(dim=-1)
    assert bool((lowest == 0).all())  # every group reaches q_min (unsigned code 0)
    step = qw.scale.abs().repeat_interleave(groups.shape[-1], dim=-1).reshape(w.shape) \
        if gran != "tensor" else qw.scale.abs()
    assert bool(((w - x).abs() <= step * (1 + 1e-6)).all())


def test_ties_take_the_positive_extreme():
    v = torch.tensor([[[2.0, -2.0, 0.5, 1.0]]])
    assert float(signed_extreme(v)) == 2.0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lower_error_than_absmax_scales_at_low_bits(bits):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    errors = {}
    for name, args in (("absmax", WeightArgs(bits=bits, group_size=64)),
                       ("full", full(bits, group_size=64))):
        errors[name] = float((GRID.dequantize(GRID.quantize(w, args)) - w).pow(2).mean())
    assert errors["full"] < 0.9 * errors["absmax"]


def test_half_precision_scales_keep_their_sign():
    w = weights()
    qw = GRID.quantize(w, full(4, scale_dtype="fp16"))
    assert bool((qw.scale < 0).any()) and bool((qw.scale > 0).any())
    assert torch.equal(qw.scale, qw.scale.half().float())
    tiny = GRID.quantize(torch.full((2, 16), 1e-9), full(4, scale_dtype="fp16"))
    assert bool((tiny.scale < 0).all())  # raised to fp16's smallest normal, sign kept


def test_clip_search_starts_from_the_full_range_scale_and_never_does_worse():
    w = weights(seed=4)
    args = full(3)
    plain = GRID.quantize(w, args)
    scale, zero = searched_int_params(w, args)
    assert zero is None
    assert bool((scale.sign() == plain.scale.sign()).all())
    assert bool((scale.abs() <= plain.scale.abs()).all())

    def error(s):
        codes = int_quantize_codes(w, s, None, args.bits)
        return float((int_dequantize_codes(codes, s, None, args.bits) - w).pow(2).sum())

    assert error(scale) <= error(plain.scale)
    assert error(scale) < error(plain.scale) * 0.99  # the search finds something here


def test_tuned_grid_without_tuning_is_the_full_range_rtn():
    w = weights(seed=5)
    args = full(2)
    rtn = GRID.quantize(w, args)
    tuned = TunedIntWeight(w, args).export()
    assert torch.equal(tuned.codes, rtn.codes) and torch.equal(tuned.scale, rtn.scale)
    assert torch.equal(TunedIntWeight(w, args).dequantized(), GRID.dequantize(rtn))


@pytest.mark.parametrize("weights_, message", [
    ({"format": "int", "symmetric": False}, "full_range applies to symmetric scales only"),
    ({"format": "nf4", "bits": 4, "group_size": 64}, "full_range applies to int only, not nf4"),
])
def test_refused_where_it_has_no_meaning(weights_, message):
    with pytest.raises(SchemeError, match=message):
        WeightArgs(full_range=True, **weights_)


def test_label_and_dict():
    args = full(2, group_size=64)
    assert args.describe() == "int2 sym full-range g64"
    assert args.to_dict()["full_range"] is True
    assert "full_range" not in WeightArgs(bits=2, group_size=64).to_dict()
