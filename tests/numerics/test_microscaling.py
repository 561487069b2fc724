"""mxfp4 / mxfp8: E8M0 exponents, agreement with compressed-tensors (fake quantization and the
compressed tensors it stores), argument and shape errors."""
from __future__ import annotations

import pytest
import torch

from mpq.errors import SchemeError
from mpq.checkpoint.native_codec import encode
from mpq.numerics.base import NUMBER_FORMATS
from mpq.numerics.microscaling import e8m0_exponent, e8m0_to_float
from mpq.numerics.args import WeightArgs
from tests.ct_reference import ct_compress, ct_decompress, ct_group

ARGS = {"mxfp4": WeightArgs(format="mxfp4", bits=4, group_size=32),
        "mxfp8": WeightArgs(format="mxfp8", bits=8, group_size=32)}


def _w(n=24, k=256, seed=0, dtype=torch.float32):
    """Rows spanning 1e-4..1e2, an all-zero block, a tiny block, and exact power-of-two and
    1.75·2^e block maxima (the exponent rounding boundary)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-4, 2, n)[:, None]
    w[0, :32] = 0
    w[1, 32:64] *= 1e-30
    w[2, :32] = torch.linspace(-1, 1, 32) * 1.75
    w[3, :32] = torch.linspace(-1, 1, 32) * 1.7499999
    w[4, :32] = torch.linspace(-1, 1, 32) * 4.0
    w[5, :32] = torch.linspace(-1, 1, 32) * 6.5  # mxfp4: 1.625·4 clips to ±6
    return w.to(dtype)


def test_e8m0_to_float_is_exact():
    e = torch.arange(255, dtype=torch.uint8)
    ref = torch.tensor([2.0 ** (i - 127) for i in range(255)], dtype=torch.float64)
    assert torch.equal(e8m0_to_float(e).double(), ref)


# E = log2(absmax rounded to a power of two, up from mantissa 1.75) + 127 − floor(log2 elem_max);
# so 448 = 1.75·2^8 rounds up to 2^9 for mxfp8 (values checked against generate_mx_scales)
@pytest.mark.parametrize("absmax,elem_max,expected", [
    (1.0, 6.0, 125), (1.7499999, 6.0, 125), (1.75, 6.0, 126), (6.0, 6.0, 127), (7.0, 6.0, 128),
    (448.0, 448.0, 128), (6.0, 448.0, 121), (0.0, 6.0, 0), (1e-40, 6.0, 0), (2.0 ** -124, 6.0, 1),
    (3.4e38, 6.0, 253), (3.4e38, 448.0, 247),
])
def test_e8m0_exponent(absmax, elem_max, expected):
    assert e8m0_exponent(torch.tensor([absmax]), elem_max).item() == expected


@pytest.mark.parametrize("name", ARGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_compressed_tensors_fake_quantize(name, dtype):
    # scales are powers of two, so compressed-tensors' arithmetic in the weight's own dtype is exact
    # and the results agree bit for bit whatever the dtype (fp16 rows are kept within its range)
    w = _w(dtype=dtype) if dtype != torch.float16 else _w(seed=1).clamp(-6e4, 6e4).half()
    if dtype == torch.float16:
        w[1] = 0  # 1e-30 underflows fp16 anyway
    ref, scale, _ = ct_group(w, name)
    qw = NUMBER_FORMATS.get(name).quantize(w, ARGS[name])
    assert qw.scale.dtype == torch.uint8 and qw.scale.shape == (24, 8)
    assert torch.equal(qw.dequantize(dtype), ref)
    if dtype != torch.float16:  # fp16 cannot hold 2^-127 (compressed-tensors then uses 1)
        assert torch.equal(e8m0_to_float(qw.scale), scale.float())
    assert qw.scale[0, 0] == 0 and (qw.dequantize()[0, :32] == 0).all()


@pytest.mark.parametrize("name", ARGS)
def test_stored_tensors_are_compressed_tensors(name):
    w = _w(seed=2)
    _, scale, _ = ct_group(w, name)
    qw = NUMBER_FORMATS.get(name).quantize(w, ARGS[name])
    ct = ct_compress(name, w, scale, None)
    ours = encode(qw)
    assert torch.equal(ct["weight_scale"], ours["scale"]) and ct["weight_scale"].dtype == torch.uint8
    if name == "mxfp4":
        assert torch.equal(ct["weight_packed"], ours["packed"])
    else:
        assert torch.equal(ct["weight"].view(torch.uint8), ours["weight"].view(torch.uint8))
    # compressed-tensors rebuilds mpq's weight (in bf16, its decompression dtype) from them
    back = ct_decompress(name, {"weight_packed" if name == "mxfp4" else "weight":
                                ours["packed" if name == "mxfp4" else "weight"],
                                "weight_scale": ours["scale"]})
    assert torch.equal(back.to(torch.bfloat16), qw.dequantize(torch.bfloat16))


@pytest.mark.parametrize("name", ARGS)
def test_error_bound_and_absmax(name):
    w = _w(seed=3)[6:]
    qw = NUMBER_FORMATS.get(name).quantize(w, ARGS[name])
    xh, s = qw.dequantize(), e8m0_to_float(qw.scale).repeat_interleave(32, dim=1)
    # half a step of the element grid at the top of the scaled range
    top = 1.0 if name == "mxfp4" else 16.0  # E2M1 spacing near 4..6; E4M3 near 256..448
    assert ((xh - w).abs() <= top * s + 1e-30).all()
    assert (xh.abs() <= (6.0 if name == "mxfp4" else 448.0) * s).all()


def test_args_and_shape_errors():
    for kwargs, match in [
        (dict(format="mxfp4", bits=4, group_size=64), "mxfp4 uses blocks of 32"),
        (dict(format="mxfp8", bits=8, granularity="channel", group_size=None), "blocks of 32"),
        (dict(format="mxfp4", bits=8, group_size=32), "mxfp4 has 4 bits"),
        (dict(format="mxfp8", bits=4, group_size=32), "mxfp8 has 8 bits"),
        (dict(format="mxfp4", bits=4, symmetric=False, group_size=32), "symmetric only"),
        (dict(format="mxfp4", bits=4, group_size=32, double_quant=True), "double_quant"),
        (dict(format="mxfp8", bits=8, granularity="block", group_size=None), "fp8_e4m3 only"),
    ]:
        with pytest.raises(SchemeError, match=match) as exc:
            WeightArgs(**kwargs)
        assert exc.value.hint
    with pytest.raises(SchemeError, match="does not divide the input dimension 48") as exc:
        NUMBER_FORMATS.get("mxfp4").quantize(torch.randn(4, 48), ARGS["mxfp4"])
    assert "skip" in exc.value.hint and "multiple of 32" in exc.value.hint
    assert ARGS["mxfp4"].describe() == "mxfp4" and ARGS["mxfp8"].describe() == "mxfp8"
