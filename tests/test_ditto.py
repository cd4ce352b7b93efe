"""Ditto (personal models tied to FedAvg's global model): fedjax_kd/algorithms/ditto.py.

Oracles: two rounds against a float64 NumPy loop of the paper's Algorithm 1 on
a softmax regression (clients of different sizes; the global params, every
sampled client's personal model, the personal train loss, and the rows of
clients outside the cohort); the global model equals FedAvg's round for round,
bit for bit; with lam = 0 the personal update is plain local SGD from the
client's previous personal model (``client.local_train``); a chunked cohort
equals the unchunked one; a CLI run reports both models.
"""

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import SOFTMAX
from helpers import SOFTMAX_B0 as B0
from helpers import SOFTMAX_PAD as PAD
from helpers import SOFTMAX_W0 as W0
from helpers import jit_round as _round
from helpers import softmax_clients as _data

from fedjax_kd import algorithms, cli, losses
from fedjax_kd.algorithms.ditto import PERSONAL_STREAM, ditto
from fedjax_kd.algorithms.fed_avg import fed_avg
from fedjax_kd.client import epoch_order, local_train


def _grad_loss(p, x, y):
    """Mean softmax cross-entropy gradient over a batch and the batch's CE sum (float64)."""
    logits = x @ p["w"] + p["b"]
    logits = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    ce_sum = -np.sum(np.log(prob[np.arange(len(y)), y]))
    prob[np.arange(len(y)), y] -= 1.0
    return {"w": x.T @ prob / len(y), "b": prob.mean(axis=0)}, ce_sum


def _sgd(p, key, x, y, n, *, epochs, batch, lr, anchor=None, lam=0.0):
    """Epochs of shuffled minibatch SGD as local_train orders them; returns (p, CE sum)."""
    p = {k: v.copy() for k, v in p.items()}
    ce = 0.0
    for e in range(epochs):
        order = np.asarray(epoch_order(jax.random.fold_in(key, e), n, PAD))[:n]
        for s in range(math.ceil(n / batch)):
            rows = order[s * batch : (s + 1) * batch]
            g, ce_sum = _grad_loss(p, x[rows], y[rows])
            ce += ce_sum
            for k in p:
                prox = 0.0 if anchor is None else lam * (p[k] - anchor[k])
                p[k] = p[k] - lr * (g[k] + prox)
    return p, ce


@pytest.mark.parametrize("uniform,shared", [(False, True), (True, False)])
def test_two_rounds_match_a_numpy_loop(uniform, shared):
    """Algorithm 1 by hand over two rounds: FedAvg's global update (E = 2) and the
    personal update v -= lr (grad F_k(v) + lam (v - w^t)) for 3 epochs from the
    stored v_k; clients outside the cohort keep their rows bit for bit."""
    counts = [2, 5, 3, 4, 1]
    n_clients, epochs, p_epochs, batch, lr, lam = len(counts), 2, 3, 2, 0.3, 0.5
    data = _data(counts)
    algo = ditto(
        SOFTMAX, client_optimizer=optax.sgd(lr), server_optimizer=optax.sgd(1.0),
        epochs=epochs, batch_size=batch, num_clients=n_clients, lam=lam,
        personal_epochs=p_epochs, shared_batches=shared, uniform_weighting=uniform,
    )  # fmt: skip
    state = algo.init(jax.random.key(0))
    xs, ys = np.asarray(data.x, np.float64), np.asarray(data.y)
    w = {"w": W0.astype(np.float64), "b": B0.astype(np.float64)}
    v = [{k: a.copy() for k, a in w.items()} for _ in range(n_clients)]
    for r, ids in enumerate([[0, 2, 3], [3, 1, 0]]):
        before = state.personal.rows
        key = jax.random.key(10 + r)
        state, metrics = _round(algo, state, data, ids, key)
        deltas, weights, p_ce, seen = [], [], 0.0, 0
        for i, k_i in zip(ids, jax.random.split(key, len(ids)), strict=True):
            n = counts[i]
            w_i, _ = _sgd(w, k_i, xs[i], ys[i], n, epochs=epochs, batch=batch, lr=lr)
            p_key = k_i if shared else jax.random.fold_in(k_i, PERSONAL_STREAM)
            v[i], ce = _sgd(
                v[i], p_key, xs[i], ys[i], n, epochs=p_epochs, batch=batch, lr=lr,
                anchor=w, lam=lam,
            )  # fmt: skip
            p_ce += ce / p_epochs  # n * (client's mean CE over its steps)
            seen += n
            deltas.append({k: w_i[k] - w[k] for k in w})
            weights.append(1.0 if uniform else float(n))
        wsum = sum(weights)
        mean = {k: sum(a * d[k] for a, d in zip(weights, deltas, strict=True)) / wsum for k in w}
        w = {k: w[k] + mean[k] for k in w}
        for k in w:
            np.testing.assert_allclose(state.params[k], w[k], rtol=1e-5, atol=1e-6)
            stacked = np.stack([row[k] for row in v])
            np.testing.assert_allclose(state.personal.rows[k], stacked, rtol=1e-5, atol=1e-6)
            for i in set(range(n_clients)) - set(ids):  # outside the cohort: untouched
                np.testing.assert_array_equal(state.personal.rows[k][i], before[k][i])
        np.testing.assert_allclose(metrics["personal_train_loss"], p_ce / seen, rtol=1e-5)
        assert bool(metrics["finite"])
    # Client 4 was never sampled: it still holds the initial model.
    np.testing.assert_array_equal(state.personal.rows["w"][4], W0)


def _setup():
    """Six clients of 1..5 examples, two epochs of batches of 2."""
    common = dict(
        client_optimizer=optax.sgd(0.2), server_optimizer=optax.sgd(1.0), epochs=2,
        batch_size=2,
    )  # fmt: skip
    return _data([5, 2, 4, 3, 5, 1], seed=1), common


def test_global_model_is_fedavg_and_lam0_personal_is_local_sgd():
    """Over two rounds the global params, train loss and bytes are FedAvg's bit for
    bit; with lam = 0 every sampled client's new personal model is local_train's
    plain cross-entropy SGD from its previous personal model (on the client's key),
    and so does not depend on the global model."""
    data, common = _setup()
    algo = ditto(SOFTMAX, num_clients=6, lam=0.0, personal_epochs=1, **common)
    base = fed_avg(SOFTMAX, **common)
    s, f = algo.init(jax.random.key(3)), base.init(jax.random.key(3))
    chex.assert_trees_all_equal(s.params, f.params)

    def ce_loss(p, batch, valid):
        per_example = losses.cross_entropy(SOFTMAX.apply(p, batch["x"]), batch["y"])
        return losses.masked_mean(per_example, valid), jnp.sum(jnp.where(valid, per_example, 0.0))

    @jax.jit
    def local(p, x, y, count, key):
        return local_train(
            ce_loss, p, optax.sgd(0.2), {"x": x, "y": y}, count, key, epochs=1, batch_size=2
        )[0]

    for r, ids in enumerate([[4, 0, 2, 5], [1, 2, 3, 4]]):
        before = s.personal.rows
        key = jax.random.key(7 + r)
        s, ms = _round(algo, s, data, ids, key)
        f, mf = _round(base, f, data, ids, key)
        chex.assert_trees_all_equal(s.params, f.params)
        assert float(ms["train_loss"]) == float(mf["train_loss"])
        np.testing.assert_array_equal(ms["uplink_bytes"], mf["uplink_bytes"])
        np.testing.assert_array_equal(ms["downlink_bytes"], mf["downlink_bytes"])
        for i, k_i in zip(ids, jax.random.split(key, len(ids)), strict=True):
            prev = jax.tree.map(lambda a, i=i: a[i], before)
            want = local(prev, data.x[i], data.y[i], data.count[i], k_i)
            got = jax.tree.map(lambda a, i=i: a[i], s.personal.rows)
            chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    # Client 2 trained in both rounds: round 2 continued from round 1's model.
    assert not np.allclose(s.personal.rows["w"][2], W0)


def test_chunked_cohort_equals_unchunked():
    """5 clients in chunks of 2 (the last chunk padded) give the unchunked round's
    global params and personal store, over two rounds with different cohorts."""
    data, common = _setup()
    algo = ditto(SOFTMAX, num_clients=6, lam=1.0, **common)
    states = []
    for chunk in (None, 2):
        state = algo.init(jax.random.key(0))
        for r, ids in enumerate([[0, 1, 2, 3, 4], [5, 3, 1, 0, 2]]):
            state, metrics = _round(algo, state, data, ids, jax.random.key(r), chunk_size=chunk)
        states.append((state, metrics))
    (a, ma), (b, mb) = states
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(ma, mb, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.personal.rows["w"][5], b.personal.rows["w"][5])


def test_cli_run_reports_personal_and_global(tmp_path):
    """The spec runs from the CLI and the summary holds both models; the headline
    test_accuracy is the personal models' mean; the records hold personal_train_loss."""
    name = "ditto" if "ditto" in algorithms.SPECS else "fedjax_kd.algorithms.ditto:SPEC"
    argv = ["run", f"--config.algorithm.name={name}", "--config.eval_every=1"]
    argv += ["--config.client.epochs=1", "--config.model.student=linear", "--no-progress"]
    argv += ["--config.rounds=2", "--workdir", str(tmp_path)]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("personal_test_accuracy", "global_test_accuracy"):
        assert key in summary, key
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["round"] == 2 and math.isfinite(last["personal_train_loss"])
    assert summary["test_accuracy"] == summary["personal_test_accuracy"]
    assert 0.0 < summary["global_test_accuracy"] <= 1.0
    assert summary["uplink_bytes"] > summary["downlink_bytes"] > 0  # + one weight per client
