"""Dense little-endian bit packing of b-bit unsigned codes (1 ≤ b ≤ 8) into int32 words.

Layout (FORMATS.md "Packing", compressed-tensors ≥ 0.18 ``pack_to_int32``): within a row, element i
occupies bits [i·b, i·b + b) of a little-endian stream of 32-bit words, so for b ∉ {1, 2, 4, 8} an
element may straddle two words (no padding bits; compressed-tensors 0.17 padded instead).  A row of
K codes takes ceil(K·b/32) words; the last word's unused high bits are 0.  Words are stored as
torch.int32, i.e. a word with bit 31 set reads negative.

Vectorised: one pass per element slot of the repeating period (32/gcd(b, 32) elements filling
b/gcd(b, 32) words), each over all rows and periods at once.
"""
from __future__ import annotations

import math

import torch

PACKING_LAYOUT = "le-dense-int32-v1"
_MASK32 = 0xFFFFFFFF


def packed_width(k: int, bits: int) -> int:
    """Number of int32 words holding ``k`` codes of ``bits`` bits."""
    return math.ceil(k * bits / 32)


def _period(bits: int) -> tuple[int, int]:
    """(elements, words) of the repeating period of the layout."""
    if not 1 <= bits <= 8:
        raise ValueError(f"packing supports 1..8 bits, got {bits}")
    g = math.gcd(bits, 32)
    return 32 // g, bits // g


def _slots(bits: int):
    """Per element slot of the period: (slot, first word, bit offset, spills into next word)."""
    per, _ = _period(bits)
    for e in range(per):
        start = e * bits
        yield e, start // 32, start % 32, start % 32 + bits > 32


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [N, K] (each < 2^bits) into int32 [N, ceil(K·bits/32)] along K."""
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"pack_rows expects uint8 [N, K], got {codes.dtype} {tuple(codes.shape)}")
    per, words = _period(bits)
    n, k = codes.shape
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    nper = math.ceil(k / per)
    u = torch.zeros(n, nper * per, dtype=torch.uint8, device=codes.device)
    u[:, :k] = codes
    u = u.reshape(n, nper, per)
    out = torch.zeros(n, nper, words, dtype=torch.int64, device=codes.device)
    for e, w0, off, spill in _slots(bits):
        v = u[:, :, e].to(torch.int64)
        out[:, :, w0] |= (v << off) & _MASK32
        if spill:
            out[:, :, w0 + 1] |= v >> (32 - off)
    out = out.reshape(n, nper * words)[:, :packed_width(k, bits)]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out)  # unsigned word -> signed int32
    return out.to(torch.int32).contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [N, ceil(k·bits/32)] → uint8 codes [N, k]."""
    per, words = _period(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack_rows expects int32 [N, W], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    n, w = packed.shape
    if w != packed_width(k, bits):
        raise ValueError(f"{w} words cannot hold exactly {k} codes of {bits} bits "
                         f"(expected {packed_width(k, bits)})")
    nper = math.ceil(k / per)
    x = torch.zeros(n, nper * words, dtype=torch.int64, device=packed.device)
    x[:, :w] = packed.to(torch.int64) & _MASK32  # signed int32 -> unsigned word
    x = x.reshape(n, nper, words)
    mask = (1 << bits) - 1
    out = torch.empty(n, nper, per, dtype=torch.uint8, device=packed.device)
    for e, w0, off, spill in _slots(bits):
        v = x[:, :, w0] >> off
        if spill:
            v = v | (x[:, :, w0 + 1] << (32 - off))
        out[:, :, e] = (v & mask).to(torch.uint8)
    return out.reshape(n, nper * per)[:, :k].contiguous()


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [N, G] along dim 0 → int32 [ceil(N·bits/32), G] (zero-point layout)."""
    return pack_rows(codes.t().contiguous(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: int32 [ceil(n·bits/32), G] → uint8 [n, G]."""
    return unpack_rows(packed.t().contiguous(), bits, n).t().contiguous()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 4-bit codes [N, K] (K even) two per byte → uint8 [N, K/2].

    Element 2j sits in the low nibble of byte j and element 2j + 1 in the high nibble: the bytes
    of :func:`pack_rows` with 4 bits on a little-endian machine, and compressed-tensors'
    ``weight_packed`` layout for FP4 (``pack_fp4_to_uint8``).
    """
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"pack_nibbles expects uint8 [N, K], got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    if codes.shape[1] % 2:
        raise ValueError(f"pack_nibbles needs an even number of columns, got {codes.shape[1]}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"code {int(codes.max())} does not fit in 4 bits")
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 [N, K/2] → uint8 codes [N, K]."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_nibbles expects uint8 [N, W], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
