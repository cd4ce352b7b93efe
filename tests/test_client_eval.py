"""Per-client evaluation (datasets with per-client test data), as the papers report it."""

import dataclasses

import numpy as np
import optax
import pytest

from fedjax_kd import algorithms, models, simulate


def test_client_accuracies_by_hand():
    # Clients: 2/4 right, 3/3 right, no test data, 0/1 right.
    got = simulate.client_accuracies(np.array([2.0, 3.0, 0.0, 0.0]), np.array([4, 3, 0, 1]))
    assert got["test_accuracy_clients_weighted"] == pytest.approx(5 / 8)
    assert got["test_accuracy_clients_mean"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    # NumPy's linear 10th percentile of [0, 0.5, 1]: 0 + 0.2 * (0.5 - 0) = 0.1.
    assert got["test_accuracy_clients_p10"] == pytest.approx(0.1)


@pytest.fixture(scope="module")
def with_test_clients(digits_small):
    """digits_small with its 360 test examples spread over 7 uneven test clients."""
    n = len(digits_small.test_y)
    owner = np.random.default_rng(0).choice(7, n, p=[0.3, 0.25, 0.15, 0.1, 0.1, 0.05, 0.05])
    return dataclasses.replace(digits_small, test_client=owner.astype(np.int32))


def _fedavg(dataset):
    model = models.create("mlp-16", feature_shape=dataset.feature_shape, num_classes=10)
    algo = algorithms.fed_avg(
        model,
        client_optimizer=optax.sgd(0.1),
        server_optimizer=optax.sgd(1.0),
        epochs=1,
        batch_size=8,
    )
    return model, algo


def test_per_client_accuracy_equals_a_numpy_recount(with_test_clients):
    ds = with_test_clients
    model, algo = _fedavg(ds)
    # eval_batch_size 50 does not divide 360: padded rows must count for no client.
    result = simulate.run(
        algo, ds, rounds=3, clients_per_round=5, eval_every=3, seed=0, progress=False,
        eval_batch_size=50,
    )  # fmt: skip
    last = result.history[-1]
    right = np.asarray(np.argmax(model.apply(result.state.params, ds.test_x), -1) == ds.test_y)
    counts = np.bincount(ds.test_client, minlength=7)
    per_client = np.bincount(ds.test_client, weights=right, minlength=7) / counts
    assert last["test_accuracy_clients_mean"] == pytest.approx(per_client.mean(), abs=1e-6)
    assert last["test_accuracy_clients_p10"] == pytest.approx(
        np.percentile(per_client, 10), abs=1e-6
    )
    # The example-weighted mean over clients is the pooled accuracy.
    assert last["test_accuracy_clients_weighted"] == pytest.approx(right.mean(), abs=1e-6)
    assert last["test_accuracy"] == pytest.approx(right.mean(), abs=1e-6)


def test_pooled_test_sets_report_no_client_metrics(digits_small):
    _, algo = _fedavg(digits_small)
    result = simulate.run(
        algo, digits_small, rounds=1, clients_per_round=5, eval_every=1, seed=0, progress=False
    )
    assert not [k for k in result.history[-1] if "clients" in k]


@pytest.mark.parametrize("width", [None, 2])
def test_parallel_points_report_their_own_client_metrics(with_test_clients, width):
    """Two seeds as one program (lax.map, or vmap at width 2): per-client metrics as alone."""
    ds = with_test_clients
    _, algo = _fedavg(ds)
    alone = [
        simulate.run(
            algo, ds, rounds=2, clients_per_round=5, eval_every=2, seed=s, progress=False
        ).history[-1]
        for s in (0, 1)
    ]
    group = simulate.run_parallel(
        lambda hp: algo,
        [simulate.Point(dataset=ds, seed=s) for s in (0, 1)],
        width=width,
        rounds=2,
        clients_per_round=5,
        eval_every=2,
        progress=False,
    )
    for one, point in zip(alone, group, strict=True):
        got = point.history[-1]
        for key in ("test_accuracy_clients_mean", "test_accuracy_clients_p10"):
            assert got[key] == pytest.approx(one[key], abs=1e-6)
    assert alone[0]["test_accuracy_clients_mean"] != alone[1]["test_accuracy_clients_mean"]
