"""Communication accounting and FedKD's dynamic SVD compression."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RANK_MARGIN, energy_margin

from fedjax_kd import compress


def low_rank(p, q, rank, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(p, rank)).astype(np.float32)
    b = rng.normal(size=(rank, q)).astype(np.float32)
    return jnp.asarray(a @ b)


def energy_fraction(s, k):
    s2 = np.square(np.asarray(s, np.float64))
    return s2[:k].sum() / s2.sum()


def test_tree_bytes_counts_size_times_itemsize():
    tree = {"a": jnp.zeros((3, 4), jnp.float32), "b": [jnp.zeros((5,), jnp.int8)]}
    assert compress.tree_bytes(tree) == 3 * 4 * 4 + 5
    assert compress.tree_bytes(jax.ShapeDtypeStruct((2, 2), jnp.float32)) == 16


def test_energy_threshold_schedule():
    assert compress.energy_threshold(0.0) == pytest.approx(0.95)
    assert compress.energy_threshold(1.0) == pytest.approx(0.98)
    assert compress.energy_threshold(0.5, 0.9, 1.0) == pytest.approx(0.95)


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.95, 0.98])
def test_svd_keeps_the_smallest_rank_reaching_the_energy_threshold(threshold):
    x = jax.random.normal(jax.random.key(0), (40, 24))
    rec, nbytes, rank = jax.jit(compress.svd_compress)(x, threshold)
    s = np.linalg.svd(np.asarray(x), compute_uv=False)
    k = int(rank)
    assert 1 <= k <= 24
    assert energy_fraction(s, k) >= threshold - 1e-6
    # Slack on both sides: the rank is chosen from float32 singular values.
    assert energy_fraction(s, k - 1) < threshold + 1e-6
    u, s_, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    if 40 * k + k * k + k * 24 < 40 * 24:  # the paper's size test: factors are sent
        assert int(nbytes) == 4 * (40 * k + k + k * 24)
        expected = (u[:, :k] * s_[:k]) @ vt[:k]
        np.testing.assert_allclose(rec, expected, rtol=1e-4, atol=1e-4)
        # The kept energy of the reconstruction is what the threshold promised.
        lost = np.sum(np.square(np.asarray(x) - np.asarray(rec))) / np.sum(np.square(x))
        assert lost <= 1 - threshold + 1e-5
    else:
        assert int(nbytes) == 4 * 40 * 24
        np.testing.assert_array_equal(rec, x)


def test_exactly_low_rank_matrix_is_sent_as_its_factors():
    x = low_rank(30, 20, 2)
    rec, nbytes, rank = compress.svd_compress(x, 0.95)
    assert int(rank) == 2
    assert int(nbytes) == 4 * (30 * 2 + 2 + 2 * 20)
    np.testing.assert_allclose(rec, x, rtol=1e-4, atol=1e-4)


def test_falls_back_to_dense_when_factors_are_not_smaller():
    # Full-rank 4x4 (singular values 1, .9, .8, .7) at 0.999 keeps K = 4: factors
    # would be 4*(16 + 4 + 16) bytes.
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))
    x = jnp.asarray((q * [1.0, 0.9, 0.8, 0.7]) @ q.T, jnp.float32)
    rec, nbytes, rank = compress.svd_compress(x, 0.999)
    assert int(rank) == 4
    assert int(nbytes) == 4 * 16
    np.testing.assert_array_equal(rec, x)
    # The paper's test counts Sigma as K x K: a rank-3 5x12 matrix would need
    # 5*3 + 3 + 3*12 = 54 < 60 floats, but 15 + 9 + 36 = 60 is not < 60: dense.
    y = low_rank(5, 12, 3, seed=2)
    rec, nbytes, rank = compress.svd_compress(y, 0.999)
    assert int(rank) == 3
    assert int(nbytes) == 4 * 60
    np.testing.assert_array_equal(rec, y)


def test_one_dimensional_and_other_arrays_are_dense():
    bias = jnp.arange(7.0)
    rec, nbytes, rank = compress.svd_compress(bias, 0.5)
    np.testing.assert_array_equal(rec, bias)
    assert (int(nbytes), int(rank)) == (28, -1)
    kernel = jnp.ones((3, 3, 2, 4))
    rec, nbytes, _ = compress.svd_compress(kernel, 0.5)
    np.testing.assert_array_equal(rec, kernel)
    assert int(nbytes) == 4 * kernel.size


def test_zero_and_non_finite_matrices():
    rec, nbytes, rank = compress.svd_compress(jnp.zeros((6, 5)), 0.95)
    assert (int(rank), int(nbytes)) == (0, 0)
    np.testing.assert_array_equal(rec, 0.0)
    # A diverged update must stay visible, not be truncated to something finite.
    x = jnp.ones((6, 5)).at[2, 3].set(jnp.nan)
    rec, nbytes, _ = compress.svd_compress(x, 0.95)
    assert not bool(jnp.all(jnp.isfinite(rec)))
    assert int(nbytes) == 4 * 30


def test_compress_tree_sums_the_leaves_and_vmaps():
    tree = {
        "kernel": low_rank(16, 12, 2),
        "bias": jnp.ones((12,)),
        "head": jax.random.normal(jax.random.key(3), (12, 3)),
    }
    rec, total = jax.jit(compress.compress_tree)(tree, 0.9)
    per_leaf = {k: compress.svd_compress(v, 0.9) for k, v in tree.items()}
    assert int(total) == sum(int(b) for _, b, _ in per_leaf.values())
    assert int(total) == 4 * (16 * 2 + 2 + 2 * 12) + 4 * 12 + 4 * 36
    for name, (r, _, _) in per_leaf.items():
        np.testing.assert_allclose(rec[name], r, rtol=1e-6, atol=1e-6)
    # Under vmap with a traced threshold: equals a loop over the stacked trees.
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a, -a]), tree)
    recs, totals = jax.jit(jax.vmap(compress.compress_tree, in_axes=(0, None)))(stacked, 0.9)
    for i in range(3):
        one = jax.tree.map(lambda a, i=i: a[i], stacked)
        # A batched and a single SVD round differently: the bytes (ranks) agree
        # exactly because no rank choice is near the threshold.
        assert energy_margin(one, 0.9) > RANK_MARGIN
        r, t = compress.compress_tree(one, 0.9)
        assert int(totals[i]) == int(t)
        for name in tree:
            np.testing.assert_allclose(recs[name][i], r[name], rtol=1e-5, atol=1e-5)
