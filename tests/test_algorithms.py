"""FedAvg / FedProx: hand-computed round, vmap vs Python loop, reductions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_kd import aggregate, algorithms, models, simulate
from fedjax_kd.client import make_client_update
from fedjax_kd.data import ClientData
from fedjax_kd.simulate import jit_round


def zero_init_linear(num_features, num_classes):
    base = models.create("linear", feature_shape=(num_features,), num_classes=num_classes)
    zeros = lambda key: jax.tree.map(jnp.zeros_like, base.init(key))  # noqa: E731
    return base._replace(init=zeros)


def test_fedavg_hand_computed_round():
    # Linear softmax model at zero: p = (1/2, 1/2) for every input, so one full-batch
    # SGD step (lr 1) moves W by -x (p - onehot(y)) and b by -(p - onehot(y)).
    #   client A: x=[1], y=0        -> W_A = [[ 0.5, -0.5]], b_A = [ 0.5, -0.5]
    #   client B: x=[2],[2], y=1,1  -> W_B = [[-1.0,  1.0]], b_B = [-0.5,  0.5]
    # FedAvg with weights 1 and 2: W = [[-0.5, 0.5]], b = [-1/6, 1/6].
    model = zero_init_linear(1, 2)
    algo = algorithms.fed_avg(
        model,
        client_optimizer=optax.sgd(1.0),
        server_optimizer=optax.sgd(1.0),
        epochs=1,
        batch_size=2,
    )
    cohort = ClientData(
        x=jnp.array([[[1.0], [0.0]], [[2.0], [2.0]]]),
        y=jnp.array([[0, 0], [1, 1]], jnp.int32),
        count=jnp.array([1, 2], jnp.int32),
    )
    state = algo.init(jax.random.key(0))
    state, metrics = jit_round(algo)(state, cohort, jax.random.key(1))
    np.testing.assert_allclose(state.params["head"]["kernel"], [[-0.5, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(state.params["head"]["bias"], [-1 / 6, 1 / 6], rtol=1e-6)
    # Both clients start at uniform predictions: train loss is log 2.
    np.testing.assert_allclose(metrics["train_loss"], np.log(2.0), rtol=1e-6)
    # 4 params down per client; 4 params + 1 weight up; float32.
    np.testing.assert_array_equal(metrics["downlink_bytes"], [16, 16])
    np.testing.assert_array_equal(metrics["uplink_bytes"], [20, 20])
    assert bool(metrics["finite"])


def test_vmapped_round_equals_python_loop(digits_small):
    model = models.create("mlp-16", feature_shape=(64,), num_classes=10)
    kwargs = dict(epochs=2, batch_size=8)
    algo = algorithms.fed_avg(
        model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), **kwargs
    )
    ids = jnp.array([3, 0, 7, 12, 5])
    cohort = jax.tree.map(lambda a: jnp.asarray(a)[ids], digits_small.train)
    state = algo.init(jax.random.key(0))
    key = jax.random.key(42)
    new_state, metrics = jit_round(algo)(state, cohort, key)

    update = jax.jit(make_client_update(model.apply, optax.sgd(0.1), **kwargs))
    keys = jax.random.split(key, len(ids))
    deltas, weights, losses = [], [], []
    for k in range(len(ids)):
        out = update(state.params, cohort.x[k], cohort.y[k], cohort.count[k], keys[k])
        deltas.append(out.delta)
        weights.append(float(out.weight))
        losses.append(float(out.metrics["train_loss"]))
    w = np.array(weights)
    expected = jax.tree.map(
        lambda p, *ds: (
            np.asarray(p) - sum(wi * np.asarray(d) for wi, d in zip(w, ds, strict=True)) / w.sum()
        ),
        state.params,
        *deltas,
    )
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["train_loss"], (w * losses).sum() / w.sum(), rtol=1e-5)


def run_history(algo, dataset, seed=0, rounds=4):
    result = simulate.run(
        algo, dataset, rounds=rounds, clients_per_round=5, eval_every=2, seed=seed, progress=False
    )
    return result


def test_fedprox_mu_zero_equals_fedavg_and_mu_pulls_towards_global(digits_small):
    model = models.create("mlp-16", feature_shape=(64,), num_classes=10)
    common = dict(
        client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), epochs=3, batch_size=8
    )
    avg = run_history(algorithms.fed_avg(model, **common), digits_small)
    prox0 = run_history(algorithms.fed_prox(model, mu=0.0, **common), digits_small)
    chex.assert_trees_all_equal(avg.state.params, prox0.state.params)
    strip = lambda h: [{k: v for k, v in r.items() if k != "wall_s"} for r in h]  # noqa: E731
    assert strip(avg.history) == strip(prox0.history)

    # A strong proximal term keeps local models near the global one: smaller deltas.
    cohort = jax.tree.map(lambda a: jnp.asarray(a)[:5], digits_small.train)
    params = model.init(jax.random.key(0))
    sizes = []
    for mu in (0.0, 1.0):
        update = jax.vmap(
            make_client_update(model.apply, optax.sgd(0.1), epochs=3, batch_size=8, prox_mu=mu),
            in_axes=(None, 0, 0, 0, 0),
        )
        out = jax.jit(update)(
            params, cohort.x, cohort.y, cohort.count, jax.random.split(jax.random.key(0), 5)
        )
        sizes.append(float(optax.tree.norm(out.delta)))
    assert sizes[1] < 0.9 * sizes[0]


def test_server_adam_equals_adam_on_the_fedavg_pseudo_gradient(digits_small):
    model = models.create("mlp-16", feature_shape=(64,), num_classes=10)
    common = dict(client_optimizer=optax.sgd(0.1), epochs=1, batch_size=8)
    cohort = jax.tree.map(lambda a: jnp.asarray(a)[:4], digits_small.train)
    key = jax.random.key(7)
    plain = algorithms.fed_avg(model, server_optimizer=optax.sgd(1.0), **common)
    state = plain.init(jax.random.key(0))
    after_plain, _ = jit_round(plain)(state, cohort, key)
    delta = jax.tree.map(jnp.subtract, state.params, after_plain.params)

    adam = optax.adam(0.01, eps=1e-3)
    fed_adam = algorithms.fed_avg(model, server_optimizer=adam, **common)
    adam_state = fed_adam.init(jax.random.key(0))
    after_adam, _ = jit_round(fed_adam)(adam_state, cohort, key)
    expected, _ = aggregate.server_update(state.params, adam.init(state.params), delta, adam)
    chex.assert_trees_all_close(after_adam.params, expected, rtol=1e-5, atol=1e-6)


def test_uniform_weighting_is_the_plain_mean(digits_small):
    model = zero_init_linear(64, 10)
    common = dict(
        client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), epochs=1, batch_size=50
    )
    cohort = jax.tree.map(lambda a: jnp.asarray(a)[:3], digits_small.train)
    key = jax.random.key(0)
    state = algorithms.fed_avg(model, **common).init(key)
    uniform = algorithms.fed_avg(model, uniform_weighting=True, **common)
    new, _ = jit_round(uniform)(state, cohort, key)
    update = jax.vmap(
        make_client_update(model.apply, optax.sgd(0.1), epochs=1, batch_size=50),
        in_axes=(None, 0, 0, 0, 0),
    )
    out = update(state.params, cohort.x, cohort.y, cohort.count, jax.random.split(key, 3))
    expected = jax.tree.map(lambda p, d: p - d.mean(0), state.params, out.delta)
    chex.assert_trees_all_close(new.params, expected, rtol=1e-5, atol=1e-7)
