"""FP4 E2M1 elements: the code layout, nearest rounding with ties to even, −0, saturation, and
agreement with compressed-tensors' cast_to_fp4 / pack_fp4_to_uint8."""
from __future__ import annotations

import pytest
import torch

from mpq.numerics.packing import pack_nibbles
from mpq.numerics.fp4 import E2M1_VALUES, e2m1_decode, e2m1_encode, e2m1_table


def _from_bits(code: int) -> float:
    """E2M1 decoded from its bits sign|exp(2)|man(1), exponent bias 1, subnormal at exp 0."""
    sign, exp, man = code >> 3, (code >> 1) & 3, code & 1
    mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
    return -mag if sign else mag


def test_table_is_the_standard_bit_layout():
    t = e2m1_table()
    assert t.dtype == torch.float32 and t.tolist() == [_from_bits(c) for c in range(16)]
    assert E2M1_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    assert torch.signbit(t[8]) and t[8] == 0  # code 8 is −0
    codes = torch.arange(16, dtype=torch.uint8)
    back = e2m1_encode(e2m1_decode(codes))
    assert torch.equal(back[codes != 8], codes[codes != 8]) and back[8] == 0  # −0.0 → code 0


def test_nearest_ties_to_even_and_saturation():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert e2m1_decode(e2m1_encode(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert e2m1_decode(e2m1_encode(-ties)).tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    assert e2m1_encode(torch.tensor([7.0, 1e30, -6.5, -1e30])).tolist() == [7, 7, 15, 15]
    # negative values that round to zero keep the sign bit; −0.0 itself does not
    assert e2m1_encode(torch.tensor([-0.1, -0.0, 0.0, 0.1])).tolist() == [8, 0, 0, 0]
    g = torch.Generator().manual_seed(0)
    y = torch.rand(20000, generator=g) * 16 - 8
    got = e2m1_decode(e2m1_encode(y))
    dist = (y.clamp(-6, 6)[:, None] - e2m1_table()).abs()
    assert torch.equal((got - y.clamp(-6, 6)).abs(), dist.min(dim=1).values)


def test_matches_compressed_tensors():
    pytest.importorskip("compressed_tensors", minversion="0.20")
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    g = torch.Generator().manual_seed(1)
    grid = torch.arange(-7.0, 7.0001, 0.125)  # every tie and every value, both signs
    y = torch.cat([torch.tensor([-0.0, 0.0]), grid, torch.randn(4096, generator=g) * 3])
    y = y[: y.numel() // 4 * 4].reshape(2, -1)
    ref = cast_to_fp4(y.clamp(-6, 6))
    codes = e2m1_encode(y)
    assert torch.equal(e2m1_decode(codes), ref)
    assert torch.equal(torch.signbit(e2m1_decode(codes)), torch.signbit(ref))
    assert torch.equal(pack_nibbles(codes), pack_fp4_to_uint8(ref))
