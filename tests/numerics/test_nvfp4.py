"""nvfp4: global and block scales, agreement with compressed-tensors (fake quantization and the
compressed tensors it stores), edge cases, argument and shape errors."""
from __future__ import annotations

import pytest
import torch

from mpq.errors import SchemeError
from mpq.checkpoint.native_codec import encode
from mpq.numerics.base import NUMBER_FORMATS
from mpq.numerics.nvfp4 import nvfp4_global_scale
from mpq.numerics.args import WeightArgs
from tests.ct_reference import ct_compress, ct_decompress, ct_group

NVFP4 = NUMBER_FORMATS.get("nvfp4")
ARGS = WeightArgs(format="nvfp4", bits=4, group_size=16)


def _w(n=24, k=128, seed=0):
    """Rows spanning 1e-3..1e1 (so small blocks' fp8 scales go subnormal), an all-zero block and
    a block whose fp8 scale underflows to 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, n)[:, None]
    w[0, :16] = 0
    w[1, 16:32] *= 1e-6
    return w


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16])
def test_matches_compressed_tensors_fake_quantize(source):
    # compressed-tensors computes the global scale and absmax/6 in the dtype of the tensor it is
    # given; mpq always works in fp32.  So the reference gets the fp32 weight (for a bf16 model:
    # the bf16 weight upcast exactly, which is what mpq quantizes) and must agree bit for bit.
    # Given a bf16 tensor directly, compressed-tensors rounds 2688/absmax to bf16 (e.g. 8.4375
    # instead of 8.4528), which moves every block scale: no element-wise tolerance is meaningful.
    w = _w().to(source).float()
    ref, scale, gs = ct_group(w, "nvfp4")
    qw = NVFP4.quantize(w.to(source), ARGS)
    assert torch.equal(qw.extras["global_scale"], gs) and qw.extras["global_scale"].shape == (1,)
    assert qw.scale.dtype == torch.float8_e4m3fn and qw.scale.shape == (24, 8)
    assert torch.equal(qw.scale.float(), scale)
    assert torch.equal(qw.dequantize(), ref)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 15
    # the underflowing block's scale became compressed-tensors' eps 0.125, the zero block's too
    assert qw.scale[1, 1].float() == 0.125 and qw.scale[0, 0].float() == 0.125
    assert (qw.dequantize()[0, :16] == 0).all()


def test_global_scale_convention():
    w = _w(seed=1)
    qw = NVFP4.quantize(w, ARGS)
    amax = w.abs().max()
    gs = qw.extras["global_scale"]
    # a divisor, not a multiplier; reciprocal then product, as torch evaluates 2688 / amax
    assert torch.equal(gs, amax.reshape(1).reciprocal() * 2688.0)
    # the block holding the absmax gets (about) the largest fp8 scale and maps it to ±6
    r, c = divmod(int(w.abs().argmax()), w.shape[1])
    assert qw.scale[r, c // 16].float() == 448.0 and qw.codes[r, c] & 7 == 7
    assert torch.allclose(qw.dequantize()[r, c].abs(), amax, rtol=1e-6)
    # an all-zero (or overflowing) tensor: global scale 1, every block scale eps
    assert nvfp4_global_scale(torch.tensor(0.0)).item() == 1.0
    assert nvfp4_global_scale(torch.tensor(1e-38)).item() == 1.0
    zero = NVFP4.quantize(torch.zeros(2, 32), ARGS)
    assert zero.extras["global_scale"].item() == 1.0 and (zero.scale.float() == 0.125).all()
    assert (zero.dequantize() == 0).all()
    ref, _, _ = ct_group(torch.zeros(2, 32), "nvfp4")
    assert torch.equal(zero.dequantize(), ref)


def test_stored_tensors_are_compressed_tensors():
    w = _w(seed=2)
    _, scale, gs = ct_group(w, "nvfp4")
    qw = NVFP4.quantize(w, ARGS)
    ct = ct_compress("nvfp4", w, scale, gs)
    ours = encode(qw)
    assert torch.equal(ct["weight_packed"], ours["packed"])
    assert ct["weight_scale"].dtype == ours["scale"].dtype == torch.float8_e4m3fn
    assert torch.equal(ct["weight_scale"].view(torch.uint8), ours["scale"].view(torch.uint8))
    assert torch.equal(ct["weight_global_scale"], ours["global_scale"])
    back = ct_decompress("nvfp4", {"weight_packed": ours["packed"], "weight_scale": ours["scale"],
                                   "weight_global_scale": ours["global_scale"]})
    assert torch.equal(back, qw.dequantize(torch.bfloat16))


def test_error_bound():
    w = _w(seed=3)[2:]
    qw = NVFP4.quantize(w, ARGS)
    eff = (qw.scale.float() / qw.extras["global_scale"]).repeat_interleave(16, dim=1)
    # at most one E2M1 step (1.0 between 4 and 6, ≤ 0.5 below) at the block's scale, plus the
    # clipping of values up to 1/16 above 6·scale from the fp8 rounding of the scale
    assert ((qw.dequantize() - w).abs() <= 1.0 * eff + w.abs() / 16).all()


def test_args_and_shape_errors():
    for kwargs, match in [
        (dict(format="nvfp4", bits=4, group_size=32), "nvfp4 uses blocks of 16"),
        (dict(format="nvfp4", bits=4, granularity="tensor", group_size=None), "blocks of 16"),
        (dict(format="nvfp4", bits=8, group_size=16), "nvfp4 has 4 bits"),
        (dict(format="nvfp4", bits=4, symmetric=False, group_size=16), "symmetric only"),
        (dict(format="nvfp4", bits=4, granularity="block", group_size=None), "fp8_e4m3 only"),
    ]:
        with pytest.raises(SchemeError, match=match) as exc:
            WeightArgs(**kwargs)
        assert exc.value.hint
    with pytest.raises(SchemeError, match="does not divide the input dimension 40") as exc:
        NVFP4.quantize(torch.randn(4, 40), ARGS)
    assert "multiple of 16" in exc.value.hint
    with pytest.raises(SchemeError, match="NaN"):
        NVFP4.quantize(torch.full((2, 16), float("inf")), ARGS)
    assert ARGS.describe() == "nvfp4"
