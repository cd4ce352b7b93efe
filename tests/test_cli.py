"""The fedjax-kd command: one-line errors for user mistakes, and an end-to-end run."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedjax_kd import cli

BAD_OVERRIDES = [
    (["--config.foo=1"], "unknown config key 'foo'"),
    (["--config.client.lrr=0.1"], "unknown config key 'client.lrr'"),
    (["--config.rounds=abc"], "'rounds' must be an integer"),
    (["--config.rounds=2.5"], "'rounds' must be an integer"),
    (["--config.client.lr=fast"], "'client.lr' must be a number"),
    (["--config.synthetic.iid=maybe"], "'synthetic.iid' must be a boolean"),
    (["--config.rounds=0"], "'rounds' must be >= 1"),
    (["--config.clients_per_round=101"], "'clients_per_round' must be <= data.num_clients"),
    (["--config.client.lr=0"], "'client.lr' must be > 0"),
    (["--config.server.lr=-1"], "'server.lr' must be > 0"),
    (["--config.data.alpha=0"], "'data.alpha' must be > 0"),
    (["--config.teacher_student.temperature=0"], "'teacher_student.temperature' must be > 0"),
    (["--config.client.batch_size=0"], "'client.batch_size' must be >= 1"),
    (["--config.client.epochs=0"], "'client.epochs' must be >= 1"),
    (["--config.eval_every=0"], "'eval_every' must be >= 1"),
    (["--config.fedprox.mu=-0.1"], "'fedprox.mu' must be >= 0"),
    (["--config.algorithm.name=fedfoo"], "'algorithm.name' must be one of fedavg, fedprox"),
    (["--config.server.optimizer=rmsprop"], "'server.optimizer' must be one of"),
    (["--config.data.name=cifar"], "'data.name' must be one of digits, synthetic"),
    (["--config.data.partition=weird"], "'data.partition' must be one of"),
    (["--config.model.student=resnot"], "'model.student': unknown model 'resnot'"),
    (["--config.model.teacher=mlp-x"], "'model.teacher': bad model name"),
    (["--config.model.student=cnn-8", "--config.data.name=synthetic"], "'model.student'"),
    (["--config.data.num_clients=5000"], "data (digits"),
    (["--config.rounds"], "--config.rounds needs a value"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--config.seed=4294967296"], "'seed' must be in [0, 2**32)"),
    (["--config.client.lr=inf"], "'client.lr' must be a finite number"),
    (["--config.data.alpha=nan"], "'data.alpha' must be a finite number"),
    (["--config.data.num_clients=0"], "'data.num_clients' must be >= 1"),
    (["--config.synthetic.test_fraction=1"], "'synthetic.test_fraction' must be in"),
    (["--config.algorithm.name=feddf"], "set data.proxy_fraction > 0"),
    (
        ["--config.model.student_groups=mlp-8,mlp-16", "--config.algorithm.name=fedavg"],
        "'model.student_groups': algorithm 'fedavg' needs one model",
    ),
    (["--config.synthetic.max_examples=1"], "'synthetic.max_examples' must be 0"),
    (["--config.client_chunk_size=-1"], "'client_chunk_size' must be >= 0"),
    (["--config.rounds_per_call=0"], "'rounds_per_call' must be >= 1"),
    (["--config.client.max_examples=-5"], "'client.max_examples' must be >= 0"),
    # Keys of the old flat schema are told their namespaced names.
    (["--config.algorithm.ntd_tau=2"], "it is now 'fedntd.temperature'"),
    (["--config.data.synthetic_alpha=0.5"], "it is now 'synthetic.alpha'"),
    (["--config.fedkd.energy_strat=0.9"], "did you mean 'fedkd.energy_start'?"),
    (["--config.fedkd.energy_end=0"], "'fedkd.energy_end' must be in (0, 1]"),
    (["--config.dsfl.aggregation=max"], "'dsfl.aggregation' must be one of era, mean"),
]


@pytest.mark.parametrize("argv,message", BAD_OVERRIDES)
def test_bad_input_exits_2_with_one_line(argv, message, capsys, no_run):
    code = cli.main(["run", *argv])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert message in lines[0]


def test_config_file_errors(tmp_path, capsys, no_run):
    missing = tmp_path / "nope.py"
    assert cli.main(["run", "--config", str(missing)]) == 2
    assert f"config file not found: {missing}" in capsys.readouterr().err

    typo = tmp_path / "typo.py"
    typo.write_text(
        "from fedjax_kd.configs import default\n"
        "def get_config():\n"
        "    c = default.get_config()\n"
        "    c.data.aplha = 0.1\n"
        "    return c\n"
    )
    assert cli.main(["run", "--config", str(typo)]) == 2
    assert "unknown config key 'data.aplha'" in capsys.readouterr().err

    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    return 1 / 0\n")
    assert cli.main(["run", "--config", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ZeroDivisionError" in err

    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    assert cli.main(["run", "--config", str(empty)]) == 2
    assert "defines no get_config()" in capsys.readouterr().err


def test_workdir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert cli.main(["run", "--config.rounds=1", "--workdir", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --workdir {target}: cannot write there")
    assert "\n" not in err


def test_missing_command(capsys):
    assert cli.main([]) == 2
    assert capsys.readouterr().err.startswith("error: missing command")


def test_diverging_run_exits_1_naming_the_round(capsys):
    argv = ["run", "--no-progress", "--config.rounds=3", "--config.data.num_clients=10"]
    argv += ["--config.clients_per_round=2", "--config.model.student=linear"]
    argv += ["--config.server.optimizer=adam", "--config.server.lr=1e38"]
    assert cli.main(argv) == 1
    # Adam's first step moves params by ~1e38 (finite); the second overflows.
    assert capsys.readouterr().err.strip().startswith("error: round 2: ")


def fedjax_kd_command():
    script = Path(sys.executable).parent / "fedjax-kd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedjax_kd.cli"]


def test_console_script_error_is_one_line_without_traceback():
    proc = subprocess.run(
        [*fedjax_kd_command(), "run", "--config.data.alpha=-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: config key 'data.alpha' must be > 0, got -1.0"


def test_end_to_end_run_writes_workdir(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(
        textwrap.dedent(
            """
            from fedjax_kd.configs import default

            def get_config():
                c = default.get_config()
                c.rounds = 3
                c.eval_every = 2
                c.clients_per_round = 3
                c.data.num_clients = 10
                c.model.student = "mlp-8"
                c.client.epochs = 1
                return c
            """
        )
    )
    workdir = tmp_path / "work"
    proc = subprocess.run(
        [
            *fedjax_kd_command(), "run", "--config", str(config), "--workdir", str(workdir),
            "--config.algorithm.name=fedprox", "--config.server.optimizer", "adam",
            "--config.server.lr=0.01",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["rounds"] == 3 and saved["algorithm"]["name"] == "fedprox"
    assert saved["server"]["optimizer"] == "adam"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [2, 3]
    keys = {"round", "test_accuracy", "test_loss", "train_loss", "uplink_bytes"}
    assert keys | {"downlink_bytes", "wall_s"} <= set(records[0])
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["rounds"] == 3
    assert summary["test_accuracy"] == records[-1]["test_accuracy"]
    # mlp-8 on 64 features, 10 classes: (64*8 + 8 + 8*10 + 10) float32 params.
    param_bytes = 4 * (64 * 8 + 8 + 8 * 10 + 10)
    assert summary["downlink_bytes"] == 3 * 3 * param_bytes
    assert summary["uplink_bytes"] == 3 * 3 * (param_bytes + 4)
    assert {"compile_s", "wall_s"} <= set(summary)
    assert "test_accuracy" in proc.stdout


def test_a_closed_stdout_is_not_a_traceback(tmp_path):
    """`fedjax-kd run | head -1`: the reader leaves early; exit 0, nothing on stderr."""
    import subprocess
    import sys

    code = "from fedjax_kd import cli; raise SystemExit(cli.main())"
    args = ["run", "--no-progress", "--config.rounds=1", "--config.eval_every=1"]
    args += ["--config.data.num_clients=10", "--config.clients_per_round=2"]
    args += ["--config.model.student=linear"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # the reader is gone before the summary is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
