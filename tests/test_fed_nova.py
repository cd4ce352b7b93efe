"""FedNova (arXiv 2007.07481): normalized averaging of heterogeneous local work.

Oracles: one round against a NumPy loop of local (momentum) SGD, normalization
and the tau_eff-scaled server step on hand-sized clients of different sizes
with stragglers; equal local work reduces to FedAvg; tau_i counted by hand and
by the authors' normalizer recurrence; chunked equals unchunked; a CLI run by
name.
"""

import json
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_kd import cli
from fedjax_kd.algorithms.fed_avg import client_inputs, fed_avg
from fedjax_kd.algorithms.fed_nova import (
    fed_nova,
    local_steps,
    normalized_client_update,
    normalizer,
)
from fedjax_kd.client import epoch_order, make_client_update
from fedjax_kd.data import ClientData, Cohort

D, C = 3, 2  # features, classes
W0 = np.array([[0.2, -0.1], [-0.3, 0.4], [0.1, 0.05]], np.float32)
B0 = np.array([0.05, -0.05], np.float32)


class _Model(NamedTuple):
    init: object
    apply: object


LINEAR = _Model(
    init=lambda key: {"w": jnp.asarray(W0), "b": jnp.asarray(B0)},
    apply=lambda p, x: x @ p["w"] + p["b"],
)


def _data(counts, n, seed=0):
    rng = np.random.default_rng(seed)
    k = len(counts)
    x = rng.normal(size=(k, n, D)).astype(np.float32)
    y = rng.integers(0, C, size=(k, n)).astype(np.int32)
    mask = np.arange(n)[None, :] < np.asarray(counts)[:, None]
    x, y = np.where(mask[..., None], x, 0.0), np.where(mask, y, 0)
    return ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(counts, jnp.int32))


def _jit_round(algo, chunk_size=None):
    return jax.jit(lambda s, d, k: algo.round(s, Cohort.from_data(d, chunk_size=chunk_size), k))


def _np_local_sgd(x, y, count, key, budget, *, lr, rho, batch_size):
    """Local heavy-ball SGD in float64 on local_train's batches; returns (w, b, steps)."""
    w, b = W0.astype(np.float64), B0.astype(np.float64)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    steps = 0
    for e in range(budget):
        order = np.asarray(epoch_order(jax.random.fold_in(key, e), count, x.shape[0]))[:count]
        for s in range(0, count, batch_size):
            idx = order[s : s + batch_size]
            xb, yb = x[idx].astype(np.float64), y[idx]
            z = xb @ w + b
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(idx)), yb] -= 1.0
            g = p / len(idx)  # gradient of the batch's mean cross-entropy
            vw, vb = rho * vw + xb.T @ g, rho * vb + g.sum(0)
            w, b = w - lr * vw, b - lr * vb
            steps += 1
    return w, b, steps


@pytest.mark.parametrize("rho,drop", [(0.0, False), (0.5, True)])
def test_round_matches_numpy_reference(rho, drop):
    """Clients of 5, 2, 7, 8 examples (B = 3), E = 3, half of them stragglers:
    tau_i, ||a_i||_1, d_i, p_i, tau_eff and x - tau_eff sum p_i d_i by hand."""
    counts, n, epochs, bs, lr = [5, 2, 7, 8], 8, 3, 3, 0.5
    data = _data(counts, n)
    algo = fed_nova(
        LINEAR,
        client_optimizer=optax.sgd(lr, momentum=rho or None),
        server_optimizer=optax.sgd(1.0),
        epochs=epochs,
        batch_size=bs,
        straggler_fraction=0.5,
        drop_stragglers=drop,
        momentum=rho,
    )
    state = algo.init(jax.random.key(0))
    key = jax.random.key(7)  # budgets [1, 3, 3, 2]: tau [2, 3, 9, 6]
    new, metrics = _jit_round(algo)(state, data, key)

    inputs = client_inputs(key, 4, epochs=epochs, straggler_fraction=0.5)
    budgets = np.asarray(inputs["epochs"])
    assert sorted(budgets.tolist()).count(epochs) == 2  # two stragglers
    x, y = np.asarray(data.x), np.asarray(data.y)
    deltas, norms, taus, weights = [], [], [], []
    for k in range(4):
        if drop and budgets[k] < epochs:
            continue
        w, b, tau = _np_local_sgd(
            x[k], y[k], counts[k], inputs["key"][k], budgets[k], lr=lr, rho=rho, batch_size=bs
        )
        # The authors' recurrence: c <- rho c + 1, ||a||_1 += c (plain SGD: += 1).
        c = a = 0.0
        for _ in range(tau):
            c = rho * c + 1.0
            a += c
        deltas.append((W0 - w, B0 - b))
        norms.append(a)
        taus.append(tau)
        weights.append(counts[k])
    assert len(set(taus)) == len(taus), taus  # heterogeneous local work
    p = np.asarray(weights, np.float64) / np.sum(weights)
    tau_eff = float(np.dot(p, norms))
    nova = [sum(p[i] * deltas[i][j] / norms[i] for i in range(len(p))) for j in (0, 1)]
    expected_w, expected_b = W0 - tau_eff * nova[0], B0 - tau_eff * nova[1]
    np.testing.assert_allclose(float(metrics["tau_eff"]), tau_eff, rtol=1e-6)
    np.testing.assert_allclose(new.params["w"], expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.params["b"], expected_b, rtol=1e-5, atol=1e-6)
    # FedAvg's x - sum p_i Delta_i is far from it: the test tells the two apart.
    avg_w = W0 - sum(p[i] * deltas[i][0] for i in range(len(p)))
    assert np.abs(avg_w - expected_w).max() > 100 * (1e-6 + 1e-5 * np.abs(expected_w).max())
    up = np.asarray(metrics["uplink_bytes"])
    assert ((up == 0) == (drop & (budgets < epochs))).all()


def test_equal_local_work_is_fedavg():
    """Equal sizes, no stragglers: tau_eff / tau = 1, so FedNova's rounds are
    FedAvg's (a server momentum that is not scale-free, two rounds)."""
    kwargs = dict(
        client_optimizer=optax.sgd(0.3),
        server_optimizer=optax.sgd(0.7, momentum=0.9),
        epochs=2,
        batch_size=3,
    )
    data = _data([6, 6, 6, 6], 8, seed=1)
    nova, avg = fed_nova(LINEAR, **kwargs), fed_avg(LINEAR, **kwargs)
    a = b = nova.init(jax.random.key(0))
    nova_round, avg_round = _jit_round(nova), _jit_round(avg)
    for r in range(2):
        key = jax.random.fold_in(jax.random.key(9), r)
        a, ma = nova_round(a, data, key)
        b, mb = avg_round(b, data, key)
        assert float(ma["tau_eff"]) == 4.0  # 2 epochs * ceil(6 / 3)
        np.testing.assert_allclose(ma["train_loss"], mb["train_loss"], rtol=1e-6)
        chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(a.params["w"]) - W0).max() > 1e-2  # the params did move


@pytest.mark.parametrize(
    "n,bs,cases",
    [
        # (count, budget, tau by hand) for a client padded to 8 rows, B = 3, E = 3
        (8, 3, [(8, 3, 9), (7, 3, 9), (7, 2, 6), (3, 3, 3), (4, 1, 2), (1, 3, 3), (0, 3, 0)]),
        # B > N: one batch of the whole (padded) client per epoch
        (4, 16, [(3, 3, 3), (4, 2, 2), (1, 1, 1)]),
    ],
)
def test_tau_counts_the_real_steps(n, bs, cases):
    base = make_client_update(LINEAR.apply, optax.sgd(0.1), epochs=3, batch_size=bs)
    update = normalized_client_update(base)

    @jax.jit
    def run(d, count, budget):
        args = (LINEAR.init(None), d.x[0], d.y[0], count, jax.random.key(1))
        return update(*args, num_epochs=budget), base(*args, num_epochs=budget)

    data = _data([n], n)
    for count, budget, tau in cases:
        out, raw = run(data, jnp.int32(count), jnp.int32(budget))
        assert int(out.metrics["local_steps"]) == tau, (count, budget)
        assert int(local_steps(count, budget, bs)) == tau
        assert float(out.metrics["nova_norm"]) == tau  # vanilla SGD: ||a_i||_1 = tau_i
        # d_i = Delta_i / tau_i (and 0 without a step)
        np.testing.assert_allclose(out.delta["w"], raw.delta["w"] / max(tau, 1), rtol=1e-6)
        assert (np.abs(np.asarray(raw.delta["w"])).max() > 0) == (tau > 0)
    # Momentum: the closed form against the authors' recurrence.
    for rho in (0.5, 0.9):
        c = a = 0.0
        for tau in range(1, 13):
            c = rho * c + 1.0
            a += c
            np.testing.assert_allclose(float(normalizer(jnp.int32(tau), rho)), a, rtol=1e-5)


def test_chunked_equals_unchunked():
    """Five clients in chunks of 2 (a padded last chunk), uniform weights, dropped
    stragglers: the same round; tau_eff the mean of the kept clients' tau_i."""
    counts, epochs, bs = [5, 2, 7, 8, 3], 3, 3
    data = _data(counts, 8, seed=2)
    algo = fed_nova(
        LINEAR,
        client_optimizer=optax.sgd(0.4),
        server_optimizer=optax.sgd(1.0),
        epochs=epochs,
        batch_size=bs,
        uniform_weighting=True,
        straggler_fraction=0.4,
        drop_stragglers=True,
    )
    state = algo.init(jax.random.key(0))
    key = jax.random.key(4)
    whole, mw = _jit_round(algo)(state, data, key)
    chunked, mc = _jit_round(algo, chunk_size=2)(state, data, key)
    chex.assert_trees_all_close(whole.params, chunked.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mw["tau_eff"], mc["tau_eff"], rtol=1e-6)
    np.testing.assert_array_equal(mw["uplink_bytes"], mc["uplink_bytes"])
    budgets = np.asarray(client_inputs(key, 5, epochs=epochs, straggler_fraction=0.4)["epochs"])
    kept = budgets == epochs
    assert kept.sum() == 3
    taus = np.asarray(local_steps(np.asarray(counts), budgets, bs))[kept]
    np.testing.assert_allclose(float(mw["tau_eff"]), taus.mean(), rtol=1e-6)


def test_cli_runs_by_name(tmp_path):
    argv = [
        "run",
        "--config.algorithm.name=fednova",
        "--config.rounds=2",
        "--config.eval_every=1",
        "--config.client.epochs=2",
        "--config.client.straggler_fraction=0.5",
        "--no-progress",
        "--workdir",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["tau_eff"]) and r["tau_eff"] > 0 for r in rows)
