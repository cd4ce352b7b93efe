"""FedProx's systems heterogeneity: stragglers run fewer epochs, or are dropped."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import cohort_of

from fedjax_kd import algorithms, experiment
from fedjax_kd.algorithms.fed_avg import STRAGGLER_STREAM, straggler_epochs
from fedjax_kd.client import make_client_update
from fedjax_kd.data import Cohort
from fedjax_kd.simulate import jit_round


def test_partial_epochs_equal_a_shorter_run(digits_small, linear):
    # Two formulations: E=5 with a budget of 2 epochs == E=2 (epoch e shuffles with
    # fold_in(key, e) either way, and the later steps are exact no-ops).
    x, y, count = (jnp.asarray(a[3]) for a in digits_small.train)
    params = linear.init(jax.random.key(0))
    key = jax.random.key(7)
    long = make_client_update(linear.apply, optax.sgd(0.1), epochs=5, batch_size=8)
    short = make_client_update(linear.apply, optax.sgd(0.1), epochs=2, batch_size=8)
    a = jax.jit(long)(params, x, y, count, key, num_epochs=jnp.int32(2))
    b = jax.jit(short)(params, x, y, count, key)
    chex.assert_trees_all_equal(a.delta, b.delta)
    np.testing.assert_array_equal(a.metrics["local_steps"], b.metrics["local_steps"])
    np.testing.assert_allclose(a.metrics["train_loss"], b.metrics["train_loss"], rtol=1e-6)
    full = jax.jit(long)(params, x, y, count, key, num_epochs=jnp.int32(5))
    chex.assert_trees_all_equal(full.delta, jax.jit(long)(params, x, y, count, key).delta)


@pytest.mark.parametrize("k,fraction,expected", [(10, 0.5, 5), (10, 0.9, 9), (7, 0.5, 4)])
def test_straggler_epochs_counts(k, fraction, expected):
    budget, mask = straggler_epochs(jax.random.key(3), k, epochs=20, fraction=fraction)
    budget, mask = np.asarray(budget), np.asarray(mask)
    stragglers = budget < 20
    np.testing.assert_array_equal(mask, stragglers)
    assert stragglers.sum() == expected  # round(fraction * K); round(3.5) = 4
    assert budget[stragglers].min() >= 1 and budget[stragglers].max() <= 19
    assert (budget[~stragglers] == 20).all()
    none, mask = straggler_epochs(jax.random.key(3), k, epochs=20, fraction=0.0)
    assert (np.asarray(none) == 20).all() and not np.asarray(mask).any()


def _reference_round(
    model, params, cohort, key, budget, active, epochs, kd_weight=0.0, teacher=None
):
    """Python loop: each active client trains its budget; example-weighted mean.

    With ``kd_weight`` the clients distil ``teacher = (apply, params)``'s logits.
    """
    update = jax.jit(
        make_client_update(
            model.apply, optax.sgd(0.1), epochs=epochs, batch_size=8, kd_weight=kd_weight
        )
    )
    keys = jax.random.split(key, len(budget))
    total, weight = None, 0.0
    for k in range(len(budget)):
        if not active[k]:
            continue
        targets = None if teacher is None else teacher[0](teacher[1], cohort.x[k])
        out = update(params, cohort.x[k], cohort.y[k], cohort.count[k], keys[k], targets)
        if budget[k] < epochs:
            out = update(
                params,
                cohort.x[k],
                cohort.y[k],
                cohort.count[k],
                keys[k],
                targets,
                num_epochs=budget[k],
            )
        w = float(cohort.count[k])
        term = jax.tree.map(lambda d, w=w: w * np.asarray(d, np.float64), out.delta)
        total = term if total is None else jax.tree.map(np.add, total, term)
        weight += w
    return jax.tree.map(lambda p, d: np.asarray(p) - d / weight, params, total)


@pytest.mark.parametrize("drop", [False, True])
def test_straggler_round_equals_python_loop(digits_small, linear, drop):
    epochs, k = 3, 6
    algo = algorithms.fed_avg(
        linear,
        client_optimizer=optax.sgd(0.1),
        server_optimizer=optax.sgd(1.0),
        epochs=epochs,
        batch_size=8,
        straggler_fraction=0.5,
        drop_stragglers=drop,
    )
    cohort = cohort_of(digits_small, [1, 4, 6, 9, 11, 15])
    state = algo.init(jax.random.key(0))
    key = jax.random.key(5)
    new_state, metrics = jit_round(algo)(state, cohort, key)
    budget, mask = straggler_epochs(jax.random.fold_in(key, 1), k, epochs=epochs, fraction=0.5)
    budget, mask = np.asarray(budget), np.asarray(mask)
    assert mask.sum() == 3 and (budget[mask] < epochs).all()
    active = np.ones(k, bool) if not drop else ~mask
    expected = _reference_round(linear, state.params, cohort, key, budget, active, epochs)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-5, atol=1e-6)
    up = np.asarray(metrics["uplink_bytes"])
    assert (up[~active] == 0).all() and (up[active] > 0).all()


def test_no_stragglers_is_plain_fedavg(digits_small, linear):
    kwargs = dict(
        client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), epochs=2, batch_size=8
    )
    cohort = cohort_of(digits_small, [0, 2, 5])
    plain = algorithms.fed_avg(linear, **kwargs)
    prox0 = algorithms.fed_prox(linear, mu=0.0, straggler_fraction=0.0, **kwargs)
    state = plain.init(jax.random.key(0))
    a, _ = jit_round(plain)(state, cohort, jax.random.key(1))
    b, _ = jit_round(prox0)(state, cohort, jax.random.key(1))
    chex.assert_trees_all_equal(a.params, b.params)


def test_stragglers_config_checks():
    cfg = experiment.resolve(overrides=[("client.straggler_fraction", "0.5")])
    assert experiment.build_algorithm(cfg, experiment.build_dataset(cfg)) is not None
    with pytest.raises(experiment.ConfigError, match="straggler_fraction.*in \\[0, 1\\]"):
        experiment.resolve(overrides=[("client.straggler_fraction", "1.5")])
    with pytest.raises(experiment.ConfigError, match="has no stragglers"):
        experiment.resolve(
            overrides=[
                ("client.straggler_fraction", "0.5"),
                ("algorithm.name", "fd"),
            ]
        )


def test_drop_stragglers_with_one_epoch(digits_small, linear):
    # E = 1: a straggler's partial work would be the full epoch, but dropping still drops.
    algo = algorithms.fed_avg(
        linear,
        client_optimizer=optax.sgd(0.1),
        server_optimizer=optax.sgd(1.0),
        epochs=1,
        batch_size=8,
        straggler_fraction=0.5,
        drop_stragglers=True,
    )
    cohort = cohort_of(digits_small, [1, 4, 6, 9])
    state = algo.init(jax.random.key(0))
    _, metrics = jit_round(algo)(state, cohort, jax.random.key(5))
    assert (np.asarray(metrics["uplink_bytes"]) == 0).sum() == 2


@pytest.mark.parametrize(
    "overrides,message",
    [
        ([("client.epochs", "1")], "needs client.epochs >= 2"),
        ([("client.drop_stragglers", "true"), ("client.straggler_fraction", "1.0")], "every"),
        ([("client.drop_stragglers", "true"), ("client.straggler_fraction", "0.96")], "every"),
    ],
)
def test_straggler_settings_that_cannot_work(overrides, message):
    base = [("client.straggler_fraction", "0.5")]
    with pytest.raises(experiment.ConfigError, match=message):
        experiment.resolve(overrides=base + overrides)


@pytest.mark.parametrize("name", ["teacher_student", "feddf"])
@pytest.mark.parametrize("drop", [False, True])
def test_stragglers_in_the_distilling_family_equal_python_loop(digits_small, linear, name, drop):
    """teacher_student (with KD from the teacher) and FedDF get FedProx's stragglers too.

    Their server side is FedAvg's (fed_avg.fedavg_step): a Python loop over the
    clients with each one's epoch budget (or dropped) gives the same student.
    Server distillation is off, so the loop reference is the aggregate alone.
    """
    epochs, k = 3, 6
    common = dict(
        client_optimizer=optax.sgd(0.1),
        server_optimizer=optax.sgd(1.0),
        epochs=epochs,
        batch_size=8,
        straggler_fraction=0.5,
        drop_stragglers=drop,
    )
    teacher = linear  # a frozen (untrained) teacher of the same shape is enough here
    if name == "teacher_student":
        algo = algorithms.teacher_student(
            linear, teacher, kd_weight=0.7, kd_start_round=0, distill_steps=0, **common
        )
    else:
        algo = algorithms.fed_df([linear], distill_steps=0, **common)
    cohort = cohort_of(digits_small, [1, 4, 6, 9, 11, 15])
    state = algo.init(jax.random.key(0))
    key = jax.random.key(5)
    new_state, metrics = jit_round(algo)(state, cohort, key)
    budget, mask = straggler_epochs(
        jax.random.fold_in(key, STRAGGLER_STREAM), k, epochs=epochs, fraction=0.5
    )
    budget, mask = np.asarray(budget), np.asarray(mask)
    assert mask.sum() == 3
    active = np.ones(k, bool) if not drop else ~mask
    params = state.params if name == "teacher_student" else state.params[0]
    kd = {}
    if name == "teacher_student":
        kd = dict(kd_weight=0.7, teacher=(teacher.apply, state.teacher))
    expected = _reference_round(linear, params, cohort, key, budget, active, epochs, **kd)
    got = new_state.params if name == "teacher_student" else new_state.params[0]
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
    up = np.asarray(metrics["uplink_bytes"])
    assert (up[~active] == 0).all() and (up[active] > 0).all()


@pytest.mark.parametrize("drop", [False, True])
def test_fedkd_stragglers_equal_python_loop(digits_small, drop):
    """FedKD's stragglers: each client's mutual update with its epoch budget, or dropped.

    A Python loop over the cohort with the algorithm's own mutual client update
    (``num_epochs`` = the budget; dropped clients skipped) gives the same mentee
    and mentors; dropped clients keep their mentor and send nothing.
    """
    from fedjax_kd import compress, models
    from fedjax_kd.algorithms.fed_kd import fed_kd, make_mutual_client_update

    mentee = models.create("mlp-8", feature_shape=(64,), num_classes=10)
    mentor = models.create("mlp-16", feature_shape=(64,), num_classes=10)
    epochs, k = 3, 6
    algo = fed_kd(
        mentee,
        mentor,
        num_clients=digits_small.train.num_clients,
        client_optimizer=optax.sgd(0.1),
        server_optimizer=optax.sgd(1.0),
        epochs=epochs,
        batch_size=8,
        compress=False,
        straggler_fraction=0.5,
        drop_stragglers=drop,
    )
    ids = jnp.array([1, 4, 6, 9, 11, 15], jnp.int32)
    cohort = cohort_of(digits_small, ids)
    state = algo.init(jax.random.key(0))
    key = jax.random.key(5)
    new_state, metrics = jax.jit(lambda s, c, k: algo.round(s, Cohort.from_data(c, ids), k))(
        state, cohort, key
    )
    budget, mask = straggler_epochs(
        jax.random.fold_in(key, STRAGGLER_STREAM), k, epochs=epochs, fraction=0.5
    )
    budget, mask = np.asarray(budget), np.asarray(mask)
    active = np.ones(k, bool) if not drop else ~mask
    update = jax.jit(
        make_mutual_client_update(mentee, mentor, optax.sgd(0.1), epochs=epochs, batch_size=8)
    )
    keys = jax.random.split(key, k)
    total, weight = None, 0.0
    for c in range(k):
        row = jax.tree.map(lambda a, c=c: a[ids[c]], state.mentors.rows)
        got_row = jax.tree.map(lambda a, c=c: a[ids[c]], new_state.mentors.rows)
        if not active[c]:
            chex.assert_trees_all_equal(got_row, row)  # a dropped client's mentor stays
            continue
        out = update(
            state.params, cohort.x[c], cohort.y[c], cohort.count[c], keys[c],
            num_epochs=jnp.int32(budget[c]), state=row,
        )  # fmt: skip
        delta, new_mentor = out.delta, out.state
        chex.assert_trees_all_close(got_row, new_mentor, rtol=1e-5, atol=1e-6)
        w = float(cohort.count[c])
        term = jax.tree.map(lambda d, w=w: w * np.asarray(d, np.float64), delta)
        total = term if total is None else jax.tree.map(np.add, total, term)
        weight += w
    expected = jax.tree.map(lambda p, d: np.asarray(p) - d / weight, state.params, total)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-5, atol=1e-6)
    up = np.asarray(metrics["uplink_bytes"])
    assert (up[~active] == 0).all()
    assert (up[active] == compress.tree_bytes(state.params) + 4).all()
    counts = np.asarray(cohort.count)
    assert int(metrics["mentor_train_examples"]) == int((budget * counts * active).sum())
