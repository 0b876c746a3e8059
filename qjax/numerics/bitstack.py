"""BitStack: a weight as a stack of residual blocks S_i ⊙ (A_i B_i), loadable at any block budget.

Reference: xinghaow99/BitStack (arXiv 2410.23918); summary in /work/shared/ALGORITHMS.md, "BitStack".

Orientation: qjax kernels are (in, out); `decompose` works on the matrix exactly as given, so for a
kernel m = in, n = out and `matmul(x)` computes x @ Ŵ. (The reference decomposes the HF weight (out, in);
sign(Wᵀ) = sign(W)ᵀ and the rank-k SVD of |W|ᵀ is the transpose of that of |W|, so both orientations give
the same Ŵ up to the transpose; only the roles of A and B swap.)

Sign planes: +1 is stored as bit 1, −1 as bit 0, packed 8 per byte along n with `packing.pack(., 1)`,
i.e. LOW BITS FIRST (column j sits in bit j % 8 of byte j // 8), zero-padded. The reference packs MSB
first; the two differ only by a bit reversal inside each byte and cost the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics import packing


def pack_signs(s: jax.Array) -> jax.Array:
    """±1 (m, n) → (m, ceil(n/8)) uint8, bit 1 = +1, low bits first (see module docstring)."""
    return packing.pack((s > 0).astype(jnp.uint8), 1)


def unpack_signs(p: jax.Array, n: int) -> jax.Array:
    """Inverse of `pack_signs`: (..., ceil(n/8)) uint8 → (..., n) float32 of ±1."""
    return jnp.where(packing.unpack(p, 1, n, signed=False) > 0, 1.0, -1.0).astype(jnp.float32)


def block_bytes(m: int, n: int, rank: int) -> int:
    """Bytes of one block: packed signs m·ceil(n/8) + fp16 factors 2·rank·(m + n)."""
    return m * packing.packed_length(n, 1) + 2 * rank * (m + n)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["signs", "a", "b", "active"],
    meta_fields=["shape", "rank", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class BitStackWeight:
    """Stacked residual blocks: Ŵ = Σ_{i<active} S_i ⊙ (A_i B_i); `active` may be traced under jit.

    signs: (n_max, m, ceil(n/8)) uint8; a: (n_max, m, k) float16; b: (n_max, k, n) float16;
    active: int32 scalar, how many leading blocks are used; shape (m, n), rank k, dtype: static.
    """

    signs: jax.Array
    a: jax.Array
    b: jax.Array
    active: jax.Array
    shape: tuple[int, int]
    rank: int
    dtype: str = "float32"

    @property
    def n_max(self) -> int:
        return self.signs.shape[0]

    @property
    def block_nbytes(self) -> int:
        """Bytes one block adds to the stored weight."""
        return block_bytes(*self.shape, self.rank)

    @property
    def nbytes(self) -> int:
        """True bytes of the active blocks (needs a concrete `active`)."""
        return int(self.active) * self.block_nbytes

    @property
    def nbytes_total(self) -> int:
        """Bytes of all n_max stored blocks."""
        return self.n_max * self.block_nbytes

    def with_active(self, n) -> BitStackWeight:
        """Same blocks, another budget (no re-decomposition); n may be traced."""
        if not isinstance(n, jax.core.Tracer) and not 0 <= int(n) <= self.n_max:
            raise ValueError(f"BitStack: active blocks must be in [0, {self.n_max}], got {int(n)}")
        return dataclasses.replace(self, active=jnp.asarray(n, jnp.int32))

    def _mask(self) -> jax.Array:
        """(n_max,) float32, 1 for the active blocks."""
        return (jnp.arange(self.n_max) < self.active).astype(jnp.float32)

    def dequantize(self, dtype=None) -> jax.Array:
        """Dense Ŵ (m, n) from the active blocks, accumulated in float32."""
        s = unpack_signs(self.signs, self.shape[1])
        ab = jnp.einsum("imk,ikn->imn", self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        w = jnp.einsum("i,imn->mn", self._mask(), s * ab)
        return w.astype(dtype or self.dtype)

    def matmul(self, x: jax.Array) -> jax.Array:
        """x @ Ŵ without the dense Ŵ: Σ_i Σ_r ((x ⊙ A_i[:, r]) S_i) ⊙ B_i[r, :] (k sign matmuls per block).

        Flops are ~k·T·m·n per block vs b·k·m·n + T·m·n for the dense path, so it only wins when
        memory, not compute, bounds the product: for few tokens T (decoding) it reads 1-bit S and
        the small factors instead of a materialised float Ŵ, and `(x ⊙ A[:, r]) S` needs only adds/subs.
        """
        s = unpack_signs(self.signs, self.shape[1])
        a = self.a.astype(jnp.float32) * self._mask()[:, None, None]
        xa = jnp.einsum("...m,imk->...ikm", x.astype(jnp.float32), a)
        y = jnp.einsum("...ikn,ikn->...n", jnp.einsum("...ikm,imn->...ikn", xa, s), self.b.astype(jnp.float32))
        return y.astype(x.dtype)

    def __repr__(self) -> str:
        return f"BitStackWeight(shape={self.shape}, rank={self.rank}, blocks={self.n_max})"


def _check(w: np.ndarray, n_blocks: int, rank: int) -> None:
    """Early, named errors for bad inputs."""
    if w.ndim != 2:
        raise ValueError(f"BitStack: decompose needs a matrix, got shape {w.shape}")
    m, n = w.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"BitStack: rank must be in [1, min(m, n)] = [1, {min(m, n)}] for shape ({m}, {n}), got {rank}")
    if n_blocks < 1:
        raise ValueError(f"BitStack: n_blocks must be >= 1, got {n_blocks}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"BitStack: weight of shape ({m}, {n}) has {int(np.sum(~np.isfinite(w)))} non-finite entries")


def decompose_block(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One iteration in float32: (S, A, B) with S = sign(w) (0 → +1), A B = rank-k SVD of |w|."""
    s = jnp.where(w >= 0, 1.0, -1.0).astype(jnp.float32)
    u, sig, vt = jnp.linalg.svd(jnp.abs(w), full_matrices=False)
    root = jnp.sqrt(sig[:rank])
    return s, u[:, :rank] * root, root[:, None] * vt[:rank]


def decompose(w, n_blocks: int, rank: int, dtype: str = "float32") -> BitStackWeight:
    """Decompose a matrix (as given; kernels are (in, out)) into n_blocks residual sign × low-rank blocks."""
    w_np = np.asarray(w, dtype=np.float32)
    _check(w_np, n_blocks, rank)
    r = jnp.asarray(w_np)
    signs, As, Bs = [], [], []
    for _ in range(n_blocks):
        s, a, b = decompose_block(r, rank)
        signs.append(pack_signs(s))
        As.append(a.astype(jnp.float16))
        Bs.append(b.astype(jnp.float16))
        r = r - s * (a @ b)
    return BitStackWeight(jnp.stack(signs), jnp.stack(As), jnp.stack(Bs), jnp.asarray(n_blocks, jnp.int32),
                          tuple(w_np.shape), rank, dtype)
