"""Hadamard and random orthogonal rotations (QuaRot-style) as linear maps on the last axis.

A rotation T spreads a massive outlier channel over all channels (incoherence processing), so that per-token
and per-channel scales see a flat distribution; `fold_into_kernel(T, W)` = Tᵀ W keeps x @ W exact. The fast
path is the Walsh–Hadamard transform, O(n log n), which only exists for n = 2^k; `RandomHadamard` handles
n = m·2^k with a small m×m orthogonal mix (a known Hadamard matrix of order m, or a random orthogonal one).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.linear_maps import _pytree

_H2 = np.array([[1, 1], [1, -1]], np.int64)


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _odd_part(n: int) -> int:
    return n // (n & -n)


def fwht(x: jax.Array) -> jax.Array:
    """Orthonormal Walsh–Hadamard transform x @ H_n/√n on the last axis (n = 2^k), in O(n log n) by reshapes."""
    n = x.shape[-1]
    if not _is_pow2(n):
        raise ValueError(f"fwht needs a power-of-two last axis, got {n}")
    lead, y, h = x.shape[:-1], x.astype(jnp.float32), 1
    while h < n:  # butterfly stage: pairs (j, j+h) in blocks of 2h become (a+b, a−b); Sylvester order
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y, h = jnp.stack([a + b, a - b], axis=-2), 2 * h
    return (y.reshape(x.shape) / math.sqrt(n)).astype(x.dtype)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q_ij = χ(j − i) with χ the Legendre symbol mod the prime q (skew for q ≡ 3, symmetric for q ≡ 1 mod 4)."""
    squares = {i * i % q for i in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], np.int64)
    idx = np.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _conference(q: int, sign: int) -> np.ndarray:
    """Conference matrix [[0, 1ᵀ], [sign·1, Q]] of order q+1 (skew for sign −1, symmetric for sign +1)."""
    c = np.zeros((q + 1, q + 1), np.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, sign, _jacobsthal(q)
    return c


def _base_hadamard(n: int) -> np.ndarray | None:
    """A Hadamard matrix of order 1, 2, q+1 (Paley I, q ≡ 3 mod 4) or 2(q+1) (Paley II, q ≡ 1 mod 4), else None."""
    if n in (1, 2):
        return np.ones((1, 1), np.int64) if n == 1 else _H2.copy()
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _conference(n - 1, -1) + np.eye(n, dtype=np.int64)
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:
        return np.kron(_conference(q, 1), _H2) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]])
    return None


def _base_order(n: int) -> int | None:
    """Smallest base order m (1, 2, Paley I/II) with n = m·2^j, or None: the cheapest Kronecker factorisation."""
    if n < 1:
        return None
    m = _odd_part(n)
    while m <= n and _base_hadamard(m) is None:
        m *= 2
    return m if m <= n else None


def hadamard_order_known(n: int) -> bool:
    """Whether `hadamard_matrix(n)` can build a Hadamard matrix of order n (Sylvester, Paley I/II, ⊗ 2^k)."""
    return _base_order(n) is not None


def hadamard_matrix(n: int) -> np.ndarray:
    """A ±1 integer matrix with H Hᵀ = n I: (Sylvester | Paley I | Paley II) ⊗ Sylvester(2^k)."""
    m = _base_order(n)
    if m is None:
        raise ValueError(f"no Hadamard matrix of order {n} is known here (orders 2^k · {{1, 2, p+1, 2(p+1)}})")
    h = _base_hadamard(m)
    for _ in range((n // m).bit_length() - 1):
        h = np.kron(h, _H2)
    return h


def random_orthogonal(key: jax.Array, n: int) -> jax.Array:
    """Haar-distributed n×n orthogonal matrix: QR of a Gaussian, columns signed so that diag(R) > 0."""
    q, r = jnp.linalg.qr(jax.random.normal(key, (n, n), jnp.float32))
    return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)


@_pytree(["signs", "mix"])
class RandomHadamard:
    """x ↦ ((x · signs) reshaped (…, m, 2^k), FWHT on 2^k, mixed by `mix` on m): T = diag(signs) (mix ⊗ H/√2^k).

    Orthogonal, so dual == apply. Costs O(n (log 2^k + m)) and stores n + m² floats.
    """

    signs: jax.Array  # (n,) of ±1
    mix: jax.Array  # (m, m) orthogonal, n = m·2^k

    @property
    def size(self) -> int:
        return self.signs.shape[-1]

    def apply(self, x: jax.Array) -> jax.Array:
        n, m = self.size, self.mix.shape[0]
        if x.shape[-1] != n:
            raise ValueError(f"RandomHadamard of size {n} applied to {x.shape[-1]} features")
        y = fwht((x.astype(jnp.float32) * self.signs).reshape(*x.shape[:-1], m, n // m))
        y = jnp.einsum("...ap,ab->...bp", y, self.mix.astype(jnp.float32))
        return y.reshape(x.shape).astype(x.dtype)

    def dual(self, x: jax.Array) -> jax.Array:
        return self.apply(x)

    def matrix(self) -> jax.Array:
        """The dense n×n matrix T (for tests and small sizes), built by Kronecker product, not by apply."""
        p = self.size // self.mix.shape[0]
        h = jnp.asarray(hadamard_matrix(p), jnp.float32) / math.sqrt(p)
        return self.signs[:, None] * jnp.kron(self.mix.astype(jnp.float32), h)


def random_hadamard(key: jax.Array, n: int, *, mix: str = "auto") -> RandomHadamard:
    """Random-sign Hadamard rotation of size n = m·2^k (QuaRot's residual-stream rotation).

    Sizes such as 576 = 9·64 (SmolLM2's width) or 1536 = 3·512 (its MLP) have no Sylvester Hadamard, and a
    dense random rotation costs O(n²) per token. The Kronecker form mix ⊗ H_{2^k} stays orthogonal and costs
    O(n log n) plus a small m×m matmul. m is the smallest factor with n/m a power of two for which a Hadamard
    matrix is known (576 = 36·16, 1536 = 12·128, 64 = 1·64; Hadamard orders > 2 are multiples of 4, so the odd
    part of n never qualifies unless it is 1), and `mix` is that Hadamard matrix normalised. When none is known
    (odd n > 1, 18, 92, 184), m is the odd part of n and `mix` a Haar random
    orthogonal matrix. mix="hadamard" requires a known order; mix="random" always uses the odd part and a
    random orthogonal mix.
    """
    if n < 1:
        raise ValueError(f"rotation size must be positive, got {n}")
    if mix not in ("auto", "hadamard", "random"):
        raise ValueError(f"mix must be 'auto', 'hadamard' or 'random', got {mix!r}")
    k_signs, k_mix = jax.random.split(key)
    signs = jnp.where(jax.random.bernoulli(k_signs, 0.5, (n,)), 1.0, -1.0).astype(jnp.float32)
    m = None if mix == "random" else _base_order(n)
    if m is None and mix == "hadamard":
        raise ValueError(f"no Hadamard matrix of order m with {n} = m·2^k is known; use mix='random' or 'auto'")
    if m is None:
        mat = random_orthogonal(k_mix, _odd_part(n))
    else:
        mat = jnp.asarray(hadamard_matrix(m) / math.sqrt(m), jnp.float32)
    return RandomHadamard(signs, mat)


def hadamard_rotation(n: int, key: jax.Array | None = None) -> RandomHadamard:
    """Deterministic Hadamard rotation (signs +1; fixed key 0 for a random mix) for QuaRot's online Hadamard."""
    rot = random_hadamard(jax.random.key(0) if key is None else key, n)
    return rot if key is not None else dataclasses.replace(rot, signs=jnp.ones((n,), jnp.float32))
