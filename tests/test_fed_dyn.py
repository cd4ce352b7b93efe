"""FedDyn (Acar et al. 2021, Algorithm 1): fedjax_kd/algorithms/fed_dyn.py.

Oracles: two rounds against a float64 NumPy loop of Algorithm 1 on a softmax
regression (minibatch SGD on clients of different sizes, on the client's own
shuffle; the server model, h and every client's grad_i must match; once with
the paper's uniform average, once with example weighting and the authors'
gradient clipping); round 1 (all grad_i = 0, h = 0) equals FedProx with
mu = alpha plus the server correction computed by hand; a chunked cohort
equals the unchunked one; a CLI run by import path, resumed from a checkpoint,
equals a straight run.
"""

import json
import math

import chex
import jax
import numpy as np
import optax
import pytest
from helpers import SOFTMAX
from helpers import SOFTMAX_B0 as B0
from helpers import SOFTMAX_PAD as PAD
from helpers import SOFTMAX_W0 as W0
from helpers import jit_round as _round
from helpers import softmax_clients as _data
from helpers import softmax_grad as _grad

from fedjax_kd import algorithms, cli
from fedjax_kd.algorithms.fed_dyn import fed_dyn
from fedjax_kd.algorithms.fed_prox import fed_prox
from fedjax_kd.client import epoch_order


@pytest.mark.parametrize("uniform,clip", [(True, None), (False, 0.3)])
def test_two_rounds_match_a_numpy_loop(uniform, clip):
    """Algorithm 1 by hand: E epochs of minibatch SGD on
    L_i - <grad_i, theta> + (alpha/2)||theta - theta^{t-1}||^2, then
    grad_i -= alpha (theta_i - theta^{t-1}), h -= (alpha/m) sum (theta_i - theta^{t-1}),
    theta = mean theta_i - h/alpha. With ``clip``: the authors' clip of
    grad L_i - grad_i - alpha theta^{t-1} before alpha theta is added."""
    counts = [2, 5, 3, 4]
    n_clients, epochs, batch, lr, alpha = len(counts), 2, 2, 0.3, 0.4
    data = _data(counts)
    algo = fed_dyn(
        SOFTMAX, client_optimizer=optax.sgd(lr), server_optimizer=optax.sgd(1.0),
        epochs=epochs, batch_size=batch, num_clients=n_clients, alpha=alpha,
        uniform_weighting=uniform, clip_norm=clip,
    )  # fmt: skip
    state = algo.init(jax.random.key(0))
    xs, ys = np.asarray(data.x, np.float64), np.asarray(data.y)
    theta = {"w": W0.astype(np.float64), "b": B0.astype(np.float64)}
    h = {k: np.zeros_like(v) for k, v in theta.items()}
    gi = [{k: np.zeros_like(v) for k, v in theta.items()} for _ in range(n_clients)]
    clipped = 0
    for r, ids in enumerate([[0, 2, 3], [3, 1, 0]]):
        key = jax.random.key(10 + r)
        state, metrics = _round(algo, state, data, ids, key)
        client_keys = jax.random.split(key, len(ids))
        thetas, weights = [], []
        for i, k_i in zip(ids, client_keys, strict=True):
            n = counts[i]
            t_i = {k: v.copy() for k, v in theta.items()}
            for e in range(epochs):
                order = np.asarray(epoch_order(jax.random.fold_in(k_i, e), n, PAD))[:n]
                for s in range(math.ceil(n / batch)):
                    rows = order[s * batch : (s + 1) * batch]
                    gw, gb = _grad(t_i["w"], t_i["b"], xs[i, rows], ys[i, rows])
                    g_l = {"w": gw, "b": gb}
                    if clip is None:
                        step = {k: g_l[k] - gi[i][k] + alpha * (t_i[k] - theta[k]) for k in theta}
                    else:
                        u = {k: g_l[k] - gi[i][k] - alpha * theta[k] for k in theta}
                        norm = math.sqrt(sum(float(np.sum(v**2)) for v in u.values()))
                        clipped += norm > clip
                        scale = min(1.0, clip / norm)
                        step = {k: scale * u[k] + alpha * t_i[k] for k in theta}
                    for k in theta:
                        t_i[k] = t_i[k] - lr * step[k]
            for k in theta:
                gi[i][k] = gi[i][k] - alpha * (t_i[k] - theta[k])
            thetas.append(t_i)
            weights.append(1.0 if uniform else float(n))
        wsum = sum(weights)
        for k in theta:
            h[k] = h[k] - (alpha / n_clients) * sum(t[k] - theta[k] for t in thetas)
            mean = sum(w * t[k] for w, t in zip(weights, thetas, strict=True)) / wsum
            theta[k] = mean - h[k] / alpha
        for k in theta:
            np.testing.assert_allclose(state.params[k], theta[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(state.h[k], h[k], rtol=1e-5, atol=1e-7)
            stacked = np.stack([row[k] for row in gi])
            np.testing.assert_allclose(state.client_grads.rows[k], stacked, rtol=1e-5, atol=1e-7)
        norm = math.sqrt(sum(float(np.sum(v**2)) for v in h.values()))
        np.testing.assert_allclose(metrics["h_norm"], norm, rtol=1e-5)
        assert bool(metrics["finite"])
    if clip is not None:
        assert clipped > 0  # the clip was active on some steps


def _setup():
    """Six clients of 1..5 examples, two epochs of batches of 2."""
    common = dict(
        client_optimizer=optax.sgd(0.2), server_optimizer=optax.sgd(1.0), epochs=2,
        batch_size=2, uniform_weighting=True,
    )  # fmt: skip
    return _data([5, 2, 4, 3, 5, 1], seed=1), common


def test_round_one_is_fedprox_plus_the_server_correction():
    """With grad_i = 0 and h = 0 the client is FedProx's with mu = alpha (bit for bit:
    the same train loss); the server then takes FedProx's uniform mean theta' and
    sets h = -(alpha/m) |P| (theta' - theta0), theta = theta' - h/alpha by hand."""
    data, common = _setup()
    alpha, m, ids = 0.05, 6, [4, 0, 2, 5]
    algo = fed_dyn(SOFTMAX, num_clients=m, alpha=alpha, **common)
    prox = fed_prox(SOFTMAX, mu=alpha, **common)
    s, f = algo.init(jax.random.key(3)), prox.init(jax.random.key(3))
    chex.assert_trees_all_equal(s.params, f.params)
    theta0 = f.params
    s, ms = _round(algo, s, data, ids, jax.random.key(7))
    f, mf = _round(prox, f, data, ids, jax.random.key(7))
    assert float(ms["train_loss"]) == float(mf["train_loss"])
    np.testing.assert_array_equal(ms["uplink_bytes"], mf["uplink_bytes"])  # bytes as FedAvg
    np.testing.assert_array_equal(ms["downlink_bytes"], mf["downlink_bytes"])
    for k in theta0:
        moved = np.asarray(f.params[k], np.float64) - np.asarray(theta0[k], np.float64)
        h = -(alpha / m) * len(ids) * moved
        np.testing.assert_allclose(s.h[k], h, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(s.params[k], f.params[k] - h / alpha, rtol=1e-5, atol=1e-7)
        # eval_models' "average" is FedProx's model, the mean of the cohort's models
        np.testing.assert_allclose(
            algo.eval_models(s)["average"][1][k], f.params[k], rtol=1e-5, atol=1e-7
        )
    assert float(ms["h_norm"]) > 0
    rows = np.asarray(s.client_grads.rows["w"])
    assert np.all(rows[[1, 3]] == 0) and np.all(np.abs(rows[ids]).sum(axis=(1, 2)) > 0)


def test_chunked_cohort_equals_unchunked():
    """5 clients in chunks of 2 (the last chunk padded) give the unchunked round's
    params, h and grad_i store, over two rounds with different cohorts."""
    data, common = _setup()
    algo = fed_dyn(SOFTMAX, num_clients=6, alpha=0.1, **common)
    states = []
    for chunk in (None, 2):
        state = algo.init(jax.random.key(0))
        for r, ids in enumerate([[0, 1, 2, 3, 4], [5, 3, 1, 0, 2]]):
            state, metrics = _round(algo, state, data, ids, jax.random.key(r), chunk_size=chunk)
        states.append((state, metrics))
    (a, ma), (b, mb) = states
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(ma, mb, rtol=1e-5, atol=1e-6)


def test_cli_run_by_import_path_and_resume(tmp_path):
    """The spec runs from the CLI; 1 round + resume to 2 equals 2 rounds straight."""
    # Once registered as a built-in, the name 'feddyn' is taken by it.
    name = "feddyn" if "feddyn" in algorithms.SPECS else "fedjax_kd.algorithms.fed_dyn:SPEC"
    argv = ["run", f"--config.algorithm.name={name}", "--config.eval_every=1"]
    argv += ["--config.client.epochs=1", "--config.model.student=linear", "--no-progress"]
    assert cli.main([*argv, "--config.rounds=2", "--workdir", str(tmp_path / "a")]) == 0
    b = str(tmp_path / "b")
    assert cli.main([*argv, "--config.rounds=1", "--workdir", b]) == 0
    assert cli.main([*argv, "--config.rounds=2", "--workdir", b]) == 0
    sa, sb = (json.loads((tmp_path / w / "summary.json").read_text()) for w in "ab")
    for key in ("test_accuracy", "test_loss", "train_loss", "uplink_bytes", "downlink_bytes"):
        assert sa[key] == sb[key], key
    assert sa["uplink_bytes"] > sa["downlink_bytes"] > 0  # the delta and one weight per client
