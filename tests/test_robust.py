"""Robust aggregation and attacks (fedjax_kd.robust) against plain NumPy and by hand.

The references below are written from the papers' definitions with NumPy
loops over clients, independently of the jitted implementations: the median
and trimmed mean of the participating (weight > 0) rows per coordinate;
Krum's score as the sum of squared distances to the ``n - f - 2`` nearest
other participants (Blanchard et al. 2017); Multi-Krum as the weighted mean
of the ``m`` lowest scores; ALIE's ``mu - z sigma`` (Baruch et al. 2019).
"""

import json
import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import one_error_line

from fedjax_kd import algorithms, cli, models, robust, simulate
from fedjax_kd import client as client_lib

# ----------------------------------------------------------------------------- references


def np_participants(weights):
    return np.flatnonzero(np.asarray(weights) > 0)


def np_median(x, weights):
    rows = x[np_participants(weights)]
    return np.median(rows, axis=0) if len(rows) else np.zeros(x.shape[1:])


def np_trimmed(x, weights, beta):
    rows = x[np_participants(weights)]
    n = len(rows)
    b = math.floor(beta * n)
    out = np.zeros(x.shape[1:])
    for idx in np.ndindex(*x.shape[1:]):
        values = sorted(rows[(slice(None), *idx)])
        kept = values[b : n - b]
        out[idx] = sum(kept) / max(len(kept), 1)
    return out


def np_krum_scores(flat, weights, f):
    part = np_participants(weights)
    n = len(part)
    scores = np.full(len(flat), np.inf)
    for i in part:
        d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in part if j != i)
        scores[i] = sum(d[: max(n - f - 2, 0)])
    return scores


def np_multi_krum(flat, weights, f, m):
    scores = np_krum_scores(flat, weights, f)
    best = sorted(range(len(flat)), key=lambda i: (scores[i], i))[:m]
    w = np.zeros(len(flat))
    w[best] = np.asarray(weights)[best]
    return (w[:, None] * flat).sum(0) / w.sum()


def tree_of(x):
    """A two-leaf pytree whose flattening (leaves in key order) is ``x``'s columns."""
    return {"a": jnp.asarray(x[:, :3]), "b": jnp.asarray(x[:, 3:].reshape(len(x), 2, -1))}


def flat_of(tree):
    return np.concatenate([np.asarray(tree["a"]), np.asarray(tree["b"]).reshape(-1)])


@pytest.fixture
def updates():
    """9 clients x 7 coordinates: ties, two large outliers, one client without data."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 7)).round(1)  # rounding to tenths makes ties
    x[2, :] = x[5, :]  # a duplicated update
    x[7] = 50.0  # outliers
    x[8, 1] = -80.0
    weights = np.array([3, 1, 2, 2, 5, 1, 4, 2, 0], np.float32)  # the last has no data
    x = x.astype(np.float32)
    return x, weights


# ----------------------------------------------------------------------------- aggregators


def test_median_and_trimmed_mean_by_hand():
    x = jnp.array([[1.0], [2.0], [100.0], [3.0], [-50.0]])
    w = jnp.ones(5)
    assert float(robust.coordinate_median({"x": x}, w)["x"][0]) == 2.0
    # beta 0.2 of 5: drop one at each end (-50 and 100), mean of 1, 2, 3.
    assert float(robust.trimmed_mean({"x": x}, w, beta=0.2)["x"][0]) == pytest.approx(2.0)
    # An even count: NumPy's median, the mean of the middle two (the 100 has weight 0).
    got = robust.coordinate_median({"x": x}, jnp.array([1.0, 1, 0, 1, 1]))["x"]
    assert float(got[0]) == 1.5


def test_median_and_trimmed_mean_match_numpy(updates):
    x, w = updates
    med = robust.coordinate_median(tree_of(x), jnp.asarray(w))
    np.testing.assert_allclose(flat_of(med), np_median(x, w), rtol=1e-6)
    for beta in (0.0, 0.1, 0.25, 0.4):
        got = robust.trimmed_mean(tree_of(x), jnp.asarray(w), beta=beta)
        np.testing.assert_allclose(flat_of(got), np_trimmed(x, w, beta), rtol=1e-5, atol=1e-6)


def test_krum_scores_and_multi_krum_match_numpy(updates):
    x, w = updates
    for f in (0, 1, 2, 3):
        scores = np.asarray(robust.krum_scores(tree_of(x), jnp.asarray(w), f=f))
        np.testing.assert_allclose(scores, np_krum_scores(x, w, f), rtol=1e-4)
        for m in (1, 3, 6):
            got = robust.multi_krum(tree_of(x), jnp.asarray(w), f=f, m=m)
            np.testing.assert_allclose(flat_of(got), np_multi_krum(x, w, f, m), rtol=1e-5)


def test_krum_picks_the_cluster_not_the_outliers():
    rng = np.random.default_rng(1)
    honest = 1.0 + 0.01 * rng.normal(size=(6, 4))
    x = np.concatenate([honest, np.full((2, 4), -30.0)])
    got = robust.multi_krum({"x": jnp.asarray(x)}, jnp.ones(8), f=2, m=1)["x"]
    assert np.any(np.all(np.isclose(honest, np.asarray(got)), axis=1))  # one honest update


def test_norm_bound_and_centered_clip_match_numpy(updates):
    x, w = updates
    norms = np.linalg.norm(x, axis=1)
    clipped = x * np.minimum(1.0, 2.0 / norms)[:, None]
    want = (w[:, None] * clipped).sum(0) / w.sum()
    got = robust.norm_bounded_mean(tree_of(x), jnp.asarray(w), bound=2.0)
    np.testing.assert_allclose(flat_of(got), want, rtol=1e-5)
    v = np.zeros(7)
    for _ in range(4):
        d = x - v
        scale = np.minimum(1.0, 1.5 / np.maximum(np.linalg.norm(d, axis=1), 1e-30))
        v = v + (w[:, None] * d * scale[:, None]).sum(0) / w.sum()
    got = robust.centered_clip(tree_of(x), jnp.asarray(w), tau=1.5, iters=4)
    np.testing.assert_allclose(flat_of(got), v, rtol=1e-5, atol=1e-6)


def test_aggregators_ignore_non_participants_bit_for_bit(updates):
    """A weight-0 row (padding, a client without data) may hold anything."""
    x, w = updates
    y = x.copy()
    y[8] = np.nan  # the weight-0 client: even NaN changes nothing
    for name in robust.AGGREGATORS:
        agg = robust.make_aggregator(name, norm_bound=2.0)
        a = flat_of(agg.fn(tree_of(x), jnp.asarray(w)))
        b = flat_of(agg.fn(tree_of(y), jnp.asarray(w)))
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="beta"):
        robust.make_aggregator("trimmed_mean", trim_beta=0.5)
    with pytest.raises(ValueError, match="unknown aggregator"):
        robust.make_aggregator("geomedian")
    with pytest.raises(ValueError, match="attack.fraction"):
        robust.check_attack(robust.Attack("sign_flip", fraction=1.0))


# ----------------------------------------------------------------------------- attacks


def test_malicious_rows_count_is_exact_and_keyed():
    for k, fraction in ((10, 0.3), (7, 0.5), (20, 0.1)):
        rows = robust.malicious_rows(jax.random.key(3), k, fraction)
        assert int(rows.sum()) == round(fraction * k)
    a = robust.malicious_rows(jax.random.key(3), 10, 0.3)
    np.testing.assert_array_equal(a, robust.malicious_rows(jax.random.key(3), 10, 0.3))
    # Over 200 rounds' keys every client is drawn sometimes (uniform choice).
    drawn = sum(np.asarray(robust.malicious_rows(jax.random.key(r), 10, 0.3)) for r in range(200))
    assert drawn.min() > 30 and drawn.sum() == 600


def test_attacks_by_hand_and_against_numpy(updates):
    x, w = updates
    bad = np.zeros(9, bool)
    bad[[0, 3]] = True
    deltas, weights, mal = tree_of(x), jnp.asarray(w), jnp.asarray(bad)
    key = jax.random.key(0)

    def run(kind, **kw):
        attack = robust.Attack(kind, fraction=2 / 9, **kw)
        out = robust.attack_deltas(attack, deltas, weights, mal, key)
        return np.stack([flat_of({k: v[i] for k, v in out.items()}) for i in range(9)])

    np.testing.assert_array_equal(run("sign_flip")[bad], -x[bad])
    np.testing.assert_array_equal(run("sign_flip")[~bad], x[~bad])
    np.testing.assert_allclose(run("scale", scale=10.0)[bad], 10 * x[bad], rtol=1e-6)
    honest = (w > 0) & ~bad
    mu, sigma = x[honest].mean(0), x[honest].std(0)
    np.testing.assert_allclose(run("ipm", epsilon=0.5)[bad], np.tile(-0.5 * mu, (2, 1)), rtol=1e-5)
    # ALIE with n = 9, f = 2: s = floor(9/2 + 1) - 2 = 3, z = Phi^-1(6/9).
    z = NormalDist().inv_cdf(6 / 9)
    assert robust.alie_z(9, 2) == pytest.approx(z)
    np.testing.assert_allclose(run("alie")[bad], np.tile(mu - z * sigma, (2, 1)), rtol=1e-4)
    np.testing.assert_array_equal(run("label_flip"), x)  # poisons data, not updates


def test_noise_attack_has_the_configured_std():
    """Over 20,000 draws the sample std is within 2% of 3.0 (its std is about 0.5%)."""
    x = jnp.zeros((4, 5000))
    attack = robust.Attack("noise", fraction=0.5, noise_std=3.0)
    mal = jnp.array([True, True, False, True])
    out = robust.attack_deltas(attack, {"x": x}, jnp.ones(4), mal, jax.random.key(7))["x"]
    draws = np.asarray(out)[np.asarray(mal)]
    assert abs(draws.std() - 3.0) < 0.06 and abs(draws.mean()) < 0.06
    np.testing.assert_array_equal(np.asarray(out)[2], 0.0)


def test_flip_labels_keeps_no_target_positions():
    y = jnp.array([[0, 3, -1], [9, 5, -1]])
    np.testing.assert_array_equal(robust.flip_labels(y, 10), [[9, 6, -1], [0, 4, -1]])


# ----------------------------------------------------------------------------- in the round


def _fedavg(dataset, **kw):
    model = models.create("mlp-16", feature_shape=dataset.feature_shape, num_classes=10)
    return algorithms.fed_avg(
        model,
        client_optimizer=optax.sgd(0.1),
        server_optimizer=optax.sgd(1.0),
        epochs=1,
        batch_size=8,
        **kw,
    )


def _params(result):
    return [np.asarray(a) for a in jax.tree.leaves(result.state.params)]


def test_stacked_mean_equals_the_running_sum(digits_small):
    """Two formulations: the mean of the stacked updates and FedAvg's chunked running sum."""
    run = dict(rounds=2, clients_per_round=6, eval_every=2, seed=0, progress=False)
    plain = simulate.run(_fedavg(digits_small), digits_small, **run)
    stacked_mean = robust.Aggregator("mean", robust.weighted_mean, stacked=True)
    stacked = simulate.run(_fedavg(digits_small, aggregator=stacked_mean), digits_small, **run)
    for a, b in zip(_params(plain), _params(stacked), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_attack_of_fraction_zero_is_plain_fedavg_bit_for_bit(digits_small):
    run = dict(rounds=2, clients_per_round=6, eval_every=2, seed=0, progress=False)
    plain = simulate.run(_fedavg(digits_small), digits_small, **run)
    idle = robust.Attack("sign_flip", fraction=0.0)
    quiet = simulate.run(_fedavg(digits_small, attack=idle), digits_small, **run)
    for a, b in zip(_params(plain), _params(quiet), strict=True):
        np.testing.assert_array_equal(a, b)


def test_label_flippers_train_on_flipped_labels(digits_small):
    """Two formulations: the label_flip attack in the round, and a plain round on a
    cohort whose malicious clients' labels were flipped by hand beforehand."""
    from fedjax_kd.algorithms.fed_avg import ATTACK_STREAM, client_inputs, fedavg_step
    from fedjax_kd.data import Cohort, gather_clients

    model = models.create("mlp-16", feature_shape=digits_small.feature_shape, num_classes=10)
    update = client_lib.make_client_update(model.apply, optax.sgd(0.1), epochs=1, batch_size=8)
    params = model.init(jax.random.key(0))
    ids = jnp.arange(8)
    data = gather_clients(jax.tree.map(jnp.asarray, digits_small.train), ids)
    key = jax.random.key(5)
    attack_key = jax.random.fold_in(key, ATTACK_STREAM)
    attack = robust.Attack("label_flip", fraction=0.25, num_classes=10)
    common = dict(client_update=update, server_optimizer=optax.sgd(1.0))
    opt = optax.sgd(1.0).init(params)
    attacked = fedavg_step(
        params, opt, Cohort.from_data(data, ids), client_inputs(key, 8),
        attack=attack, attack_key=attack_key, **common,
    )  # fmt: skip
    bad = np.asarray(robust.malicious_rows(jax.random.fold_in(attack_key, 0), 8, 0.25))
    assert bad.sum() == 2
    flipped_y = np.where(bad[:, None], 9 - np.asarray(data.y), np.asarray(data.y))
    poisoned = data._replace(y=jnp.asarray(flipped_y, jnp.int32))
    by_hand = fedavg_step(
        params, opt, Cohort.from_data(poisoned, ids), client_inputs(key, 8), **common
    )
    for a, b in zip(jax.tree.leaves(attacked.delta), jax.tree.leaves(by_hand.delta), strict=True):
        np.testing.assert_array_equal(a, b)


def test_alie_round_is_the_same_in_chunks(digits_small):
    run = dict(rounds=2, clients_per_round=6, eval_every=2, seed=0, progress=False)
    algo = _fedavg(digits_small, attack=robust.Attack("alie", fraction=1 / 3))
    whole = simulate.run(algo, digits_small, **run)
    chunked = simulate.run(algo, digits_small, client_chunk_size=4, **run)
    for a, b in zip(_params(whole), _params(chunked), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_median_round_is_the_same_in_chunks(digits_small):
    run = dict(rounds=2, clients_per_round=6, eval_every=2, seed=0, progress=False)
    algo = _fedavg(digits_small, aggregator=robust.make_aggregator("median"))
    whole = simulate.run(algo, digits_small, **run)
    chunked = simulate.run(algo, digits_small, client_chunk_size=4, **run)
    for a, b in zip(_params(whole), _params(chunked), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- the CLI

TINY = [
    "--config.rounds=3", "--config.eval_every=3", "--config.clients_per_round=10",
    "--config.client.epochs=1", "--no-progress",
]  # fmt: skip


def _final(tmp_path, *extra):
    longer = ["--config.rounds=20", "--config.eval_every=20", "--config.client.epochs=5"]
    assert cli.main(["run", *TINY, *longer, "--workdir", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / "summary.json").read_text())["test_accuracy"]


def test_scaled_attack_breaks_the_mean_and_not_the_median(tmp_path):
    attack = [
        "--config.attack.kind=scale",
        "--config.attack.scale=-20",
        "--config.attack.fraction=0.3",
    ]
    clean = _final(tmp_path / "clean")
    mean = _final(tmp_path / "mean", *attack)
    median = _final(tmp_path / "median", *attack, "--config.server.aggregator=median")
    assert mean < clean - 0.2 and median > mean + 0.2


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--config.algorithm.name=teacher_student", "--config.data.proxy_fraction=0.1",
             "--config.server.aggregator=median"],
            "config key 'server.aggregator': algorithm 'teacher_student' aggregates",
        ),
        (["--config.attack.kind=ipm", "--config.attack.fraction=0.01"], "rounds to no attacker"),
        (["--config.server.aggregator=geomedian"], "config key 'server.aggregator'"),
        (["--config.server.trim_beta=0.5"], "config key 'server.trim_beta'"),
        (["--config.server.aggregator=krum", "--config.server.krum_f=4"], "allow f <= 3"),
        (["--config.attack.kind=sign_flip"], "attacks nobody"),
        (["--config.attack.kind=alie", "--config.attack.fraction=0.5"], "fewer than half"),
        (["--config.attack.kind=scale", "--config.attack.fraction=0.96"], "no honest client"),
        (
            ["--config.algorithm.name=fedkd", "--config.server.drop_nonfinite=true"],
            "config key 'server.drop_nonfinite': algorithm 'fedkd'",
        ),
    ],
)  # fmt: skip
def test_mistakes_are_one_error_line(capsys, no_run, extra, message):
    assert cli.main(["run", *TINY, *extra]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_memory_estimate_counts_the_stacked_updates(digits_small):
    from fedjax_kd import resources

    algo = _fedavg(digits_small)
    model = models.create("mlp-16", feature_shape=digits_small.feature_shape, num_classes=10)
    common = dict(client_models=[model], clients_per_round=10)
    plain = resources.estimate(algo, digits_small, **common)
    stacked = resources.estimate(algo, digits_small, stacked_updates=True, **common)
    params = 64 * 16 + 16 + 16 * 10 + 10
    # The K updates and as much again for the rule's sorting or distances.
    assert plain.stacked == 0 and stacked.stacked == 2 * 10 * 4 * params
    assert stacked.total == plain.total + 2 * 10 * 4 * params


def test_non_finite_updates_are_dropped_and_counted(digits_small):
    """Two formulations: a client whose features are NaN (its update is NaN) dropped,
    and the same round with that client holding no data (weight 0)."""
    from fedjax_kd.algorithms.fed_avg import client_inputs, fedavg_step
    from fedjax_kd.data import Cohort, gather_clients

    model = models.create("mlp-16", feature_shape=digits_small.feature_shape, num_classes=10)
    update = client_lib.make_client_update(model.apply, optax.sgd(0.1), epochs=1, batch_size=8)
    params = model.init(jax.random.key(0))
    ids = jnp.arange(6)
    data = gather_clients(jax.tree.map(jnp.asarray, digits_small.train), ids)
    broken = data._replace(x=data.x.at[2].set(jnp.nan))
    empty = data._replace(count=data.count.at[2].set(0))
    common = dict(client_update=update, server_optimizer=optax.sgd(1.0))
    opt = optax.sgd(1.0).init(params)

    def step(d, **kw):
        inputs = client_inputs(jax.random.key(1), 6)
        return fedavg_step(params, opt, Cohort.from_data(d, ids), inputs, **common, **kw)

    assert not bool(step(broken).finite)  # without dropping the round is not finite
    dropped = step(broken, drop_nonfinite=True)
    assert bool(dropped.finite) and int(dropped.sums["dropped_nonfinite"]) == 1
    for a, b in zip(
        jax.tree.leaves(dropped.delta), jax.tree.leaves(step(empty).delta), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert int(step(data, drop_nonfinite=True).sums["dropped_nonfinite"]) == 0


def test_dropped_updates_are_counted_per_round_and_over_the_run(digits_small):
    import dataclasses

    x = np.array(digits_small.train.x)
    x[0] = np.nan  # client 0's data is broken: every round it takes part, it is dropped
    ds = dataclasses.replace(digits_small, train=digits_small.train._replace(x=x))
    k = ds.num_clients  # every client every round
    run = dict(rounds=3, clients_per_round=k, eval_every=1, seed=0, progress=False)
    result = simulate.run(_fedavg(ds, drop_nonfinite=True), ds, **run)
    assert [r["dropped_nonfinite"] for r in result.history] == [1, 1, 1]
    assert [r["cumulative_dropped_nonfinite"] for r in result.history] == [1, 2, 3]
    assert result.summary["dropped_nonfinite"] == 3 and np.isfinite(result.summary["test_loss"])
