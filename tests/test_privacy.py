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
from helpers import one_error_line

from fedjax_kd import algorithms, cli, client, models, privacy, simulate
from fedjax_kd.algorithms.fed_avg import client_inputs, fedavg_step
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
        (["--config.algorithm.name=fedkd"], "DP-FedAvg works with fedavg, fedprox, fedntd"),
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
