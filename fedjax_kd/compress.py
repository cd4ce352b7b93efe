"""Communication accounting: bytes of the arrays that clients and server exchange.

Byte counts are computed from the shapes and dtypes of the arrays actually
sent (``size * itemsize`` summed over a pytree's leaves), so they follow any
change of model, dtype or message automatically.

Lossy compression of updates (FedKD's dynamic SVD, Wu et al., Nature
Communications 13:2032, 2022, arXiv 2108.13323) is simulated with static
shapes: the message is reconstructed in place and its size is returned as a
(traced) byte count computed from what would be sent.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_kd.types import PyTree


def tree_bytes(tree: PyTree) -> int:
    """Number of bytes in all array leaves of ``tree`` (a Python int, static).

    Works on concrete arrays, tracers and ``jax.ShapeDtypeStruct`` leaves alike.
    """
    return sum(
        int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    )


def energy_threshold(progress, t_start: float = 0.95, t_end: float = 0.98):
    """FedKD's energy schedule ``T(t) = T_start + (T_end - T_start) * t``.

    Args:
      progress: fraction of training done, ``t`` in ``[0, 1]`` (may be traced).
      t_start: threshold at the start of training (FedKD: 0.95).
      t_end: threshold at the end of training (FedKD: 0.98).

    Returns:
      The energy threshold (same kind as ``progress``: float or scalar array).
    """
    return t_start + (t_end - t_start) * progress


def energy_schedule(t_start: float = 0.95, t_end: float = 0.98, *, rounds: int):
    """FedKD's linear energy schedule as a function of the round, like an optax schedule.

    ``schedule(r)`` for the 0-based round ``r`` (an int32 scalar, may be traced)
    is :func:`energy_threshold` at ``t = min((r + 1) / rounds, 1)``: the
    official code's ``(1 + comm_round) / epochs``, so round ``rounds - 1`` and
    every later one use ``t_end``. ``rounds`` is the schedule's horizon, not
    necessarily the run's length.
    """
    if rounds < 1:
        raise ValueError(f"the energy schedule needs rounds >= 1, got {rounds}")

    def schedule(r):
        progress = jnp.minimum((r + 1).astype(jnp.float32) / rounds, 1.0)
        return energy_threshold(progress, t_start, t_end)

    return schedule


def energy_rank(singular_values: jax.Array, threshold) -> jax.Array:
    """Smallest ``K`` with ``sum_{i<K} s_i^2 >= threshold * sum_i s_i^2``.

    ``>=`` where the paper writes ``>``: the two differ only on exact ties, and
    ``>=`` gives ``threshold = 1`` a meaning (keep everything) instead of none.
    The energy fraction of ``K = 0`` is taken as 0, so a zero matrix (or a
    threshold of 0) gives ``K = 0``.

    Args:
      singular_values: ``[r]`` non-negative, in decreasing order.
      threshold: energy fraction in ``[0, 1]`` (may be traced).

    Returns:
      int32 ``K`` in ``[0, r]``.
    """
    energy = jnp.cumsum(jnp.square(singular_values))
    total = energy[-1]
    kept_before = jnp.concatenate([jnp.zeros((1,), energy.dtype), energy[:-1]])
    # K = number of prefixes (of length 0..r-1) that still fall short of the target;
    # the cumulative energy is nondecreasing, so they are exactly the first K.
    return jnp.sum(kept_before < threshold * total).astype(jnp.int32)


def svd_compress(x: jax.Array, threshold) -> tuple[jax.Array, jax.Array, jax.Array]:
    """FedKD's dynamic SVD compression of one array, with static shapes.

    For a 2-D ``x`` of shape ``P x Q`` with singular values ``s`` (rank ``r =
    min(P, Q)``), keeps the smallest ``K`` with energy fraction ``>= threshold``
    (:func:`energy_rank`) and sends the factors ``U[:, :K]``, ``s[:K]``,
    ``V[:K, :]`` when the paper's test ``P*K + K*K + K*Q < P*Q`` holds (the
    paper counts Sigma as a ``K x K`` matrix), otherwise ``x`` itself (dense).
    Arrays that are not 2-D (biases, conv kernels) and non-finite arrays (so
    a divergence stays visible) are always sent dense.

    Bytes sent: factors ``itemsize * (P*K + K + K*Q)`` (Sigma is sent as its
    ``K`` diagonal entries), dense ``itemsize * P*Q``; float32 has itemsize 4.

    The discarded singular triplets are zeroed rather than sliced, so ``K`` can
    be traced (jit, vmap); the reconstruction has ``x``'s shape.

    Args:
      x: the array to send.
      threshold: energy fraction in ``[0, 1]`` (may be traced).

    Returns:
      ``(reconstruction, nbytes, rank)``: what the receiver reconstructs, the
      int32 number of bytes sent, and the int32 energy rank ``K`` (computed
      for every 2-D array, whether or not its factors were smaller; -1 for
      arrays that are not 2-D).

    Example::

      x = jnp.outer(jnp.arange(1.0, 9.0), jnp.ones(6))      # 8 x 6, rank 1
      rec, nbytes, rank = svd_compress(x, 0.95)              # rank 1
      # nbytes == 4 * (8 + 1 + 6) == 60 instead of 4 * 48 == 192
    """
    itemsize = np.dtype(x.dtype).itemsize
    dense = jnp.asarray(x.size * itemsize, jnp.int32)
    if x.ndim != 2:
        return x, dense, jnp.asarray(-1, jnp.int32)
    p, q = x.shape
    finite = jnp.all(jnp.isfinite(x))
    # LAPACK's SVD can loop forever on NaN/Inf input (seen on CPU): decompose
    # zeros instead; a non-finite array is sent dense anyway.
    u, s, vt = jnp.linalg.svd(jnp.where(finite, x, 0.0), full_matrices=False)
    rank = energy_rank(s, threshold)
    kept = jnp.where(jnp.arange(s.shape[0]) < rank, s, 0.0).astype(x.dtype)
    reconstruction = (u * kept) @ vt
    smaller = p * rank + rank * rank + rank * q < p * q
    use_factors = smaller & finite
    factor_bytes = (itemsize * (p * rank + rank + rank * q)).astype(jnp.int32)
    return (
        jnp.where(use_factors, reconstruction, x),
        jnp.where(use_factors, factor_bytes, dense),
        rank,
    )


def compress_tree(tree: PyTree, threshold) -> tuple[PyTree, jax.Array]:
    """:func:`svd_compress` applied to every leaf of ``tree``.

    Args:
      tree: pytree of arrays (e.g. a model update).
      threshold: energy fraction in ``[0, 1]`` (may be traced).

    Returns:
      ``(reconstructed_tree, total_bytes)`` with ``total_bytes`` the int32 sum of
      the leaves' bytes sent.
    """
    leaves, treedef = jax.tree.flatten(tree)
    out = [svd_compress(leaf, threshold) for leaf in leaves]
    total = sum((nbytes for _, nbytes, _ in out), jnp.zeros((), jnp.int32))
    return jax.tree.unflatten(treedef, [rec for rec, _, _ in out]), total


def stochastic_quantize(x: jax.Array, key: jax.Array, bits: int) -> tuple[jax.Array, int]:
    """Unbiased stochastic ``bits``-bit quantization of one array, and its encoded bytes.

    The values are mapped onto ``2^b`` evenly spaced levels between the
    array's minimum and maximum and rounded up with probability equal to the
    remainder (Suresh et al., "Distributed Mean Estimation with Limited
    Communication", ICML 2017, arXiv 1611.00429, without the rotation), so
    ``E[quantized] = x`` exactly; a constant array is sent exactly. The
    message is ``b`` bits a value plus the minimum and the step (two
    float32): ``ceil(b n / 8) + 8`` bytes.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"quantization bits must be in [1, 16], got {bits}")
    levels = 2**bits - 1
    lo, hi = jnp.min(x), jnp.max(x)
    step = (hi - lo) / levels
    safe = jnp.where(step > 0, step, 1.0)
    v = (x - lo) / safe
    low = jnp.floor(v)
    up = jax.random.uniform(key, x.shape, x.dtype) < (v - low)
    q = jnp.clip(low + up, 0, levels)
    out = jnp.where(step > 0, lo + q * step, x).astype(x.dtype)
    return out, -(-bits * int(np.prod(x.shape, dtype=np.int64)) // 8) + 8


def quantize_tree(tree: PyTree, key: jax.Array, bits: int) -> tuple[PyTree, jax.Array]:
    """:func:`stochastic_quantize` on every leaf (independent keys): ``(received, int32 bytes)``."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    pairs = [stochastic_quantize(x, k, bits) for x, k in zip(leaves, keys, strict=True)]
    total = sum(n for _, n in pairs)
    return jax.tree.unflatten(treedef, [q for q, _ in pairs]), jnp.int32(total)


def topk_sparsify(x: jax.Array, fraction: float) -> tuple[jax.Array, int]:
    """Top-k sparsification of one array: its ``k`` largest-magnitude entries, and bytes sent.

    ``k = max(1, ceil(fraction * x.size))`` (static). The message is the
    ``k`` values (``x``'s dtype) and their int32 flat indices; when that is
    not smaller than the dense array, the array is sent dense. Ties are
    broken by ``jax.lax.top_k`` (lowest index first). Biased, so the FedAvg
    family pairs it with error feedback (``error_feedback``: Stich,
    Cordonnier & Jaggi, "Sparsified SGD with Memory", NeurIPS 2018, arXiv
    1809.07599; Karimireddy et al., "Error Feedback Fixes SignSGD", ICML
    2019, arXiv 1901.09847).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
    n = int(np.prod(x.shape, dtype=np.int64))
    k = max(1, math.ceil(fraction * n))
    itemsize = np.dtype(x.dtype).itemsize
    sparse_bytes = k * (itemsize + 4)
    if sparse_bytes >= n * itemsize:
        return x, n * itemsize
    flat = x.reshape(-1)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    kept = jnp.zeros_like(flat).at[idx].set(flat[idx])
    return kept.reshape(x.shape), sparse_bytes


def topk_tree(tree: PyTree, fraction: float) -> tuple[PyTree, jax.Array]:
    """:func:`topk_sparsify` on every leaf (``k`` per leaf): ``(received, int32 bytes)``."""
    leaves, treedef = jax.tree.flatten(tree)
    pairs = [topk_sparsify(x, fraction) for x in leaves]
    return jax.tree.unflatten(treedef, [s for s, _ in pairs]), jnp.int32(sum(n for _, n in pairs))
