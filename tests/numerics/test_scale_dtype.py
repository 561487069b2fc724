"""WeightArgs.scale_dtype: int scales rounded to fp16/bf16 before the codes are computed."""
from __future__ import annotations

import pytest
import torch

from mpq.checkpoint.gptq_v1 import layer_tensors as gptq_tensors
from mpq.checkpoint.native_codec import decode, encode, ideal_bits
from mpq.config.recipe import parse_recipe
from mpq.errors import RecipeError, SchemeError
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import NUMBER_FORMATS
from mpq.numerics.int_grid import int_params, int_quantize_codes
from mpq.quantizers.clip_search import searched_int_params
from mpq.numerics.base import QuantizedWeight
from mpq.quantizers.gptq_options import GPTQOptions
from mpq.quantizers.gptq_solve import gptq_solve
from tests.checkpoint.test_gptq_v1 import decode_v1

TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16}


def weight(n=16, k=64, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, k) * 0.05


def representable(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.equal(t.to(dtype).to(torch.float32), t)


@pytest.mark.parametrize("scale_dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["group", "channel", "tensor"])
def test_rtn_scales_are_rounded_first_and_round_trip_bit_exact(scale_dtype, symmetric,
                                                               granularity):
    args = WeightArgs(bits=4, symmetric=symmetric, granularity=granularity,
                      group_size=32 if granularity == "group" else None, scale_dtype=scale_dtype)
    w = weight()
    qw = NUMBER_FORMATS.get("int").quantize(w, args)
    assert representable(qw.scale, TORCH[scale_dtype])
    # the codes are those of the rounded scale (and the zeros computed from it)
    scale, zero = int_params(w, args)
    assert torch.equal(qw.codes, int_quantize_codes(w, scale, zero, 4))
    tensors = encode(qw)
    assert tensors["scale"].dtype == TORCH[scale_dtype]
    back = decode(tensors, args, qw.shape)
    assert torch.equal(back.dequantize(), qw.dequantize())
    # within half a step of the rounded grid, as fp32 scales are
    step = qw.scale.max()
    assert float((qw.dequantize() - w).abs().max()) <= float(step) * (1.0 if symmetric else 1.01)


def test_fp32_default_is_unchanged_and_left_out_of_the_record():
    w = weight()
    fp32 = WeightArgs(bits=4, group_size=32)
    assert "scale_dtype" not in fp32.to_dict()
    assert WeightArgs(bits=4, group_size=32, scale_dtype="fp16").to_dict()["scale_dtype"] == "fp16"
    assert encode(NUMBER_FORMATS.get("int").quantize(w, fp32))["scale"].dtype == torch.float32
    assert ideal_bits(WeightArgs(bits=4, group_size=32, scale_dtype="fp16"), (16, 64)) == \
        pytest.approx(4 + 16 / 32)
    assert ideal_bits(fp32, (16, 64)) == pytest.approx(4 + 32 / 32)


def test_tiny_and_zero_groups_keep_a_nonzero_scale():
    w = torch.zeros(2, 64)
    w[1, :32] = 1e-9  # below fp16's smallest normal
    args = WeightArgs(bits=4, group_size=32, scale_dtype="fp16")
    qw = NUMBER_FORMATS.get("int").quantize(w, args)
    assert bool((qw.scale > 0).all()) and representable(qw.scale, torch.float16)
    assert float(qw.dequantize()[0].abs().max()) == 0.0


def test_a_scale_beyond_fp16_is_refused():
    w = torch.full((2, 32), 1e6)
    args = WeightArgs(bits=4, group_size=32, scale_dtype="fp16")
    with pytest.raises(SchemeError, match="overflows scale_dtype fp16"):
        NUMBER_FORMATS.get("int").quantize(w, args)
    bf16 = NUMBER_FORMATS.get("int").quantize(w, WeightArgs(bits=4, group_size=32,
                                                            scale_dtype="bf16"))
    assert bool(torch.isfinite(bf16.scale).all())


def test_clip_search_scales_are_rounded_too():
    args = WeightArgs(bits=4, symmetric=False, group_size=32, scale_dtype="bf16")
    scale, zero = searched_int_params(weight(), args, torch.rand(64))
    assert representable(scale, torch.bfloat16)


@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"clip_search": True}])
def test_gptq_with_fp16_scales_is_stored_exactly_by_the_gptq_format(options):
    torch.manual_seed(1)
    w = weight(32, 64)
    x = torch.randn(256, 64)
    h = x.t() @ x
    args = WeightArgs(bits=4, symmetric=False, group_size=32, scale_dtype="fp16")
    result = gptq_solve(w, h, args, GPTQOptions(**options))
    qw = QuantizedWeight(args=args, shape=tuple(w.shape), codes=result.codes,
                         scale=result.scale, zero=result.zero, g_idx=result.g_idx)
    assert representable(qw.scale, torch.float16)
    assert torch.equal(qw.dequantize(), result.q)  # what GPTQ assumed is what is decoded
    tensors, rounding = gptq_tensors("layer", qw)
    assert rounding == 0.0
    decoded = decode_v1(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                        tensors["g_idx"], 4)
    assert torch.equal(decoded, qw.dequantize(torch.float32))
    back = decode(encode(qw), args, qw.shape)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_scale_dtype_is_for_int_only_and_checked():
    with pytest.raises(SchemeError, match="unknown scale_dtype"):
        WeightArgs(scale_dtype="fp8")
    with pytest.raises(SchemeError, match="scale_dtype applies to int and fp8"):
        WeightArgs(format="nf4", bits=4, group_size=64, scale_dtype="fp16")
    # a rule switching format drops an inherited int scale_dtype
    recipe = parse_recipe(
        "mpq_recipe: 1\ndefaults:\n  weights: {scale_dtype: fp16}\nrules:\n"
        "  - targets: lm_head\n    weights: {format: nf4}\n  - targets: Linear\n",
        "r.yaml")
    assert recipe.rules[0].scheme.weights.scale_dtype == "fp32"
    assert recipe.rules[1].scheme.weights.scale_dtype == "fp16"
    with pytest.raises(RecipeError, match="scale_dtype"):
        parse_recipe("mpq_recipe: 1\nrules:\n  - targets: Linear\n    weights: {scale_dtype: 16}\n",
                     "r.yaml")


@pytest.mark.parametrize("granularity", ["channel", "tensor", "block"])
def test_fp8_scales_take_a_scale_dtype_too(granularity):
    args = WeightArgs(format="fp8_e4m3", bits=8, granularity=granularity, group_size=None,
                      scale_dtype="bf16")
    w = weight(16, 64)
    qw = NUMBER_FORMATS.get("fp8_e4m3").quantize(w, args)
    assert representable(qw.scale, torch.bfloat16)
    tensors = encode(qw)
    assert tensors["scale"].dtype == torch.bfloat16
    assert torch.equal(decode(tensors, args, qw.shape).dequantize(), qw.dequantize())
    # within fp8's relative precision of the weights (the max element may saturate)
    assert float((qw.dequantize() - w).abs().max()) <= 0.07 * float(w.abs().max())
