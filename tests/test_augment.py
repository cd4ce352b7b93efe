"""On-device augmentation: NumPy references, per-client keys, reproducible runs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_kd import algorithms, augment, experiment, models, simulate
from fedjax_kd.configs import default as default_config
from fedjax_kd.data import Cohort, from_arrays


def _images(n=6, h=5, w=7, c=None, seed=0):
    shape = (n, h, w) if c is None else (n, h, w, c)
    return np.random.default_rng(seed).integers(1, 256, shape).astype(np.uint8)


@pytest.mark.parametrize("channels", [None, 3])
def test_crop_equals_numpy_padding_and_slicing(channels):
    x = _images(c=channels)
    key = jax.random.key(4)
    got = np.asarray(augment.random_crop(key, jnp.asarray(x), 2))
    offsets = np.asarray(augment.crop_offsets(key, len(x), 2))
    pad = ((2, 2), (2, 2)) + (((0, 0),) if channels else ())
    for i, (dy, dx) in enumerate(offsets):
        want = np.pad(x[i], pad)[dy : dy + 5, dx : dx + 7]
        np.testing.assert_array_equal(got[i], want)
    assert got.dtype == np.uint8 and got.shape == x.shape
    assert offsets.min() >= 0 and offsets.max() <= 4


def test_crop_without_padding_is_the_identity():
    x = jnp.asarray(_images())
    np.testing.assert_array_equal(augment.random_crop(jax.random.key(0), x, 0), x)


def test_flip_mirrors_exactly_the_drawn_examples():
    x = _images(n=64)
    key = jax.random.key(1)
    got = np.asarray(augment.random_flip(key, jnp.asarray(x)))
    flipped = np.asarray(jax.random.bernoulli(key, 0.5, (64,)))
    for i in range(64):
        np.testing.assert_array_equal(got[i], x[i, :, ::-1] if flipped[i] else x[i])
    assert 10 < flipped.sum() < 54  # both branches are exercised


def test_make_augment_checks_its_arguments():
    assert augment.make_augment("none") is None
    with pytest.raises(ValueError, match="augment must be one of"):
        augment.make_augment("rotate")
    with pytest.raises(ValueError, match="padding"):
        augment.make_augment("crop", -1)


def _image_dataset():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (120, 8, 8)).astype(np.uint8)
    y = (x[:, :4].mean((1, 2)) > x[:, 4:].mean((1, 2))).astype(np.int32)
    return from_arrays(x[:90], y[:90], x[90:], y[90:], num_classes=2, num_clients=6, compact=True)


def test_cohort_augments_each_client_with_its_own_key():
    """Gathered through the cohort == augment(fold_in(key, client id), x) client by client."""
    ds = _image_dataset()
    fn = augment.make_augment("crop+flip", 2)
    ids = jnp.asarray([4, 1, 3], jnp.int32)
    key = jax.random.key(9)
    train = jax.tree.map(jnp.asarray, ds.train)
    plain = Cohort.from_store(train, ids, ds.train.max_examples).materialize()
    got = Cohort.from_store(
        train, ids, ds.train.max_examples, augment=fn, augment_key=key
    ).materialize()
    for row, cid in enumerate([4, 1, 3]):
        want = fn(jax.random.fold_in(key, cid), plain.x[row])
        np.testing.assert_array_equal(got.x[row], want)
    np.testing.assert_array_equal(got.y, plain.y)
    assert not np.array_equal(got.x, plain.x)


def _run(ds, kind, seed=0):
    model = models.create("cnn-4", feature_shape=ds.feature_shape, num_classes=2)
    algo = algorithms.fed_avg(
        model,
        client_optimizer=optax.sgd(0.1),
        server_optimizer=optax.sgd(1.0),
        epochs=1,
        batch_size=5,
    )
    return simulate.run(
        algo, ds, rounds=3, clients_per_round=3, eval_every=3, seed=seed, progress=False,
        augment=augment.make_augment(kind, 2),
    )  # fmt: skip


def test_augmented_runs_are_reproducible_and_differ_from_plain_ones():
    ds = _image_dataset()
    a, b = _run(ds, "crop+flip"), _run(ds, "crop+flip")
    plain = _run(ds, "none")
    jax.tree.map(np.testing.assert_array_equal, a.state.params, b.state.params)
    assert a.history[-1]["test_loss"] == b.history[-1]["test_loss"]
    assert a.history[-1]["test_loss"] != plain.history[-1]["test_loss"]


def test_augmenting_flat_features_is_one_config_error():
    config = default_config.get_config()
    config.client.augment = "flip"
    with pytest.raises(experiment.ConfigError, match="needs images"):
        experiment.build_checked_dataset(config)
