"""KD-family losses and server distillation against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_kd import distill, losses, models


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_not_true_logits_hand_computed():
    logits = jnp.array([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])
    out = losses.not_true_logits(logits, jnp.array([0, 2]))
    np.testing.assert_array_equal(out, [[1.0, 2.0, 3.0], [4.0, 5.0, 7.0]])


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_ntd_loss_against_numpy(tau):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(5, 6)).astype(np.float32)
    t = rng.normal(size=(5, 6)).astype(np.float32)
    y = np.array([0, 5, 2, 2, 3])
    expected = []
    for i in range(5):
        keep = [c for c in range(6) if c != y[i]]
        log_pt = np_log_softmax(t[i, keep] / tau)
        log_ps = np_log_softmax(s[i, keep] / tau)
        expected.append(tau**2 * (np.exp(log_pt) * (log_pt - log_ps)).sum())
    out = losses.not_true_distillation_loss(s, t, y, tau)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # The true-class logit does not matter at all.
    s2 = s.copy()
    s2[np.arange(5), y] += 10.0
    np.testing.assert_allclose(losses.not_true_distillation_loss(s2, t, y, tau), out, rtol=1e-5)


def test_soft_cross_entropy_and_l1():
    logits = jnp.array([[0.0, 0.0]])
    np.testing.assert_allclose(
        losses.soft_cross_entropy(logits, jnp.array([[0.3, 0.7]])), [np.log(2)]
    )
    np.testing.assert_allclose(
        losses.l1_logit_loss(jnp.array([[1.0, -1.0, 3.0]]), jnp.array([[0.0, 1.0, 3.0]])), [1.0]
    )


def test_entropy_reduction_sharpens():
    probs = jnp.array([[0.5, 0.3, 0.2]])
    sharp = losses.entropy_reduction(probs, 0.1)
    expected = np.exp(np.array([5.0, 3.0, 2.0]))
    np.testing.assert_allclose(sharp, [expected / expected.sum()], rtol=1e-5)
    entropy = lambda p: float(-(p * jnp.log(p)).sum())  # noqa: E731
    assert entropy(sharp) < entropy(probs)


def test_ensemble_logits_is_the_weighted_mean_over_groups():
    a = models.create("mlp-4", feature_shape=(3,), num_classes=2)
    b = models.create("linear", feature_shape=(3,), num_classes=2)
    pa = jax.vmap(a.init)(jax.random.split(jax.random.key(0), 2))
    pb = jax.vmap(b.init)(jax.random.split(jax.random.key(1), 1))
    x = jax.random.normal(jax.random.key(2), (5, 3))
    out = distill.ensemble_logits([(a.apply, pa), (b.apply, pb)], x, weights=jnp.array([1.0, 0, 3]))
    row = lambda tree, i: jax.tree.map(lambda leaf: leaf[i], tree)  # noqa: E731
    za = [a.apply(row(pa, i), x) for i in range(2)]
    zb = b.apply(row(pb, 0), x)
    np.testing.assert_allclose(out, (za[0] + 3 * zb) / 4, rtol=1e-5, atol=1e-6)
    unweighted = distill.ensemble_logits([(a.apply, pa), (b.apply, pb)], x)
    np.testing.assert_allclose(unweighted, (za[0] + za[1] + zb) / 3, rtol=1e-5, atol=1e-6)


def test_server_distill_fits_the_target_and_zero_steps_is_identity():
    model = models.create("linear", feature_shape=(4,), num_classes=3)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, 4))
    target = model.apply(model.init(jax.random.key(5)), x)
    kl = lambda p: float(jnp.mean(losses.distillation_loss(model.apply(p, x), target)))  # noqa: E731
    run = distill.make_server_distill(model.apply, optax.adam(0.05), steps=200, batch_size=16)
    new, metrics = jax.jit(run)(params, x, target, jax.random.key(3))
    assert kl(new) < 0.1 * kl(params)
    assert float(metrics["distill_loss"]) > 0
    same, _ = distill.make_server_distill(model.apply, optax.adam(0.05), steps=0, batch_size=16)(
        params, x, target, jax.random.key(3)
    )
    jax.tree.map(np.testing.assert_array_equal, same, params)
