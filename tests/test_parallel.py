"""Parallel sweep points: grouping, equality with runs alone, workdirs, resume, errors.

The tolerance: a point run in a group equals its run alone up to float
rounding of the vmapped products and sums. Here that means the same test
accuracy at every evaluation (digits: one example is 1/360) and test/train
losses within 1e-4 relative; parameters within 1e-4 absolute after 4 rounds.
"""

import json
import textwrap

import jax
import numpy as np
import pytest

from fedjax_kd import cli, experiment, parallel, resources, simulate
from fedjax_kd.data import ClientData, FederatedDataset

SMALL = [
    ("rounds", "4"), ("eval_every", "2"), ("clients_per_round", "4"), ("data.num_clients", "12"),
    ("client.epochs", "1"), ("model.student", "mlp-16"), ("model.teacher", "mlp-32"),
]  # fmt: skip
TINY_FLAGS = [f"--config.{k}={v}" for k, v in SMALL] + ["--no-progress"]
LOSSES = ("test_loss", "train_loss")


def configs(*overrides, seeds=(0, 1, 2)):
    """Resolved SMALL configs, one per seed (and per override tuple given)."""
    sets = overrides or [()]
    return [experiment.resolve(None, [*SMALL, *o, ("seed", str(s))]) for o in sets for s in seeds]


def assert_close_records(a, b):
    """The tolerance of the module docstring, record by record."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if key == "wall_s":
                continue
            if key in LOSSES or key.endswith("_loss"):
                np.testing.assert_allclose(x[key], y[key], rtol=1e-4, err_msg=key)
            else:
                assert x[key] == y[key], key


def test_continuous_keys():
    keys = parallel.continuous_keys(experiment.resolve())
    for key in ("client.lr", "server.lr", "server.distill_lr", "fedprox.mu",
                "teacher_student.temperature", "fedntd.beta"):  # fmt: skip
        assert key in keys
    for key in ("seed", "data.alpha", "data.proxy_fraction", "client.epochs", "rounds",
                "synthetic.alpha", "teacher_student.kd_start_round"):  # fmt: skip
        assert key not in keys


def test_plan_groups_by_seed_and_continuous_keys():
    cs = [
        *configs(seeds=(0, 1)),  # 0, 1
        *configs((("client.lr", "0.05"),), seeds=(0,)),  # 2: joins 0, 1
        *configs((("client.epochs", "2"),), seeds=(0, 1)),  # 3, 4: another shape
        *configs((("algorithm.name", "fedprox"),), seeds=(0,)),  # 5
        *configs((("data.alpha", "0.1"),), seeds=(0,)),  # 6: other data
    ]
    assert parallel.plan(cs, 8) == [[0, 1, 2], [3, 4], [5], [6]]
    assert parallel.plan(cs, 2) == [[0, 1], [2], [3, 4], [5], [6]]
    assert parallel.plan(cs, 1) == [[i] for i in range(7)]


@pytest.fixture(scope="module")
def fedavg_pair():
    """Six FedAvg points (3 seeds x 2 learning rates) in one group, and alone."""
    cs = configs((), (("client.lr", "0.05"),))
    together = parallel.run_all(cs, parallel=8, progress=False)
    alone = [experiment.run(c, progress=False) for c in cs]
    return cs, together, alone


def test_group_equals_runs_alone(fedavg_pair):
    _, together, alone = fedavg_pair
    for t, a in zip(together, alone, strict=True):
        assert_close_records(t.history, a.history)
        assert t.summary["uplink_bytes"] == a.summary["uplink_bytes"]
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-4), t.state, a.state)
    # The learning rate really is per point: the two rates end elsewhere.
    assert together[0].history[-1]["test_loss"] != together[3].history[-1]["test_loss"]


def test_group_is_reproducible_bit_for_bit(fedavg_pair):
    cs, together, _ = fedavg_pair
    again = parallel.run_all(cs, parallel=8, progress=False)
    for t, a in zip(together, again, strict=True):
        assert [dict(r, wall_s=0) for r in t.history] == [dict(r, wall_s=0) for r in a.history]
        jax.tree.map(np.testing.assert_array_equal, t.state, a.state)


def test_every_vmap_width_equals_runs_alone(fedavg_pair):
    cs, together, alone = fedavg_pair
    dataset = [experiment.build_dataset(c) for c in cs[:3]]
    build = parallel._builder(cs[0], dataset[0], [])
    points = [simulate.Point(c.seed, d) for c, d in zip(cs[:3], dataset, strict=True)]
    for width in (3, 2):  # one vmap; a loop over a vmapped pair and a single point
        out = simulate.run_parallel(
            build, points, width=width, progress=False, **experiment.run_settings(cs[0])
        )
        for o, a in zip(out, alone[:3], strict=True):
            assert_close_records(o.history, a.history)


@pytest.mark.parametrize(
    "overrides",
    [
        (("algorithm.name", "teacher_student"), ("data.proxy_fraction", "0.1"),
         ("server.distill_steps", "2")),
        (("algorithm.name", "fedkd"),),
    ],
    ids=["teacher_student", "fedkd"],
)  # fmt: skip
def test_kd_algorithms_in_a_group_equal_runs_alone(overrides):
    cs = configs(overrides, seeds=(0, 1))
    together = parallel.run_all(cs, parallel=8, progress=False)
    for config, t in zip(cs, together, strict=True):
        assert_close_records(t.history, experiment.run(config, progress=False).history)


def test_sweep_parallel_writes_each_point_and_resumes_per_group(tmp_path, capsys):
    root = tmp_path / "sweep"
    argv = ["sweep", "--workdir", str(root), "--seeds", "0,1", "--parallel", "4",
            "--grid", "client.lr=0.1,0.05", *TINY_FLAGS]  # fmt: skip
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "running 4 points as one program" in captured.err
    dirs = sorted(root.glob("*/seed*"))
    assert len(dirs) == 4
    for d in dirs:
        assert {p.name for p in d.iterdir()} >= {"config.json", "metrics.jsonl", "summary.json",
                                                 "checkpoints"}  # fmt: skip
        assert [json.loads(line)["round"] for line in (d / "metrics.jsonl").open()] == [2, 4]
    manifest = json.loads((root / "sweep.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["done"] * 4
    # Extending the sweep resumes every point from its checkpoint, as one group again;
    # the result is the group run for 6 rounds without a stop, bit for bit.
    assert cli.main([*argv, "--config.rounds=6"]) == 0
    assert capsys.readouterr().err.count("resuming from round 4") == 4
    straight = tmp_path / "straight"
    argv_straight = [*argv, "--config.rounds=6"]
    argv_straight[argv_straight.index(str(root))] = str(straight)
    assert cli.main(argv_straight) == 0
    for d in dirs:
        resumed = (d / "metrics.jsonl").read_text().splitlines()
        direct = (straight / d.relative_to(root) / "metrics.jsonl").read_text().splitlines()
        strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "wall_s"}  # noqa: E731
        assert [strip(x) for x in resumed] == [strip(x) for x in direct]
        assert len(resumed) == 3


def test_a_diverging_point_stops_alone(tmp_path, capsys):
    root = tmp_path / "sweep"
    argv = ["sweep", "--workdir", str(root), "--seeds", "0", "--parallel", "4",
            "--grid", "client.lr=0.1,1e30", *TINY_FLAGS]  # fmt: skip
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "running 2 points as one program" in captured.err
    out = captured.out
    assert "client.lr-1e30 seed 0: diverged (round 1:" in out
    assert "client.lr-0.1 seed 0: test_accuracy" in out
    manifest = json.loads((root / "sweep.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["done", "diverged"]


def test_memory_of_the_group_is_refused_before_compiling(tmp_path, capsys, monkeypatch):
    one = experiment.build_run(configs()[0])  # an estimate that fits alone
    need = experiment._check_memory(configs()[0], *one).total
    monkeypatch.setattr(resources, "available_memory", lambda: (int(need * 2.5), "RAM available"))
    argv = ["sweep", "--workdir", str(tmp_path / "s"), "--seeds", "0,1,2", "--parallel", "3",
            *TINY_FLAGS]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --parallel: 3 runs in one program need at least")
    assert err.endswith("use --parallel 2 or less")


BRANCHING = textwrap.dedent(
    """
    import optax

    from fedjax_kd import algorithms, spec


    def _build(ctx):
        step = ctx.hp["step"]
        if step > 1.5:  # a Python branch on a float hyperparameter: cannot be traced
            step = 1.5
        return algorithms.fed_avg(ctx.student, **dict(ctx.common, server_optimizer=optax.sgd(step)))


    SPEC = spec.AlgorithmSpec(
        name="branchy",
        help="FedAvg with a clipped server step",
        build=_build,
        hypers={"step": spec.Hyper(1.0, "server learning rate", **spec.positive())},
    )
    """
)


def test_an_untraceable_hyperparameter_runs_its_values_apart(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "branchy_mod.py").write_text(BRANCHING)
    monkeypatch.syspath_prepend(str(folder))
    cs = configs(
        (("algorithm.name", "branchy_mod:SPEC"), ("branchy.step", "1.0")),
        (("algorithm.name", "branchy_mod:SPEC"), ("branchy.step", "0.5")),
        seeds=(0, 1),
    )
    assert parallel.plan(cs, 8) == [[0, 1, 2, 3]]
    together = parallel.run_all(cs, parallel=8, progress=False)
    assert "note: branchy.step cannot reach this algorithm's compiled round" in (
        capsys.readouterr().err
    )
    for config, t in zip(cs, together, strict=True):
        assert_close_records(t.history, experiment.run(config, progress=False).history)


def test_stack_datasets_pads_and_refuses_other_shapes():
    def dataset(num_clients, n):
        x = np.ones((num_clients, n, 3), np.float32)
        y = np.zeros((num_clients, n), np.int32)
        test = np.ones((5, 3), np.float32), np.zeros((5,), np.int32)
        return FederatedDataset("t", ClientData(x, y, np.full((num_clients,), n, np.int32)),
                                *test, num_classes=2)  # fmt: skip

    train, test, server, axis = simulate.stack_datasets([dataset(4, 2), dataset(4, 3)], 8)
    assert axis == 0 and train.x.shape == (2, 4, 3, 3) and server == {}
    np.testing.assert_array_equal(train.x[0, :, 2], 0)  # the padding
    np.testing.assert_array_equal(train.count, [[2] * 4, [3] * 4])
    assert test[0].shape == (2, 1, 5, 3)
    same = dataset(4, 2)
    assert simulate.stack_datasets([same, same], 8)[3] is None
    with pytest.raises(ValueError, match="differ in shape"):
        simulate.stack_datasets([dataset(4, 2), dataset(5, 2)], 8)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_parallel_must_be_a_whole_number_at_least_1(tmp_path, capsys, no_run, value):
    code = cli.main(["sweep", "--workdir", str(tmp_path / "s"), "--parallel", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(
        f"error: argument --parallel: expected a whole number >= 1, got '{value}'"
    )


def test_points_whose_data_differ_in_shape_run_apart(capsys):
    # Synthetic's test set size depends on the seed: the two points cannot share a program.
    cs = configs((("data.name", "synthetic"), ("data.num_clients", "12")), seeds=(0, 1))
    datasets = [experiment.build_dataset(c) for c in cs]
    assert datasets[0].test_x.shape != datasets[1].test_x.shape
    assert parallel.plan(cs, 8) == [[0, 1]]
    together = parallel.run_all(cs, parallel=8, progress=False)
    assert "as one program" not in capsys.readouterr().err
    for config, t in zip(cs, together, strict=True):
        alone = experiment.run(config, progress=False)
        assert [dict(r, wall_s=0) for r in t.history] == [dict(r, wall_s=0) for r in alone.history]
