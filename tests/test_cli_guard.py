"""Config files run in a guard, empty paths are refused, and the newcomer's first minute.

Every mistake here must end as one ``error:`` line and exit code 2, before
anything is compiled; the CLI's own lines (version, what is compiled, where
the results went) are checked on a real process where it matters.
"""

import json
import subprocess
import sys
import textwrap

import pytest
from helpers import one_error_line

from fedjax_kd import cli, experiment, simulate

GUARDED = [
    # (file text, variant, what the line says)
    ("import sys\nsys.exit(3)\n", "", "its import called sys.exit(3)"),
    ("raise SystemExit\n", "", "its import called sys.exit()"),
    ("raise KeyboardInterrupt\n", "", "interrupted in its import"),
    ("import no_such_module_xyz\n", "", "its import failed: ModuleNotFoundError"),
    ("def get_config():\n    import sys\n    sys.exit(3)\n", "", "get_config() called sys.exit(3)"),
    ("def get_config(v):\n    raise SystemExit('bye')\n", ":smoke", "called sys.exit('bye')"),
    ("def get_config():\n    raise KeyboardInterrupt\n", "", "interrupted in get_config()"),
    (
        "def get_config():\n    raise ValueError('two\\nlines')\n",
        "",
        "get_config() failed: ValueError: two lines",
    ),
    ("def __getattr__(name):\n    raise SystemExit(4)\n", "", "get_config() called sys.exit(4)"),
]


@pytest.mark.parametrize("text,variant,message", GUARDED)
def test_config_file_exits_and_exceptions_are_one_line(
    text, variant, message, tmp_path, capsys, no_run
):
    f = tmp_path / "cfg.py"
    f.write_text(text)
    assert cli.main(["run", "--config", f"{f}{variant}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: config file {f}: ") and message in line, line


def test_sweep_config_file_that_exits_is_one_line(tmp_path, capsys, no_run):
    f = tmp_path / "cfg.py"
    f.write_text("import sys\nsys.exit(3)\n")
    assert cli.main(["sweep", "--config", str(f), "--workdir", str(tmp_path / "w")]) == 2
    assert "its import called sys.exit(3)" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "w").exists()


def test_library_guard_keeps_config_errors_and_names_the_file(tmp_path):
    with pytest.raises(experiment.ConfigError, match="unknown config key 'x'"):
        with experiment.user_code("f.py", "get_sweep()"):
            raise experiment.ConfigError("unknown config key 'x'")
    with pytest.raises(experiment.ConfigError) as info:
        with experiment.user_code("f.py", "get_sweep()"):
            sys.exit(5)
    assert str(info.value) == "config file f.py: get_sweep() called sys.exit(5)"


def test_a_config_file_calling_sys_exit_in_a_real_process(tmp_path):
    """The reported bug: `sys.exit(3)` in a config file ended the command with 3, silently."""
    f = tmp_path / "cfg.py"
    f.write_text("import sys\nsys.exit(3)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedjax_kd", "run", "--config", str(f)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: config file {f}: its import called sys.exit(3)"


EMPTY = [
    (["run", "--workdir", ""], "--workdir: the path is empty"),
    (["run", "--config", ""], "--config: the path is empty"),
    (["run", "--config", "   "], "--config: the path is empty"),
    (["sweep", "--workdir", ""], "--workdir: the path is empty"),
    (["sweep", "--workdir", "w", "--config", ""], "--config: the path is empty"),
    (["report", "d", "--out", ""], "--out: the path is empty"),
    (["report", "", "--out", "o"], "a DIR is empty"),
    (["bench", "--json", ""], "--json: the path is empty"),
]


@pytest.mark.parametrize("argv,message", EMPTY)
def test_empty_paths_are_refused_in_one_line(argv, message, capsys, no_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty path must not mean the current directory
    assert cli.main(argv) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_library_refuses_an_empty_workdir_and_config(no_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(experiment.ConfigError, match="--workdir: the path is empty"):
        experiment.run(workdir="", progress=False)
    with pytest.raises(experiment.ConfigError, match="--config: the path is empty"):
        experiment.load_config_file("")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- the first minute


def command(*argv, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "fedjax_kd", *argv], capture_output=True, text=True, timeout=timeout
    )


def test_version_is_printed_without_importing_jax():
    code = (
        "import sys; from fedjax_kd import cli\n"
        "try:\n    cli.main(['--version'])\nexcept SystemExit as e:\n    code = e.code\n"
        "else:\n    code = 0\n"
        "print(code, 'jax' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    import fedjax_kd

    assert proc.stdout.splitlines() == [f"fedjax-kd {fedjax_kd.__version__}", "0 False"]
    assert fedjax_kd.__version__ == "0.1.0"


def test_python_dash_m_is_the_command():
    proc = command("--version", timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "fedjax-kd 0.1.0"
    proc = command("run", "--config.data.alpha=-1", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config key 'data.alpha' must be > 0, got -1.0"


TINY = [
    "--config.rounds=2",
    "--config.eval_every=1",
    "--config.data.num_clients=10",
    "--config.clients_per_round=4",
    "--config.client_chunk_size=2",
    "--config.model.student=linear",
    "--config.client.epochs=1",
]


def test_first_run_says_what_compiles_and_where_results_went(tmp_path):
    work = tmp_path / "work"
    proc = command("run", *TINY, "--workdir", str(work))
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    compiling = [i for i, line in enumerate(err) if line.startswith("compiling ")]
    assert len(compiling) == 1, proc.stderr
    assert err[compiling[0]].startswith("compiling fedavg round (2 clients x 2 chunks)")
    # The progress bar (tqdm's "round" unit) comes only after the compile line.
    bar = [i for i, line in enumerate(err) if "round/s" in line or "s/round" in line]
    assert all(i > compiling[0] for i in bar)
    out = proc.stdout.splitlines()
    assert out[-1] == (
        f"results in {work} (config.json, metrics.jsonl, summary.json, checkpoints/)"
    )
    assert json.loads(out[1])["rounds"] == 2
    assert (work / "summary.json").is_file() and (work / "checkpoints").is_dir()

    proc = command("run", *TINY, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("nothing saved (no --workdir)")
    assert "compiling" not in proc.stderr  # --no-progress: quiet


def test_compile_line_names_chunks_and_rounds_per_call(capsys):
    from fedjax_kd import data, fed_avg, models, optimizers

    dataset = data.synthetic(num_clients=6, seed=0)
    model = models.create("linear", feature_shape=dataset.feature_shape, num_classes=10)
    algorithm = fed_avg(
        model,
        client_optimizer=optimizers.client_optimizer("sgd", lr=0.1),
        server_optimizer=optimizers.server_optimizer("sgd", lr=1.0),
        epochs=1,
        batch_size=10,
    )
    kwargs = dict(rounds=2, clients_per_round=5, eval_every=2, seed=0, max_local_examples=8)
    simulate.run(algorithm, dataset, **kwargs, name="fedavg", rounds_per_call=2)
    err = capsys.readouterr().err
    assert "compiling fedavg round (5 clients x 1 chunk, 2 rounds per call) ..." in err
    simulate.run(algorithm, dataset, **kwargs, client_chunk_size=2, progress=False)
    assert capsys.readouterr().err == ""


def test_version_flag_in_help_text():
    proc = command("--help", timeout=60)
    assert proc.returncode == 0 and "--version" in proc.stdout


@pytest.mark.parametrize(
    "key,hint",
    [
        ("client.epoch", "did you mean 'client.epochs'?"),
        ("clinet.epochs", "did you mean 'client.epochs'?"),
        ("Client.LR", "did you mean 'client.lr'?"),
        ("client.lr.x", "did you mean 'client.lr'?"),
        ("fedkd.energy_strat", "did you mean 'fedkd.energy_start'?"),
        ("fedkd.energystart", "did you mean 'fedkd.energy_start'?"),
        ("server.distill_temp", "did you mean 'server.distill_temperature'?"),
        ("rouns", "did you mean 'rounds'?"),
        ("epochs", "did you mean 'client.epochs'?"),
        ("client", "'client' is a section"),
        ("fedprox", "'fedprox' is a section"),
        ("synthetic.alfa", "did you mean 'synthetic.alpha'?"),
    ],
)
def test_did_you_mean_at_any_depth(key, hint, capsys, no_run):
    assert cli.main(["run", f"--config.{key}=3"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: unknown config key '{key}'") and hint in line, line


def test_did_you_mean_in_a_config_file(tmp_path, capsys, no_run):
    f = tmp_path / "cfg.py"
    f.write_text(
        textwrap.dedent(
            """
            from fedjax_kd.configs import default

            def get_config():
                c = default.get_config()
                c.client.epoch = 3
                return c
            """
        )
    )
    assert cli.main(["run", "--config", str(f)]) == 2
    assert "did you mean 'client.epochs'?" in one_error_line(capsys.readouterr().err)
