"""Model registry: shapes, names, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_kd import models


@pytest.mark.parametrize(
    "name,feature_shape,expected_params",
    [
        ("linear", (64,), 64 * 10 + 10),
        ("mlp-32", (64,), 64 * 32 + 32 + 32 * 10 + 10),
        ("mlp-16-8", (60,), 60 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10),
        # conv 3x3: 1->4 and 4->8 channels, then an 4x4x8 -> 10 head after pooling 8x8.
        ("cnn-4-8", (64,), 9 * 4 + 4 + 9 * 4 * 8 + 8 + 4 * 4 * 8 * 10 + 10),
    ],
)
def test_shapes_and_param_counts(name, feature_shape, expected_params):
    model = models.create(name, feature_shape=feature_shape, num_classes=10)
    params = model.init(jax.random.key(0))
    assert models.num_params(params) == expected_params
    logits = jax.jit(model.apply)(params, jnp.ones((5, *feature_shape)))
    assert logits.shape == (5, 10)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_init_is_deterministic_in_the_key():
    model = models.create("mlp-16", feature_shape=(8,), num_classes=3)
    a, b = model.init(jax.random.key(1)), model.init(jax.random.key(1))
    c = model.init(jax.random.key(2))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["dense0"]["kernel"], c["dense0"]["kernel"])


def test_linear_model_is_affine():
    model = models.create("linear", feature_shape=(3,), num_classes=2)
    params = model.init(jax.random.key(0))
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    expected = x @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
    np.testing.assert_allclose(model.apply(params, x), expected, rtol=1e-6)


def test_vmap_over_params():
    model = models.create("mlp-8", feature_shape=(4,), num_classes=3)
    stacked = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 5))
    out = jax.vmap(model.apply, in_axes=(0, None))(stacked, jnp.ones((2, 4)))
    assert out.shape == (5, 2, 3)


@pytest.mark.parametrize("bad", ["resnet", "mlp", "mlp-0", "mlp-x", "linear-4", "cnn-"])
def test_bad_names(bad):
    with pytest.raises(ValueError, match="model"):
        models.create(bad, feature_shape=(64,), num_classes=10)


def test_cnn_needs_image_features():
    with pytest.raises(ValueError, match="image"):
        models.create("cnn-4", feature_shape=(60,), num_classes=10)
