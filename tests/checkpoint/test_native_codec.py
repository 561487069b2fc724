"""Native codec: lossless encode/decode for every format, strict validation, size accounting."""
from __future__ import annotations

import pytest
import torch

from mpq.errors import ArtifactError
from mpq.checkpoint.native_codec import decode, encode, ideal_bits, stored_bytes
from mpq.numerics.base import NUMBER_FORMATS, QuantizedWeight
from mpq.numerics.int_grid import int_params, int_quantize_codes
from mpq.numerics.args import WeightArgs

N, K = 40, 192  # N not a multiple of 32/b: exercises packed zero-point padding
CASES = [
    *(WeightArgs(bits=b, symmetric=s, granularity=g, group_size=gs)
      for b in (2, 3, 4, 5, 8) for s in (True, False)
      for g, gs in (("tensor", None), ("channel", None), ("group", 64))),
    WeightArgs(format="fp8_e4m3", bits=8, granularity="tensor", group_size=None),
    WeightArgs(format="fp8_e4m3", bits=8, granularity="channel", group_size=None),
    WeightArgs(format="fp8_e5m2", bits=8, granularity="channel", group_size=None),
    WeightArgs(format="nf4", bits=4, group_size=64),
    WeightArgs(format="nf4", bits=4, group_size=64, double_quant=True),
    WeightArgs(format="fp8_e4m3", bits=8, granularity="block", group_size=None),
    WeightArgs(format="mxfp4", bits=4, group_size=32),
    WeightArgs(format="mxfp8", bits=8, group_size=32),
    WeightArgs(format="nvfp4", bits=4, group_size=16),
]
MXFP4, MXFP8, NVFP4 = CASES[-3:]
FP8_BLOCK = CASES[-4]


def _w(seed=0):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _qw(args, seed=0):
    return NUMBER_FORMATS.get(args.format).quantize(_w(seed), args)


@pytest.mark.parametrize("args", CASES, ids=lambda a: a.describe())
def test_round_trip_bit_exact(args):
    qw = _qw(args)
    tensors = encode(qw)
    assert all(t.is_contiguous() for t in tensors.values())
    back = decode(tensors, args, (N, K))
    assert back.shape == (N, K) and back.args == args
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(back.dequantize(dtype), qw.dequantize(dtype))
    assert torch.equal(back.codes.view(torch.uint8), qw.codes.view(torch.uint8))
    assert (back.zero is None) == (qw.zero is None)
    # stored size = ideal up to word padding of the packed rows / zero columns
    ideal = ideal_bits(args, (N, K)) * N * K / 8
    assert ideal - 1e-6 <= stored_bytes(tensors) <= ideal + 4 * (N + 3)


def test_keys_and_dtypes():
    t = encode(_qw(WeightArgs(bits=4, symmetric=False, group_size=64)))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {
        "qweight": (torch.int32, (N, K * 4 // 32)), "scale": (torch.float32, (N, 3)),
        "zero": (torch.int32, (5, 3))}  # ceil(40·4/32) = 5
    t = encode(_qw(WeightArgs(format="nf4", bits=4, group_size=64, double_quant=True)))
    assert set(t) == {"qweight", "absmax_codes", "absmax_scale", "absmax_offset"}
    assert t["absmax_codes"].dtype == torch.uint8 and t["absmax_scale"].shape == (1,)
    t = encode(_qw(WeightArgs(format="fp8_e5m2", bits=8, granularity="tensor", group_size=None)))
    assert t["weight"].dtype == torch.float8_e5m2 and t["scale"].shape == (1, 1)


def test_w4a16_g64_size_within_15_percent_of_4_5_bits():
    args = WeightArgs(bits=4, group_size=64)
    t = encode(_qw(args))
    assert ideal_bits(args, (N, K)) == 4.5  # 4 bits + one fp32 scale per 64 weights
    assert stored_bytes(t) * 8 / (N * K) <= 4.5 * 1.15


def test_g_idx_round_trip():
    args = WeightArgs(bits=4, symmetric=False, group_size=64)
    w = _w().float()
    scale, zero = int_params(w, args)
    g_idx = torch.randperm(K, generator=torch.Generator().manual_seed(3)).int() // 64
    codes = int_quantize_codes(w, scale, zero, 4, g_idx)
    qw = QuantizedWeight(args=args, shape=(N, K), codes=codes, scale=scale, zero=zero, g_idx=g_idx)
    t = encode(qw)
    assert t["g_idx"].dtype == torch.int32
    back = decode(t, args, (N, K))
    assert torch.equal(back.g_idx, g_idx) and torch.equal(back.dequantize(), qw.dequantize())
    assert ideal_bits(args, (N, K), act_order=True) * N * K / 8 <= stored_bytes(t)
    t["g_idx"] = torch.full((K,), 3, dtype=torch.int32)
    with pytest.raises(ArtifactError, match="outside"):
        decode(t, args, (N, K))


@pytest.mark.parametrize("args,key", [
    (WeightArgs(bits=4, symmetric=False, group_size=64), "zero"),
    (WeightArgs(bits=4, group_size=64), "qweight"),
    (WeightArgs(format="fp8_e4m3", bits=8, granularity="channel", group_size=None), "weight"),
    (WeightArgs(format="nf4", bits=4, group_size=64, double_quant=True), "absmax_scale"),
    (WeightArgs(format="nf4", bits=4, group_size=64), "scale"),
])
def test_missing_key(args, key):
    t = encode(_qw(args))
    del t[key]
    with pytest.raises(ArtifactError) as exc:
        decode(t, args, (N, K), prefix="model.layers.0.mlp.up_proj.")
    assert f"'model.layers.0.mlp.up_proj.{key}'" in exc.value.message
    assert "missing" in exc.value.message


def test_wrong_shape_dtype_and_args():
    args = WeightArgs(bits=3, group_size=64)
    t = encode(_qw(args))
    bad = dict(t, scale=t["scale"][:, :2])
    with pytest.raises(ArtifactError) as exc:
        decode(bad, args, (N, K))
    assert "(40, 2)" in exc.value.message and "expected (40, 3)" in exc.value.message
    with pytest.raises(ArtifactError, match="expected"):
        decode(t, args, (N, K - 64))  # qweight too wide for the claimed shape
    with pytest.raises(ArtifactError, match="dtype"):
        decode(dict(t, qweight=t["qweight"].to(torch.int64)), args, (N, K))
    with pytest.raises(ArtifactError, match="does not divide"):
        decode(t, args, (N, 100))
    # an fp8 weight stored in the other fp8 flavour is rejected
    a8 = WeightArgs(format="fp8_e4m3", bits=8, granularity="channel", group_size=None)
    t8 = encode(_qw(a8))
    with pytest.raises(ArtifactError, match="dtype"):
        decode(dict(t8, weight=t8["weight"].float().to(torch.float8_e5m2)), a8, (N, K))


def test_extra_keys_ignored():
    args = WeightArgs(bits=4, group_size=64)
    t = dict(encode(_qw(args)), bias=torch.zeros(N))
    assert torch.equal(decode(t, args, (N, K)).dequantize(), _qw(args).dequantize())


def test_microscaled_keys_dtypes_and_sizes():
    t = encode(_qw(MXFP4))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {
        "packed": (torch.uint8, (N, K // 2)), "scale": (torch.uint8, (N, K // 32))}
    t = encode(_qw(MXFP8))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {
        "weight": (torch.float8_e4m3fn, (N, K)), "scale": (torch.uint8, (N, K // 32))}
    t = encode(_qw(NVFP4))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {
        "packed": (torch.uint8, (N, K // 2)), "scale": (torch.float8_e4m3fn, (N, K // 16)),
        "global_scale": (torch.float32, (1,))}
    t = encode(_qw(FP8_BLOCK))
    assert t["scale"].shape == (1, 2) and t["scale"].dtype == torch.float32  # ceil(40/128), ...
    assert ideal_bits(MXFP4, (N, K)) == 4.25 and ideal_bits(MXFP8, (N, K)) == 8.25
    assert ideal_bits(NVFP4, (N, K)) == 4.5 + 32 / (N * K)
    assert ideal_bits(FP8_BLOCK, (N, K)) == 8 + 2 * 32 / (N * K)


@pytest.mark.parametrize("args,key", [(MXFP4, "packed"), (MXFP4, "scale"), (MXFP8, "weight"),
                                      (NVFP4, "global_scale"), (FP8_BLOCK, "scale")])
def test_microscaled_missing_key(args, key):
    t = encode(_qw(args))
    del t[key]
    with pytest.raises(ArtifactError, match=f"missing tensor 'p.{key}'"):
        decode(t, args, (N, K), prefix="p.")


def test_microscaled_bad_tensors():
    t = encode(_qw(NVFP4))
    with pytest.raises(ArtifactError, match="dtype"):  # fp8 scales stored as floats
        decode(dict(t, scale=t["scale"].float()), NVFP4, (N, K))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ArtifactError, match="finite and > 0"):
            decode(dict(t, global_scale=torch.tensor([bad])), NVFP4, (N, K))
    with pytest.raises(ArtifactError, match="expected"):
        decode(dict(t, packed=t["packed"][:, :-1]), NVFP4, (N, K))
    nan_scale = t["scale"].clone()
    nan_scale.view(torch.uint8)[0, 0] = 0x7F  # E4M3 NaN
    with pytest.raises(ArtifactError, match="NaN"):
        decode(dict(t, scale=nan_scale), NVFP4, (N, K))
    t = encode(_qw(MXFP4))
    scale = t["scale"].clone()
    scale[3, 1] = 255
    with pytest.raises(ArtifactError, match="NaN"):
        decode(dict(t, scale=scale), MXFP4, (N, K))
    with pytest.raises(ArtifactError, match="dtype"):
        decode(dict(t, packed=t["packed"].to(torch.int32)), MXFP4, (N, K))
    with pytest.raises(ArtifactError, match="does not divide"):
        decode(t, MXFP4, (N, 48))
    t = encode(_qw(FP8_BLOCK))
    with pytest.raises(ArtifactError, match="expected"):  # a per-channel scale for a block layout
        decode(dict(t, scale=torch.ones(N, 1)), FP8_BLOCK, (N, K))
