"""FD: per-label means and leave-one-out targets against NumPy loops, protocol, groups, bytes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_only_sampled_clients_changed, client_params, cohort_of

from fedjax_kd import models, simulate
from fedjax_kd.algorithms import personal
from fedjax_kd.algorithms.fd import (
    available_uploads,
    fd,
    fd_loss,
    leave_one_out_targets,
    per_label_mean_softmax,
)
from fedjax_kd.client import local_train
from fedjax_kd.simulate import jit_round

C = 10


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_label_means(logits, labels, count, num_classes):
    """Python loop: mean softmax per label over the real examples."""
    means = np.zeros((num_classes, num_classes))
    counts = np.zeros(num_classes, np.int64)
    for i in range(count):
        means[labels[i]] += softmax(logits[i])
        counts[labels[i]] += 1
    for label in range(num_classes):
        if counts[label]:
            means[label] /= counts[label]
    return means, counts


def np_leave_one_out(means, counts, available, ids, weighting):
    """Python loop over receivers, labels and senders."""
    n, c, _ = means.shape
    out = np.zeros((len(ids), c, c))
    for k, receiver in enumerate(ids):
        for label in range(c):
            num, den = np.zeros(c), 0.0
            for j in range(n):
                if j == receiver or not available[j] or counts[j, label] == 0:
                    continue
                w = counts[j, label] if weighting == "count" else 1.0
                num += w * means[j, label]
                den += w
            if den > 0:
                out[k, label] = num / den
    return out


def test_per_label_means_hand_computed_and_numpy_loop():
    # Hand-computed: labels (1, 1, 0) with equal logits give uniform rows for
    # labels 0 and 1, a zero row for label 2; the padded 4th example is ignored.
    logits = jnp.zeros((4, 3))
    means, counts = per_label_mean_softmax(
        logits, jnp.array([1, 1, 0, 2]), jnp.array([True, True, True, False]), 3
    )
    np.testing.assert_allclose(means, [[1 / 3] * 3, [1 / 3] * 3, [0, 0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(counts, [1, 2, 0])
    # A non-finite padded row changes nothing.
    nan_pad = per_label_mean_softmax(
        logits.at[3].set(jnp.nan), jnp.array([1, 1, 0, 2]), jnp.array([True, True, True, False]), 3
    )
    np.testing.assert_array_equal(nan_pad[0], means)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20, C)).astype(np.float32)
    y = rng.integers(0, 4, size=20)  # labels 4..9 absent
    means, counts = per_label_mean_softmax(jnp.asarray(z), jnp.asarray(y), jnp.arange(20) < 15, C)
    ref_means, ref_counts = np_label_means(z, y, 15, C)
    np.testing.assert_allclose(means, ref_means, atol=1e-6)
    np.testing.assert_array_equal(counts, ref_counts)


@pytest.mark.parametrize("weighting", ["count", "uniform"])
def test_leave_one_out_targets_match_numpy_loop(weighting):
    rng = np.random.default_rng(1)
    n = 7
    counts = rng.integers(0, 4, size=(n, C)) * (rng.random((n, C)) < 0.6)
    counts[:, 9] = 0
    counts[3, 9] = 5  # only client 3 holds label 9: it gets no target for it
    means = rng.dirichlet(np.ones(C), size=(n, C)) * (counts > 0)[..., None]
    available = np.array([True, True, False, True, True, True, False])
    ids = np.array([3, 0, 2, 6])  # receivers with and without an upload of their own
    got = leave_one_out_targets(
        jnp.asarray(means, jnp.float32),
        jnp.asarray(counts, jnp.int32),
        jnp.asarray(available),
        jnp.asarray(ids),
        label_weighting=weighting,
    )
    expected = np_leave_one_out(means, counts, available, ids, weighting)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.all(np.asarray(got[0, 9]) == 0.0)
    assert np.allclose(np.asarray(got[1, 9]).sum(), 1.0)  # client 0 sees client 3's row


def test_leave_one_out_hand_computed():
    # Label 0: client 0 (2 examples, mean a) and client 1 (1 example, mean b);
    # client 2 has uploaded nothing.
    a, b, zero = np.array([0.8, 0.2]), np.array([0.2, 0.8]), np.zeros(2)
    means = jnp.asarray(np.array([[a, zero], [b, zero], [zero, zero]]))
    counts = jnp.array([[2, 0], [1, 0], [0, 0]])
    available = jnp.array([True, True, False])
    # Client 0 receives client 1's row; client 2 the count-weighted mean of both.
    got = leave_one_out_targets(means, counts, available, jnp.array([0, 2]))
    np.testing.assert_allclose(got[0, 0], b, rtol=1e-6)
    np.testing.assert_allclose(got[1, 0], (2 * a + b) / 3, rtol=1e-6)
    np.testing.assert_allclose(got[:, 1], 0.0)
    uniform = leave_one_out_targets(
        means, counts, available, jnp.array([2]), label_weighting="uniform"
    )
    np.testing.assert_allclose(uniform[0, 0], (a + b) / 2, rtol=1e-6)


def test_available_uploads_respect_the_staleness_window():
    upload_round = jnp.array([-1, 0, 1, 2, 2])
    np.testing.assert_array_equal(available_uploads(upload_round, 3, 1), [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(available_uploads(upload_round, 3, 2), [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(available_uploads(upload_round, 3, None), [0, 1, 1, 1, 1])
    np.testing.assert_array_equal(available_uploads(jnp.full(3, -1), 0, 1), [0, 0, 0])


def test_fd_loss_matches_numpy(linear):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 64)).astype(np.float32)
    y = rng.integers(0, C, size=5)
    t = rng.dirichlet(np.ones(C), size=5).astype(np.float32)
    t[2] = 0.0  # a label without a target: no distillation term
    params = linear.init(jax.random.key(0))
    valid = jnp.array([True, True, True, True, False])
    loss, task_sum = fd_loss(linear.apply, 0.5)(params, {"x": x, "y": y, "targets": t}, valid)
    logp = np.log(softmax(np.asarray(linear.apply(params, x), np.float64)))
    ce = -logp[np.arange(5), y]
    per = ce + 0.5 * -(t * logp).sum(-1)
    np.testing.assert_allclose(loss, per[:4].mean(), rtol=1e-5)
    np.testing.assert_allclose(task_sum, ce[:4].sum(), rtol=1e-5)


HYPER = dict(client_optimizer=optax.sgd(0.1), epochs=2, batch_size=8)


def test_two_rounds_follow_the_protocol(digits_proxy, linear):
    """Round 0 has no targets; round 1 distils to the leave-one-out of round 0's uploads."""
    num_groups = 2
    kwargs = dict(num_clients=30, num_classes=C, **HYPER)
    algo = fd([linear, linear], gamma=0.7, **kwargs)
    no_kd = fd([linear, linear], gamma=0.0, **kwargs)
    step = jit_round(algo)
    ids0 = jnp.array([4, 0, 22, 1, 7, 15], jnp.int32)
    ids1 = jnp.array([4, 8, 2, 3, 7, 11], jnp.int32)  # 4 and 7 again
    state0 = algo.init(jax.random.key(0))
    key0, key1 = jax.random.key(10), jax.random.key(11)
    state1, m0 = step(state0, cohort_of(digits_proxy, ids0), key0, None, ids0)
    # Round 0: no upload is held yet, so gamma changes nothing and nothing is sent down.
    ref1, _ = jit_round(no_kd)(state0, cohort_of(digits_proxy, ids0), key0, None, ids0)
    chex.assert_trees_all_equal(state1.stores, ref1.stores)
    np.testing.assert_array_equal(m0["downlink_bytes"], [0] * 6)
    np.testing.assert_array_equal(m0["uplink_bytes"], [C * C * 4 + C * 4] * 6)

    # The uploads are the trained models' per-label means (NumPy loop).
    train = np.asarray(digits_proxy.train.y), np.asarray(digits_proxy.train.count)
    for client in ids0.tolist():
        params = client_params(state1.stores, client, num_groups)
        logits = np.asarray(linear.apply(params, digits_proxy.train.x[client]))
        ref_means, ref_counts = np_label_means(logits, train[0][client], train[1][client], C)
        np.testing.assert_allclose(state1.label_means[client], ref_means, atol=1e-5)
        np.testing.assert_array_equal(state1.label_counts[client], ref_counts)
    np.testing.assert_array_equal(
        state1.upload_round, [0 if i in ids0.tolist() else -1 for i in range(30)]
    )

    # Round 1: Python loop with the targets written out.
    state2, m1 = step(state1, cohort_of(digits_proxy, ids1), key1, None, ids1)
    tables = np_leave_one_out(
        np.asarray(state1.label_means),
        np.asarray(state1.label_counts),
        np.asarray(state1.upload_round) == 0,
        ids1.tolist(),
        "count",
    )

    def loss(p, batch, valid):
        logp = jax.nn.log_softmax(linear.apply(p, batch["x"]))
        ce = -jnp.take_along_axis(logp, batch["y"][:, None], 1)[:, 0]
        per = ce - 0.7 * jnp.sum(batch["targets"] * logp, -1)
        return jnp.sum(per * valid) / jnp.maximum(valid.sum(), 1), jnp.sum(ce * valid)

    local = jax.jit(
        lambda p, ex, n, k: local_train(loss, p, optax.sgd(0.1), ex, n, k, epochs=2, batch_size=8)
    )
    keys = jax.random.split(jax.random.fold_in(key1, personal.PHASE_A), 6)
    cohort1 = cohort_of(digits_proxy, ids1)
    for k, client in enumerate(ids1.tolist()):
        targets = tables[k][np.asarray(cohort1.y[k])]
        p, _ = local(
            client_params(state1.stores, client, num_groups),
            {"x": cohort1.x[k], "y": cohort1.y[k], "targets": targets},
            cohort1.count[k],
            keys[k],
        )
        chex.assert_trees_all_close(
            client_params(state2.stores, client, num_groups), p, atol=1e-5, rtol=1e-5
        )
    # Everyone outside the cohort keeps model and upload.
    for client in sorted(set(range(30)) - set(ids1.tolist())):
        chex.assert_trees_all_equal(
            client_params(state2.stores, client, num_groups),
            client_params(state1.stores, client, num_groups),
        )
        np.testing.assert_array_equal(state2.label_means[client], state1.label_means[client])
        assert int(state2.upload_round[client]) == int(state1.upload_round[client])
    np.testing.assert_array_equal(m1["downlink_bytes"], [C * C * 4] * 6)


def test_heterogeneous_groups_run_through_simulate_traced_once(digits_proxy):
    ms = [
        models.create(n, feature_shape=(64,), num_classes=C) for n in ("mlp-8", "mlp-16", "mlp-32")
    ]
    k, rounds = 6, 3
    algo = fd(
        ms, num_clients=30, num_classes=C, label_weighting="uniform", max_staleness=None, **HYPER
    )
    traces = []

    def counting_round(state, cohort, key, server_data):
        traces.append(1)
        return algo.round(state, cohort, key, server_data)

    result = simulate.run(
        algo._replace(round=counting_round), digits_proxy, rounds=rounds, clients_per_round=k,
        eval_every=1, seed=0, progress=False,
    )  # fmt: skip
    assert len(traces) == 1
    # Uniform weighting: only the C x C table goes up; round 0 sends nothing down.
    assert [r["uplink_bytes"] for r in result.history] == [k * C * C * 4] * rounds
    assert [r["downlink_bytes"] for r in result.history] == [0] + [k * C * C * 4] * (rounds - 1)
    record = result.history[-1]
    for name in ("clients", "group0_mlp-8", "group1_mlp-16", "group2_mlp-32"):
        assert 0.0 <= record[f"{name}_test_accuracy"] <= 1.0

    sampled = assert_only_sampled_clients_changed(
        algo, result, rounds=rounds, k=k, num_clients=30, num_groups=3
    )
    np.testing.assert_array_equal(
        np.asarray(result.state.upload_round) >= 0, [i in sampled for i in range(30)]
    )


def test_bad_arguments_are_rejected(linear):
    with pytest.raises(ValueError, match="label_weighting"):
        fd([linear], num_clients=4, num_classes=C, label_weighting="median", **HYPER)
    with pytest.raises(ValueError, match="max_staleness"):
        fd([linear], num_clients=4, num_classes=C, max_staleness=0, **HYPER)
