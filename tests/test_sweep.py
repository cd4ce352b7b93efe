"""fedjax-kd sweep: grid expansion, point names, config variants, a tiny real sweep."""

import json

import pytest

from fedjax_kd import cli, experiment, report, simulate, sweep

TINY = [
    "--config.rounds=2",
    "--config.eval_every=1",
    "--config.data.num_clients=10",
    "--config.clients_per_round=3",
    "--config.model.student=linear",
    "--config.client.epochs=1",
]


def test_point_name():
    name = sweep.point_name([("algorithm.name", "fedprox"), ("fedprox.mu", "1.0")])
    assert name == "algorithm.name-fedprox__fedprox.mu-1.0"
    assert sweep.point_name([("model.student_groups", "mlp-8,cnn 4/x")]) == (
        "model.student_groups-mlp-8_cnn_4_x"
    )
    assert sweep.point_name([]) == "base"
    long = sweep.point_name([("model.student_groups", "mlp-8," * 40)])
    assert len(long) == sweep.MAX_NAME_LENGTH
    assert long != sweep.point_name([("model.student_groups", "mlp-8," * 41)])


def test_expand_grid():
    assert sweep.expand_grid({"a": [1, 2], "b": ["x", "y"]}) == [
        (("a", "1"), ("b", "x")),
        (("a", "1"), ("b", "y")),
        (("a", "2"), ("b", "x")),
        (("a", "2"), ("b", "y")),
    ]
    union = sweep.expand_grid([{"a": [1, 2]}, {"a": [2, 3.5], "c": True}])
    assert union == [
        (("a", "1"),),
        (("a", "2"),),
        (("a", "2"), ("c", "true")),
        (("a", "3.5"), ("c", "true")),
    ]
    assert sweep.expand_grid({}) == [()] and sweep.expand_grid(None) == [()]
    assert sweep.expand_grid([{"a": [1]}, {"a": [1]}]) == [(("a", "1"),)]
    with pytest.raises(experiment.ConfigError, match="'a' has no values"):
        sweep.expand_grid({"a": []})
    with pytest.raises(experiment.ConfigError, match="--seeds"):
        sweep.expand_grid({"seed": [1, 2]})


def test_parse_grid_flags_and_points(tmp_path):
    grid = sweep.parse_grid_flags(["client.lr=0.05, 0.1", "algorithm.name=fedavg"])
    assert grid == {"client.lr": ["0.05", "0.1"], "algorithm.name": ["fedavg"]}
    for bad in (["client.lr"], ["client.lr="], ["a=1", "a=2"], ["=1"], ["a=1,,2"]):
        with pytest.raises(experiment.ConfigError):
            sweep.parse_grid_flags(bad)
    points = sweep.make_points(sweep.expand_grid(grid), [0, 7], tmp_path)
    assert [(p.name, p.seed) for p in points] == [
        ("client.lr-0.05__algorithm.name-fedavg", 0),
        ("client.lr-0.05__algorithm.name-fedavg", 7),
        ("client.lr-0.1__algorithm.name-fedavg", 0),
        ("client.lr-0.1__algorithm.name-fedavg", 7),
    ]
    assert points[1].workdir == tmp_path / "client.lr-0.05__algorithm.name-fedavg" / "seed7"
    with pytest.raises(experiment.ConfigError, match="same directory name"):
        sweep.make_points([(("a", "x y"),), (("a", "x/y"),)], [0], tmp_path)


CONFIG_FILE = """
from fedjax_kd.configs import default

def get_config(variant=None):
    c = default.get_config()
    c.rounds = {"smoke": 2, None: 50}[variant]
    return c

def get_sweep(variant=None):
    grid = {"fedprox.mu": [0.0, 0.5]}
    if variant == "smoke":
        return {"grid": [grid, {"algorithm.name": ["fedavg"]}], "seeds": [3, 4]}
    return {"grid": grid}
"""


def test_config_variants_and_get_sweep(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text(CONFIG_FILE)
    assert experiment.load_config_file(f).rounds == 50
    assert experiment.load_config_file(f"{f}:smoke").rounds == 2
    with pytest.raises(experiment.ConfigError, match="failed: KeyError"):
        experiment.load_config_file(f"{f}:nope")
    assert sweep.load_sweep_file(f) == {"grid": [{"fedprox.mu": ["0.0", "0.5"]}], "seeds": None}
    assert sweep.load_sweep_file(f"{f}:smoke") == {
        "grid": [{"fedprox.mu": ["0.0", "0.5"]}, {"algorithm.name": ["fedavg"]}],
        "seeds": [3, 4],
    }

    plain = tmp_path / "plain.py"
    plain.write_text("from fedjax_kd.configs import default\nget_config = default.get_config\n")
    assert experiment.load_config_file(plain).rounds == 100
    assert sweep.load_sweep_file(plain) is None
    with pytest.raises(experiment.ConfigError, match="takes no variant, got ':smoke'"):
        experiment.load_config_file(f"{plain}:smoke")

    needs = tmp_path / "needs.py"
    needs.write_text("def get_config(variant):\n    raise AssertionError\n")
    with pytest.raises(experiment.ConfigError, match="needs a variant"):
        experiment.load_config_file(needs)

    # A ':' inside an existing file's name is part of the name.
    colon = tmp_path / "a:b.py"
    colon.write_text(plain.read_text())
    assert experiment.load_config_file(colon).rounds == 100
    with pytest.raises(experiment.ConfigError, match="not found"):
        experiment.load_config_file(f"{tmp_path / 'missing.py'}:smoke")

    bad = tmp_path / "bad.py"
    bad.write_text(plain.read_text() + "def get_sweep():\n    return {'grid': {}, 'seed': [1]}\n")
    with pytest.raises(experiment.ConfigError, match="must return a dict"):
        sweep.load_sweep_file(bad)


def test_sweep_runs_skips_and_matches_a_direct_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["sweep", "--workdir", str(out), "--grid", "client.lr=0.05,0.2", "--seeds", "0,1"]
    argv += [*TINY, "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "[4/4] client.lr-0.2 seed 1" in captured.err
    lines = [line for line in captured.out.splitlines() if "test_accuracy" in line]
    assert len(lines) == 4
    names = ["client.lr-0.05", "client.lr-0.2"]
    for name in names:
        for seed in (0, 1):
            run_dir = out / name / f"seed{seed}"
            assert (run_dir / "summary.json").is_file()
            assert json.loads((run_dir / "config.json").read_text())["seed"] == seed
    manifest = json.loads((out / "sweep.json").read_text())
    assert [(p["name"], p["seed"], p["status"]) for p in manifest["points"]] == [
        (n, s, "done") for n in names for s in (0, 1)
    ]
    assert manifest["points"][3]["overrides"] == {"client.lr": "0.2"}

    # The same seed and config as a direct run give the same accuracy.
    overrides = [tuple(a[len("--config.") :].split("=")) for a in TINY]
    config = experiment.resolve(overrides=overrides + [("client.lr", "0.2"), ("seed", "1")])
    direct = experiment.run(config, progress=False).summary["test_accuracy"]
    swept = json.loads((out / "client.lr-0.2" / "seed1" / "summary.json").read_text())
    assert swept["test_accuracy"] == direct == manifest["points"][3]["test_accuracy"]

    # Running it again runs nothing (a key added to the schema since counts as its default).
    old_config = out / "client.lr-0.05" / "seed0" / "config.json"
    stored = json.loads(old_config.read_text())
    del stored["rounds_per_call"]
    old_config.write_text(json.dumps(stored))
    monkeypatch.setattr(experiment, "run", lambda *a, **k: pytest.fail("ran a finished point"))
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count("skipped") == 4

    # The sweep's directory is what `fedjax-kd report` reads.
    summary = report.summarize([out])
    assert sorted(g["label"] for g in summary["groups"]) == ["client.lr=0.05", "client.lr=0.2"]
    assert all(g["num_runs"] == 2 for g in summary["groups"])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--grid", "client.lrr=0.1,0.2"], "unknown config key 'client.lrr'"),
        (["--grid", "client.lr=0.1,fast"], "'client.lr' must be a number"),
        (["--grid", "client.lr"], "expected KEY=V1,V2"),
        (["--config.rounds=0"], "'rounds' must be >= 1"),
        (["--seeds", "0,x"], "--seeds"),
        (["--config", "{missing}:smoke"], "config file not found"),
    ],
)
def test_bad_sweep_exits_2_before_running(tmp_path, capsys, no_run, extra, message):
    extra = [e.format(missing=tmp_path / "missing.py") for e in extra]
    code = cli.main(["sweep", "--workdir", str(tmp_path / "w"), *TINY, *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "w" / "sweep.json").exists()


def test_sweep_from_get_sweep_refuses_a_workdir_of_another_config(tmp_path, capsys, no_run):
    f = tmp_path / "cfg.py"
    f.write_text(CONFIG_FILE)
    stale = tmp_path / "w" / "fedprox.mu-0.0" / "seed3"
    stale.mkdir(parents=True)
    config = experiment.resolve(overrides=[("rounds", "5")])
    (stale / "config.json").write_text(json.dumps(config.to_dict()))
    code = cli.main(["sweep", "--config", f"{f}:smoke", "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds a run of another config" in err and "\n" not in err


def test_sweep_plan_from_get_sweep(tmp_path, capsys, monkeypatch):
    f = tmp_path / "cfg.py"
    f.write_text(CONFIG_FILE)
    calls = []

    def fake_run(config, *, workdir, progress):
        calls.append((config.rounds, config.seed, config.fedprox.mu, workdir))
        return simulate.RunResult(state=None, history=[], summary={"test_accuracy": 0.5})

    monkeypatch.setattr(experiment, "run", fake_run)
    assert cli.main(["sweep", "--config", f"{f}:smoke", "--workdir", str(tmp_path / "w")]) == 0
    w = tmp_path / "w"
    assert calls == [
        (2, 3, 0.0, w / "fedprox.mu-0.0" / "seed3"),
        (2, 4, 0.0, w / "fedprox.mu-0.0" / "seed4"),
        (2, 3, 0.5, w / "fedprox.mu-0.5" / "seed3"),
        (2, 4, 0.5, w / "fedprox.mu-0.5" / "seed4"),
        (2, 3, 0.01, w / "algorithm.name-fedavg" / "seed3"),
        (2, 4, 0.01, w / "algorithm.name-fedavg" / "seed4"),
    ]
    assert "[6/6] algorithm.name-fedavg seed 4" in capsys.readouterr().err


def test_a_larger_rounds_extends_finished_points(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--workdir", str(out), "--grid", "client.lr=0.05", "--seeds", "0"]
    argv += [*TINY, "--no-progress"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main([*argv, "--config.rounds=3"]) == 0
    captured = capsys.readouterr()
    assert "resuming from round 2" in captured.err and "skipped" not in captured.out
    summary = json.loads((out / "client.lr-0.05" / "seed0" / "summary.json").read_text())
    assert summary["rounds"] == 3
