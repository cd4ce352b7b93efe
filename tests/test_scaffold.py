"""SCAFFOLD (option II control variates): fedjax_kd/algorithms/scaffold.py.

Oracles: two rounds against a float64 NumPy loop of Algorithm 1 on a softmax
regression (minibatch SGD on clients of different sizes, so every client takes
its own number of steps K_i; the global params, the server control c and every
client's c_i must match); round 1 (all control variates zero) equals FedAvg's
round bit for bit; a chunked cohort equals the unchunked one; the bytes of
both messages; a CLI run by import path, resumed from a checkpoint, equals a
straight run.
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
from helpers import SOFTMAX_C as C
from helpers import SOFTMAX_D as D
from helpers import SOFTMAX_PAD as PAD
from helpers import SOFTMAX_W0 as W0
from helpers import jit_round as _round
from helpers import softmax_clients as _data
from helpers import softmax_grad as _grad

from fedjax_kd import algorithms, cli
from fedjax_kd.algorithms.fed_avg import fed_avg
from fedjax_kd.algorithms.scaffold import scaffold
from fedjax_kd.client import epoch_order


@pytest.mark.parametrize("uniform", [True, False])
def test_two_rounds_match_a_numpy_loop(uniform):
    """Algorithm 1 by hand: K_i = E * ceil(n_i / B) corrected SGD steps on the
    client's own shuffle, option II, x += eta_g * mean dy, c += (1/N) sum dc."""
    counts = [2, 5, 3, 4]  # K_i = 2, 6, 4, 4 with E = 2, B = 2 (padded to 5: 6 scan steps)
    n_clients, epochs, batch, lr, eta_g = len(counts), 2, 2, 0.3, 0.7
    data = _data(counts)
    algo = scaffold(
        SOFTMAX, client_optimizer=optax.sgd(lr), server_optimizer=optax.sgd(1.0),
        epochs=epochs, batch_size=batch, num_clients=n_clients, client_lr=lr,
        server_lr=eta_g, uniform_weighting=uniform,
    )  # fmt: skip
    state = algo.init(jax.random.key(0))
    xs, ys = np.asarray(data.x, np.float64), np.asarray(data.y)
    x = {"w": W0.astype(np.float64), "b": B0.astype(np.float64)}
    c = {k: np.zeros_like(v) for k, v in x.items()}
    ci = [{k: np.zeros_like(v) for k, v in x.items()} for _ in range(n_clients)]
    for r, ids in enumerate([[0, 2, 3], [3, 1, 0]]):
        key = jax.random.key(10 + r)
        state, metrics = _round(algo, state, data, ids, key)
        client_keys = jax.random.split(key, len(ids))
        dys, dcs, weights = [], [], []
        for i, k_i in zip(ids, client_keys, strict=True):
            n = counts[i]
            y_i = {k: v.copy() for k, v in x.items()}
            steps = 0
            for e in range(epochs):
                order = np.asarray(epoch_order(jax.random.fold_in(k_i, e), n, PAD))[:n]
                for s in range(math.ceil(n / batch)):
                    rows = order[s * batch : (s + 1) * batch]
                    gw, gb = _grad(y_i["w"], y_i["b"], xs[i, rows], ys[i, rows])
                    for name, g in (("w", gw), ("b", gb)):
                        y_i[name] -= lr * (g - ci[i][name] + c[name])
                    steps += 1
            new = {k: ci[i][k] - c[k] + (x[k] - y_i[k]) / (steps * lr) for k in x}
            dys.append({k: y_i[k] - x[k] for k in x})
            dcs.append({k: new[k] - ci[i][k] for k in x})
            weights.append(1.0 if uniform else float(n))
            ci[i] = new
        wsum = sum(weights)
        for k in x:
            x[k] = x[k] + eta_g * sum(w * d[k] for w, d in zip(weights, dys, strict=True)) / wsum
            c[k] = c[k] + (len(ids) / n_clients) * np.mean([d[k] for d in dcs], axis=0)
        for k in x:
            np.testing.assert_allclose(state.params[k], x[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(state.control[k], c[k], rtol=1e-5, atol=1e-6)
            stacked = np.stack([row[k] for row in ci])
            np.testing.assert_allclose(state.client_controls.rows[k], stacked, rtol=1e-5, atol=1e-6)
        norm = math.sqrt(sum(float(np.sum(v**2)) for v in c.values()))
        np.testing.assert_allclose(metrics["control_norm"], norm, rtol=1e-5)
        assert bool(metrics["finite"])


def _setup():
    """Six clients of 1..5 examples, two epochs of batches of 2."""
    common = dict(
        client_optimizer=optax.sgd(0.2), server_optimizer=optax.sgd(1.0), epochs=2,
        batch_size=2,
    )  # fmt: skip
    return _data([5, 2, 4, 3, 5, 1], seed=1), common


def test_round_one_is_fedavg_and_round_two_is_not():
    """With c = c_i = 0 the corrected gradient is the gradient: round 1's params
    equal FedAvg's bit for bit; round 2 (c != 0) moves away from FedAvg."""
    data, common = _setup()
    algo = scaffold(SOFTMAX, num_clients=6, client_lr=0.2, **common)
    base = fed_avg(SOFTMAX, **common)
    s, f = algo.init(jax.random.key(3)), base.init(jax.random.key(3))
    chex.assert_trees_all_equal(s.params, f.params)
    s, ms = _round(algo, s, data, [4, 0, 2, 5], jax.random.key(7))
    f, mf = _round(base, f, data, [4, 0, 2, 5], jax.random.key(7))
    chex.assert_trees_all_equal(s.params, f.params)
    assert float(ms["train_loss"]) == float(mf["train_loss"])
    assert float(ms["control_norm"]) > 0
    s, _ = _round(algo, s, data, [1, 2, 3, 4], jax.random.key(8))
    f, _ = _round(base, f, data, [1, 2, 3, 4], jax.random.key(8))
    leaves = zip(*map(jax.tree.leaves, (s.params, f.params)), strict=True)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in leaves)
    assert gap > 1e-4


def test_chunked_cohort_equals_unchunked():
    """5 clients in chunks of 2 (the last chunk padded) give the unchunked round's
    params, server control and store, over two rounds with different cohorts."""
    data, common = _setup()
    algo = scaffold(SOFTMAX, num_clients=6, client_lr=0.2, **common)
    states = []
    for chunk in (None, 2):
        state = algo.init(jax.random.key(0))
        for r, ids in enumerate([[0, 1, 2, 3, 4], [5, 3, 1, 0, 2]]):
            state, metrics = _round(algo, state, data, ids, jax.random.key(r), chunk_size=chunk)
        states.append((state, metrics))
    (a, ma), (b, mb) = states
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(ma, mb, rtol=1e-5, atol=1e-6)


def test_bytes_are_both_messages():
    """Uplink: Delta y_i and Delta c_i (2 x 48 bytes) plus the float32 weight;
    downlink: x and c (2 x 48 bytes), per cohort client."""
    data = _data([2, 5, 3])
    algo = scaffold(
        SOFTMAX, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
        epochs=1, batch_size=2, num_clients=3, client_lr=0.1,
    )  # fmt: skip
    _, metrics = _round(algo, algo.init(jax.random.key(0)), data, [0, 1, 2], jax.random.key(1))
    params_bytes = (D * C + C) * 4
    np.testing.assert_array_equal(metrics["uplink_bytes"], [2 * params_bytes + 4] * 3)
    np.testing.assert_array_equal(metrics["downlink_bytes"], [2 * params_bytes] * 3)


def test_cli_run_by_import_path_and_resume(tmp_path):
    """The spec runs from the CLI; 1 round + resume to 2 equals 2 rounds straight."""
    # Once registered as a built-in, the name 'scaffold' is taken by it.
    name = "scaffold" if "scaffold" in algorithms.SPECS else "fedjax_kd.algorithms.scaffold:SPEC"
    argv = ["run", f"--config.algorithm.name={name}", "--config.eval_every=1"]
    argv += ["--config.client.epochs=1", "--config.model.student=linear", "--no-progress"]
    assert cli.main([*argv, "--config.rounds=2", "--workdir", str(tmp_path / "a")]) == 0
    b = str(tmp_path / "b")
    assert cli.main([*argv, "--config.rounds=1", "--workdir", b]) == 0
    assert cli.main([*argv, "--config.rounds=2", "--workdir", b]) == 0
    sa, sb = (json.loads((tmp_path / w / "summary.json").read_text()) for w in "ab")
    for key in ("test_accuracy", "test_loss", "train_loss", "uplink_bytes", "downlink_bytes"):
        assert sa[key] == sb[key], key
    assert sa["uplink_bytes"] > sa["downlink_bytes"] > 0  # + one weight per client
