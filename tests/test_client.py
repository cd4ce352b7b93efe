"""Local training: exact padding invariance and a NumPy plain-loop reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_kd import client, models


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def make_problem(n, pad_to, num_features=5, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((pad_to, num_features), np.float32)
    y = np.zeros((pad_to,), np.int32)
    x[:n] = rng.normal(size=(n, num_features))
    y[:n] = rng.integers(0, num_classes, size=n)
    return jnp.asarray(x), jnp.asarray(y), jnp.int32(n)


def test_epoch_order_real_first_and_independent_of_padding():
    key = jax.random.key(3)
    short = np.asarray(client.epoch_order(key, jnp.int32(7), 7))
    long = np.asarray(client.epoch_order(key, jnp.int32(7), 40))
    assert sorted(short.tolist()) == list(range(7))
    np.testing.assert_array_equal(long[:7], short)
    assert sorted(long[7:].tolist()) == list(range(7, 40))
    other = np.asarray(client.epoch_order(jax.random.key(4), jnp.int32(7), 7))
    assert not np.array_equal(other, short)


@pytest.mark.parametrize("prox_mu,kd_weight", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.7)])
def test_padding_changes_nothing_exactly(prox_mu, kd_weight):
    model = models.create("mlp-8", feature_shape=(5,), num_classes=3)
    teacher = models.create("mlp-16", feature_shape=(5,), num_classes=3)
    update = client.make_client_update(
        model.apply,
        optax.sgd(0.1),
        epochs=2,
        batch_size=3,
        prox_mu=prox_mu,
        kd_weight=kd_weight,
        temperature=2.0,
    )
    params = model.init(jax.random.key(0))
    t_params = teacher.init(jax.random.key(1))
    key = jax.random.key(5)
    outs = []
    # 64 and 200 rows: a plain [N, ...] teacher forward differs in the last bits
    # from 7 rows on the development machine's CPU (client.map_batches).
    for pad_to in (7, 11, 30, 64, 200):
        x, y, n = make_problem(7, pad_to)
        # The targets as the library computes them (teacher_student, FedNTD).
        targets = client.batched_apply(teacher.apply, t_params, x, batch_size=3)
        outs.append(jax.jit(update)(params, x, y, n, key, targets))
    for out in outs[1:]:
        chex.assert_trees_all_equal(out.delta, outs[0].delta)
        chex.assert_trees_all_equal(out.metrics, outs[0].metrics)
    assert int(outs[0].metrics["local_steps"]) == 2 * 3  # ceil(7 / 3) steps per epoch
    assert float(outs[0].weight) == 7.0


def test_map_batches_is_the_plain_forward_and_independent_of_padding():
    teacher = models.create("mlp-64-64", feature_shape=(5,), num_classes=3)
    t_params = teacher.init(jax.random.key(1))
    forward = jax.jit(client.batched_apply, static_argnums=0, static_argnames="batch_size")
    x7, _, _ = make_problem(7, 7)
    blocked = [
        np.asarray(forward(teacher.apply, t_params, make_problem(7, n)[0], batch_size=4))
        for n in (7, 9, 64, 130)
    ]
    assert blocked[1].shape == (9, 3) and blocked[3].shape == (130, 3)
    # Two formulations: the blocks give the plain forward up to float rounding ...
    np.testing.assert_allclose(blocked[0], teacher.apply(t_params, x7), rtol=1e-6, atol=1e-6)
    # ... and the real rows' bits do not depend on the padding.
    for other in blocked[1:]:
        np.testing.assert_array_equal(other[:7], blocked[0])


def test_sum_batches_hand_computed_and_independent_of_padding():
    # fn sums its block's real rows; blocks of 2 over 5 real rows [1..5].
    def total(block, valid):
        return {"s": jnp.sum(jnp.where(valid, block["v"], 0.0)), "n": jnp.sum(valid)}

    sums = []
    for pad_to in (5, 6, 64, 131):
        v = jnp.zeros(pad_to).at[:5].set(jnp.arange(1.0, 6.0)).at[5:].set(100.0)
        sums.append(
            jax.jit(client.sum_batches, static_argnums=0, static_argnames="batch_size")(
                total, {"v": v}, jnp.int32(5), batch_size=2
            )
        )
    assert float(sums[0]["s"]) == 15.0 and int(sums[0]["n"]) == 5
    for other in sums[1:]:
        chex.assert_trees_all_equal(other, sums[0])
    # A count past the client's rows counts only its rows (not the fill of the
    # last block), and a client without rows sums to zeros.
    v = jnp.arange(1.0, 6.0)
    over = client.sum_batches(total, {"v": v}, jnp.int32(9), batch_size=2)
    assert float(over["s"]) == 15.0 and int(over["n"]) == 5
    empty = client.sum_batches(total, {"v": jnp.zeros((0,))}, jnp.int32(0), batch_size=2)
    assert float(empty["s"]) == 0.0 and int(empty["n"]) == 0


def reference_client_update(
    w, b, x, y, n, key, *, epochs, batch_size, lr, mu=0.0, kd_weight=0.0, t_w=None, t_b=None, T=1.0
):
    """Plain NumPy SGD on softmax regression, one example batch at a time."""
    w0, b0 = w.copy(), b.copy()
    num_classes = w.shape[1]
    for e in range(epochs):
        order = np.asarray(client.epoch_order(jax.random.fold_in(key, e), jnp.int32(n), n))
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            p = np_softmax(xb @ w + b)
            g_logits = p - np.eye(num_classes)[yb]
            if kd_weight > 0:
                pt = np_softmax((xb @ t_w + t_b) / T)
                ps = np_softmax((xb @ w + b) / T)
                # d/dz T^2 KL(pt || softmax(z/T)) = T (softmax(z/T) - pt)
                g_logits = g_logits + kd_weight * T * (ps - pt)
            g_logits /= len(idx)
            gw = xb.T @ g_logits + mu * (w - w0)
            gb = g_logits.sum(0) + mu * (b - b0)
            w, b = w - lr * gw, b - lr * gb
    return w0 - w, b0 - b


@pytest.mark.parametrize(
    "mu,kd_weight,batch_size", [(0.0, 0.0, 4), (0.3, 0.0, 3), (0.0, 0.5, 5), (0.2, 0.5, 100)]
)
def test_matches_numpy_plain_loop(mu, kd_weight, batch_size):
    n, pad_to, epochs, lr, T = 11, 16, 3, 0.2, 2.0
    model = models.create("linear", feature_shape=(5,), num_classes=3)
    params = model.init(jax.random.key(0))
    t_params = model.init(jax.random.key(9))
    update = client.make_client_update(
        model.apply,
        optax.sgd(lr),
        epochs=epochs,
        batch_size=batch_size,
        prox_mu=mu,
        kd_weight=kd_weight,
        temperature=T,
    )
    x, y, count = make_problem(n, pad_to)
    key = jax.random.key(11)
    out = jax.jit(update)(params, x, y, count, key, model.apply(t_params, x))
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    dw, db = reference_client_update(
        f(params["head"]["kernel"]),
        f(params["head"]["bias"]),
        f(x),
        np.asarray(y),
        n,
        key,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        mu=mu,
        kd_weight=kd_weight,
        t_w=f(t_params["head"]["kernel"]),
        t_b=f(t_params["head"]["bias"]),
        T=T,
    )
    np.testing.assert_allclose(out.delta["head"]["kernel"], dw, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.delta["head"]["bias"], db, rtol=1e-4, atol=1e-6)


def test_empty_client_sends_zero_delta():
    model = models.create("linear", feature_shape=(5,), num_classes=3)
    update = client.make_client_update(model.apply, optax.sgd(0.5), epochs=2, batch_size=4)
    x, y, count = make_problem(0, 8)
    out = jax.jit(update)(model.init(jax.random.key(0)), x, y, count, jax.random.key(1))
    chex.assert_trees_all_equal(
        out.delta, jax.tree.map(jnp.zeros_like, model.init(jax.random.key(0)))
    )
    assert float(out.weight) == 0.0 and int(out.metrics["local_steps"]) == 0


def test_shuffle_depends_on_client_key():
    model = models.create("linear", feature_shape=(5,), num_classes=3)
    update = jax.jit(client.make_client_update(model.apply, optax.sgd(0.5), epochs=1, batch_size=2))
    params = model.init(jax.random.key(0))
    x, y, count = make_problem(9, 9)
    a = update(params, x, y, count, jax.random.key(1))
    b = update(params, x, y, count, jax.random.key(1))
    c = update(params, x, y, count, jax.random.key(2))
    chex.assert_trees_all_equal(a.delta, b.delta)
    assert not np.allclose(a.delta["head"]["kernel"], c.delta["head"]["kernel"])


def test_bad_arguments():
    model = models.create("linear", feature_shape=(5,), num_classes=3)
    with pytest.raises(ValueError, match="batch_size"):
        client.make_client_update(model.apply, optax.sgd(0.1), epochs=1, batch_size=0)
    update = client.make_client_update(
        model.apply, optax.sgd(0.1), epochs=1, batch_size=2, kd_weight=1.0
    )
    x, y, count = make_problem(3, 4)
    with pytest.raises(ValueError, match="targets"):
        update(model.init(jax.random.key(0)), x, y, count, jax.random.key(1))


def test_custom_distill_fn_and_task_weight_zero():
    # task_weight 0 and distillation 0.5 ||z - t||^2 on logits z = xW + b: one
    # full-batch SGD step moves W by lr * x^T (z - t) / n and b by lr * sum(z - t) / n.
    model = models.create("linear", feature_shape=(5,), num_classes=3)
    params = model.init(jax.random.key(0))
    l2 = lambda s, t, y: 0.5 * jnp.sum(jnp.square(s - t), -1)  # noqa: E731
    update = client.make_client_update(
        model.apply,
        optax.sgd(0.1),
        epochs=1,
        batch_size=8,
        kd_weight=1.0,
        distill_fn=l2,
        task_weight=0.0,
    )
    x, y, count = make_problem(8, 8)
    targets = jnp.ones((8, 3))
    out = update(params, x, y, count, jax.random.key(0), targets)
    w, b = np.asarray(params["head"]["kernel"]), np.asarray(params["head"]["bias"])
    z = np.asarray(x) @ w + b
    g = (z - 1.0) / 8
    np.testing.assert_allclose(out.delta["head"]["kernel"], 0.1 * np.asarray(x).T @ g, rtol=1e-5)
    np.testing.assert_allclose(out.delta["head"]["bias"], 0.1 * g.sum(0), rtol=1e-5)
