"""The run loop: reproducibility, one trace, evaluation, bytes, divergence."""

import jax
import numpy as np
import optax
import pytest

from fedjax_kd import algorithms, compress, models, simulate


def fedavg(dataset, lr=0.1, name="mlp-16"):
    model = models.create(name, feature_shape=dataset.feature_shape, num_classes=10)
    algo = algorithms.fed_avg(
        model,
        client_optimizer=optax.sgd(lr),
        server_optimizer=optax.sgd(1.0),
        epochs=1,
        batch_size=8,
    )
    return model, algo


def run(algo, dataset, seed=0, rounds=4, **kwargs):
    return simulate.run(
        algo, dataset, rounds=rounds, clients_per_round=5, eval_every=2, seed=seed,
        progress=False, **kwargs,
    )  # fmt: skip


def without_time(history):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in history]


def test_same_seed_identical_different_seed_different(digits_small):
    _, algo = fedavg(digits_small)
    a, b, c = run(algo, digits_small, 0), run(algo, digits_small, 0), run(algo, digits_small, 1)
    assert without_time(a.history) == without_time(b.history)
    jax.tree.map(np.testing.assert_array_equal, a.state.params, b.state.params)
    assert without_time(a.history) != without_time(c.history)


def test_round_is_traced_once(digits_small):
    _, algo = fedavg(digits_small)
    traces = []

    def counting_round(state, cohort, key, server_data):
        traces.append(1)
        return algo.round(state, cohort, key, server_data)

    run(algo._replace(round=counting_round), digits_small, rounds=6)
    assert len(traces) == 1


def test_history_cadence_bytes_and_evaluation(digits_small):
    model, algo = fedavg(digits_small)
    result = simulate.run(
        algo, digits_small, rounds=5, clients_per_round=4, eval_every=2, seed=0, progress=False,
        eval_batch_size=64,
    )  # fmt: skip
    assert [r["round"] for r in result.history] == [2, 4, 5]
    param_bytes = compress.tree_bytes(result.state.params)
    for r in result.history:
        assert r["downlink_bytes"] == 4 * param_bytes
        assert r["uplink_bytes"] == 4 * (param_bytes + 4)
        assert r["cumulative_uplink_bytes"] == r["round"] * 4 * (param_bytes + 4)
    assert result.summary["uplink_bytes"] == 5 * 4 * (param_bytes + 4)
    # Batched, padded evaluation equals a direct NumPy computation on the test set.
    logits = np.asarray(model.apply(result.state.params, digits_small.test_x))
    expected = float((logits.argmax(-1) == digits_small.test_y).mean())
    np.testing.assert_allclose(result.summary["test_accuracy"], expected, rtol=1e-6)


def test_batch_test_set_pads_with_mask():
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    y = np.arange(5, dtype=np.int32)
    xb, yb, mask = simulate.batch_test_set(x, y, 2)
    assert xb.shape == (3, 2, 2) and yb.shape == (3, 2)
    np.testing.assert_array_equal(mask.reshape(-1), [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(yb.reshape(-1)[:5], y)


def test_non_finite_update_stops_with_round(digits_small):
    _, algo = fedavg(digits_small, lr=1e30)
    with pytest.raises(simulate.NonFiniteError, match=r"round \d+"):
        run(algo, digits_small, rounds=10)


def test_non_finite_server_step_stops_in_round_1(digits_small):
    # Client deltas are finite; only the server step (inf * 0 = NaN) is not.
    model = models.create("linear", feature_shape=(64,), num_classes=10)
    algo = algorithms.fed_avg(
        model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(float("inf")),
        epochs=1, batch_size=8,
    )  # fmt: skip
    with pytest.raises(simulate.NonFiniteError, match=r"^round 1:"):
        run(algo, digits_small, rounds=3)


def test_learns(digits_small):
    _, algo = fedavg(digits_small, lr=0.1)
    result = run(algo, digits_small, rounds=30)
    assert result.history[-1]["test_accuracy"] > 0.7
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


@pytest.mark.parametrize("rounds_per_call", [2, 3])
def test_rounds_in_one_scan_equal_one_round_per_call(digits_small, rounds_per_call):
    _, algo = fedavg(digits_small)
    kwargs = dict(rounds=7, clients_per_round=5, eval_every=4, seed=0, progress=False)
    one = simulate.run(algo, digits_small, **kwargs)
    block = simulate.run(algo, digits_small, rounds_per_call=rounds_per_call, **kwargs)
    assert [r["round"] for r in block.history] == [4, 7]
    for a, b in zip(without_time(one.history), without_time(block.history), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
        one.state.params,
        block.state.params,
    )


def test_non_finite_inside_a_block_names_its_round(digits_small):
    _, algo = fedavg(digits_small, lr=1e30)
    with pytest.raises(simulate.NonFiniteError, match=r"^round 1:"):
        run(algo, digits_small, rounds=6, rounds_per_call=3)
