"""GPTQ on the GGUF block grids in activation order (static groups) and with the clipping search
weighted by diag H; the weighted parameter search of RTN on the same grids."""
from __future__ import annotations

import pytest
import torch

from mpq.config.scheme import LayerScheme
from mpq.errors import SchemeError
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import QuantizedWeight
from mpq.numerics.format import NUMBER_FORMATS
from mpq.quantizers.base import QUANTIZERS
from mpq.quantizers.gptq_options import GPTQOptions
from mpq.quantizers.gptq_solve import gptq_solve

gguf = pytest.importorskip("gguf")

# one of each kind: legacy without and with a min, K-quants with and without a min, iq4_nl
NAMES = ["q4_0", "q5_1", "q4_k", "q6_k", "iq4_nl"]
K = 512


def args_of(name: str) -> WeightArgs:
    fmt = NUMBER_FORMATS.get(name)
    return WeightArgs(format=name, bits=fmt.bits, group_size=fmt.block,
                      symmetric=not fmt.with_min)


def problem(seed: int = 3):
    """A weight [16, K] and a Hessian of uneven, correlated inputs (act-order has work to do)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, K, generator=gen) * 0.05
    x = torch.randn(1024, K, generator=gen)
    x[:, 200:216] *= 10  # important columns in the middle of a block, not at its start
    x[:, 300:310] += x[:, 200:210]
    return w, 2 * x.t() @ x / x.shape[0]


def gguf_dequant(name: str, blocks: torch.Tensor) -> bytes:
    kind = getattr(gguf.GGMLQuantizationType, name.upper())
    return gguf.quants.dequantize(blocks.numpy(), kind).astype("float32").tobytes()


def weighted_error(w: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> float:
    return float(((w - q) ** 2 * c).sum())


@pytest.mark.parametrize("name", NAMES)
def test_act_order_needs_static_groups(name):
    w, h = problem()
    with pytest.raises(SchemeError, match="needs static_groups") as exc:
        gptq_solve(w, h, args_of(name), GPTQOptions(act_order=True))
    assert exc.value.hint == "add static_groups: true"
    scheme = LayerScheme("gptq", args_of(name), (("act_order", True),))
    with pytest.raises(SchemeError, match="needs static_groups"):
        QUANTIZERS.get("gptq").check(scheme)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("clip_search", [False, True])
def test_act_order_with_static_groups_is_exact_in_gguf(name, clip_search):
    fmt, args = NUMBER_FORMATS.get(name), args_of(name)
    w, h = problem()
    options = GPTQOptions(act_order=True, static_groups=True, clip_search=clip_search)
    res = gptq_solve(w, h, args, options)
    assert res.g_idx is None  # every column stayed in its block: nothing to store
    qw = QuantizedWeight(args=args, shape=tuple(w.shape), codes=res.codes, scale=res.scale,
                         zero=res.zero)
    assert torch.equal(qw.dequantize(), res.q)
    assert gguf_dequant(name, fmt.encode(qw)["blocks"]) == res.q.numpy().tobytes()
    if not clip_search:  # static groups: the blocks' parameters are RTN's of the float rows
        assert torch.equal(res.scale, fmt.quantize(w, args).scale)

    def loss(q):
        d = w - q
        return float(torch.einsum("nk,kl,nl->", d, h, d))

    in_order = gptq_solve(w, h, args, GPTQOptions(static_groups=True, clip_search=clip_search))
    assert loss(res.q) < loss(in_order.q)  # the important columns first pays off here


@pytest.mark.parametrize("name", NAMES)
def test_weighted_parameters_lower_the_weighted_error(name):
    fmt, args = NUMBER_FORMATS.get(name), args_of(name)
    w, h = problem(5)
    c = h.diagonal().clone()
    plain = fmt.quantize(w, args).dequantize()
    searched = fmt.quantize(w, args, col_weight=c).dequantize()
    assert weighted_error(w, searched, c) < weighted_error(w, plain, c)
    if name != "iq4_nl":  # the plain choice is a candidate: no block gets worse
        blocks = (w.shape[0], K // fmt.block, fmt.block)
        err = lambda q: ((w - q) ** 2 * c).reshape(blocks).sum(-1)  # noqa: E731
        assert bool((err(searched) <= err(plain)).all())


def test_gptq_clip_search_beats_plain_gptq_on_the_output_error():
    args = args_of("q4_0")
    w, h = problem(7)

    def loss(q):
        d = w - q
        return float(torch.einsum("nk,kl,nl->", d, h, d))

    plain = gptq_solve(w, h, args, GPTQOptions(act_order=True, static_groups=True))
    clip = gptq_solve(w, h, args, GPTQOptions(act_order=True, static_groups=True,
                                              clip_search=True))
    assert loss(clip.q) < loss(plain.q)


@pytest.mark.parametrize("name", ["q5_0", "q4_k"])
def test_rtn_activation_search_on_gguf_grids(name):
    fmt, args = NUMBER_FORMATS.get(name), args_of(name)
    w, h = problem(9)
    sqmean = h.diagonal() / 2
    scheme = LayerScheme("rtn", args, (("scale_search", "activations"),))
    qw = QUANTIZERS.get("rtn").quantize(w, scheme, {"input_sqmean": sqmean})
    assert qw.info["scale_search"] == "activations"
    assert torch.equal(qw.dequantize(), fmt.quantize(w, args, col_weight=sqmean).dequantize())
    plain = fmt.quantize(w, args).dequantize()
    assert weighted_error(w, qw.dequantize(), sqmean) < weighted_error(w, plain, sqmean)
