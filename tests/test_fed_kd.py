"""FedKD: adaptive mutual loss against NumPy, vmap vs loop, mentor store, bytes, one trace."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import RANK_MARGIN, energy_margin

from fedjax_kd import compress, models, simulate
from fedjax_kd.algorithms.fed_kd import adaptive_mutual_losses, fed_kd, make_mutual_client_update
from fedjax_kd.data import Cohort


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_reference(zt, zs, y, valid, *, sg_denominator, sg_targets, kl_scale=1.0):
    """Values of (L_t, L_s) and the gradient of L_t + L_s w.r.t. (zt, zs), in float64."""
    zt, zs = zt.astype(np.float64), zs.astype(np.float64)
    pt, ps = np_softmax(zt), np_softmax(zs)
    onehot = np.eye(zt.shape[1])[y]
    v = valid.astype(np.float64)[:, None]
    n = valid.sum()
    ce_t = (-np.log(pt[np.arange(len(y)), y]) * valid).sum() / n
    ce_s = (-np.log(ps[np.arange(len(y)), y]) * valid).sum() / n
    kl_t = kl_scale * ((ps * (np.log(ps) - np.log(pt))).sum(-1) * valid).sum() / n  # KL(y_s||y_t)
    kl_s = kl_scale * ((pt * (np.log(pt) - np.log(ps))).sum(-1) * valid).sum() / n  # KL(y_t||y_s)
    d = ce_t + ce_s
    loss_t, loss_s = ce_t + kl_t / d, ce_s + kl_s / d
    # d/dz of mean CE and of mean KL(q || softmax(z)) w.r.t. the taught model's logits.
    dce_t, dce_s = v * (pt - onehot) / n, v * (ps - onehot) / n
    dkl_t_zt, dkl_s_zs = kl_scale * v * (pt - ps) / n, kl_scale * v * (ps - pt) / n
    g_t = dce_t + dkl_t_zt / d
    g_s = dce_s + dkl_s_zs / d
    if not sg_denominator:
        g_t -= kl_t / d**2 * dce_t
        g_s -= kl_s / d**2 * dce_s
    if not sg_targets:  # KL(p || q) also moves its first argument p = softmax(z)
        a_t = np.log(pt) - np.log(ps)  # gradient of L_s w.r.t. zt through y_t
        g_t += kl_scale * v * pt * (a_t - (pt * a_t).sum(-1, keepdims=True)) / n / d
        a_s = np.log(ps) - np.log(pt)
        g_s += kl_scale * v * ps * (a_s - (ps * a_s).sum(-1, keepdims=True)) / n / d
    return loss_t, loss_s, g_t, g_s


@pytest.mark.parametrize(
    "sg_denominator, sg_targets, reduction",
    [(True, True, "batchmean"), (False, True, "batchmean"), (True, False, "mean")],
)
def test_adaptive_mutual_loss_against_numpy(sg_denominator, sg_targets, reduction):
    rng = np.random.default_rng(0)
    zt = rng.normal(size=(5, 4)).astype(np.float32) * 2
    zs = rng.normal(size=(5, 4)).astype(np.float32)
    y = np.array([0, 3, 1, 1, 2])
    valid = np.array([True, True, True, False, True])
    kw = dict(
        stop_gradient_denominator=sg_denominator,
        stop_gradient_targets=sg_targets,
        kl_reduction=reduction,
    )

    def total(zt, zs):
        lt, ls, _ = adaptive_mutual_losses(zt, zs, jnp.asarray(y), jnp.asarray(valid), **kw)
        return lt + ls, (lt, ls)

    (_, (lt, ls)), (gt, gs) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(zt, zs)
    ref = numpy_reference(
        zt, zs, y, valid, sg_denominator=sg_denominator, sg_targets=sg_targets,
        kl_scale=0.25 if reduction == "mean" else 1.0,
    )  # fmt: skip
    np.testing.assert_allclose(lt, ref[0], rtol=1e-5)
    np.testing.assert_allclose(ls, ref[1], rtol=1e-5)
    np.testing.assert_allclose(gt, ref[2], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gs, ref[3], rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(gt[3], 0.0)  # the padded example has no gradient


def test_denominator_and_target_options_change_the_gradients():
    rng = np.random.default_rng(1)
    zt, zs = rng.normal(size=(2, 6, 5)).astype(np.float32)
    y, valid = jnp.array([0, 1, 2, 3, 4, 0]), jnp.ones(6, bool)

    def grads(**kw):
        def total(zt, zs):
            lt, ls, _ = adaptive_mutual_losses(zt, zs, y, valid, **kw)
            return lt + ls

        return jax.grad(total, argnums=(0, 1))(zt, zs)

    base = grads()
    for other in (grads(stop_gradient_denominator=False), grads(stop_gradient_targets=False)):
        assert not np.allclose(base[0], other[0], rtol=1e-3)
    # With stopped targets the mentor's loss sends nothing into the mentee.
    g = jax.grad(lambda zs: adaptive_mutual_losses(zt, zs, y, valid)[0])(zs)
    np.testing.assert_array_equal(g, 0.0)
    # An empty batch gives zero losses, not NaN.
    lt, ls, _ = adaptive_mutual_losses(zt, zs, y, jnp.zeros(6, bool))
    assert float(lt) == 0.0 and float(ls) == 0.0


MENTEE = models.create("mlp-8", feature_shape=(64,), num_classes=10)
MENTOR = models.create("mlp-16", feature_shape=(64,), num_classes=10)
COMMON = dict(
    num_clients=20,
    energy=compress.energy_schedule(rounds=4),
    client_optimizer=optax.sgd(0.1),
    server_optimizer=optax.sgd(1.0),
    epochs=2,
    batch_size=16,
)


def test_vmapped_round_equals_python_loop_and_keeps_other_mentors(digits_small):
    algo = fed_kd(MENTEE, MENTOR, **COMMON)
    ids = jnp.array([3, 0, 7, 12, 5], jnp.int32)
    cohort = jax.tree.map(lambda a: jnp.asarray(a)[ids], digits_small.train)
    state = algo.init(jax.random.key(0))
    key = jax.random.key(42)
    new_state, metrics = jax.jit(lambda s, c, k: algo.round(s, Cohort.from_data(c, ids), k))(
        state, cohort, key
    )

    update = jax.jit(
        make_mutual_client_update(MENTEE, MENTOR, optax.sgd(0.1), epochs=2, batch_size=16)
    )
    threshold = compress.energy_threshold(1 / 4)  # t = (round + 1) / rounds
    compress_tree = jax.jit(compress.compress_tree)
    keys = jax.random.split(key, len(ids))
    sent, up, counts, losses, deltas = [], [], [], [], []
    for k, cid in enumerate(ids):
        mentor_row = jax.tree.map(lambda a, cid=cid: a[cid], state.mentors.rows)
        out = update(
            state.params, cohort.x[k], cohort.y[k], cohort.count[k], keys[k], state=mentor_row
        )
        delta, new_mentor, m = out.delta, out.state, out.metrics
        rec, nbytes = compress_tree(delta, threshold)
        deltas.append(delta)
        sent.append(rec)
        up.append(int(nbytes) + 4)  # + the float32 aggregation weight
        counts.append(float(cohort.count[k]))
        losses.append(float(m["train_loss"]))
        got_row = jax.tree.map(lambda a, cid=cid: a[cid], new_state.mentors.rows)
        chex.assert_trees_all_close(got_row, new_mentor, rtol=1e-5, atol=1e-6)
    w = np.array(counts) / sum(counts)
    mean_delta = jax.tree.map(lambda *ds: sum(wi * d for wi, d in zip(w, ds, strict=True)), *sent)
    down, down_bytes = compress_tree(jax.tree.map(jnp.negative, mean_delta), threshold)
    expected = jax.tree.map(jnp.add, state.params, down)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-5, atol=1e-6)
    # The loop's deltas equal the vmapped round's up to float rounding; SVD-rank
    # bytes are compared exactly only because no rank choice is near the threshold.
    assert min(energy_margin(d, threshold) for d in deltas) > RANK_MARGIN
    assert energy_margin(jax.tree.map(jnp.negative, mean_delta), threshold) > RANK_MARGIN
    np.testing.assert_array_equal(metrics["uplink_bytes"], up)
    np.testing.assert_array_equal(metrics["downlink_bytes"], [int(down_bytes)] * 5)
    np.testing.assert_allclose(metrics["train_loss"], (w * np.array(losses)).sum(), rtol=1e-5)
    assert bool(metrics["finite"]) and int(new_state.round) == 1
    # Compression pays: every client sends less than the dense update + weight.
    assert max(up) < compress.tree_bytes(state.params) + 4
    assert float(metrics["uplink_compression"]) > 1.0
    # Mentors outside the cohort are untouched (bit-equal); those inside moved.
    others = np.setdiff1d(np.arange(20), np.asarray(ids))
    chex.assert_trees_all_equal(
        jax.tree.map(lambda a: a[others], new_state.mentors.rows),
        jax.tree.map(lambda a: a[others], state.mentors.rows),
    )
    moved = jax.tree.map(
        lambda a, b: np.abs(a[ids] - b[ids]).max(), new_state.mentors.rows, state.mentors.rows
    )
    assert min(jax.tree.leaves(moved)) > 0


def test_bytes_dense_without_compression_and_threshold_one_is_lossless(digits_small):
    ids = jnp.array([1, 4, 9, 2], jnp.int32)
    cohort = jax.tree.map(lambda a: jnp.asarray(a)[ids], digits_small.train)
    results = {}
    for name, kw in {"dense": dict(compress=False), "svd_t1": dict(energy=1.0)}.items():
        algo = fed_kd(MENTEE, MENTOR, **{**COMMON, **kw})
        state = algo.init(jax.random.key(0))
        round_fn = jax.jit(lambda s, c, k, algo=algo: algo.round(s, Cohort.from_data(c, ids), k))
        results[name] = round_fn(state, cohort, jax.random.key(5))
    param_bytes = compress.tree_bytes(state.params)
    dense_state, dense = results["dense"]
    # FedAvg's accounting: params down; delta + one float32 weight up.
    np.testing.assert_array_equal(dense["uplink_bytes"], [param_bytes + 4] * 4)
    np.testing.assert_array_equal(dense["downlink_bytes"], [param_bytes] * 4)
    # Threshold 1 is lossless: the same mentee as no compression (up to float
    # rounding), never more bytes; it still saves where an update is exactly
    # low-rank (dead ReLU units zero whole columns of the first kernel's update).
    t1_state, t1 = results["svd_t1"]
    chex.assert_trees_all_close(t1_state.params, dense_state.params, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(t1["uplink_bytes"]) <= param_bytes + 4)
    assert np.all(np.asarray(t1["downlink_bytes"]) <= param_bytes)


def test_round_takes_a_cohort_only(digits_small):
    algo = fed_kd(MENTEE, MENTOR, **COMMON)
    gathered = jax.tree.map(lambda a: jnp.asarray(a)[:2], digits_small.train)
    with pytest.raises(TypeError, match=r"Cohort\.from_data"):
        algo.round(algo.init(jax.random.key(0)), gathered, jax.random.key(1))


def test_energy_schedule_is_the_papers_line_and_a_constant_is_accepted():
    schedule = compress.energy_schedule(0.9, 1.0, rounds=4)
    got = [float(schedule(jnp.int32(r))) for r in range(6)]
    # t = min((r + 1) / 4, 1): 0.925, 0.95, 0.975, then T_end from round 3 on.
    np.testing.assert_allclose(got, [0.925, 0.95, 0.975, 1.0, 1.0, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="rounds >= 1"):
        compress.energy_schedule(rounds=0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fed_kd(MENTEE, MENTOR, **{**COMMON, "energy": 1.5})


def test_run_traces_the_round_once_and_evaluates_mentee_and_mentors(digits_small):
    algo = fed_kd(MENTEE, MENTOR, **{**COMMON, "energy": compress.energy_schedule(rounds=3)})
    traces = []

    def counting_round(state, cohort, key, server_data):
        traces.append(1)
        return algo.round(state, cohort, key, server_data)

    result = simulate.run(
        algo._replace(round=counting_round), digits_small, rounds=3, clients_per_round=5,
        eval_every=1, seed=0, progress=False,
    )  # fmt: skip
    assert len(traces) == 1
    last = result.history[-1]
    assert last["test_accuracy"] == last["mentee_test_accuracy"]
    assert 0.0 <= last["mentors_test_accuracy"] <= 1.0
    np.testing.assert_allclose(
        [r["energy_threshold"] for r in result.history], [0.96, 0.97, 0.98], rtol=1e-6
    )
    assert last["mentor_train_examples"] > 0 and np.isfinite(last["mentor_train_loss"])
    # The per-mentor evaluation: M stored mentors give [M, B, C] logits.
    apply, mentors = algo.eval_models(result.state)["mentors"]
    assert apply(mentors, digits_small.test_x[:7]).shape == (20, 7, 10)
