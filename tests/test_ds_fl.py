"""DS-FL: entropy reduction against NumPy, a Python-loop round, groups, bytes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_only_sampled_clients_changed, client_params, cohort_of

from fedjax_kd import models, simulate
from fedjax_kd.algorithms import personal
from fedjax_kd.algorithms.ds_fl import aggregate_soft_labels, ds_fl, entropy
from fedjax_kd.client import local_train
from fedjax_kd.simulate import jit_round

C = 10


def np_entropy(p):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)


def test_era_hand_computed_and_numpy():
    # Hand-computed: the mean of (0.6, 0.4, 0) and (0.4, 0.2, 0.4) is (0.5, 0.3, 0.2);
    # ERA with T = 0.1 gives exp((5, 3, 2)) / sum.
    probs = jnp.array([[[0.6, 0.4, 0.0]], [[0.4, 0.2, 0.4]], [[1.0, 0.0, 0.0]]])
    weights = jnp.array([1.0, 1.0, 0.0])  # the third (empty) client is left out
    e = np.exp([5.0, 3.0, 2.0])
    np.testing.assert_allclose(
        aggregate_soft_labels(probs, weights, temperature=0.1), [e / e.sum()], rtol=1e-5
    )
    np.testing.assert_allclose(
        aggregate_soft_labels(probs, weights, aggregation="mean"), [[0.5, 0.3, 0.2]], rtol=1e-6
    )
    # NumPy formula on random soft labels.
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(C), size=(4, 6)).astype(np.float32)
    mean = p.mean(0)
    era = np.exp(mean / 0.3) / np.exp(mean / 0.3).sum(-1, keepdims=True)
    got = aggregate_soft_labels(jnp.asarray(p), jnp.ones(4), temperature=0.3)
    np.testing.assert_allclose(got, era, rtol=1e-5)
    np.testing.assert_allclose(entropy(got), np_entropy(era), rtol=1e-5)


def test_era_lowers_entropy_when_clients_agree_on_a_leading_class():
    # Exactly, per example: a uniform average mixed with a peak, p = (1 - a) u + a e_0.
    mix = jnp.linspace(0.01, 0.999, 25)[:, None]
    peaked = (1 - mix) / C + mix * jnp.eye(C)[0]
    plain = aggregate_soft_labels(peaked[None], jnp.ones(1), aggregation="mean")
    era = aggregate_soft_labels(peaked[None], jnp.ones(1), temperature=0.1)
    assert np.all(np.asarray(entropy(era)) < np.asarray(entropy(plain)))
    # On average, for non-IID clients: half of the 10 clients know each example's class.
    rng = np.random.default_rng(1)
    k, p = 10, 500
    label = rng.integers(0, C, size=p)
    knows = rng.random((k, p, 1)) < 0.5
    logits = rng.normal(size=(k, p, C)) + 4.0 * np.eye(C)[label] * knows
    probs = jnp.asarray(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), jnp.float32)
    plain = aggregate_soft_labels(probs, jnp.ones(k), aggregation="mean")
    era = aggregate_soft_labels(probs, jnp.ones(k), temperature=0.1)
    assert float(jnp.mean(entropy(era))) < 0.7 * float(jnp.mean(entropy(plain)))
    assert np.mean(np.asarray(entropy(era)) < np.asarray(entropy(plain))) > 0.95


def test_era_raises_entropy_when_the_mass_sits_on_few_classes():
    # The documented caveat: ERA lifts near-zero classes to exp(0) / Z.
    tie = jnp.array([[[0.5, 0.5] + [0.0] * (C - 2)]])
    one_hot = jnp.eye(C)[None, :3]
    for p in (tie, one_hot):
        era = aggregate_soft_labels(p, jnp.ones(1), temperature=0.1)
        assert np.all(np.asarray(entropy(era)) > np.asarray(entropy(p[0])))


HYPER = dict(client_optimizer=optax.sgd(0.1), epochs=2, batch_size=8)


@pytest.fixture(scope="module")
def reference_fns(linear):
    """The phases written out for one client, jitted once for the module."""

    def ce(p, batch, valid):
        logp = jax.nn.log_softmax(linear.apply(p, batch["x"]))
        v = -jnp.take_along_axis(logp, batch["y"][:, None], 1)[:, 0]
        return jnp.sum(v * valid) / jnp.maximum(valid.sum(), 1), jnp.sum(v * valid)

    def soft(p, batch, valid):
        v = -jnp.sum(batch["targets"] * jax.nn.log_softmax(linear.apply(p, batch["x"])), -1)
        return jnp.sum(v * valid) / jnp.maximum(valid.sum(), 1), jnp.sum(v * valid)

    train = jax.jit(
        lambda p, ex, n, k: local_train(ce, p, optax.sgd(0.1), ex, n, k, epochs=2, batch_size=8)
    )
    distil = jax.jit(
        lambda p, ex, n, k, lr: local_train(
            soft, p, optax.sgd(lr), ex, n, k, epochs=2, batch_size=16
        )
    )
    return train, distil


@pytest.mark.parametrize("distill_first", [False, True])
def test_round_equals_python_loop_and_leaves_other_clients_alone(
    digits_proxy, linear, reference_fns, distill_first
):
    num_groups, public_size = 2, 40
    algo = ds_fl(
        [linear, linear],
        num_clients=30,
        public_size=public_size,
        distill_epochs=2,
        distill_batch_size=16,
        distill_first=distill_first,
        server_model=linear,
        server_optimizer=optax.sgd(0.2),
        **HYPER,
    )
    ids = jnp.array([4, 0, 22, 1, 7, 15], jnp.int32)
    cohort = cohort_of(digits_proxy, ids)
    proxy = jnp.asarray(digits_proxy.proxy_x)
    state = algo.init(jax.random.key(0))
    key = jax.random.key(5)
    new, metrics = jit_round(algo)(state, cohort, key, {"proxy_x": proxy}, ids)

    train, distil = reference_fns
    train_keys = jax.random.split(jax.random.fold_in(key, personal.PHASE_A), 6)
    distill_keys = jax.random.split(jax.random.fold_in(key, personal.PHASE_B), 6)
    params = [client_params(state.stores, int(i), num_groups) for i in ids]

    def update(params):
        return [
            train(p, {"x": cohort.x[k], "y": cohort.y[k]}, cohort.count[k], train_keys[k])[0]
            for k, p in enumerate(params)
        ]

    if not distill_first:
        params = update(params)
    idx = jax.random.choice(
        jax.random.fold_in(key, personal.SUBSET), proxy.shape[0], (public_size,), False
    )
    x_pub = proxy[idx]
    probs = np.stack([np.asarray(jax.nn.softmax(linear.apply(p, x_pub))) for p in params])
    mean = probs.mean(0)
    targets = np.exp(mean / 0.1) / np.exp(mean / 0.1).sum(-1, keepdims=True)
    ex = {"x": x_pub, "targets": targets}
    params = [distil(p, ex, public_size, distill_keys[k], 0.1)[0] for k, p in enumerate(params)]
    if distill_first:
        params = update(params)
    for k, client in enumerate(ids.tolist()):
        chex.assert_trees_all_close(
            client_params(new.stores, client, num_groups), params[k], atol=1e-5, rtol=1e-5
        )
    server, _ = distil(
        state.server,
        ex,
        public_size,
        jax.random.fold_in(key, personal.SERVER),
        0.2,
    )
    chex.assert_trees_all_close(new.server, server, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(metrics["target_entropy"], np_entropy(targets).mean(), rtol=1e-4)
    for client in sorted(set(range(30)) - set(ids.tolist())):
        chex.assert_trees_all_equal(
            client_params(new.stores, client, num_groups),
            client_params(state.stores, client, num_groups),
        )
    # Bytes: soft labels [P, C] float32 up; indices [P] int32 + targets [P, C] down.
    np.testing.assert_array_equal(metrics["uplink_bytes"], [public_size * C * 4] * 6)
    np.testing.assert_array_equal(metrics["downlink_bytes"], [public_size * (C + 1) * 4] * 6)
    assert int(metrics["distill_examples"]) == 6 * public_size * 2
    assert int(metrics["server_distill_examples"]) == public_size * 2


def test_heterogeneous_groups_run_through_simulate_traced_once(digits_proxy):
    ms = [
        models.create(n, feature_shape=(64,), num_classes=C) for n in ("mlp-8", "mlp-16", "mlp-32")
    ]
    public_size, k, rounds = 32, 6, 3
    algo = ds_fl(
        ms, num_clients=30, public_size=public_size, distill_batch_size=16, server_model=ms[2],
        **HYPER,
    )  # fmt: skip
    traces = []

    def counting_round(state, cohort, key, server_data):
        traces.append(1)
        return algo.round(state, cohort, key, server_data)

    result = simulate.run(
        algo._replace(round=counting_round), digits_proxy, rounds=rounds, clients_per_round=k,
        eval_every=rounds, seed=0, progress=False,
    )  # fmt: skip
    assert len(traces) == 1
    record = result.history[-1]
    assert record["uplink_bytes"] == k * public_size * C * 4
    assert record["downlink_bytes"] == k * public_size * (C + 1) * 4
    assert result.summary["downlink_bytes"] == rounds * k * public_size * (C + 1) * 4
    for name in ("clients", "group0_mlp-8", "group1_mlp-16", "group2_mlp-32", "server"):
        assert 0.0 <= record[f"{name}_test_accuracy"] <= 1.0
    assert record["test_accuracy"] == record["clients_test_accuracy"]
    assert 0.0 <= record["target_entropy"] <= np.log(C)

    assert_only_sampled_clients_changed(
        algo, result, rounds=rounds, k=k, num_clients=30, num_groups=3
    )


def test_bad_arguments_are_rejected(linear):
    with pytest.raises(ValueError, match="aggregation"):
        ds_fl([linear], num_clients=4, public_size=4, aggregation="median", **HYPER)
    with pytest.raises(ValueError, match="era_temperature"):
        ds_fl([linear], num_clients=4, public_size=4, era_temperature=0.0, **HYPER)
