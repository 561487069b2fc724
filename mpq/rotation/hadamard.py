"""Exact Hadamard matrices, seeded orthogonal rotations, and a fast normalized Hadamard transform.

Hadamard matrices (:func:`hadamard_matrix`) are float64 with entries ±1 and H·Hᵀ = n·I.  They are
built deterministically (no randomness, no tables) from:

- Sylvester: H_1 = [1], H_2k = H_2 ⊗ H_k, so H_{2^k}[i, j] = (−1)^popcount(i & j) (symmetric);
- Paley I, order q+1 for a prime q ≡ 3 mod 4: H = I + S, S = [[0, 1ᵀ], [−1, Q]] (skew), where
  Q[i, j] = χ(j − i) is the Jacobsthal matrix of the Legendre symbol χ mod q (H is not symmetric);
- Paley II, order 2(q+1) for a prime q ≡ 1 mod 4: C = [[0, 1ᵀ], [1, Q]] (symmetric conference
  matrix), H = C ⊗ [[1, −1], [−1, −1]] + I ⊗ [[1, 1], [1, −1]] (symmetric);
- Kronecker products of two of these "cores" (e.g. 144 = 12·12).

Every order is written n = 2^k · m with m the smallest core order that works (m = 1 for powers of
two), and **H_n = H_{2^k} ⊗ H_m** (Sylvester factor on the left): index i = a·m + b with a < 2^k,
b < m.  For a core m the constructions are tried in the order Paley I, Paley II, Kronecker, with the
smallest Kronecker factor first.  This covers n = 2^k·m for m ∈ {1, 12, 20, 28, 36, 40, 44, 60, …}
(60 is Paley I with q = 59); orders it cannot build (52, anything not divisible by 4 except 1 and 2)
give None.  :func:`hadamard_construction` names the construction, e.g.
``"kron(sylvester(16), paley2(17))"`` for 576.

:func:`apply_hadamard` computes ``x @ H_n / √n`` over the last dimension (``inverse=True``:
``x @ H_nᵀ / √n``, its inverse) as a dense m×m matmul followed by a Walsh–Hadamard butterfly over
the 2^k factor, without materializing the n×n matrix.

:func:`orthogonal_for` gives a :class:`RotationSpec`: a randomized Hadamard Q = H_n·diag(s)/√n with
seeded signs s (QuaRot's choice), or a seeded random orthogonal matrix where no Hadamard exists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Union

import torch

__all__ = [
    "RotationSpec",
    "apply_hadamard",
    "hadamard_construction",
    "hadamard_matrix",
    "orthogonal_for",
    "splitmix64",
]

KINDS = ("hadamard", "random")
_MASK64 = (1 << 64) - 1

# A recipe is ("sylvester", 2^k) | ("paley1", q) | ("paley2", q) | ("kron", left, right).
Recipe = tuple


# ---------------------------------------------------------------------------------------------
# Constructions


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    f = 3
    while f * f <= q:
        if q % f == 0:
            return False
        f += 2
    return True


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@lru_cache(maxsize=None)
def _core_recipe(m: int) -> Recipe | None:
    """Recipe for a core order m (4 | m, odd part > 1), or None."""
    if m % 4 or _is_pow2(m):
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return ("paley1", m - 1)
    q = m // 2 - 1
    if _is_prime(q) and q % 4 == 1:
        return ("paley2", q)
    a = 12  # smallest core order
    while a * a <= m:
        if m % a == 0:
            left, right = _core_recipe(a), _core_recipe(m // a)
            if left is not None and right is not None:
                return ("kron", left, right)
        a += 4
    return None


@lru_cache(maxsize=None)
def _plan(n: int) -> tuple[int, int, Recipe | None] | None:
    """(p, m, core recipe) with n = p·m, p = 2^k and H_n = H_p ⊗ H_m; m = 1 (recipe None) for
    powers of two; None when no construction is known."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"a Hadamard order must be a positive integer, got {n!r}")
    if _is_pow2(n):
        return (n, 1, None)
    v = (n & -n).bit_length() - 1  # 2-adic valuation
    odd = n >> v
    for j in range(2, v + 1):  # smallest core first: cheapest dense factor
        recipe = _core_recipe(odd << j)
        if recipe is not None:
            return (1 << (v - j), odd << j, recipe)
    return None


def _describe(recipe: Recipe) -> str:
    if recipe[0] == "kron":
        return f"kron({_describe(recipe[1])}, {_describe(recipe[2])})"
    return f"{recipe[0]}({recipe[1]})"


def hadamard_construction(n: int) -> str | None:
    """How :func:`hadamard_matrix` builds order n, e.g. ``"sylvester(64)"``, ``"paley1(11)"``,
    ``"kron(sylvester(16), paley2(17))"``; None when no construction is known."""
    plan = _plan(n)
    if plan is None:
        return None
    p, _, core = plan
    if core is None:
        return f"sylvester({p})"
    if p == 1:
        return _describe(core)
    return _describe(("kron", ("sylvester", p), core))


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < p:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), χ the Legendre symbol mod the odd prime q."""
    chi = torch.full((q,), -1, dtype=torch.int8)
    chi[0] = 0
    chi[torch.tensor(sorted({i * i % q for i in range(1, q)}))] = 1
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    s = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.int8)


def _paley2(q: int) -> torch.Tensor:
    c = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    a = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    b = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int8), b)


@lru_cache(maxsize=32)
def _build(recipe: Recipe) -> torch.Tensor:
    """int8 ±1 matrix of a recipe (cached: callers must not modify it)."""
    kind = recipe[0]
    if kind == "sylvester":
        return _sylvester(recipe[1])
    if kind == "paley1":
        return _paley1(recipe[1])
    if kind == "paley2":
        return _paley2(recipe[1])
    return torch.kron(_build(recipe[1]), _build(recipe[2]))


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """An exact Hadamard matrix of order n: float64 [n, n], entries ±1, H·Hᵀ = n·I, always the
    same matrix for the same n (H_n = H_{2^k} ⊗ H_m, see the module docstring); a new tensor on
    each call.  None when no construction is known (e.g. 52, 6).  ValueError for n < 1."""
    plan = _plan(n)
    if plan is None:
        return None
    p, m, core = plan
    h = _build(("sylvester", p))
    if core is not None:
        h = torch.kron(h, _build(core)) if p > 1 else _build(core)
    return h.to(torch.float64)  # always a copy


# ---------------------------------------------------------------------------------------------
# Fast application


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if not x.dtype.is_floating_point:
        raise TypeError(f"apply_hadamard needs a floating-point tensor, got {x.dtype}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fwht_rows(y: torch.Tensor) -> torch.Tensor:
    """H_p @ y over dim 1 of y [L, p, m] (Sylvester H_p, unnormalized) by butterflies."""
    rows, p, m = y.shape
    h = 1
    while h < p:
        y = y.reshape(rows, p // (2 * h), 2, h, m)  # index = block·2h + bit·h + r
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(rows, p, m)


def _hadamard_in(xc: torch.Tensor, n: int, inverse: bool) -> torch.Tensor:
    """xc @ H_n / √n (inverse: xc @ H_nᵀ / √n) over the last dim, in xc's (compute) dtype."""
    plan = _plan(n)
    if plan is None:
        raise ValueError(f"no Hadamard matrix of order {n} is known "
                         f"(use orthogonal_for({n}, seed) for a random orthogonal fallback)")
    p, m, core = plan
    lead = xc.shape[:-1]
    y = xc.reshape(-1, p, m)
    if core is not None:
        b = _build(core).to(device=xc.device, dtype=xc.dtype)
        # x @ (A ⊗ B) is Aᵀ·X·B on X = x viewed [p, m]; A = H_p is symmetric.
        y = y @ (b.T if inverse else b)
    if p > 1:
        y = _fwht_rows(y)
    return (y * (1.0 / math.sqrt(n))).reshape(*lead, n)


def apply_hadamard(x: torch.Tensor, n_or_spec: Union[int, "RotationSpec"], *,
                   inverse: bool = False) -> torch.Tensor:
    """``x @ H_n / √n`` over the last dimension of ``x`` [..., n], where H_n =
    :func:`hadamard_matrix` (n) = H_{2^k} ⊗ H_m, without materializing the n×n matrix: a dense
    m×m matmul, then a Walsh–Hadamard butterfly over the 2^k factor.  ``inverse=True`` gives
    ``x @ H_nᵀ / √n``, which undoes it (H_n is not symmetric when its core is Paley I).

    Given a hadamard :class:`RotationSpec` instead of n, applies its Q = H_n·diag(s)/√n:
    ``x @ Q`` (``inverse``: ``x @ Qᵀ``).  A ``kind="random"`` spec raises ValueError (use
    ``spec.apply``).  The last dim must equal n (reshape first for block-diagonal rotations).

    Computes in float32 (float64 for float64 inputs) on x's device and returns x's dtype.
    """
    spec = n_or_spec if isinstance(n_or_spec, RotationSpec) else None
    n = spec.n if spec is not None else n_or_spec
    if spec is not None and spec.kind != "hadamard":
        raise ValueError(f"apply_hadamard needs a hadamard rotation, got kind={spec.kind!r} "
                         "(use spec.apply)")
    if x.shape[-1:] != (n,):
        raise ValueError(f"last dimension of x is {tuple(x.shape[-1:])}, expected {n}")
    xc = x.to(_compute_dtype(x))
    if spec is None:
        return _hadamard_in(xc, n, inverse).to(x.dtype)
    s = spec.signs(dtype=xc.dtype, device=x.device)
    if inverse:  # x @ diag(s) Hᵀ / √n
        return _hadamard_in(xc * s, n, True).to(x.dtype)
    return (_hadamard_in(xc, n, False) * s).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Seeded rotations


def splitmix64(seed: int, count: int) -> list[int]:
    """The first ``count`` outputs of SplitMix64 (Steele, Lea & Flood 2014) from state ``seed``:
    a tiny, platform-independent generator, so seeded signs never need storing."""
    state, out = seed & _MASK64, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        out.append(z ^ (z >> 31))
    return out


@lru_cache(maxsize=64)
def _signs(n: int, seed: int) -> torch.Tensor:
    return torch.tensor([-1.0 if z >> 63 else 1.0 for z in splitmix64(seed, n)],
                        dtype=torch.float64)


def _random_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    return q * torch.where(d == 0, torch.ones_like(d), d)  # R with a positive diagonal: unique


@dataclass(frozen=True)
class RotationSpec:
    """An n×n orthogonal rotation Q, reproducible from its fields.

    - ``kind="hadamard"``: Q = H_n·diag(s)/√n, H_n = :func:`hadamard_matrix` (n) (named by
      ``construction``), s_i = −1 where the i-th :func:`splitmix64` output from ``seed`` has its
      top bit set, else +1.  Deterministic: recording the spec is enough.
    - ``kind="random"``: Q from the QR of an n×n float64 standard Gaussian drawn by a CPU
      ``torch.Generator`` seeded with ``seed``, columns signed so R has a positive diagonal
      (Haar-distributed).  Reproducible from the seed only up to the LAPACK build, so the caller
      must store the matrix (``needs_storage``).
    """

    n: int
    kind: str
    seed: int
    construction: str | None = None

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"rotation size must be a positive integer, got {self.n!r}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown rotation kind {self.kind!r}; known: {', '.join(KINDS)}")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= _MASK64:
            raise ValueError(f"seed must be an integer in [0, 2^64), got {self.seed!r}")
        expected = hadamard_construction(self.n) if self.kind == "hadamard" else None
        if self.kind == "hadamard" and expected is None:
            raise ValueError(f"no Hadamard matrix of order {self.n} is known")
        if self.construction != expected:
            raise ValueError(f"{self.kind} rotation of size {self.n}: construction "
                             f"{self.construction!r} does not match this version's {expected!r}")

    @property
    def deterministic(self) -> bool:
        """True when Q is rebuilt exactly from the spec on any machine."""
        return self.kind == "hadamard"

    @property
    def needs_storage(self) -> bool:
        """True when the caller must store Q itself (a random orthogonal)."""
        return not self.deterministic

    def signs(self, dtype: torch.dtype = torch.float64,
              device: torch.device | str | None = None) -> torch.Tensor:
        """The ±1 vector s [n] of a hadamard rotation."""
        if self.kind != "hadamard":
            raise ValueError("only hadamard rotations have signs")
        return _signs(self.n, self.seed).to(device=device, dtype=dtype)

    def matrix(self, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Q [n, n], built in float64 on the CPU, then cast."""
        if self.kind == "hadamard":
            q = hadamard_matrix(self.n) * (_signs(self.n, self.seed) / math.sqrt(self.n))
        else:
            q = _random_orthogonal(self.n, self.seed)
        return q.to(device=device, dtype=dtype)

    def apply(self, x: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
        """``x @ Q`` over the last dim (``inverse``: ``x @ Qᵀ``), in float32 (float64 for float64
        inputs), returning x's dtype; fast for hadamard, a dense matmul for random."""
        if self.kind == "hadamard":
            return apply_hadamard(x, self, inverse=inverse)
        if x.shape[-1:] != (self.n,):
            raise ValueError(f"last dimension of x is {tuple(x.shape[-1:])}, expected {self.n}")
        xc = x.to(_compute_dtype(x))
        q = self.matrix(dtype=xc.dtype, device=x.device)
        return (xc @ (q.T if inverse else q)).to(x.dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record for metadata."""
        return {"n": self.n, "kind": self.kind, "seed": self.seed,
                "deterministic": self.deterministic, "construction": self.construction}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RotationSpec":
        """Inverse of :meth:`to_dict`; ValueError when the record does not describe the rotation
        this version would build (unknown kind, different Hadamard construction)."""
        spec = cls(n=data["n"], kind=data["kind"], seed=data["seed"],
                   construction=data.get("construction"))
        if "deterministic" in data and bool(data["deterministic"]) != spec.deterministic:
            raise ValueError(f"rotation record says deterministic={data['deterministic']!r} "
                             f"for kind {spec.kind!r}")
        return spec


def orthogonal_for(n: int, seed: int, kind: str = "hadamard") -> RotationSpec:
    """The rotation for size n: ``kind="hadamard"`` gives a randomized Hadamard when an exact H_n
    is known and otherwise falls back to a random orthogonal (the spec then says
    ``kind="random"``); ``kind="random"`` always gives a random orthogonal."""
    if kind not in KINDS:
        raise ValueError(f"unknown rotation kind {kind!r}; known: {', '.join(KINDS)}")
    construction = hadamard_construction(n) if kind == "hadamard" else None
    if construction is None:
        return RotationSpec(n=n, kind="random", seed=seed)
    return RotationSpec(n=n, kind="hadamard", seed=seed, construction=construction)
