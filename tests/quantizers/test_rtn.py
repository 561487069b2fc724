"""RTN quantizer: registered, needs nothing, delegates to the scheme's number format."""
from __future__ import annotations

import pytest
import torch

import mpq.quantizers  # noqa: F401
from mpq.numerics.base import NUMBER_FORMATS
from mpq.quantizers.base import QUANTIZERS
from mpq.numerics.args import WeightArgs
from mpq.config.scheme import LayerScheme

SCHEMES = [
    WeightArgs(bits=4, group_size=32),
    WeightArgs(bits=3, symmetric=False, granularity="channel", group_size=None),
    WeightArgs(format="fp8_e4m3", bits=8, granularity="channel", group_size=None),
    WeightArgs(format="fp8_e5m2", bits=8, granularity="tensor", group_size=None),
    WeightArgs(format="nf4", bits=4, group_size=64, double_quant=True),
]


def test_registered_everything():
    assert set(NUMBER_FORMATS) >= {"int", "fp8_e4m3", "fp8_e5m2", "nf4"}
    rtn = QUANTIZERS.get("rtn")
    assert rtn.name == "rtn" and rtn.needs == frozenset()


@pytest.mark.parametrize("args", SCHEMES, ids=lambda a: a.describe())
def test_rtn_equals_number_format(args):
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    qw = QUANTIZERS.get("rtn").quantize(w, LayerScheme("rtn", args), {})
    ref = NUMBER_FORMATS.get(args.format).quantize(w, args)
    assert qw.args == args and qw.shape == (4, 128)
    assert torch.equal(qw.codes.view(torch.uint8), ref.codes.view(torch.uint8))
    assert torch.equal(qw.dequantize(), ref.dequantize())
    assert (qw.dequantize() - w.float()).abs().max() < 0.6
