"""Losses against hand-computed values and NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_kd import losses


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy_hand_computed():
    # Uniform logits over 4 classes: CE = log 4 whatever the label.
    logits = jnp.zeros((3, 4))
    out = losses.cross_entropy(logits, jnp.array([0, 1, 3]))
    chex.assert_shape(out, (3,))
    np.testing.assert_allclose(out, np.log(4.0) * np.ones(3), rtol=1e-6)


def test_cross_entropy_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=7)
    expected = -np_log_softmax(logits)[np.arange(7), labels]
    np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_distillation_loss_against_numpy(temperature):
    rng = np.random.default_rng(1)
    s = rng.normal(size=(6, 10)).astype(np.float32) * 2
    t = rng.normal(size=(6, 10)).astype(np.float32) * 2
    log_pt = np_log_softmax(t / temperature)
    log_ps = np_log_softmax(s / temperature)
    expected = temperature**2 * (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
    out = losses.distillation_loss(s, t, temperature)
    chex.assert_shape(out, (6,))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_distillation_loss_hand_computed_two_classes():
    # teacher p = (1/2, 1/2), student q = softmax(0, log 3) = (1/4, 3/4), T = 1:
    # KL = 1/2 log(2) + 1/2 log(2/3).
    s = jnp.array([[0.0, np.log(3.0)]])
    t = jnp.zeros((1, 2))
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    np.testing.assert_allclose(losses.distillation_loss(s, t, 1.0), [expected], rtol=1e-6)
    # Identical distributions give zero loss.
    np.testing.assert_allclose(losses.distillation_loss(t, t, 2.0), [0.0], atol=1e-7)


def test_distillation_loss_no_gradient_into_teacher():
    s = jnp.array([[0.3, -1.0, 2.0]])
    t = jnp.array([[1.0, 0.0, -1.0]])
    g_t = jax.grad(lambda t: losses.distillation_loss(s, t, 2.0).sum())(t)
    g_s = jax.grad(lambda s: losses.distillation_loss(s, t, 2.0).sum())(s)
    np.testing.assert_array_equal(g_t, np.zeros_like(t))
    assert np.abs(np.asarray(g_s)).sum() > 0


def test_masked_mean_ignores_padding_exactly():
    values = jnp.array([1.0, 2.0, 3.0, 1e9])
    mask = jnp.array([True, True, True, False])
    assert float(losses.masked_mean(values, mask)) == 2.0
    assert float(losses.masked_mean(values, jnp.zeros(4, bool))) == 0.0
    # Even Inf/NaN in padded entries change nothing.
    bad = jnp.array([1.0, 2.0, 3.0, jnp.inf])
    assert float(losses.masked_mean(bad, mask)) == 2.0
    assert float(losses.masked_mean(bad.at[3].set(jnp.nan), mask)) == 2.0


def test_accuracy():
    logits = jnp.array([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    np.testing.assert_array_equal(losses.accuracy(logits, jnp.array([1, 1, 1])), [1, 0, 1])
