"""Clipping search for int scales (mpq.quantizers.clip_search) and GPTQ's ``clip_search`` option."""
from __future__ import annotations

import pytest
import torch

import mpq.quantizers  # noqa: F401
from mpq.errors import SchemeError
from mpq.quantizers.base import QUANTIZERS
from mpq.quantizers.clip_search import searched_int_params
from mpq.quantizers.gptq_options import GPTQOptions
from mpq.quantizers.gptq_solve import gptq_solve
from mpq.numerics.int_grid import int_dequantize_codes, int_params, int_quantize_codes
from mpq.numerics.args import WeightArgs
from mpq.config.scheme import LayerScheme

ARGS = [
    WeightArgs(bits=4, granularity="channel", group_size=None),
    WeightArgs(bits=3, symmetric=False, granularity="channel", group_size=None),
    WeightArgs(bits=4, group_size=16),
    WeightArgs(bits=4, symmetric=False, group_size=32),
    WeightArgs(bits=8, granularity="tensor", group_size=None),
]


def heavy_tailed(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * (1 + 4 * (torch.rand(n, k, generator=g) > 0.98))


def weighted_error(w, scale, zero, args, c) -> torch.Tensor:
    codes = int_quantize_codes(w, scale, zero, args.bits)
    d = (int_dequantize_codes(codes, scale, zero, args.bits) - w).square() * c
    return d.sum()


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.describe())
def test_search_never_worse_than_min_max_and_usually_better(args):
    w = heavy_tailed(24, 64)
    c = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 3
    s0, z0 = int_params(w, args)
    s1, z1 = searched_int_params(w, args, c)
    assert s1.shape == s0.shape and (z1 is None) == (z0 is None)
    if z1 is not None:
        assert z1.dtype == torch.int32
    searched, min_max = weighted_error(w, s1, z1, args, c), weighted_error(w, s0, z0, args, c)
    assert searched < min_max if args.bits <= 4 else searched <= min_max
    # per scale, the searched range is never wider than min-max's
    assert bool((s1 <= s0 * (1 + 1e-6)).all())


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.describe())
def test_one_step_is_min_max(args):
    w = heavy_tailed(8, 64, seed=2)
    s0, z0 = int_params(w, args)
    s1, z1 = searched_int_params(w, args, None, steps=1)
    assert torch.equal(s0, s1) and (z0 is None or torch.equal(z0, z1))


def test_column_weights_steer_the_search():
    """A column that dominates the error weights keeps its outlier representable."""
    args = WeightArgs(bits=3, granularity="channel", group_size=None)
    w = torch.full((1, 32), 0.15)
    w[0, 0] = 1.0
    c_out = torch.ones(32)
    c_out[0] = 1e4
    s_keep, _ = searched_int_params(w, args, c_out)
    s_clip, _ = searched_int_params(w, args, torch.ones(32))
    assert float(s_keep) > float(s_clip)


def calib(n=32, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8 * k, k, generator=g) * (1 + torch.rand(k, generator=g) * 3)
    return heavy_tailed(n, k, seed), 2 / x.shape[0] * x.T @ x


def output_loss(w, q, h) -> float:
    d = (w - q).double()
    return float(torch.trace(d @ h.double() @ d.T))


@pytest.mark.parametrize("args,options", [
    (ARGS[0], {"act_order": True}),
    (ARGS[1], {}),
    (ARGS[2], {"act_order": True, "static_groups": True}),
    (ARGS[3], {"act_order": True}),
], ids=["int4-ch-act", "int3-asym-ch", "int4-g16-static", "int4-asym-g32-act"])
def test_gptq_clip_search_lowers_the_output_error(args, options):
    w, h = calib()
    plain = gptq_solve(w, h, args, GPTQOptions(**options))
    searched = gptq_solve(w, h, args, GPTQOptions(clip_search=True, **options))
    assert output_loss(w, searched.q, h) < output_loss(w, plain.q, h)
    qw = QUANTIZERS.get("gptq").quantize(
        w, LayerScheme("gptq", args, tuple(sorted({**options, "clip_search": True}.items()))),
        {"hessian": h})
    assert torch.equal(qw.dequantize(), searched.q)  # the stored params are the searched ones


def test_gptq_clip_search_is_refused_where_the_grid_has_no_search():
    nf4 = WeightArgs(format="nf4", bits=4, group_size=64)
    with pytest.raises(SchemeError, match="clip_search supports the int, .*q4_k.* formats only, "
                                          "not nf4") as exc:
        QUANTIZERS.get("gptq").check(LayerScheme("gptq", nf4, (("clip_search", True),)))
    assert exc.value.hint
