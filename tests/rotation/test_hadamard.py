"""Hadamard matrices, seeded rotations and the fast Hadamard transform (mpq.rotation.hadamard)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mpq.rotation.hadamard import (RotationSpec, apply_hadamard, hadamard_construction,
                                   hadamard_matrix, orthogonal_for, splitmix64)

EXACT_ORDERS = [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 44, 60, 64, 128, 144, 576, 1360, 1536, 2304]


@pytest.mark.parametrize("n", EXACT_ORDERS)
def test_hadamard_is_exact(n):
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert bool((h.abs() == 1).all())
    hf = h.float()  # integer sums <= 2304: exact in float32, and twice as fast
    assert torch.equal(hf @ hf.T, n * torch.eye(n))


@pytest.mark.parametrize("n", [3, 6, 10, 52, 92, 100])
def test_unknown_orders_give_none(n):
    assert hadamard_matrix(n) is None and hadamard_construction(n) is None


def test_bad_orders_raise():
    for n in (0, -4, 2.0):
        with pytest.raises(ValueError, match="positive integer"):
            hadamard_matrix(n)


def test_constructions_and_kronecker_order():
    assert hadamard_construction(12) == "paley1(11)"
    assert hadamard_construction(28) == "paley2(13)"
    assert hadamard_construction(36) == "paley2(17)"
    assert hadamard_construction(40) == "kron(sylvester(2), paley1(19))"
    assert hadamard_construction(576) == "kron(sylvester(16), paley2(17))"
    assert hadamard_construction(1536) == "kron(sylvester(128), paley1(11))"
    assert hadamard_construction(1360) == "kron(paley1(19), paley1(67))"
    # H_n = H_{2^k} ⊗ H_m, Sylvester factor on the left
    assert torch.equal(hadamard_matrix(576), torch.kron(hadamard_matrix(16), hadamard_matrix(36)))
    parity = torch.tensor([[bin(a & b).count("1") % 2 for b in range(64)] for a in range(64)])
    assert torch.equal(hadamard_matrix(64), (1 - 2 * parity).double())  # (−1)^popcount(i & j)
    h12 = hadamard_matrix(12)
    assert not torch.equal(h12, h12.T)  # Paley I is not symmetric: the transpose matters


def test_hadamard_matrix_is_a_fresh_copy():
    first = hadamard_matrix(12)
    kept = first.clone()
    first.zero_()  # must not reach the cache
    assert torch.equal(hadamard_matrix(12), kept)
    assert torch.equal(hadamard_matrix(1536), hadamard_matrix(1536))  # deterministic


def test_splitmix64_reference_values():
    assert splitmix64(0, 1) == [0xE220A8397B1DCDAF]
    assert splitmix64(1234567, 5) == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                                      4593380528125082431, 16408922859458223821]


def _assert_orthogonal(q):
    n = q.shape[0]
    assert float((q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max()) < 1e-10


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_randomized_hadamard_is_orthogonal_and_seeded(n):
    spec = orthogonal_for(n, seed=7)
    assert spec.kind == "hadamard" and spec.deterministic and not spec.needs_storage
    q = spec.matrix()
    assert q.dtype == torch.float64
    _assert_orthogonal(q)
    s = spec.signs()
    assert torch.equal(q, hadamard_matrix(n) * s / math.sqrt(n))  # H·diag(s)/√n
    assert set(s.tolist()) == {-1.0, 1.0}
    assert torch.equal(orthogonal_for(n, seed=7).matrix(), q)
    assert not torch.equal(orthogonal_for(n, seed=8).signs(), s)


def test_random_orthogonal_fallback():
    spec = orthogonal_for(52, seed=3)
    assert spec.kind == "random" and spec.construction is None
    assert not spec.deterministic and spec.needs_storage
    q = spec.matrix()
    _assert_orthogonal(q)
    assert torch.equal(orthogonal_for(52, seed=3).matrix(), q)
    assert not torch.allclose(orthogonal_for(52, seed=4).matrix(), q)
    # the sign fix: Qᵀ·G is R with a positive diagonal
    g = torch.randn(52, 52, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    r = q.T @ g
    assert float(torch.tril(r, -1).abs().max()) < 1e-10 and bool((torch.diagonal(r) > 0).all())
    forced = orthogonal_for(64, seed=3, kind="random")
    assert forced.kind == "random"
    _assert_orthogonal(forced.matrix())
    assert orthogonal_for(6, seed=0).kind == "random"


def test_spec_round_trips_and_validates():
    for spec in (orthogonal_for(576, 5), orthogonal_for(52, 5)):
        record = json.loads(json.dumps(spec.to_dict()))
        assert record["deterministic"] == spec.deterministic
        assert RotationSpec.from_dict(record) == spec
    record = orthogonal_for(576, 5).to_dict()
    with pytest.raises(ValueError, match="does not match"):
        RotationSpec.from_dict({**record, "construction": "paley1(575)"})
    with pytest.raises(ValueError, match="deterministic"):
        RotationSpec.from_dict({**record, "deterministic": False})
    with pytest.raises(ValueError, match="unknown rotation kind"):
        RotationSpec.from_dict({**record, "kind": "givens"})
    with pytest.raises(ValueError, match="no Hadamard"):
        RotationSpec(n=52, kind="hadamard", seed=0)
    with pytest.raises(ValueError, match="seed"):
        orthogonal_for(64, seed=-1)
    with pytest.raises(ValueError, match="unknown rotation kind"):
        orthogonal_for(64, seed=0, kind="identity")


@pytest.mark.parametrize("n", [64, 576, 1536])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_apply_hadamard_equals_dense(n, lead):
    torch.manual_seed(n + len(lead))
    x = torch.randn(*lead, n)
    h = hadamard_matrix(n) / math.sqrt(n)
    for inverse, dense in ((False, h), (True, h.T)):
        y = apply_hadamard(x, n, inverse=inverse)
        assert y.shape == x.shape and y.dtype == torch.float32
        expected = (x.double() @ dense).float()
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_apply_then_inverse_gives_back_x():
    torch.manual_seed(0)
    x = torch.randn(4, 1536)
    back = apply_hadamard(apply_hadamard(x, 1536), 1536, inverse=True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
    # forward twice is not the identity when the core (Paley I, 12) is not symmetric
    assert not torch.allclose(apply_hadamard(apply_hadamard(x, 1536), 1536), x, atol=1e-3)


@pytest.mark.parametrize("spec", [orthogonal_for(576, 11), orthogonal_for(1536, 12),
                                  orthogonal_for(52, 13)], ids=["had576", "had1536", "rand52"])
def test_spec_apply_is_x_at_q_and_inverts(spec):
    torch.manual_seed(1)
    x = torch.randn(2, 3, spec.n)
    q = spec.matrix()
    y = spec.apply(x)
    torch.testing.assert_close(y, (x.double() @ q).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spec.apply(y, inverse=True), x, rtol=1e-5, atol=1e-5)
    if spec.kind == "hadamard":
        torch.testing.assert_close(apply_hadamard(x, spec), y, rtol=0, atol=0)
    else:
        with pytest.raises(ValueError, match="spec.apply"):
            apply_hadamard(x, spec)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_their_dtype(dtype):
    torch.manual_seed(2)
    x = torch.randn(3, 576).to(dtype)
    y = apply_hadamard(x, 576)
    assert y.dtype == dtype
    expected = apply_hadamard(x.float(), 576)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol)
    assert apply_hadamard(x.double(), 576).dtype == torch.float64


def test_apply_hadamard_rejects_bad_inputs():
    with pytest.raises(ValueError, match="last dimension"):
        apply_hadamard(torch.zeros(2, 64), 128)
    with pytest.raises(ValueError, match="no Hadamard"):
        apply_hadamard(torch.zeros(2, 52), 52)
    with pytest.raises(TypeError, match="floating-point"):
        apply_hadamard(torch.zeros(2, 64, dtype=torch.int32), 64)


def test_non_contiguous_and_empty_inputs():
    torch.manual_seed(3)
    x = torch.randn(576, 6).T  # [6, 576], non-contiguous
    torch.testing.assert_close(apply_hadamard(x, 576), apply_hadamard(x.contiguous(), 576))
    assert apply_hadamard(torch.zeros(0, 4, 64), 64).shape == (0, 4, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(4)
    x = torch.randn(8, 1536)
    spec = orthogonal_for(1536, 9)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        got = spec.apply(xd.cuda())
        assert got.device.type == "cuda" and got.dtype == dtype
        torch.testing.assert_close(got.cpu().float(), spec.apply(xd).float(), rtol=1e-2, atol=1e-2)
