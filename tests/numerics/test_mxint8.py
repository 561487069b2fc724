"""mxint8 (OCP MX v1.0 INT8 elements, E8M0 scale per 32 inputs): grid facts, an independent
per-element oracle, RTN error bounds, power-of-two equivariance, the native round trip and its
checks, and the recipe defaults."""
from __future__ import annotations

import math

import pytest
import torch

from mpq.config.recipe import parse_recipe
from mpq.errors import ArtifactError, SchemeError
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import NUMBER_FORMATS
from mpq.numerics.microscaling import e8m0_to_float
from mpq.numerics.mxint8 import element_codes, shared_exponent

ARGS = WeightArgs(format="mxint8", bits=8, group_size=32)
FMT = NUMBER_FORMATS.get("mxint8")


def _w(n=24, k=128, seed=0, scale=1.0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale


def oracle(w: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """Per element in Python floats: E = floor(log2 absmax) + 127, q = round-half-even of
    64·w/2^(E−127) clamped to ±127."""
    codes, exps = [], []
    for row in w.tolist():
        crow, erow = [], []
        for b in range(0, len(row), 32):
            block = row[b:b + 32]
            a = max(abs(v) for v in block)
            e = 0 if a == 0 else min(max(math.frexp(a)[1] - 1 + 127, 0), 254)
            x = 2.0 ** (e - 127)
            erow.append(e)
            crow += [max(-127, min(127, round(v / x * 64))) for v in block]
        codes.append(crow)
        exps.append(erow)
    return codes, exps


@pytest.mark.parametrize("scale", [1.0, 1e-3, 3e4, 2.0 ** -120])
def test_matches_the_oracle(scale):
    w = _w(scale=scale)
    qw = FMT.quantize(w, ARGS)
    codes, exps = oracle(w)
    assert qw.codes.dtype == torch.int8 and qw.scale.dtype == torch.uint8
    assert qw.codes.tolist() == codes and qw.scale.tolist() == exps


def test_shared_exponent_facts():
    a = torch.tensor([0.0, 1.0, 1.999, 2.0, 0.75, 2.0 ** -127, 1e-45, 3e38])
    assert shared_exponent(a).tolist() == [0, 127, 127, 128, 126, 0, 0, 254]


def test_element_codes_round_half_even_and_saturate():
    y = torch.tensor([1 / 128, 3 / 128, -3 / 128, 1.999, -1.999, 1.0, -2.0])
    assert element_codes(y).tolist() == [0, 2, -2, 127, -127, 64, -127]


def test_rtn_error_bounds():
    w = _w(64, 256, seed=3) * torch.logspace(-3, 2, 256)  # blocks of very different ranges
    qw = FMT.quantize(w, ARGS)
    step = e8m0_to_float(qw.scale).repeat_interleave(32, dim=1)  # X per element
    err = (w - qw.dequantize()).abs()
    saturated = w.abs() / step * 64 >= 127.5
    assert bool((err[~saturated] <= step[~saturated] / 128).all())
    assert bool((err < step / 64).all())
    assert int(qw.codes.abs().max()) <= 127
    # a / X in [1, 2): every block's largest code is at least 64
    assert bool((qw.codes.abs().reshape(64, -1, 32).amax(-1) >= 64).all())


def test_power_of_two_equivariance_and_dtype_independence():
    w = _w(seed=5)
    base = FMT.quantize(w, ARGS)
    for j in (-7, 3):
        scaled = FMT.quantize(w * 2.0 ** j, ARGS)
        assert torch.equal(scaled.codes, base.codes)
        assert torch.equal(scaled.scale.int(), base.scale.int() + j)
        assert torch.equal(scaled.dequantize(), base.dequantize() * 2.0 ** j)
    wb = w.to(torch.bfloat16)
    assert torch.equal(FMT.quantize(wb, ARGS).dequantize(), FMT.quantize(wb.float(), ARGS)
                       .dequantize())


def test_zero_block_and_sizes():
    w = _w(8, 64)
    w[:, :32] = 0
    qw = FMT.quantize(w, ARGS)
    assert qw.scale[:, 0].tolist() == [0] * 8 and not bool(qw.codes[:, :32].any())
    tensors = FMT.encode(qw)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        "weight": (torch.int8, (8, 64)), "scale": (torch.uint8, (8, 2))}
    assert FMT.native_bytes(ARGS, (8, 64)) == 8 * 64 + 8 * 2
    assert FMT.ideal_bits(ARGS, (8, 64)) == 8.25
    assert ARGS.describe() == "mxint8"


def test_round_trip_and_decode_checks():
    qw = FMT.quantize(_w(), ARGS)
    tensors = FMT.encode(qw)
    back = FMT.decode(tensors, ARGS, (24, 128), "p.")
    assert torch.equal(back.dequantize(), qw.dequantize())
    # −128 is a valid stored element (−2 · X) though RTN never writes it
    codes = tensors["weight"].clone()
    codes[0, 0] = -128
    deq = FMT.decode(dict(tensors, weight=codes), ARGS, (24, 128)).dequantize()
    assert float(deq[0, 0]) == -2 * float(e8m0_to_float(qw.scale[0, 0]))
    nan = tensors["scale"].clone()
    nan[2, 1] = 255
    with pytest.raises(ArtifactError, match="E8M0 NaN"):
        FMT.decode(dict(tensors, scale=nan), ARGS, (24, 128), "p.")
    with pytest.raises(ArtifactError, match="dtype"):
        FMT.decode(dict(tensors, weight=codes.to(torch.uint8)), ARGS, (24, 128))
    with pytest.raises(ArtifactError, match="missing tensor 'p.scale'"):
        FMT.decode({"weight": codes}, ARGS, (24, 128), "p.")


def test_recipe_defaults_and_validation():
    recipe = parse_recipe("mpq_recipe: 1\nrules: [{targets: Linear, weights: {format: mxint8}}]\n",
                          "t.yaml")
    assert recipe.rules[0].scheme.weights == ARGS  # bits 8, symmetric, group 32 implied
    with pytest.raises(SchemeError, match="mxint8 has 8 bits, got 4"):
        WeightArgs(format="mxint8", bits=4, group_size=32)
    with pytest.raises(SchemeError, match="mxint8 uses blocks of 32 along the input dimension"):
        WeightArgs(format="mxint8", bits=8, group_size=64)
    with pytest.raises(SchemeError, match="mxint8 is symmetric only"):
        WeightArgs(format="mxint8", bits=8, symmetric=False, group_size=32)
    with pytest.raises(SchemeError, match="needs a multiple of 32 inputs"):
        ARGS.check_shape((8, 48))
