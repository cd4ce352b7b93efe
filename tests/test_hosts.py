"""Multi-host runs: 2 CPU processes on localhost equal a 1-process run."""

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedjax_kd import cli

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    port, n, pid, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if n > 1:
        from fedjax_kd.cli import _initialize_hosts
        _initialize_hosts(f"127.0.0.1:{port}", n, pid)
    import numpy as np, optax
    from fedjax_kd import algorithms, data, models, simulate
    ds = data.digits(num_clients=20, partition="dirichlet", alpha=0.5, seed=0)
    m = models.create("mlp-8", feature_shape=(64,), num_classes=10)
    algo = algorithms.fed_avg(m, client_optimizer=optax.sgd(0.1),
                              server_optimizer=optax.sgd(1.0), epochs=1, batch_size=8)
    r = simulate.run(algo, ds, rounds=3, clients_per_round=6, eval_every=3, seed=0,
                     progress=False, mesh="auto" if n > 1 else None)
    if jax.process_index() == 0:
        leaves = [np.asarray(l).ravel().tolist() for l in jax.tree.leaves(r.state.params)]
        json.dump({"params": leaves, "devices": len(jax.devices())}, open(out, "w"))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args_for, n, timeout=300):
    procs = [
        subprocess.Popen(args_for(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(n)
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_two_processes_equal_one(tmp_path: Path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    port = free_port()
    launch(
        lambda i: [sys.executable, str(script), str(port), "2", str(i), str(tmp_path / "two.json")],
        2,
    )
    launch(lambda i: [sys.executable, str(script), "0", "1", "0", str(tmp_path / "one.json")], 1)
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads((tmp_path / "one.json").read_text())
    assert two["devices"] == 2 and one["devices"] == 1
    for a, b in zip(two["params"], one["params"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cli_two_processes_write_one_summary_equal_to_one_process(tmp_path: Path):
    base = [
        "run", "--no-progress", "--config.rounds=2", "--config.eval_every=2",
        "--config.data.num_clients=12", "--config.clients_per_round=4",
        "--config.model.student=mlp-8", "--config.client.epochs=1",
    ]  # fmt: skip
    port = free_port()
    cmd = [sys.executable, "-m", "fedjax_kd.cli"]
    launch(
        lambda i: [*cmd, *base, "--workdir", str(tmp_path / f"two{i}"), "--coordinator",
                   f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        2,
    )  # fmt: skip
    launch(lambda i: [*cmd, *base, "--workdir", str(tmp_path / "one")], 1)
    assert not (tmp_path / "two1" / "summary.json").exists()  # only process 0 writes
    two = json.loads((tmp_path / "two0" / "summary.json").read_text())
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(two["test_loss"], one["test_loss"], rtol=1e-5)
    assert two["uplink_bytes"] == one["uplink_bytes"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--coordinator", "127.0.0.1:1"], "need --coordinator, --num-processes and --process-id"),
        (
            ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
            "--process-id must be in [0, 2)",
        ),
    ],
)
def test_host_flag_errors(argv, message, capsys):
    assert cli.main(["run", *argv]) == 2
    assert message in capsys.readouterr().err
