"""FedMD: consensus and digest against NumPy, a Python-loop round, groups, bytes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import client_params, cohort_of

from fedjax_kd import models, simulate
from fedjax_kd.algorithms import personal
from fedjax_kd.algorithms.fed_md import consensus_logits, fed_md, make_shared_target_train
from fedjax_kd.client import local_train
from fedjax_kd.data import Cohort
from fedjax_kd.losses import l1_logit_loss
from fedjax_kd.simulate import jit_round

C = 10


def test_consensus_is_the_mean_of_client_logits():
    # Hand-computed: two clients, one example, two classes; the empty third is left out.
    logits = jnp.array([[[1.0, -2.0]], [[3.0, 4.0]], [[100.0, 100.0]]])
    got = consensus_logits(logits, jnp.array([True, True, False]))
    np.testing.assert_allclose(got, [[2.0, 1.0]])
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 7, C)).astype(np.float32)
    np.testing.assert_allclose(consensus_logits(jnp.asarray(z), jnp.ones(5)), z.mean(0), rtol=1e-6)


def test_digest_step_matches_numpy_gradient_of_the_l1_loss(linear):
    """One digest step of a linear model: ``W -= lr * x^T sign(xW + b - t) / (P C)``."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 64)).astype(np.float32)
    t = rng.normal(size=(6, C)).astype(np.float32)
    params = linear.init(jax.random.key(0))
    (w_name, b_name) = ("kernel", "bias")
    w, b = np.asarray(params["head"][w_name]), np.asarray(params["head"][b_name])
    z = x @ w + b
    np.testing.assert_allclose(l1_logit_loss(jnp.asarray(z), t), np.abs(z - t).mean(-1), rtol=1e-6)
    lr = 0.5
    digest = make_shared_target_train(
        linear.apply, l1_logit_loss, optax.sgd(lr), epochs=1, batch_size=6
    )
    stacked = jax.tree.map(lambda a: a[None], params)
    new, metrics = jax.jit(digest)(stacked, x, t, jax.random.key(0)[None])
    s = np.sign(z - t) / (6 * C)
    np.testing.assert_allclose(new["head"][w_name][0], w - lr * x.T @ s, atol=1e-6)
    np.testing.assert_allclose(new["head"][b_name][0], b - lr * s.sum(0), atol=1e-6)
    np.testing.assert_allclose(metrics["train_loss"][0], np.abs(z - t).mean(), rtol=1e-5)


HYPER = dict(client_optimizer=optax.sgd(0.1), epochs=2, batch_size=8)


def test_round_equals_python_loop_and_leaves_other_clients_alone(digits_proxy, linear):
    # Two groups with the same architecture: the group bookkeeping is exercised
    # while the loop reference compiles one function per phase.
    num_groups, public_size = 2, 40
    algo = fed_md(
        [linear, linear],
        num_clients=30,
        public_size=public_size,
        digest_epochs=2,
        digest_batch_size=16,
        **HYPER,
    )
    ids = jnp.array([4, 0, 22, 1, 7, 15], jnp.int32)  # group 0 (even), then group 1 (odd)
    cohort = cohort_of(digits_proxy, ids)
    proxy = jnp.asarray(digits_proxy.proxy_x)
    state = algo.init(jax.random.key(0))
    key = jax.random.key(5)
    new, metrics = jit_round(algo)(state, cohort, key, {"proxy_x": proxy}, ids)

    # Reference: a Python loop over clients with the losses written out.
    idx = jax.random.choice(
        jax.random.fold_in(key, personal.SUBSET), proxy.shape[0], (public_size,), False
    )
    x_pub = proxy[idx]
    before = [client_params(state.stores, int(i), num_groups) for i in ids]
    logits = np.stack([np.asarray(linear.apply(p, x_pub)) for p in before])
    consensus = logits.mean(0)

    def l1(p, batch, valid):
        v = jnp.mean(jnp.abs(linear.apply(p, batch["x"]) - batch["targets"]), -1)
        return jnp.sum(v * valid) / jnp.maximum(valid.sum(), 1), jnp.sum(v * valid)

    def ce(p, batch, valid):
        logp = jax.nn.log_softmax(linear.apply(p, batch["x"]))
        v = -jnp.take_along_axis(logp, batch["y"][:, None], 1)[:, 0]
        return jnp.sum(v * valid) / jnp.maximum(valid.sum(), 1), jnp.sum(v * valid)

    digest = jax.jit(lambda p, ex, n, k: local_train(l1, p, optax.sgd(0.1), ex, n, k, epochs=2,
                                                     batch_size=16))  # fmt: skip
    revisit = jax.jit(lambda p, ex, n, k: local_train(ce, p, optax.sgd(0.1), ex, n, k, epochs=2,
                                                      batch_size=8))  # fmt: skip
    digest_keys = jax.random.split(jax.random.fold_in(key, personal.PHASE_A), 6)
    revisit_keys = jax.random.split(jax.random.fold_in(key, personal.PHASE_B), 6)
    for k, client in enumerate(ids.tolist()):
        p, _ = digest(before[k], {"x": x_pub, "targets": consensus}, public_size, digest_keys[k])
        p, _ = revisit(p, {"x": cohort.x[k], "y": cohort.y[k]}, cohort.count[k], revisit_keys[k])
        chex.assert_trees_all_close(
            client_params(new.stores, client, num_groups), p, atol=1e-5, rtol=1e-5
        )
    # Everyone else keeps the model they had, bit for bit.
    for client in sorted(set(range(30)) - set(ids.tolist())):
        chex.assert_trees_all_equal(
            client_params(new.stores, client, num_groups),
            client_params(state.stores, client, num_groups),
        )
    assert int(new.round) == 1
    # Bytes: logits [P, C] float32 up; indices [P] int32 and consensus [P, C] down.
    np.testing.assert_array_equal(metrics["uplink_bytes"], [public_size * C * 4] * 6)
    np.testing.assert_array_equal(metrics["downlink_bytes"], [public_size * (C + 1) * 4] * 6)
    assert int(metrics["public_forward_examples"]) == 6 * public_size
    assert int(metrics["digest_examples"]) == 6 * public_size * 2


def test_heterogeneous_groups_run_through_simulate_traced_once(digits_proxy):
    ms = [
        models.create(n, feature_shape=(64,), num_classes=C) for n in ("mlp-8", "mlp-16", "mlp-32")
    ]
    public_size, k, rounds = 32, 6, 3
    algo = fed_md(ms, num_clients=30, public_size=public_size, digest_batch_size=16, **HYPER)
    traces = []

    def counting_round(state, cohort, key, server_data):
        traces.append(1)
        assert set(server_data) == {"proxy_x"}  # the ids come with the cohort
        assert cohort.ids.shape == (k,)
        return algo.round(state, cohort, key, server_data)

    result = simulate.run(
        algo._replace(round=counting_round), digits_proxy, rounds=rounds, clients_per_round=k,
        eval_every=rounds, seed=0, progress=False,
    )  # fmt: skip
    assert len(traces) == 1
    record = result.history[-1]
    assert record["uplink_bytes"] == k * public_size * C * 4
    assert record["downlink_bytes"] == k * public_size * (C + 1) * 4
    assert result.summary["uplink_bytes"] == rounds * k * public_size * C * 4
    for name in ("clients", "group0_mlp-8", "group1_mlp-16", "group2_mlp-32"):
        assert 0.0 <= record[f"{name}_test_accuracy"] <= 1.0
    assert record["test_accuracy"] == record["clients_test_accuracy"]
    # The headline averages every client's model: the groups' mean weighted by size.
    groups = [record[f"group{g}_{m.name}_test_accuracy"] for g, m in enumerate(ms)]
    np.testing.assert_allclose(record["test_accuracy"], np.mean(groups), rtol=1e-5)

    # Clients never sampled still hold their initial models.
    init_key, rounds_key = simulate.seed_keys(0)
    sampled = set()
    for r in range(rounds):
        key_r = jax.random.fold_in(rounds_key, r)
        ids = algo.sample_cohort(jax.random.fold_in(key_r, simulate.SAMPLE), 30, k)
        assert [int(i) % 3 for i in ids] == [0, 0, 1, 1, 2, 2]
        sampled |= set(ids.tolist())
    initial = jax.jit(algo.init)(init_key)
    for client in range(30):
        same = jax.tree.map(
            lambda a, b: bool(jnp.all(a == b)),
            client_params(result.state.stores, client, 3),
            client_params(initial.stores, client, 3),
        )
        assert all(jax.tree.leaves(same)) == (client not in sampled), client


def test_errors_name_what_is_missing(digits_proxy, linear):
    algo = fed_md([linear], num_clients=30, public_size=10, **HYPER)
    state = jax.eval_shape(algo.init, jax.random.key(0))
    cohort = cohort_of(digits_proxy, [0, 1])
    ids = jnp.array([0, 1])
    proxy = jnp.asarray(digits_proxy.proxy_x)

    def trace(algo, server_data):  # the checks run while tracing: nothing is compiled
        def round_fn(s, c, k):
            return algo.round(s, Cohort.from_data(c, ids), k, server_data)

        return jax.eval_shape(round_fn, state, cohort, jax.random.key(0))

    with pytest.raises(ValueError, match="proxy_fraction"):
        trace(algo, None)
    too_big = fed_md([linear], num_clients=30, public_size=1000, **HYPER)
    with pytest.raises(ValueError, match="public_size"):
        trace(too_big, {"proxy_x": proxy})
    with pytest.raises(ValueError, match="cannot be split"):
        trace(
            fed_md([linear] * 3, num_clients=30, public_size=10, **HYPER),
            {"proxy_x": proxy},
        )
