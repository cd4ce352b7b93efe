"""teacher_student, FedDF and FedNTD: exact reductions, loop references, groups."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import cohort_of

from fedjax_kd import aggregate, algorithms, distill, models, simulate
from fedjax_kd.algorithms.fed_df import fed_df
from fedjax_kd.algorithms.fed_ntd import fed_ntd, ntd_distill_fn
from fedjax_kd.algorithms.teacher_student import teacher_student
from fedjax_kd.client import make_client_update
from fedjax_kd.simulate import jit_round

COMMON = dict(
    client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), epochs=2, batch_size=8
)


@pytest.fixture(scope="module")
def student():
    return models.create("mlp-16", feature_shape=(64,), num_classes=10)


@pytest.fixture(scope="module")
def teacher():
    return models.create("mlp-32-32", feature_shape=(64,), num_classes=10)


def run(algo, dataset, rounds=3, k=6, **kwargs):
    return simulate.run(
        algo, dataset, rounds=rounds, clients_per_round=k, eval_every=rounds, seed=0,
        progress=False, **kwargs,
    )  # fmt: skip


def assert_same_params(a, b):
    chex.assert_trees_all_equal(a, b)


def test_reductions_to_fedavg_are_exact(digits_proxy, student, teacher):
    reference = run(algorithms.fed_avg(student, **COMMON), digits_proxy).state.params
    ts = run(
        teacher_student(student, teacher, kd_weight=0.0, distill_steps=0, **COMMON), digits_proxy
    )
    assert_same_params(ts.state.params, reference)
    df = run(fed_df([student], distill_steps=0, **COMMON), digits_proxy)
    assert_same_params(df.state.params[0], reference)
    ntd = run(fed_ntd(student, beta=0.0, **COMMON), digits_proxy)
    assert_same_params(ntd.state.params, reference)
    # And the distillation terms do change things.
    ntd1 = run(fed_ntd(student, beta=1.0, **COMMON), digits_proxy)
    assert not np.allclose(ntd1.state.params["head"]["kernel"], reference["head"]["kernel"])


def test_teacher_student_round_equals_python_loop(digits_proxy, student, teacher):
    algo = teacher_student(
        student, teacher, kd_weight=0.7, temperature=2.0, kd_start_round=0, distill_steps=5,
        distill_batch_size=32, distill_optimizer=optax.adam(1e-3), **COMMON,
    )  # fmt: skip
    ids = [4, 9, 0, 21]
    cohort = cohort_of(digits_proxy, ids)
    proxy = jnp.asarray(digits_proxy.proxy_x)
    state = algo.init(jax.random.key(0))
    key = jax.random.key(3)
    new, metrics = jit_round(algo)(state, cohort, key, {"proxy_x": proxy})

    update = jax.jit(
        make_client_update(
            student.apply, optax.sgd(0.1), epochs=2, batch_size=8, kd_weight=0.7, temperature=2.0
        )
    )
    keys = jax.random.split(key, len(ids))
    outs = []
    for k in range(len(ids)):
        targets = teacher.apply(state.teacher, cohort.x[k])
        outs.append(
            update(state.params, cohort.x[k], cohort.y[k], cohort.count[k], keys[k], targets)
        )
    w = np.array([float(o.weight) for o in outs])
    mean_delta = jax.tree.map(
        lambda *ds: sum(wi * d for wi, d in zip(w, ds, strict=True)) / w.sum(),
        *[o.delta for o in outs],
    )
    expected_student = jax.tree.map(jnp.subtract, state.params, mean_delta)
    chex.assert_trees_all_close(new.params, expected_student, rtol=1e-5, atol=1e-6)

    # Teacher: distil the average of the local students' logits on the proxy set.
    local_logits = [
        student.apply(jax.tree.map(jnp.subtract, state.params, o.delta), proxy) for o in outs
    ]
    target = sum(local_logits) / len(outs)
    run_distill = distill.make_server_distill(
        teacher.apply, optax.adam(1e-3), steps=5, batch_size=32, temperature=1.0
    )
    expected_teacher, _ = run_distill(state.teacher, proxy, target, jax.random.fold_in(key, 1))
    chex.assert_trees_all_close(new.teacher, expected_teacher, rtol=1e-4, atol=1e-5)
    assert int(new.round) == 1
    assert int(metrics["teacher_forward_examples"]) == int(cohort.count.sum())
    assert int(metrics["server_forward_examples"]) == len(ids) * proxy.shape[0]


def test_teacher_student_kd_starts_at_kd_start_round(digits_proxy, student, teacher):
    cohort = cohort_of(digits_proxy, [1, 2, 3])
    key = jax.random.key(1)
    plain = teacher_student(student, teacher, kd_weight=0.0, distill_steps=0, **COMMON)
    gated = teacher_student(
        student, teacher, kd_weight=2.0, kd_start_round=1, distill_steps=0, **COMMON
    )
    state = plain.init(jax.random.key(0))
    a, _ = jit_round(plain)(state, cohort, key)
    b, _ = jit_round(gated)(state, cohort, key)
    assert_same_params(a.params, b.params)  # round 0: no distillation yet
    a2, _ = jit_round(plain)(a, cohort, key)
    b2, _ = jit_round(gated)(b, cohort, key)
    assert not np.allclose(a2.params["head"]["kernel"], b2.params["head"]["kernel"])


def test_teacher_student_learns_both_and_reports_both(digits_proxy, student, teacher):
    algo = teacher_student(student, teacher, kd_weight=1.0, distill_steps=30, **COMMON)
    result = run(algo, digits_proxy, rounds=15, k=10)
    last = result.history[-1]
    assert last["test_accuracy"] == last["student_test_accuracy"]
    assert last["student_test_accuracy"] > 0.6 and last["teacher_test_accuracy"] > 0.6
    # Downlink carries both models, uplink only the student delta and weight.
    from fedjax_kd.compress import tree_bytes

    sb, tb = tree_bytes(result.state.params), tree_bytes(result.state.teacher)
    assert last["downlink_bytes"] == 10 * (sb + tb)
    assert last["uplink_bytes"] == 10 * (sb + 4)


def test_teacher_student_round_traces_once(digits_proxy, student, teacher):
    algo = teacher_student(student, teacher, kd_weight=1.0, distill_steps=3, **COMMON)
    traces = []

    def counting(*args):
        traces.append(1)
        return algo.round(*args)

    run(algo._replace(round=counting), digits_proxy, rounds=4)
    assert len(traces) == 1


def test_fedntd_equals_client_update_with_global_targets(digits_proxy, student):
    algo = fed_ntd(student, beta=0.5, tau=2.0, **COMMON)
    cohort = cohort_of(digits_proxy, [0, 5, 7])
    state = algo.init(jax.random.key(0))
    key = jax.random.key(2)
    new, _ = jit_round(algo)(state, cohort, key)
    update = make_client_update(
        student.apply, optax.sgd(0.1), epochs=2, batch_size=8, kd_weight=0.5,
        distill_fn=ntd_distill_fn(2.0),
    )  # fmt: skip
    targets = jax.vmap(student.apply, in_axes=(None, 0))(state.params, cohort.x)
    out = jax.vmap(update, in_axes=(None, 0, 0, 0, 0, 0))(
        state.params, cohort.x, cohort.y, cohort.count, jax.random.split(key, 3), targets
    )
    delta = aggregate.weighted_mean(out.delta, out.weight)
    chex.assert_trees_all_close(
        new.params, jax.tree.map(jnp.subtract, state.params, delta), rtol=1e-5, atol=1e-6
    )


def test_feddf_distillation_moves_fused_model_towards_ensemble(digits_proxy, student):
    algo = fed_df([student], distill_steps=40, distill_batch_size=64, **COMMON)
    plain = fed_df([student], distill_steps=0, **COMMON)
    cohort = cohort_of(digits_proxy, [2, 3, 5, 8, 13])
    proxy = jnp.asarray(digits_proxy.proxy_x)
    state = algo.init(jax.random.key(0))
    key = jax.random.key(4)
    fused, m = jit_round(algo)(state, cohort, key, {"proxy_x": proxy})
    avg, _ = jit_round(plain)(state, cohort, key, {"proxy_x": proxy})
    update = make_client_update(student.apply, optax.sgd(0.1), epochs=2, batch_size=8)
    out = jax.vmap(update, in_axes=(None, 0, 0, 0, 0))(
        state.params[0], cohort.x, cohort.y, cohort.count, jax.random.split(key, 5)
    )
    locals_ = jax.tree.map(lambda p, d: p[None] - d, state.params[0], out.delta)
    target = distill.ensemble_logits([(student.apply, locals_)], proxy)
    from fedjax_kd import losses

    kl = lambda p: float(jnp.mean(losses.distillation_loss(student.apply(p, proxy), target)))  # noqa: E731
    assert kl(fused.params[0]) < kl(avg.params[0])
    assert float(m["distill_loss"]) > 0


def test_feddf_heterogeneous_groups(digits_proxy):
    group_models = [
        models.create(name, feature_shape=(64,), num_classes=10)
        for name in ("mlp-8", "mlp-16", "linear")
    ]
    algo = fed_df(group_models, distill_steps=5, distill_batch_size=32, **COMMON)
    traces = []

    def counting(*args):
        traces.append(1)
        return algo.round(*args)

    result = run(algo._replace(round=counting), digits_proxy, rounds=4, k=6)
    assert len(traces) == 1
    last = result.history[-1]
    for g, m in enumerate(group_models):
        assert f"group{g}_{m.name}_test_accuracy" in last
    accs = [last[f"group{g}_{m.name}_test_accuracy"] for g, m in enumerate(group_models)]
    np.testing.assert_allclose(last["test_accuracy"], np.mean(accs), rtol=1e-5)
    from fedjax_kd.compress import tree_bytes

    expected_down = sum(2 * tree_bytes(p) for p in result.state.params)
    assert last["downlink_bytes"] == expected_down
    with pytest.raises(ValueError, match="multiple"):
        run(algo, digits_proxy, rounds=1, k=5)
