"""Dense little-endian int32 bit packing (compressed-tensors >= 0.18 layout)."""
from __future__ import annotations

import pytest
import torch

from mpq.numerics.packing import (PACKING_LAYOUT, pack_cols, pack_nibbles, pack_rows, packed_width,
                         unpack_cols, unpack_nibbles, unpack_rows)


def _codes(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** bits, (n, k), generator=g).to(torch.uint8)


def _reference_row(row: list[int], bits: int) -> list[int]:
    """Bit-by-bit Python reference: element i at bits [i*b, i*b+b) of a LE word stream."""
    stream = 0
    for i, c in enumerate(row):
        stream |= c << (i * bits)
    words = [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(packed_width(len(row), bits))]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 37, 64, 101])
def test_round_trip_and_reference(bits, k):
    codes = _codes(5, k, bits, seed=bits * 100 + k)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-k * bits // 32))
    assert torch.equal(unpack_rows(packed, bits, k), codes)
    assert packed.tolist() == [_reference_row(r, bits) for r in codes.tolist()]


def test_hand_checked_4bit():
    packed = pack_rows(torch.arange(1, 9, dtype=torch.uint8)[None], 4)
    assert packed.tolist() == [[0x87654321 - (1 << 32)]]  # sign bit set -> negative int32
    assert packed.item() == -2023406815


def test_hand_checked_3bit_cross_word():
    codes = torch.zeros(1, 11, dtype=torch.uint8)
    codes[0, 10] = 0b111  # bits 30..32: two bits in word 0, one in word 1
    codes[0, 0] = 0b101
    assert pack_rows(codes, 3).tolist() == [[(0b11 << 30 | 0b101) - (1 << 32), 1]]
    full = torch.full((1, 32), 7, dtype=torch.uint8)  # 96 bits of ones -> three words of -1
    assert pack_rows(full, 3).tolist() == [[-1, -1, -1]]


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
def test_cols(bits):
    z = _codes(37, 3, bits, seed=bits)
    packed = pack_cols(z, bits)
    assert packed.shape == (packed_width(37, bits), 3) and packed.is_contiguous()
    assert torch.equal(packed, pack_rows(z.t().contiguous(), bits).t())
    assert torch.equal(unpack_cols(packed, bits, 37), z)


def test_gptq_symmetric_4bit_words():
    # all zero points 8 (stored as 7 in GPTQ v1) give 0x77777777 words
    z = torch.full((8, 2), 7, dtype=torch.uint8)
    assert pack_cols(z, 4).tolist() == [[0x77777777, 0x77777777]]


def test_errors():
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        pack_rows(torch.tensor([[1]], dtype=torch.int32), 2)
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(1, 4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="words"):
        unpack_rows(torch.zeros(1, 2, dtype=torch.int32), 4, 8)
    assert PACKING_LAYOUT == "le-dense-int32-v1"


def test_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for bits in range(1, 9):
        codes = _codes(3, 37, bits, seed=bits)
        signed = (codes.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)
        ref = helpers.pack_to_int32(signed, bits)
        assert torch.equal(pack_rows(codes, bits), ref)
        back = helpers.unpack_from_int32(ref, bits, torch.Size((3, 37)))
        assert torch.equal(back, signed)
        assert torch.equal(pack_cols(codes.t().contiguous(), bits),
                           helpers.pack_to_int32(signed.t().contiguous(), bits, packed_dim=0))


def test_nibbles_round_trip_and_layout():
    codes = _codes(5, 34, 4, seed=7)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 17) and packed.is_contiguous()
    assert torch.equal(unpack_nibbles(packed), codes)
    # element 2j in the low nibble of byte j: the bytes of the little-endian int32 words
    assert pack_nibbles(torch.arange(1, 9, dtype=torch.uint8)[None]).tolist() == [
        [0x21, 0x43, 0x65, 0x87]]
    wide = _codes(3, 64, 4, seed=8)
    assert torch.equal(pack_nibbles(wide), pack_rows(wide, 4).view(torch.uint8))


def test_nibbles_errors():
    with pytest.raises(ValueError, match="does not fit"):
        pack_nibbles(torch.tensor([[16, 0]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(torch.zeros(1, 3, dtype=torch.uint8))
    with pytest.raises(ValueError):
        unpack_nibbles(torch.zeros(1, 2, dtype=torch.int32))


def test_nibbles_match_compressed_tensors_fp4():
    helpers = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 2)  # every E2M1 code, both nibbles
    values = helpers.unpack_fp4_from_uint8(pack_nibbles(codes), 3, 32, dtype=torch.float32)
    assert torch.equal(helpers.pack_fp4_to_uint8(values), pack_nibbles(codes))
