"""A user's own Flax model (NNX or Linen), dataset and algorithm through the library and CLI.

The user's code lives in a module outside the package (a temp folder on
``sys.path``); nothing in the package is edited.
"""

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_kd import cli, data, models

USER_MODULE = textwrap.dedent(
    """
    import flax.linen as nn
    import numpy as np
    from flax import nnx


    class NNXNet(nnx.Module):
        def __init__(self, in_features, num_classes, rngs):
            self.hidden = nnx.Linear(in_features, 8, rngs=rngs)
            self.head = nnx.Linear(8, num_classes, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.hidden(x)))


    def nnx_net(feature_shape, num_classes, rngs):
        return NNXNet(feature_shape[0], num_classes, rngs)


    class LinenNet(nn.Module):
        num_classes: int

        @nn.compact
        def __call__(self, x):
            return nn.Dense(self.num_classes)(nn.relu(nn.Dense(8)(x)))


    def linen_net(feature_shape, num_classes):
        return LinenNet(num_classes)


    def not_a_model(feature_shape, num_classes):
        return 42


    def broken(feature_shape, num_classes):
        raise RuntimeError("out of ideas")


    def _arrays(seed):
        rng = np.random.default_rng(seed)
        w = rng.normal(size=(6, 3))
        x = rng.normal(size=(240, 6)).astype(np.float32)
        y = np.argmax(x @ w, axis=1)
        return {"x_train": x[:200], "y_train": y[:200], "x_test": x[200:], "y_test": y[200:]}


    def load_arrays(seed):
        return _arrays(seed)


    def load_given_clients():
        out = _arrays(0)
        out["client_indices"] = [np.arange(k * 20, (k + 1) * 20) for k in range(10)]
        return out


    def load_wrong():
        return [1, 2, 3]


    def load_dataset():
        from fedjax_kd import data

        a = _arrays(0)
        return data.from_arrays(
            a["x_train"], a["y_train"], a["x_test"], a["y_test"], num_clients=10
        )
    """
)

TINY = [
    "--config.rounds=2", "--config.eval_every=1", "--config.clients_per_round=3",
    "--config.data.num_clients=10", "--config.client.epochs=1", "--no-progress",
]  # fmt: skip


def install_user_module(tmp_path, monkeypatch, name: str, text: str) -> str:
    """Writes module ``name`` into a folder outside the package and puts it on sys.path."""
    folder = tmp_path / f"{name}_dir"
    folder.mkdir()
    (folder / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(folder))
    return name


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """``user_models_mod`` (models and loaders) importable from outside the package."""
    return install_user_module(tmp_path, monkeypatch, "user_models_mod", USER_MODULE)


def test_from_nnx_and_from_linen_hand_computed():
    class Affine(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.dense(x)

    import flax.linen as nn

    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
    nnx_model = models.from_nnx(lambda rngs: Affine(rngs), name="affine")
    linen_model = models.from_linen(nn.Dense(3), (4,), name="dense")
    for model, params_of in (
        (nnx_model, lambda p: (p["dense"]["kernel"], p["dense"]["bias"])),
        (linen_model, lambda p: (p["kernel"], p["bias"])),
    ):
        params = model.init(jax.random.key(0))
        w, b = (np.asarray(a) for a in params_of(params))
        np.testing.assert_allclose(model.apply(params, x), np.asarray(x) @ w + b, rtol=1e-5)
        # init is a pure function of the key.
        again = model.init(jax.random.key(0))
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, again)))


def test_unsupported_state_is_refused():
    class WithBatchNorm(nnx.Module):
        def __init__(self, rngs):
            self.bn = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.bn(x)

    with pytest.raises(ValueError, match="other than nnx.Param"):
        models.from_nnx(lambda rngs: WithBatchNorm(rngs))


@pytest.mark.parametrize("function", ["nnx_net", "linen_net"])
def test_cli_runs_a_user_model_and_resumes_it(tmp_path, capsys, user_models, function):
    path = f"{user_models}:{function}"
    model = [f"--config.model.student={path}"]
    whole = tmp_path / "whole"
    assert cli.main(["run", *TINY, *model, "--workdir", str(whole)]) == 0, capsys.readouterr().err
    # Two rounds, then extended to three in the same workdir == three at once.
    part = tmp_path / "part"
    assert cli.main(["run", *TINY, *model, "--config.rounds=1", "--workdir", str(part)]) == 0
    capsys.readouterr()
    assert cli.main(["run", *TINY, *model, "--workdir", str(part)]) == 0
    assert "resuming from round 1" in capsys.readouterr().err

    def records(d):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]

    assert records(part) == records(whole)
    assert json.loads((whole / "config.json").read_text())["model"]["student"] == path
    # A hidden layer of 8: (64*8 + 8 + 8*10 + 10) float32 params go down per client.
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["downlink_bytes"] == 2 * 3 * 4 * (64 * 8 + 8 + 8 * 10 + 10)


def test_sweep_over_user_models(tmp_path, capsys, user_models):
    grid = f"model.student={user_models}:nnx_net,{user_models}:linen_net"
    out = tmp_path / "sweep"
    argv = ["sweep", "--workdir", str(out), "--grid", grid, "--seeds", "0", *TINY]
    assert cli.main(argv) == 0, capsys.readouterr().err
    manifest = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["done", "done"]
    assert all(0.0 <= p["test_accuracy"] <= 1.0 for p in manifest["points"])


@pytest.mark.parametrize(
    "name,message",
    [
        ("no_such_module_xyz:net", "cannot import 'no_such_module_xyz'"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:not_a_model", "returned int; expected a fedjax_kd Model"),
        ("{mod}:broken", "raised RuntimeError: out of ideas"),
    ],
)
def test_user_model_mistakes_are_one_error_line(capsys, user_models, name, message):
    name = name.format(mod=user_models)
    code = cli.main(["run", *TINY, f"--config.model.student={name}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: config key 'model.student'")
    assert message in err


def test_from_arrays_partitions_like_the_partitioner_and_keeps_given_clients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=50)
    ds = data.from_arrays(x, y, x[:5], y[:5], num_clients=5, partition="iid", seed=3)
    parts = data.PARTITIONERS["iid"](y.astype(np.int32), 5, seed=3)
    expected = data.pack(x, y, parts)
    for got, want in zip(ds.train, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert ds.num_classes == 4 and ds.proxy_x is None
    given = data.from_arrays(x, y, x[:5], y[:5], client_indices=[[0, 1], [2, 3, 4]])
    np.testing.assert_array_equal(given.train.count, [2, 3])
    np.testing.assert_array_equal(given.train.x[1, :3], x[2:5])
    with pytest.raises(ValueError, match="labels must lie"):
        data.from_arrays(x, y, x[:5], y[:5], num_classes=3, num_clients=2)


@pytest.mark.parametrize("loader,clients", [("load_arrays", 8), ("load_given_clients", 10)])
def test_cli_runs_a_user_dataset(tmp_path, capsys, user_models, loader, clients):
    argv = [
        "run",
        *TINY,
        f"--config.data.name={user_models}:{loader}",
        "--config.data.partition=iid",
    ]
    argv += ["--config.data.num_clients=8", "--config.model.student=linear"]
    workdir = tmp_path / "run"
    assert cli.main([*argv, "--workdir", str(workdir)]) == 0, capsys.readouterr().err
    summary = json.loads((workdir / "summary.json").read_text())
    # Linear on 6 features, 3 classes: 6*3 + 3 float32 params per client and round.
    assert summary["downlink_bytes"] == 2 * 3 * 4 * (6 * 3 + 3)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    # Library and CLI agree: the same arrays through data.from_arrays and simulate.run.
    import user_models_mod

    from fedjax_kd import experiment

    config = experiment.resolve(
        overrides=[tuple(a[len("--config.") :].split("=", 1)) for a in argv if "=" in a]
    )
    dataset = experiment.build_dataset(config)
    assert dataset.train.num_clients == clients
    if loader == "load_arrays":
        arrays = user_models_mod.load_arrays(0)
        np.testing.assert_array_equal(dataset.test_x, arrays["x_test"])
    direct = experiment.run(config, progress=False).summary["test_accuracy"]
    assert direct == summary["test_accuracy"]


def test_user_dataset_mistakes_are_one_error_line(capsys, user_models):
    code = cli.main(["run", *TINY, f"--config.data.name={user_models}:load_wrong"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "must return a FederatedDataset or a dict with x_train" in err
    code = cli.main(["run", *TINY, "--config.data.name=no_such_module_xyz:load"])
    err = capsys.readouterr().err
    assert code == 2 and "config key 'data.name': cannot import" in err


USER_ALGORITHM = textwrap.dedent(
    """
    import optax

    from fedjax_kd import algorithms, spec


    def _build(ctx):
        common = dict(ctx.common, server_optimizer=optax.sgd(ctx.hp["step"]))
        return algorithms.fed_avg(ctx.student, **common)


    SPEC = spec.AlgorithmSpec(
        name="stepavg",
        help="FedAvg with a server step size",
        build=_build,
        hypers={"step": spec.Hyper(1.0, "server learning rate", **spec.positive())},
    )


    def make_spec():
        return SPEC


    TAKEN = spec.AlgorithmSpec(name="fedprox", help="clashes", build=_build)
    DOTTED = spec.AlgorithmSpec(name="my.algo", help="not a namespace", build=_build)


    NOT_A_SPEC = 3
    """
)


@pytest.fixture
def user_algorithm(tmp_path, monkeypatch):
    """``user_algo_mod`` (a spec built on fed_avg) importable from outside the package."""
    return install_user_module(tmp_path, monkeypatch, "user_algo_mod", USER_ALGORITHM)


def test_cli_runs_a_user_algorithm_resumes_and_sweeps_it(tmp_path, capsys, user_algorithm):
    def records(d):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]

    # Two formulations: the user's spec with step 1 is FedAvg (server sgd(1.0)).
    builtin = tmp_path / "builtin"
    assert cli.main(["run", *TINY, "--workdir", str(builtin)]) == 0, capsys.readouterr().err
    for name in ("SPEC", "make_spec"):
        algo = [f"--config.algorithm.name={user_algorithm}:{name}", "--config.stepavg.step=1.0"]
        part = tmp_path / f"user_{name}"
        assert cli.main(["run", *TINY, *algo, "--config.rounds=1", "--workdir", str(part)]) == 0
        capsys.readouterr()
        assert cli.main(["run", *TINY, *algo, "--workdir", str(part)]) == 0  # resumed, extended
        assert "resuming from round 1" in capsys.readouterr().err
        assert records(part) == records(builtin)
        assert json.loads((part / "config.json").read_text())["stepavg"] == {"step": 1.0}
    # A sweep over the user's own key.
    out = tmp_path / "sweep"
    argv = ["sweep", "--workdir", str(out), "--grid", "stepavg.step=0.5,1.0", "--seeds", "0"]
    argv += [*TINY, f"--config.algorithm.name={user_algorithm}:SPEC"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    manifest = json.loads((out / "sweep.json").read_text())
    assert [p["name"] for p in manifest["points"]] == ["stepavg.step-0.5", "stepavg.step-1.0"]
    assert manifest["points"][1]["test_accuracy"] == records(builtin)[-1]["test_accuracy"]
    assert manifest["points"][0]["test_accuracy"] != manifest["points"][1]["test_accuracy"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config.stepavg.step=-1"], "config key 'stepavg.step' must be > 0"),
        (["--config.stepavg.stpe=1"], "did you mean 'stepavg.step'?"),
    ],
)
def test_user_algorithm_mistakes_are_one_error_line(capsys, user_algorithm, extra, message):
    code = cli.main(["run", *TINY, f"--config.algorithm.name={user_algorithm}:SPEC", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err
    code = cli.main(["run", *TINY, f"--config.algorithm.name={user_algorithm}:NOT_A_SPEC"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a fedjax_kd.spec.AlgorithmSpec (got int)" in err
    for name, why in (("TAKEN", "is named 'fedprox', which is taken"), ("DOTTED", "identifier")):
        code = cli.main(["run", *TINY, f"--config.algorithm.name={user_algorithm}:{name}"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and why in err, err


def test_a_config_file_with_a_user_algorithm_can_be_overridden(tmp_path, user_algorithm):
    """The file's user algorithm keeps its namespace when an override picks another one."""
    from fedjax_kd import experiment

    path = tmp_path / "conf.py"
    path.write_text(
        "from fedjax_kd.configs import default\n"
        "from fedjax_kd import experiment\n\n"
        "def get_config():\n"
        "    c = experiment.resolve(overrides=[('algorithm.name', "
        f"'{user_algorithm}:SPEC'), ('stepavg.step', '0.5')])\n"
        "    return c\n"
    )
    config = experiment.load_config_file(str(path))
    resolved = experiment.resolve(config, [("algorithm.name", "fedavg")])
    assert resolved.algorithm.name == "fedavg" and resolved.stepavg.step == 0.5


def test_list_shows_every_algorithm_and_its_keys(capsys):
    from fedjax_kd import algorithms

    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for spec in algorithms.SPECS.values():
        assert f"  {spec.name} " in out and spec.help in out
        for name, hyper in spec.hypers.items():
            assert f"    {spec.name}.{name} = " in out and hyper.help in out
    for spec in data.DATASET_SPECS.values():
        assert f"  {spec.name} " in out
        for name in spec.hypers:
            assert f"    {spec.name}.{name} = " in out
    assert "mlp-W1[-W2...]" in out


def test_loader_clients_bound_the_cohort_and_a_missing_proxy_is_one_line(capsys, user_models):
    # load_given_clients brings 10 clients of its own, whatever data.num_clients says.
    argv = ["run", *TINY, f"--config.data.name={user_models}:load_given_clients"]
    argv += ["--config.model.student=linear", "--config.data.num_clients=20"]
    assert cli.main([*argv, "--config.clients_per_round=12"]) == 2
    assert "must be <= the dataset's 10 clients, got 12" in capsys.readouterr().err
    feddf = ["--config.algorithm.name=feddf", "--config.data.proxy_fraction=0.1"]
    assert cli.main([*argv, *feddf]) == 2  # given clients cannot lend a proxy set
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "proxy_fraction needs a partitioner" in err
    # A whole FederatedDataset without a proxy set: FedDF is refused in one line.
    argv = ["run", *TINY, f"--config.data.name={user_models}:load_dataset", *feddf]
    assert cli.main([*argv, "--config.model.student=linear"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has none (its loader returned no proxy_x)" in err
