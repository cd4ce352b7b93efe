"""Top-k sparsification, SVD as a FedAvg uplink codec, and per-client error feedback.

Oracles: top-k and its bytes by hand; three rounds of FedAvg with top-k and error
feedback against a plain NumPy loop that keeps every client's residual (the
residual store, the server params and the bytes must match); keep-everything
top-k against the dense round; a checkpointed run resumes bit-exactly with its
residuals.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import FakeModel, feature_client_update, feature_clients, one_error_line

from fedjax_kd import cli, compress
from fedjax_kd.algorithms.fed_avg import from_client_update
from fedjax_kd.data import Cohort


def test_topk_by_hand():
    x = jnp.array([0.5, -4.0, 1.0, 3.0, 0.0, -0.25, 2.0, 0.1, -1.5, 0.2])
    sent, nbytes = compress.topk_sparsify(x, 0.2)  # k = 2: -4 and 3
    np.testing.assert_array_equal(sent, [0, -4.0, 0, 3.0, 0, 0, 0, 0, 0, 0])
    assert nbytes == 2 * (4 + 4)  # two float32 values, two int32 indices
    same, dense = compress.topk_sparsify(x, 0.5)  # 5 * 8 bytes >= 40 dense: sent dense
    np.testing.assert_array_equal(same, x)
    assert dense == 40
    tree, total = compress.topk_tree({"a": x, "b": jnp.ones((3, 4))}, 0.1)
    assert int(total) == 8 + 16  # k = ceil(0.1 * 10) = 1 and ceil(0.1 * 12) = 2
    assert int(jnp.count_nonzero(tree["a"])) == 1 and float(tree["a"][1]) == -4.0
    assert int(jnp.count_nonzero(tree["b"])) == 2


DIM, CLIENTS = 12, 5


def _topk_np(v, k):
    out = np.zeros_like(v)
    idx = np.argsort(-np.abs(v), kind="stable")[:k]
    out[idx] = v[idx]
    return out


def test_error_feedback_residuals_match_a_numpy_loop():
    """Three rounds, cohorts {0,1,2}, {2,3,4}, {0,3,4}: each member sends
    topk(delta + e) and keeps e <- delta + e - sent; the others keep theirs."""
    model = FakeModel(init=lambda key: {"w": jnp.linspace(-1.0, 1.0, DIM)}, apply=None)
    algo = from_client_update(
        model, feature_client_update, optax.sgd(1.0), topk_fraction=0.25, error_feedback=True,
        num_clients=CLIENTS,
    )  # fmt: skip
    data = feature_clients(CLIENTS, DIM)
    state = algo.init(jax.random.key(0))
    cohorts = [[0, 1, 2], [2, 3, 4], [0, 3, 4]]
    w = np.linspace(-1.0, 1.0, DIM).astype(np.float32)
    e = np.zeros((CLIENTS, DIM), np.float32)
    x, count = np.asarray(data.x), np.asarray(data.count)
    k = 3  # ceil(0.25 * 12)
    for r, ids in enumerate(cohorts):
        rows = jnp.array(ids)
        cohort = Cohort.from_data(jax.tree.map(lambda a, rows=rows: a[rows], data), rows)
        state, metrics = algo.round(state, cohort, jax.random.key(r))
        sent_sum, weight = np.zeros(DIM, np.float32), 0.0
        for i in ids:
            m = x[i, 0] + 0.3 * w + e[i]
            sent = _topk_np(m, k)
            e[i] = m - sent
            sent_sum += count[i] * sent
            weight += count[i]
        w = w - sent_sum / weight
        np.testing.assert_allclose(state.opt_state.residuals.rows["w"], e, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.params["w"], w, rtol=1e-5, atol=1e-6)
        # k values and k indices (4 bytes each) plus the float32 weight, per client.
        np.testing.assert_array_equal(metrics["uplink_bytes"], [k * 8 + 4] * 3)


def test_keep_everything_topk_is_the_dense_round():
    """topk_fraction = 1 sends every entry (dense): same params as no codec, and
    zero residuals."""
    model = FakeModel(init=lambda key: {"w": jnp.linspace(-1.0, 1.0, DIM)}, apply=None)
    data = feature_clients(CLIENTS, DIM)
    cohort = Cohort.from_data(data)
    outs = []
    for kwargs in ({}, {"topk_fraction": 1.0, "error_feedback": True, "num_clients": CLIENTS}):
        algo = from_client_update(model, feature_client_update, optax.sgd(1.0), **kwargs)
        outs.append(algo.round(algo.init(jax.random.key(0)), cohort, jax.random.key(1))[0])
    np.testing.assert_allclose(outs[0].params["w"], outs[1].params["w"], rtol=1e-6, atol=1e-7)
    assert not np.any(np.asarray(outs[1].opt_state.residuals.rows["w"]))


TINY = ["--config.rounds=4", "--config.eval_every=2", "--config.client.epochs=1", "--no-progress"]


def test_error_feedback_run_resumes_bit_exactly(tmp_path):
    """The residuals are checkpointed: 2 rounds + resume to 4 equals 4 straight, and
    fewer bytes go up than dense."""
    argv = [*TINY, "--config.client.topk_fraction=0.05", "--config.client.error_feedback=true"]
    assert cli.main(["run", *argv, "--workdir", str(tmp_path / "a")]) == 0
    half = [a if a != "--config.rounds=4" else "--config.rounds=2" for a in argv]
    assert (
        cli.main(["run", *half, "--config.checkpoint_every=2", "--workdir", str(tmp_path / "b")])
        == 0
    )
    assert cli.main(["run", *argv, "--workdir", str(tmp_path / "b"), "--resume"]) == 0
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert a["test_loss"] == b["test_loss"] and a["uplink_bytes"] == b["uplink_bytes"]
    assert a["uplink_bytes"] < 0.2 * a["downlink_bytes"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config.client.error_feedback=true"], "it feeds back what an uplink codec"),
        (
            ["--config.client.topk_fraction=0.1", "--config.client.svd_energy=0.9"],
            "choose one uplink codec",
        ),
        (["--config.client.topk_fraction=0.1", "--config.dp.clip_norm=1"], "lossy uplink codec"),
        (["--config.client.svd_energy=1.5"], "config key 'client.svd_energy'"),
        (
            ["--config.client.topk_fraction=0.1", "--config.algorithm.name=fedkd"],
            "uplink codecs work with fedavg",
        ),
    ],
)
def test_mistakes_are_one_error_line(capsys, no_run, extra, message):
    assert cli.main(["run", *TINY, *extra]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_a_client_dropped_as_non_finite_keeps_its_residual():
    """drop_nonfinite leaves a NaN client out of the round: its message was never used,
    so its residual stays what it was; the others' move on."""
    model = FakeModel(init=lambda key: {"w": jnp.linspace(-1.0, 1.0, DIM)})
    algo = from_client_update(
        model, feature_client_update, optax.sgd(1.0), topk_fraction=0.25, error_feedback=True,
        num_clients=CLIENTS, drop_nonfinite=True,
    )  # fmt: skip
    data = feature_clients(CLIENTS, DIM)
    state = algo.init(jax.random.key(0))
    state, _ = algo.round(state, Cohort.from_data(data), jax.random.key(1))
    before = np.asarray(state.opt_state.residuals.rows["w"])
    poisoned = data._replace(x=data.x.at[1].set(jnp.nan))
    state, metrics = algo.round(state, Cohort.from_data(poisoned), jax.random.key(2))
    after = np.asarray(state.opt_state.residuals.rows["w"])
    assert int(metrics["dropped_nonfinite"]) == 1
    np.testing.assert_array_equal(after[1], before[1])
    assert not np.array_equal(after[0], before[0]) and np.all(np.isfinite(after))
