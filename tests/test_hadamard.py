"""Tests for rotations/hadamard.py: exact Hadamard constructions, orthogonality, seeding, errors, caching."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modernbert_ane.rotations import hadamard as had  # noqa: E402
from modernbert_ane.rotations.hadamard import (  # noqa: E402
    NoHadamardConstructionError,
    describe_construction,
    hadamard_matrix,
    has_hadamard,
    orthogonal_hadamard,
    random_hadamard,
    random_orthogonal,
    rotation_matrix,
)

POWERS_OF_TWO = [2 ** k for k in range(1, 13)]  # 2 .. 4096
OTHER_SIZES = [12, 20, 24, 28, 36, 40, 48, 96, 192, 384, 768, 1152, 2624, 2304, 3072, 5248]
PRIME_POWER_PALEY = [28, 52, 100, 244]  # q = 27, 25, 49, 243
ALL_SIZES = POWERS_OF_TWO + OTHER_SIZES + PRIME_POWER_PALEY
FULL_CHECK_MAX = 1024  # above this: Freivalds' test for the Gram matrix, sampled rows for orthogonality
NO_CONSTRUCTION = [3, 5, 6, 7, 10, 14, 22, 92, 116, 156, 172, 1004]


def _gram_is_n_identity(h: np.ndarray) -> bool:
    """H @ H.T == n I exactly.

    Small n: the full float64 product. Large n: Freivalds' test, H (H^T X) == n X for 64 random +-1
    vectors X. All values are integers below 2^53, so float64 is exact, and a wrong Gram matrix
    survives with probability at most 2^-64, at a fraction of the cost of an n^3 product.
    """
    n = h.shape[0]
    if n <= FULL_CHECK_MAX:
        return np.array_equal(h @ h.T, n * np.eye(n))
    x = np.random.default_rng(n).choice(np.array([-1.0, 1.0]), size=(n, 64))
    return np.array_equal(h @ (h.T @ x), n * x)


def _orthogonality_error(q: np.ndarray) -> float:
    """max |Q Q^T - I| (over 32 random rows for large n; the Gram of H itself is checked exactly)."""
    n = q.shape[0]
    rows = np.arange(n) if n <= FULL_CHECK_MAX else np.random.default_rng(n).choice(n, 32, replace=False)
    eye_rows = np.zeros((len(rows), n))
    eye_rows[np.arange(len(rows)), rows] = 1.0
    return float(np.max(np.abs(q[rows] @ q.T - eye_rows)))


def _row_chunks(n: int, size: int = 256):
    """Row slices, so checks on the big matrices need no full-size temporaries."""
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


@pytest.mark.parametrize("n", ALL_SIZES)
def test_hadamard_exact_and_orthogonal(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == np.float64
    assert all(np.all(np.abs(h[r]) == 1.0) for r in _row_chunks(n))
    assert _gram_is_n_identity(h)
    q = orthogonal_hadamard(n)
    assert q.dtype == np.float64
    assert all(np.array_equal(q[r], h[r] / np.sqrt(n)) for r in _row_chunks(n))
    assert _orthogonality_error(q) < 1e-12
    assert has_hadamard(n)


@pytest.mark.parametrize("n, text", [
    (1024, "1024 = Sylvester 1024"),
    (12, "12 = Paley I 12 (q=11)"),
    (36, "36 = Paley II 36 (q=17)"),
    (28, "28 = Paley I 28 (q=27)"),
    (52, "52 = Paley II 52 (q=25)"),
    (768, "768 = Sylvester 64 x Paley I 12 (q=11)"),
    (1152, "1152 = Sylvester 32 x Paley II 36 (q=17)"),
    (2624, "2624 = Sylvester 16 x Paley I 164 (q=163)"),
    (5248, "5248 = Sylvester 32 x Paley I 164 (q=163)"),
])
def test_describe_construction(n, text):
    assert describe_construction(n) == text


def test_order_one():
    assert np.array_equal(hadamard_matrix(1), np.ones((1, 1)))


@pytest.mark.parametrize("n", NO_CONSTRUCTION)
def test_no_construction_error(n):
    assert not has_hadamard(n)
    for call in (hadamard_matrix, orthogonal_hadamard, random_hadamard, lambda m: rotation_matrix("hadamard", m)):
        with pytest.raises(NoHadamardConstructionError) as info:
            call(n)
        message = str(info.value)
        assert isinstance(info.value, ValueError)
        assert "\n" not in message
        assert f"order {n}" in message
        assert "2^k*m" in message
        assert "use --rotation random (a random orthogonal matrix) instead" in message
    with pytest.raises(NoHadamardConstructionError):
        describe_construction(n)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-4, ValueError), (4.0, TypeError)])
def test_invalid_order(bad, error):
    with pytest.raises(error):
        hadamard_matrix(bad)


@pytest.mark.parametrize("n", [12, 64, 768, 1024])
def test_random_hadamard(n):
    a = random_hadamard(n, seed=1)
    assert a.dtype == np.float64
    assert _orthogonality_error(a) < 1e-12
    assert np.array_equal(a, random_hadamard(n, seed=1))
    assert not np.array_equal(a, random_hadamard(n, seed=2))
    signs = a[0] / orthogonal_hadamard(n)[0]  # only column signs differ from the plain Hadamard
    assert np.array_equal(np.abs(signs), np.ones(n))
    assert np.array_equal(a, orthogonal_hadamard(n) * signs[None, :])


@pytest.mark.parametrize("n", [1, 7, 22, 96])
def test_random_orthogonal(n):
    a = random_orthogonal(n, seed=1)
    assert a.shape == (n, n) and a.dtype == np.float64
    assert _orthogonality_error(a) < 1e-12
    assert np.array_equal(a, random_orthogonal(n, seed=1))
    if n > 1:
        assert not np.array_equal(a, random_orthogonal(n, seed=2))


def test_rotation_matrix_dispatch():
    assert np.array_equal(rotation_matrix("hadamard", 48, seed=3), random_hadamard(48, 3))
    assert np.array_equal(rotation_matrix("random", 48, seed=3), random_orthogonal(48, 3))
    assert np.array_equal(rotation_matrix("hadamard", 48), random_hadamard(48, 0))
    assert np.array_equal(rotation_matrix("random", 22), random_orthogonal(22, 0))


def test_rotation_matrix_unknown_kind():
    with pytest.raises(ValueError) as info:
        rotation_matrix("givens", 16)
    assert "givens" in str(info.value)
    assert "'hadamard'" in str(info.value) and "'random'" in str(info.value)


def test_cache_cannot_be_corrupted():
    reference = hadamard_matrix(20)
    h = hadamard_matrix(20)
    h[:] = 0.0
    orthogonal_hadamard(20)[:] = 0.0
    random_hadamard(20, 0)[:] = 0.0
    assert np.array_equal(hadamard_matrix(20), reference)
    assert _gram_is_n_identity(hadamard_matrix(20))
    cached = had._hadamard_pm1(20)
    assert not cached.flags.writeable
    with pytest.raises(ValueError):
        cached[0, 0] = 5.0
