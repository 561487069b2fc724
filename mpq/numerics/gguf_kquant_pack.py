"""Byte layouts of llama.cpp's K-quant super-blocks (ggml's block_q3_K … block_q6_K; the ``gguf``
package's ``gguf.quants`` reads them): one super-block is 256 consecutive input columns of a row.

Each function works on a whole weight at once: ``u`` uint8 [N, B, 256] the unsigned codes of B
super-blocks per row, ``d`` / ``dmin`` fp32 [N, B] (float16 values), ``sc`` / ``m`` the integer
sub-block scales and mins [N, B, S] (as any integer-valued tensor).  ``pack_*`` returns the rows'
bytes uint8 [N, B · type size]; ``unpack_*`` is its inverse.

- Q4_K (144 bytes): fp16 d, fp16 dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes of
  4-bit codes; byte 32c + l holds the codes of columns 64c + l (low nibble) and 64c + 32 + l.
  The 12 bytes: for i < 4, byte i = sc[i] | (sc[i+4] >> 4) << 6, byte 4+i = m[i] | (m[i+4] >>
  4) << 6, byte 8+i = (sc[i+4] & 15) | (m[i+4] & 15) << 4.
- Q5_K (176 bytes): as Q4_K with 32 bytes of high bits between the scales and the low nibbles:
  bit s of byte l is bit 4 of the code of column 32s + l.
- Q6_K (210 bytes): 128 bytes of low nibbles (byte 64h + b: columns 128h + b and 128h + 64 + b),
  64 bytes of high 2-bit pairs (byte 32h + l, bits 2s..2s+1: column 128h + 32s + l), sixteen
  int8 scales, fp16 d.
- Q3_K (110 bytes): 32 bytes of high bits (bit s of byte l: bit 2 of column 32s + l's code), 64
  bytes of low 2-bit pairs (byte 32h + l, bits 2s..2s+1: column 128h + 32s + l), 12 bytes of
  sixteen 6-bit scales stored sc + 32 (byte j < 8: scales j and j + 8 in its low and high
  nibble; byte 8 + i, bits 2k..2k+1: the top two bits of scale i + 4k), fp16 d.
"""
from __future__ import annotations

import torch

QK = 256  # columns of a super-block


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[N, B] fp32 (float16 values) → uint8 [N, B, 2]."""
    return x.to(torch.float16).unsqueeze(-1).view(torch.uint8)


def _fp16_of(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, B, 2] → fp32 [N, B]."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int16).to(torch.uint8) if x.is_floating_point() else x.to(torch.uint8)


def _bits(x: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """uint8 [..., n] fields of ``width`` bits of the bytes ``x`` [...], lowest first."""
    shifts = torch.arange(0, n * width, width, dtype=torch.uint8)
    return (x.unsqueeze(-1) >> shifts) & ((1 << width) - 1)


def _gather_bits(fields: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`_bits`: uint8 [...] of the fields [..., n] (lowest first)."""
    out = torch.zeros(fields.shape[:-1], dtype=torch.uint8)
    for i in range(fields.shape[-1]):
        out |= fields[..., i] << (i * width)
    return out


# --- Q4_K / Q5_K ------------------------------------------------------------------------------

def _pack_scale_min(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    sc, m = _u8(sc), _u8(m)
    lo = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6),
                    m[..., :4] | ((m[..., 4:] >> 4) << 6),
                    (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)], dim=-1)
    return lo


def _unpack_scale_min(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, m, md = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 6) << 4)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], dim=-1)
    return sc, mn


def _pack_nibbles_64(u: torch.Tensor) -> torch.Tensor:
    """[N, B, 256] codes → [N, B, 128]: chunk c of 64 columns → 32 bytes (low, high nibble)."""
    q = (u & 15).reshape(*u.shape[:-1], 4, 2, 32)
    return (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*u.shape[:-1], 128)


def _unpack_nibbles_64(qs: torch.Tensor) -> torch.Tensor:
    q = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return torch.cat([q & 15, q >> 4], dim=-2).reshape(*qs.shape[:-1], QK)


def pack_q4_k(u, d, dmin, sc, m) -> torch.Tensor:
    n, nb = d.shape
    parts = [_fp16_bytes(d), _fp16_bytes(dmin), _pack_scale_min(sc, m), _pack_nibbles_64(u)]
    return torch.cat(parts, dim=-1).reshape(n, nb * 144)


def unpack_q4_k(rows: torch.Tensor, n: int, nb: int):
    b = rows.reshape(n, nb, 144)
    sc, m = _unpack_scale_min(b[..., 4:16])
    return _unpack_nibbles_64(b[..., 16:]), _fp16_of(b[..., 0:2]), _fp16_of(b[..., 2:4]), sc, m


def pack_q5_k(u, d, dmin, sc, m) -> torch.Tensor:
    n, nb = d.shape
    high = ((u >> 4) & 1).reshape(n, nb, 8, 32).transpose(-1, -2)  # [.., l, s]
    parts = [_fp16_bytes(d), _fp16_bytes(dmin), _pack_scale_min(sc, m),
             _gather_bits(high, 1), _pack_nibbles_64(u)]
    return torch.cat(parts, dim=-1).reshape(n, nb * 176)


def unpack_q5_k(rows: torch.Tensor, n: int, nb: int):
    b = rows.reshape(n, nb, 176)
    sc, m = _unpack_scale_min(b[..., 4:16])
    high = _bits(b[..., 16:48], 8, 1).transpose(-1, -2).reshape(n, nb, QK)
    u = _unpack_nibbles_64(b[..., 48:]) | (high << 4)
    return u, _fp16_of(b[..., 0:2]), _fp16_of(b[..., 2:4]), sc, m


# --- Q6_K -------------------------------------------------------------------------------------

def pack_q6_k(u, d, sc) -> torch.Tensor:
    n, nb = d.shape
    halves = u.reshape(n, nb, 2, 2, 64)  # [h, low/high 64, b]
    ql = (halves[..., 0, :] & 15) | ((halves[..., 1, :] & 15) << 4)  # [N, B, 2, 64]
    high = ((u >> 4) & 3).reshape(n, nb, 2, 4, 32).transpose(-1, -2)  # [h, l, s]
    qh = _gather_bits(high, 2)  # [N, B, 2, 32]
    scales = sc.to(torch.int16).to(torch.int8).view(torch.uint8)
    parts = [ql.reshape(n, nb, 128), qh.reshape(n, nb, 64), scales, _fp16_bytes(d)]
    return torch.cat(parts, dim=-1).reshape(n, nb * 210)


def unpack_q6_k(rows: torch.Tensor, n: int, nb: int):
    b = rows.reshape(n, nb, 210)
    ql = b[..., :128].reshape(n, nb, 2, 1, 64)
    low = torch.cat([ql & 15, ql >> 4], dim=-2).reshape(n, nb, QK)
    high = _bits(b[..., 128:192].reshape(n, nb, 2, 32), 4, 2).transpose(-1, -2)
    u = low | (high.reshape(n, nb, QK) << 4)
    sc = b[..., 192:208].contiguous().view(torch.int8)
    return u, _fp16_of(b[..., 208:210]), sc


# --- Q3_K -------------------------------------------------------------------------------------

def pack_q3_k(u, d, sc) -> torch.Tensor:
    n, nb = d.shape
    hmask = _gather_bits((u >> 2).reshape(n, nb, 8, 32).transpose(-1, -2) & 1, 1)
    low = (u & 3).reshape(n, nb, 2, 4, 32).transpose(-1, -2)  # [h, l, s]
    qs = _gather_bits(low, 2).reshape(n, nb, 64)
    sv = (sc.to(torch.int16) + 32).to(torch.uint8)  # [N, B, 16] in 0..63
    lo = (sv[..., :8] & 15) | ((sv[..., 8:] & 15) << 4)
    hi = _gather_bits((sv >> 4).reshape(n, nb, 4, 4).transpose(-1, -2), 2)  # [i, k]
    parts = [hmask, qs, lo, hi, _fp16_bytes(d)]
    return torch.cat(parts, dim=-1).reshape(n, nb * 110)


def unpack_q3_k(rows: torch.Tensor, n: int, nb: int):
    b = rows.reshape(n, nb, 110)
    high = _bits(b[..., :32], 8, 1).transpose(-1, -2).reshape(n, nb, QK)
    low = _bits(b[..., 32:96].reshape(n, nb, 2, 32), 4, 2).transpose(-1, -2).reshape(n, nb, QK)
    lo = b[..., 96:104]
    hi = _bits(b[..., 104:108], 4, 2).transpose(-1, -2).reshape(n, nb, 16)
    sv = torch.cat([lo & 15, lo >> 4], dim=-1) | (hi << 4)
    sc = (sv.to(torch.int16) - 32).to(torch.int8)
    return low | (high << 2), _fp16_of(b[..., 108:110]), sc
