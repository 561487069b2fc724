"""RTN's scale_search option: the activation-weighted (importance) and plain MSE clipping
searches, never worse than min-max on the error they measure; option checks."""
from __future__ import annotations

import pytest
import torch

from mpq.config.scheme import LayerScheme
from mpq.errors import SchemeError
from mpq.numerics.args import WeightArgs
from mpq.quantizers.base import QUANTIZERS, scheme_needs

RTN = QUANTIZERS.get("rtn")
ARGS = [
    WeightArgs(bits=4, group_size=64),
    WeightArgs(bits=3, symmetric=False, group_size=32),
    WeightArgs(bits=2, granularity="channel", group_size=None),
    WeightArgs(bits=8, symmetric=False, granularity="channel", group_size=None),
    WeightArgs(bits=4, granularity="tensor", group_size=None),
]


def _scheme(args, search=None):
    return LayerScheme("rtn", args, (("scale_search", search),) if search else ())


def _weighted_error(w, q, importance):
    return float(((w - q).square() * importance).sum())


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.describe())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_activation_weighted_search_never_worse_than_min_max(args, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 128, generator=gen) * torch.rand(1, 128, generator=gen) * 3
    importance = torch.rand(128, generator=gen) ** 6 * 100  # a few loud input channels
    importance[:5] = 0  # dead inputs
    plain = RTN.quantize(w, _scheme(args), {}).dequantize()
    searched = RTN.quantize(w, _scheme(args, "activations"), {"input_sqmean": importance})
    assert searched.info == {"scale_search": "activations"}
    weighted = _weighted_error(w, searched.dequantize(), importance)
    assert weighted <= _weighted_error(w, plain, importance) + 1e-6
    mse = RTN.quantize(w, _scheme(args, "mse"), {}).dequantize()
    assert float((w - mse).square().sum()) <= float((w - plain).square().sum()) + 1e-6


def test_weighted_search_beats_min_max_on_outliers():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=gen)
    w[:, ::16] *= 6  # an outlier per group stretches the min-max range
    importance = torch.ones(128)
    importance[::16] = 1e-3  # ... on inputs that hardly matter
    args = WeightArgs(bits=3, group_size=64)
    plain = RTN.quantize(w, _scheme(args), {}).dequantize()
    searched = RTN.quantize(w, _scheme(args, "activations"), {"input_sqmean": importance})
    assert (_weighted_error(w, searched.dequantize(), importance)
            < 0.8 * _weighted_error(w, plain, importance))


def test_none_is_min_max_and_needs_follow_the_option():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    args = WeightArgs(bits=4, group_size=32)
    plain, none = RTN.quantize(w, _scheme(args), {}), RTN.quantize(w, _scheme(args, "none"), {})
    assert torch.equal(plain.codes, none.codes) and torch.equal(plain.scale, none.scale)
    assert scheme_needs(RTN, _scheme(args)) == frozenset()
    assert scheme_needs(RTN, _scheme(args, "mse")) == frozenset()
    assert scheme_needs(RTN, _scheme(args, "activations")) == {"input_sqmean"}


@pytest.mark.parametrize("scheme, message", [
    (LayerScheme("rtn", WeightArgs(bits=4, group_size=32), (("scale_serch", "mse"),)),
     "did you mean 'scale_search'"),
    (LayerScheme("rtn", WeightArgs(bits=4, group_size=32), (("scale_search", "hessian"),)),
     "must be one of none, auto, mse, activations"),
    (LayerScheme("rtn", WeightArgs(format="nf4", bits=4, group_size=64),
                 (("scale_search", "activations"),)), "supports the int, .*q4_k.* formats only, not nf4"),
])
def test_bad_options_are_scheme_errors(scheme, message):
    with pytest.raises(SchemeError, match=message):
        RTN.check(scheme)


def test_missing_statistic_is_a_scheme_error():
    with pytest.raises(SchemeError, match="input_sqmean"):
        RTN.quantize(torch.randn(4, 32), _scheme(WeightArgs(bits=4, group_size=32),
                                                 "activations"), {})
