"""DP-FedAvg (fedjax_kd.privacy): clipping, noise and accounting against references.

Oracles: the clipped mean recomputed in NumPy from the clients' own updates;
the noise's standard deviation over many seeded draws; epsilon from a direct
``dp_accounting`` computation of the same events composed one round at a
time (against the library's self-composed event); the budget's round count
against a plain loop.
"""

import json

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import rdp
from helpers import FakeModel, feature_client_update, feature_clients, one_error_line

from fedjax_kd import algorithms, cli, client, models, privacy, simulate
from fedjax_kd.algorithms.fed_avg import client_inputs, fedavg_step, from_client_update
from fedjax_kd.data import Cohort, gather_clients


def test_all_clients_every_round_is_the_gaussian_mechanism_of_sensitivity_2s():
    """At K = N nothing is subsampled: replacing a client moves the clipped sum by up
    to 2S, so with noise std zS the RDP is alpha (2S)^2 / (2 (zS)^2) = 2 alpha / z^2
    per round (hand-derived), converted by dp-accounting's epsilon conversion."""
    from dp_accounting.rdp import rdp_privacy_accountant

    z, rounds, delta = 2.0, 5, 1e-5
    orders = privacy._one_round_rdp(50, 50, z)[0]
    want, _ = rdp_privacy_accountant.compute_epsilon(
        orders, [rounds * 2 * a / z**2 for a in orders], delta
    )
    got = privacy.epsilon(50, 50, z, rounds, delta)
    assert got == pytest.approx(want, rel=1e-6)
    # The add/remove value (alpha / (2 z^2)) would be far smaller: the factor matters.
    small, _ = rdp_privacy_accountant.compute_epsilon(
        orders, [rounds * a / (2 * z**2) for a in orders], delta
    )
    assert got > 1.5 * small


def test_epsilon_equals_a_direct_dp_accounting_composition():
    n, k, z, delta = 100, 10, 1.1, 1e-5
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    # The noise z S against the replace-one sensitivity 2 S: multiplier z / 2.
    one_round = dp_accounting.SampledWithoutReplacementDpEvent(
        n, k, dp_accounting.GaussianDpEvent(z / 2)
    )
    for r in range(1, 31):
        accountant.compose(one_round)  # one event per round, composed as they happen
        if r in (1, 7, 30):
            assert privacy.epsilon(n, k, z, r, delta) == pytest.approx(
                accountant.get_epsilon(delta), rel=1e-9
            )
    assert privacy.epsilon(n, k, z, 0, delta) == 0.0
    assert privacy.epsilon(n, k, 0.0, 5, delta) == float("inf")
    # More noise, fewer clients per round or fewer rounds: less epsilon.
    assert privacy.epsilon(n, k, 2.0, 30, delta) < privacy.epsilon(n, k, z, 30, delta)
    assert privacy.epsilon(n, 5, z, 30, delta) < privacy.epsilon(n, k, z, 30, delta)


def test_rounds_within_a_budget_match_a_plain_loop():
    n, k, z, delta = 100, 10, 1.0, 1e-5
    for budget in (3.0, 8.0):
        r = 0
        while privacy.epsilon(n, k, z, r + 1, delta) <= budget:
            r += 1
        assert privacy.rounds_within(budget, n, k, z, delta) == r
    assert privacy.rounds_within(0.5, n, k, z, delta) == 0


def test_clip_update_by_hand():
    tree = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # norm 5
    clipped, norm = privacy.clip_update(tree, 2.5)
    assert float(norm) == 5.0
    np.testing.assert_allclose(clipped["a"], [1.5, 0.0])
    np.testing.assert_allclose(clipped["b"], [[2.0]])
    same, _ = privacy.clip_update(tree, 10.0)  # inside the bound: unchanged
    np.testing.assert_array_equal(same["a"], tree["a"])


def test_noise_std_is_z_times_s_over_k():
    """The std of 40,000 noise draws is within 2% of z S / K (sampling std about 0.35%)."""
    dp = privacy.DP(clip_norm=0.5, noise_multiplier=1.5)
    zeros = {"x": jnp.zeros((200,)), "y": jnp.zeros((2, 100))}
    draws = [
        np.concatenate(
            [np.ravel(v) for v in privacy.noised_mean(zeros, jax.random.key(i), dp, 4).values()]
        )
        for i in range(100)
    ]
    draws = np.concatenate(draws)
    want = 1.5 * 0.5 / 4
    assert abs(draws.std() / want - 1) < 0.02 and abs(draws.mean()) < 0.02 * want


@pytest.fixture(scope="module")
def dp_setup(digits_small):
    model = models.create("mlp-16", feature_shape=digits_small.feature_shape, num_classes=10)
    update = client.make_client_update(model.apply, optax.sgd(0.5), epochs=2, batch_size=8)
    params = model.init(jax.random.key(0))
    ids = jnp.arange(6)
    data = gather_clients(jax.tree.map(jnp.asarray, digits_small.train), ids)
    return model, update, params, ids, data


def test_the_private_aggregate_is_the_mean_of_clipped_updates(dp_setup):
    """Without noise the aggregate is (1/K) sum_k clip_S(delta_k), every client weight 1."""
    model, update, params, ids, data = dp_setup
    key = jax.random.key(3)
    inputs = client_inputs(key, 6)
    clip = 0.3
    step = fedavg_step(
        params,
        optax.sgd(1.0).init(params),
        Cohort.from_data(data, ids),
        inputs,
        client_update=update,
        server_optimizer=optax.sgd(1.0),
        dp=privacy.DP(clip_norm=clip, noise_multiplier=0.0),
        dp_key=jax.random.key(9),
    )
    flat, norms = [], []
    for k in range(6):
        out = update(params, data.x[k], data.y[k], data.count[k], inputs["key"][k])
        d = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(out.delta)])
        norms.append(np.linalg.norm(d))
        flat.append(d * min(1.0, clip / norms[-1]))
    want = np.mean(flat, axis=0)
    got = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(step.delta)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    assert float(step.sums["dp_clipped"]) == sum(n > clip for n in norms)


def test_chunks_give_the_same_private_round(dp_setup):
    model, update, params, ids, data = dp_setup
    dp = privacy.DP(clip_norm=0.3, noise_multiplier=1.0)
    outs = []
    for chunk in (None, 4):
        outs.append(
            fedavg_step(
                params,
                optax.sgd(1.0).init(params),
                Cohort.from_data(data, ids, chunk_size=chunk),
                client_inputs(jax.random.key(3), 6),
                client_update=update,
                server_optimizer=optax.sgd(1.0),
                dp=dp,
                dp_key=jax.random.key(9),
            ).delta
        )
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_records_carry_epsilon_and_the_same_seed_gives_the_same_run(digits_small):
    model = models.create("mlp-16", feature_shape=digits_small.feature_shape, num_classes=10)
    dp = privacy.DP(clip_norm=1.0, noise_multiplier=1.0)
    algo = algorithms.fed_avg(
        model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
        epochs=1, batch_size=8, dp=dp,
    )._replace(host_metrics=privacy.host_metrics(dp, digits_small.num_clients, 5))  # fmt: skip
    run = dict(rounds=4, clients_per_round=5, eval_every=2, seed=0, progress=False)
    a = simulate.run(algo, digits_small, **run)
    b = simulate.run(algo, digits_small, **run)
    eps = [r["dp_epsilon"] for r in a.history]
    assert eps == [privacy.epsilon(digits_small.num_clients, 5, 1.0, r, 1e-5) for r in (2, 4)]
    assert a.summary["dp_epsilon"] == eps[-1] and 0 <= a.history[-1]["dp_clipped_fraction"] <= 1
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params), strict=True):
        np.testing.assert_array_equal(x, y)


TINY = ["--config.rounds=40", "--config.eval_every=10", "--config.client.epochs=1", "--no-progress"]


def test_cli_stops_at_the_epsilon_budget(tmp_path, capsys):
    argv = ["run", *TINY, "--config.dp.clip_norm=1", "--config.dp.noise_multiplier=2"]
    argv += ["--config.dp.epsilon_budget=6", "--workdir", str(tmp_path)]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    allowed = privacy.rounds_within(6.0, 100, 10, 2.0, 1e-5)
    assert summary["rounds"] == allowed < 40 and summary["dp_epsilon"] <= 6.0
    assert f"reached after {allowed} of the 40 rounds" in capsys.readouterr().err
    # The same command again finds the run finished and keeps its records.
    before = (tmp_path / "metrics.jsonl").read_text()
    assert cli.main(argv) == 0
    assert (tmp_path / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config.dp.epsilon_budget=1"], "below one round's epsilon"),
        (["--config.dp.clip_norm=0", "--config.dp.epsilon_budget=5"], "a budget needs DP"),
        (
            ["--config.algorithm.name=fedkd"],
            "DP-FedAvg works with fedavg, fedprox, teacher_student, feddf, fedntd",
        ),
        (["--config.server.aggregator=median"], "does not combine with server.aggregator"),
        (["--config.dp.delta=0"], "config key 'dp.delta'"),
    ],
)
def test_mistakes_are_one_error_line(capsys, no_run, extra, message):
    assert cli.main(["run", *TINY, "--config.dp.clip_norm=1", *extra]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_no_noise_reports_null_epsilon(tmp_path):
    argv = ["run", *TINY, "--config.rounds=2", "--config.eval_every=1"]
    argv += [
        "--config.dp.clip_norm=1",
        "--config.dp.noise_multiplier=0",
        "--workdir",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["dp_epsilon"] is None


# --- Poisson sampling, PLD, adaptive clipping -------------------------------------------


def test_poisson_epsilon_equals_direct_dp_accounting_rdp_and_pld():
    """Poisson at rate K/N, add/remove-one: the RDP value is dp-accounting's own
    accountant on T rounds; PLD (at our coarser discretization) is within 0.5% of the
    library's default-discretization PLD and below RDP (PLD is tighter)."""
    from dp_accounting import pld

    n, k, z, delta = 200, 10, 1.1, 1e-5
    event = dp_accounting.PoissonSampledDpEvent(k / n, dp_accounting.GaussianDpEvent(z))
    for rounds in (1, 7, 60):
        direct = rdp.RdpAccountant()  # ADD_OR_REMOVE_ONE by default
        for _ in range(rounds):
            direct.compose(event)
        got = privacy.epsilon(n, k, z, rounds, delta, sampling="poisson")
        assert got == pytest.approx(direct.get_epsilon(delta), rel=1e-9)
        fine = pld.PLDAccountant().compose(event, rounds).get_epsilon(delta)
        ours = privacy.epsilon(n, k, z, rounds, delta, sampling="poisson", accountant="pld")
        assert ours == pytest.approx(fine, rel=5e-3) and ours < got


def test_two_releases_compose_like_one_of_z_over_root_two():
    """Updates and outputs released on the same cohort: the composition of two
    Gaussian events of z inside the sampling equals our single event of z / sqrt 2."""
    n, k, z, delta = 120, 12, 1.3, 1e-5
    both = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z), dp_accounting.GaussianDpEvent(z)]
    )
    direct = rdp.RdpAccountant().compose(dp_accounting.PoissonSampledDpEvent(k / n, both), 20)
    got = privacy.epsilon(n, k, z, 20, delta, sampling="poisson", releases=2)
    assert got == pytest.approx(direct.get_epsilon(delta), rel=1e-9)
    assert got > privacy.epsilon(n, k, z, 20, delta, sampling="poisson")


def test_pld_refuses_fixed_size_sampling():
    with pytest.raises(ValueError, match="pld cannot account fixed-size sampling"):
        privacy.epsilon(100, 10, 1.0, 5, 1e-5, sampling="fixed", accountant="pld")


def test_poisson_sampler_is_one_uniform_per_client():
    """The drawn ids are exactly those whose uniform falls below q (NumPy recomputation),
    in ascending order, padded and masked; the mean cohort over many rounds is q N."""
    n, q, m = 300, 0.05, 40
    sample = jax.jit(privacy.poisson_sampler(q, m), static_argnums=(1, 2))
    sizes = []
    for r in range(200):
        key = jax.random.key(r)
        got = sample(key, n, 15)
        want = np.flatnonzero(np.asarray(jax.random.uniform(key, (n,))) < q)
        assert int(got.drawn) == len(want) <= m
        np.testing.assert_array_equal(np.asarray(got.ids)[: len(want)], want)
        np.testing.assert_array_equal(np.asarray(got.members), np.arange(m) < len(want))
        sizes.append(len(want))
    # Mean of 200 Binomial(300, 0.05) draws: std sqrt(14.25 / 200) = 0.27; 5 sigma.
    assert abs(np.mean(sizes) - q * n) < 5 * np.sqrt(n * q * (1 - q) / 200)


def test_max_cohort_is_the_smallest_size_within_the_overflow_probability():
    """Against the binomial tail summed exactly in Python integers."""
    from fractions import Fraction
    from math import comb

    def tail(m, n, q):  # P(Bin(n, q) > m), exact
        return sum(comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(m + 1, n + 1))

    n, q, rounds = 150, Fraction(1, 10), 30
    m = privacy.max_cohort_size(n, 0.1, rounds)
    assert tail(m, n, q) * rounds <= Fraction(1, 10**6) < tail(m - 1, n, q) * rounds


def test_adaptive_clip_norm_by_hand():
    """All unclipped (b = 1) shrinks C by exp(-eta (1 - gamma)); all clipped (b = 0)
    grows it by exp(eta gamma); the count noise is N(0, sigma_b^2) from the key."""
    a = privacy.AdaptiveClip(target_quantile=0.6, learning_rate=0.3, count_stddev=1e-9)
    key = jax.random.key(0)
    up = privacy.adapt_clip_norm(jnp.float32(2.0), 8.0, 8.0, key, a, 8.0)
    down = privacy.adapt_clip_norm(jnp.float32(2.0), 0.0, 8.0, key, a, 8.0)
    assert float(up) == pytest.approx(2.0 * np.exp(-0.3 * 0.4), rel=1e-6)
    assert float(down) == pytest.approx(2.0 * np.exp(0.3 * 0.6), rel=1e-6)
    noisy = privacy.AdaptiveClip(0.5, 0.2, count_stddev=2.0)
    got = privacy.adapt_clip_norm(jnp.float32(1.0), 3.0, 10.0, key, noisy, 10.0)
    b = np.clip((3.0 - 5.0 + 2.0 * float(jax.random.normal(key, ()))) / 10.0 + 0.5, 0, 1)
    assert float(got) == pytest.approx(np.exp(-0.2 * (b - 0.5)), rel=1e-6)


def test_adaptive_splits_the_noise_so_the_total_stays_z():
    """z_delta^-2 + (2 sigma_b)^-2 = z^-2 (TFF's split), and z >= 2 sigma_b is refused."""
    dp = privacy.DP(0.1, 1.0, adaptive=privacy.AdaptiveClip(count_stddev=2.0))
    z_delta = privacy.sum_noise_multiplier(dp)
    assert z_delta**-2 + 4.0**-2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="below 2 x dp.count_stddev"):
        privacy.check_dp(privacy.DP(0.1, 1.0, adaptive=privacy.AdaptiveClip(count_stddev=0.5)))


def test_a_poisson_cohort_trains_only_its_members(dp_setup):
    """Two formulations: a padded cohort of 6 rows with 4 members (the padding rows are
    real clients, masked out) equals the 4 members alone, both divided by the expected
    cohort 5; padding rows send and receive no bytes."""
    model, update, params, ids, data = dp_setup
    members = jnp.array([True, True, False, True, True, False])
    keep = np.flatnonzero(np.asarray(members))
    dp = privacy.DP(clip_norm=0.3, noise_multiplier=0.0)
    inputs = client_inputs(jax.random.key(3), 6)
    common = dict(
        client_update=update, server_optimizer=optax.sgd(1.0), dp=dp, dp_key=jax.random.key(9),
        dp_denominator=5.0,
    )  # fmt: skip
    padded = Cohort.from_data(data, ids, members=members, drawn=jnp.int32(4))
    a = fedavg_step(params, optax.sgd(1.0).init(params), padded, inputs, **common)
    alone = Cohort.from_data(jax.tree.map(lambda x: x[keep], data), ids[keep])
    sub = jax.tree.map(lambda x: x[keep], inputs)
    b = fedavg_step(params, optax.sgd(1.0).init(params), alone, sub, **common)
    for x, y in zip(jax.tree.leaves(a.delta), jax.tree.leaves(b.delta), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8)
    assert np.all(np.asarray(a.uplink)[~np.asarray(members)] == 0)
    assert np.all(np.asarray(a.downlink)[~np.asarray(members)] == 0)
    assert np.all(np.asarray(a.uplink)[np.asarray(members)] > 0)


def test_cli_poisson_and_adaptive_run_and_report(tmp_path):
    """A Poisson, PLD-accounted, adaptively clipped run: records carry the cohort's size,
    overflow 0, the clip norm it used and the PLD epsilon of the rounds so far."""
    argv = ["run", *TINY, "--config.rounds=4", "--config.eval_every=2"]
    argv += ["--config.dp.clip_norm=0.1", "--config.dp.noise_multiplier=0.8"]
    argv += ["--config.dp.sampling=poisson", "--config.dp.accountant=pld"]
    argv += ["--config.dp.adaptive=true", "--config.dp.count_stddev=1", "--workdir", str(tmp_path)]
    assert cli.main(argv) == 0
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for r in records:
        assert r["dp_epsilon"] == privacy.epsilon(
            100, 10, 0.8, r["round"], 1e-5, sampling="poisson", accountant="pld"
        )
        assert 0 < r["cohort_size"] and r["cohort_overflow"] == 0 and r["dp_clip_norm"] > 0
    assert records[0]["dp_clip_norm"] != 0.1  # round 2 clips with the adapted norm
    assert summary["cohort_overflow"] == 0 and summary["dp_epsilon"] == records[-1]["dp_epsilon"]


def test_an_overflowing_poisson_round_trains_a_random_subset_and_is_reported(digits_small, capsys):
    """A padded cohort of 3 at rate 0.5 of the population overflows every round: 3 distinct
    drawn clients train (not always the lowest ids), the rest are counted per record and
    in the summary, and a warning names the round."""
    n = digits_small.num_clients
    sample = privacy.poisson_sampler(0.5, 3)
    lowest = []
    for r in range(20):
        key = jax.random.key(r)
        got = sample(key, n, 5)
        drawn = set(np.flatnonzero(np.asarray(jax.random.uniform(key, (n,))) < 0.5))
        ids = [int(i) for i in got.ids]
        assert int(got.drawn) == len(drawn) > 3 and set(ids) <= drawn and len(set(ids)) == 3
        lowest.append(ids == sorted(drawn)[:3])
    assert not all(lowest)  # a random subset, not the first ids
    model = models.create("linear", feature_shape=digits_small.feature_shape, num_classes=10)
    algo = algorithms.fed_avg(
        model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), epochs=1,
        batch_size=8, dp=privacy.DP(1.0, 1.0), poisson=privacy.Poisson(0.5, 3, n / 2),
    )  # fmt: skip
    out = simulate.run(algo, digits_small, rounds=2, clients_per_round=5, eval_every=1,
                       seed=0, progress=False)  # fmt: skip
    assert all(r["cohort_size"] == 3 and r["cohort_overflow"] > 0 for r in out.history)
    assert out.summary["cohort_overflow"] == sum(r["cohort_overflow"] for r in out.history)
    assert "round 1: Poisson sampling drew" in capsys.readouterr().err


def test_adaptive_clipping_counts_only_the_clients_that_report():
    """Half the cohort dropped as stragglers: the count is over the 5 that report
    (all clipped), centred by 5 and divided by the expected 10 (TF Privacy's fixed
    denominator): b = (0 - 2.5) / 10 + 1/2 = 0.25, so C <- C exp(-0.2 (0.25 - 0.5))."""
    a = privacy.AdaptiveClip(target_quantile=0.5, learning_rate=0.2, count_stddev=1e-9)
    algo = from_client_update(
        FakeModel(init=lambda key: {"w": 100.0 * jnp.ones(12)}), feature_client_update,
        optax.sgd(1.0), dp=privacy.DP(1.0, 0.0, adaptive=a), epochs=2,
        straggler_fraction=0.5, drop_stragglers=True,
    )  # fmt: skip
    cohort = Cohort.from_data(feature_clients(10))
    state, metrics = algo.round(algo.init(jax.random.key(0)), cohort, jax.random.key(1))
    assert float(state.opt_state.clip_norm) == pytest.approx(np.exp(-0.2 * (0.25 - 0.5)))
    assert float(metrics["dp_clipped_fraction"]) == pytest.approx(0.5)  # 5 of 10 clipped


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config.dp.accountant=pld"], "pld cannot account fixed-size sampling"),
        (["--config.dp.clip_norm=0", "--config.dp.sampling=poisson"], "is DP-FedAvg's"),
        (["--config.dp.clip_norm=0", "--config.dp.adaptive=true"], "adaptive clipping needs"),
        (["--config.dp.adaptive=true"], "below 2 x dp.count_stddev"),
        (
            [
                "--config.dp.sampling=poisson",
                "--config.client.straggler_fraction=0.2",
                "--config.client.drop_stragglers=true",
            ],
            "Poisson sampling takes no client.straggler_fraction",
        ),
        (["--config.dp.max_cohort=5"], "it pads Poisson cohorts"),
        (["--config.dp.sampling=poisson", "--config.dp.max_cohort=3"], "must be in ["),
        (["--config.dp.sampling=uniform"], "config key 'dp.sampling'"),
    ],
)
def test_sampling_mistakes_are_one_error_line(capsys, no_run, extra, message):
    assert cli.main(["run", *TINY, "--config.dp.clip_norm=1", *extra]) == 2
    assert message in one_error_line(capsys.readouterr().err)
