"""Hadamard and random orthogonal rotation matrices (QuaRot / QuIP# style), all float64.

A Hadamard matrix H of order n has entries +-1 and H @ H.T == n * I; H / sqrt(n) is orthogonal.
Orders are built as n = 2^k * m, searching m over the odd-ish part of n (m = 1 included):

* Sylvester doubling gives the 2^k factor: H_2k = [[H_k, H_k], [H_k, -H_k]].
* Paley construction I gives order m = q + 1 for a prime power q = 3 (mod 4) (12, 20, 24, 28, ..., 164).
* Paley construction II gives order m = 2(q + 1) for a prime power q = 1 (mod 4) (36, 52, 108, ...).
* The two are combined by a Kronecker product: H_n = kron(Sylvester_2^k, Paley_m).

Both Paley constructions use the quadratic character of GF(q); for q = p^e with e > 1 the field is built
from a primitive polynomial found by search, and the character is the parity of the discrete logarithm.
No tables are pasted in: every matrix is constructed, and the +-1 matrices are cached (read-only).
Sizes with no such decomposition raise NoHadamardConstructionError, which points at --rotation random.
"""
from __future__ import annotations

import functools
import operator

import numpy as np

ROTATION_KINDS = ("hadamard", "random")


class NoHadamardConstructionError(ValueError):
    """No Hadamard matrix of the requested order is reachable by Sylvester x Paley constructions."""


# ----------------------------------------------------------------------------------------------
# number theory helpers


def _check_order(n) -> int:
    """Return n as a Python int, rejecting non-integers and n < 1."""
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"matrix order must be a positive integer, got {n}")
    return n


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q == p**e for a prime p, or None if q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, int(q ** 0.5) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _paley_base(m: int) -> tuple[str, int] | None:
    """("I", q) if m = q + 1 with q = 3 mod 4, ("II", q) if m = 2(q + 1) with q = 1 mod 4, else None."""
    q = m - 1
    if q % 4 == 3 and _prime_power(q):
        return ("I", q)
    if m % 2 == 0:
        q = m // 2 - 1
        if q % 4 == 1 and _prime_power(q):
            return ("II", q)
    return None


def _two_adic(n: int) -> int:
    """Largest k with 2^k dividing n."""
    return (n & -n).bit_length() - 1


@functools.lru_cache(maxsize=1024)
def _decompose(n: int) -> tuple[int, int, tuple[str, int] | None] | None:
    """(2^k, m, Paley base of m or None for m == 1) with n = 2^k * m and the smallest such m, or None."""
    v = _two_adic(n)
    for k in range(v, -1, -1):
        m = n >> k
        if m == 1:
            return (1 << k, 1, None)
        base = _paley_base(m)
        if base is not None:
            return (1 << k, m, base)
    return None


# ----------------------------------------------------------------------------------------------
# finite fields and the Paley constructions


def _digits(code: int, p: int, e: int) -> list[int]:
    """Base-p digits (least significant first) of a GF(p^e) element's integer code."""
    return [(code // p ** t) % p for t in range(e)]


@functools.lru_cache(maxsize=64)
def _quadratic_character(q: int) -> np.ndarray:
    """chi[a] for every element code a of GF(q): 0 at 0, +1 on nonzero squares, -1 otherwise.

    Elements of GF(p^e) are polynomials of degree < e over GF(p), coded as base-p integers.
    We search for a primitive modulus f (one for which x has order q - 1); then every nonzero
    element is x^k and it is a square exactly when k is even.
    """
    p, e = _prime_power(q)
    for f_code in range(q):  # f = x^e + f_{e-1} x^{e-1} + ... + f_0
        f = _digits(f_code, p, e)
        if f[0] == 0:
            continue
        chi = np.zeros(q, dtype=np.int8)
        cur = [1] + [0] * (e - 1)
        for k in range(q - 1):
            code = sum(c * p ** t for t, c in enumerate(cur))
            if code == 0 or chi[code] != 0:
                break  # x has order < q - 1 (or f is reducible): not primitive
            chi[code] = 1 if k % 2 == 0 else -1
            top = cur[-1]
            cur = [(c - top * f[t]) % p for t, c in enumerate([0] + cur[:-1])]
        else:
            if cur == [1] + [0] * (e - 1):
                return chi
    raise AssertionError(f"no primitive polynomial found for GF({q})")  # cannot happen for a prime power


def _jacobsthal(q: int) -> np.ndarray:
    """The q x q Jacobsthal matrix Q[a, b] = chi(a - b) over GF(q), as float64."""
    p, e = _prime_power(q)
    codes = np.arange(q)
    diff = np.zeros((q, q), dtype=np.int64)
    for t in range(e):
        d = (codes // p ** t) % p
        diff += ((d[:, None] - d[None, :]) % p) * p ** t
    return _quadratic_character(q)[diff].astype(np.float64)


def _paley_i(q: int) -> np.ndarray:
    """Paley I: order q + 1 for q = 3 mod 4. H = I + S, S = [[0, 1^T], [-1, Q]] skew with S S^T = q I."""
    s = np.zeros((q + 1, q + 1))
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1) + s


def _paley_ii(q: int) -> np.ndarray:
    """Paley II: order 2(q + 1) for q = 1 mod 4, from the symmetric conference matrix C = [[0, 1^T], [1, Q]]."""
    c = np.zeros((q + 1, q + 1))
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, np.array([[1.0, 1.0], [1.0, -1.0]])) + np.kron(np.eye(q + 1), np.array([[1.0, -1.0], [-1.0, -1.0]]))


def _sylvester(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix of order n = 2^k by doubling."""
    h = np.empty((n, n))
    h[0, 0] = 1.0
    s = 1
    while s < n:  # fill [[H, H], [H, -H]] in place from the top-left s x s block
        h[:s, s:2 * s] = h[:s, :s]
        h[s:2 * s, :s] = h[:s, :s]
        np.negative(h[:s, :s], out=h[s:2 * s, s:2 * s])
        s *= 2
    return h


# ----------------------------------------------------------------------------------------------
# public API


def has_hadamard(n: int) -> bool:
    """True if hadamard_matrix(n) can build a matrix of order n."""
    return _decompose(_check_order(n)) is not None


def describe_construction(n: int) -> str:
    """A one-line description of how order n is built, e.g. '768 = Sylvester 64 x Paley I 12 (q=11)'."""
    n = _check_order(n)
    parts = _decompose(n)
    if parts is None:
        raise _no_construction_error(n)
    two_k, m, base = parts
    if base is None:
        return f"{n} = Sylvester {two_k}"
    kind, q = base
    paley = f"Paley {kind} {m} (q={q})"
    return f"{n} = {paley}" if two_k == 1 else f"{n} = Sylvester {two_k} x {paley}"


def _no_construction_error(n: int) -> NoHadamardConstructionError:
    """The one-line error for an order with no construction."""
    v = _two_adic(n)
    tried = ", ".join(str(n >> k) for k in range(v, -1, -1))
    hint = "" if n % 4 == 0 else " (a Hadamard order must be 1, 2 or a multiple of 4)"
    return NoHadamardConstructionError(
        f"no Hadamard matrix of order {n}{hint}: tried n = 2^k*m with m in {{{tried}}} and found no Paley base "
        f"for m (Paley I needs m-1 a prime power = 3 mod 4, Paley II needs m/2-1 a prime power = 1 mod 4); "
        f"use --rotation random (a random orthogonal matrix) instead")


@functools.lru_cache(maxsize=16)
def _hadamard_pm1(n: int) -> np.ndarray:
    """The cached, read-only +-1 Hadamard matrix of order n."""
    parts = _decompose(n)
    if parts is None:
        raise _no_construction_error(n)
    two_k, _, base = parts
    h = _sylvester(two_k)
    if base is not None:
        kind, q = base
        h = np.kron(h, _paley_i(q) if kind == "I" else _paley_ii(q))
    h.flags.writeable = False
    return h


def hadamard_matrix(n: int) -> np.ndarray:
    """An n x n float64 matrix of +-1 with H @ H.T == n * I (a fresh, writable copy)."""
    return _hadamard_pm1(_check_order(n)).copy()


def orthogonal_hadamard(n: int) -> np.ndarray:
    """hadamard_matrix(n) / sqrt(n): an orthogonal float64 matrix."""
    return _hadamard_pm1(_check_order(n)) / np.sqrt(n)


def random_hadamard(n: int, seed: int = 0) -> np.ndarray:
    """orthogonal_hadamard(n) @ diag(s) with random signs s from numpy.random.default_rng(seed)."""
    n = _check_order(n)
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=n)
    return orthogonal_hadamard(n) * signs[None, :]


def random_orthogonal(n: int, seed: int = 0) -> np.ndarray:
    """A Haar-random n x n orthogonal matrix: QR of a Gaussian, columns sign-fixed by diag(R)."""
    n = _check_order(n)
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    d = np.sign(np.diag(r))
    d[d == 0] = 1.0
    return q * d[None, :]


def rotation_matrix(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """An n x n float64 rotation: "hadamard" -> random_hadamard(n, seed), "random" -> random_orthogonal(n, seed)."""
    if kind == "hadamard":
        return random_hadamard(n, seed)
    if kind == "random":
        return random_orthogonal(n, seed)
    raise ValueError(f"unknown rotation kind {kind!r}; valid kinds: {', '.join(map(repr, ROTATION_KINDS))}")
