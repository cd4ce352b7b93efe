"""Aggregation against NumPy; server update formulations."""

import jax.numpy as jnp
import numpy as np
import optax

from fedjax_kd import aggregate


def test_weighted_mean_against_numpy():
    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(4, 3, 2)).astype(np.float32), "b": rng.normal(size=(4,))}
    w = np.array([1.0, 0.0, 3.0, 6.0], np.float32)
    out = aggregate.weighted_mean(tree, jnp.asarray(w))
    np.testing.assert_allclose(out["a"], np.einsum("k,kij->ij", w, tree["a"]) / 10, rtol=1e-6)
    np.testing.assert_allclose(out["b"], (w * tree["b"]).sum() / 10, rtol=1e-6)


def test_weighted_mean_hand_computed_and_zero_weights():
    out = aggregate.weighted_mean(jnp.array([[2.0], [5.0]]), jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(out, [4.0])
    zero = aggregate.weighted_mean(jnp.array([[2.0], [5.0]]), jnp.zeros(2))
    np.testing.assert_array_equal(zero, [0.0])


def test_client_weights():
    counts = jnp.array([3, 0, 5])
    np.testing.assert_array_equal(aggregate.client_weights(counts), [3, 0, 5])
    np.testing.assert_array_equal(aggregate.client_weights(counts, uniform=True), [1, 0, 1])


def test_tree_all_finite():
    assert bool(aggregate.tree_all_finite({"a": jnp.ones(3), "b": jnp.zeros(2)}))
    assert not bool(aggregate.tree_all_finite({"a": jnp.ones(3), "b": jnp.array([0.0, jnp.nan])}))
    assert not bool(aggregate.tree_all_finite({"a": jnp.array([jnp.inf])}))


def test_server_sgd_one_gives_the_average_of_client_params():
    params = {"w": jnp.array([1.0, 2.0])}
    clients = np.array([[0.0, 1.0], [3.0, 5.0]], np.float32)
    weights = jnp.array([3.0, 1.0])
    delta = aggregate.weighted_mean({"w": params["w"] - clients}, weights)
    opt = optax.sgd(1.0)
    new, _ = aggregate.server_update(params, opt.init(params), delta, opt)
    np.testing.assert_allclose(new["w"], (3 * clients[0] + clients[1]) / 4, rtol=1e-6)
