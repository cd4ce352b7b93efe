"""Checkpoint and resume: an interrupted run (even by SIGKILL) equals a straight one bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_kd import algorithms, checkpoint, cli, experiment, models, simulate

# A tiny run: 12 rounds of softmax regression on digits take ~2 s (mostly compile).
BASE = {
    "rounds": 12,
    "eval_every": 2,
    "clients_per_round": 5,
    "data.num_clients": 20,
    "model.student": "linear",
    "client.epochs": 1,
    "checkpoint_every": 2,
}


def overrides(**changes) -> list[tuple[str, str]]:
    merged = {**BASE, **{k.replace("__", "."): v for k, v in changes.items()}}
    return [(k, str(v)) for k, v in merged.items()]


def flags(**changes) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides(**changes)]


def run(workdir: Path, **changes) -> simulate.RunResult:
    config = experiment.resolve(overrides=overrides(**changes))
    return experiment.run(config, workdir=workdir, progress=False)


def records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in lines]


def summary(workdir: Path) -> dict:
    s = json.loads((workdir / "summary.json").read_text())
    return {k: v for k, v in s.items() if k not in ("wall_s", "compile_s")}


def final_leaves(workdir: Path, template) -> list[np.ndarray]:
    """The arrays of the newest checkpoint in ``workdir``."""
    restored = checkpoint.latest_valid(workdir / "checkpoints", template, on_skip=None)
    assert restored is not None
    return jax.tree.leaves(restored.state)


def assert_bit_identical(workdir: Path, ref: dict, state=None) -> None:
    assert records(workdir) == ref["records"]
    assert summary(workdir) == ref["summary"]
    leaves = final_leaves(workdir, ref["state"])
    if state is not None:
        assert len(jax.tree.leaves(state)) == len(leaves)
        leaves += [np.asarray(leaf) for leaf in jax.tree.leaves(state)]
    for i, leaf in enumerate(leaves):
        expected = ref["leaves"][i % len(ref["leaves"])]
        assert leaf.dtype == expected.dtype and np.array_equal(leaf, expected), i


def reference_of(workdir: Path, **changes) -> dict:
    result = run(workdir, **changes)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(result.state)]
    assert [r["round"] for r in records(workdir)] == [2, 4, 6, 8, 10, 12]
    assert checkpoint.rounds(workdir / "checkpoints") == [8, 10, 12]  # the newest 3
    for a, b in zip(final_leaves(workdir, result.state), leaves, strict=True):
        assert np.array_equal(a, b)
    return {
        "state": result.state,
        "leaves": leaves,
        "records": records(workdir),
        "summary": summary(workdir),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A straight 12-round run (one round per call)."""
    return reference_of(tmp_path_factory.mktemp("straight"))


def test_resume_extends_a_finished_run_bit_for_bit(tmp_path, reference, capsys):
    work = tmp_path / "w"
    run(work, rounds=5)
    assert [r["round"] for r in records(work)] == [2, 4, 5]
    capsys.readouterr()
    result = run(work, rounds=12)
    assert "resuming from round 5" in capsys.readouterr().err
    # The record of round 5 (the end of the shorter run) is not one of this run's.
    assert_bit_identical(work, reference, result.state)
    # A finished run run again: resumes from its last round, changes nothing.
    result = run(work, rounds=12)
    assert "resuming from round 12" in capsys.readouterr().err
    assert_bit_identical(work, reference, result.state)


SLOW_SAVES = """
import sys, time
from fedjax_kd import checkpoint, cli
save = checkpoint.save
def slow_save(*args, **kwargs):  # leaves the test time to kill the run mid-way
    time.sleep(0.4)
    return save(*args, **kwargs)
checkpoint.save = slow_save
raise SystemExit(cli.main(sys.argv[1:]))
"""


def test_sigkill_mid_run_then_rerun_is_bit_identical(tmp_path, reference):
    work = tmp_path / "w"
    argv = ["run", "--no-progress", "--workdir", str(work), *flags()]
    env = dict(os.environ)  # conftest's XLA_FLAGS: the same compiled programs as in-process
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVES, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 180
    try:
        while True:  # until a checkpoint after round >= 4 is complete
            done = [
                r
                for r in checkpoint.rounds(work / "checkpoints")
                if (checkpoint.path_for(work / "checkpoints", r) / checkpoint.SIDECAR).exists()
            ]
            if any(r >= 4 for r in done):
                break
            assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint after round 4 in time"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (work / "summary.json").exists()

    rerun = subprocess.run(
        [sys.executable, "-m", "fedjax_kd.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert rerun.returncode == 0, rerun.stderr
    resumed = [line for line in rerun.stderr.splitlines() if line.startswith("resuming from")]
    assert len(resumed) == 1 and 4 <= int(resumed[0].split()[3]) < 12, rerun.stderr
    assert rerun.stdout.startswith("test_accuracy") and len(rerun.stdout.splitlines()) == 3
    assert "absl" not in rerun.stderr  # orbax's logging stays quiet
    assert_bit_identical(work, reference)


def test_corrupt_checkpoints_fall_back_with_a_warning(tmp_path, reference, capsys):
    work = tmp_path / "w"
    run(work, rounds=6)
    ckpts = work / "checkpoints"
    assert checkpoint.rounds(ckpts) == [2, 4, 6]
    # Round 6: truncated array files (their recorded sha256 no longer matches).
    data_files = [p for p in checkpoint.path_for(ckpts, 6).rglob("*") if p.parent.name == "d"]
    assert data_files
    for p in data_files:
        p.write_bytes(p.read_bytes()[:3])
    # Round 4: bytes that orbax reads fine but that differ from what was saved.
    sidecar = checkpoint.path_for(ckpts, 4) / checkpoint.SIDECAR
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "sha256": "0" * 64}))
    # An unfinished save (orbax's temporary directory) is ignored.
    (ckpts / "round_00000008.orbax-checkpoint-tmp").mkdir()
    capsys.readouterr()
    result = run(work, rounds=12)
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("warning: skipping checkpoint")]
    assert len(warnings) == 2, err
    assert "round_00000006" in warnings[0] and "round_00000004" in warnings[1]
    assert "files changed" in warnings[0]  # caught before orbax reads the damaged files
    assert "sha256" in warnings[1]
    assert not any("Traceback" in line or "Exception ignored" in line for line in err), err
    assert any(line.startswith("resuming from round 2") for line in err), err
    assert_bit_identical(work, reference, result.state)


def test_incomplete_checkpoints_are_not_valid(tmp_path):
    state = {"w": jnp.arange(6.0).reshape(2, 3), "n": (jnp.int32(7), None)}
    for r in (1, 2, 3):
        checkpoint.save(tmp_path, r, jax.tree.map(lambda x, r=r: x + r, state), {"r": r})
    skipped = []

    def latest():
        return checkpoint.latest_valid(tmp_path, state, on_skip=lambda p, why: skipped.append(why))

    assert latest().round == 3 and latest().extra == {"r": 3}
    assert np.array_equal(latest().state["w"], np.asarray(state["w"]) + 3)
    os.remove(checkpoint.path_for(tmp_path, 3) / checkpoint.COMMIT_MARKER)  # orbax's marker
    os.remove(checkpoint.path_for(tmp_path, 2) / checkpoint.SIDECAR)  # killed before our sidecar
    restored = latest()
    assert restored.round == 1 and restored.extra == {"r": 1}
    assert np.array_equal(restored.state["w"], np.asarray(state["w"]) + 1)
    assert restored.state["n"][1] is None
    assert checkpoint.COMMIT_MARKER in skipped[-2] and checkpoint.SIDECAR in skipped[-1]
    # A template of another structure does not restore.
    assert checkpoint.latest_valid(tmp_path, {"w": state["w"]}, on_skip=None) is None


def test_config_conflict_overwrite_and_resume(tmp_path, capsys):
    work = tmp_path / "w"
    base = ["run", "--no-progress", "--workdir", str(work), *flags(rounds=4)]
    assert cli.main(base) == 0
    capsys.readouterr()

    assert cli.main([*base, "--config.client.lr=0.05", "--config.seed=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "client.lr 0.1 -> 0.05" in err and "seed 0 -> 3" in err
    assert "--resume" in err and "--overwrite" in err

    assert cli.main([*base, "--overwrite", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not allowed with" in err

    assert cli.main([*base, "--config.rounds=2"]) == 2  # cannot go back
    assert "past config.rounds=2" in capsys.readouterr().err

    assert cli.main([*base, "--config.client.lr=0.05", "--config.rounds=6", "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resuming from round 4" in captured.err and "test_accuracy" in captured.out
    assert json.loads((work / "config.json").read_text())["client"]["lr"] == 0.05
    assert [r["round"] for r in records(work)] == [2, 4, 6]

    assert cli.main([*base, "--config.client.lr=0.2", "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert "resuming" not in captured.err
    assert [r["round"] for r in records(work)] == [2, 4]
    assert checkpoint.rounds(work / "checkpoints") == [2, 4]
    assert summary(work)["rounds"] == 4


RPC_SCRIPT = """
import json, sys
from pathlib import Path
import jax, numpy as np
from fedjax_kd import experiment
sys.path.insert(0, sys.argv[2])
from test_checkpoint import overrides, records, summary
work = Path(sys.argv[1])
kw = dict(rounds_per_call=3, eval_every=4, checkpoint_every=4)
def run(name, **changes):
    config = experiment.resolve(overrides=overrides(**kw, **changes))
    return experiment.run(config, workdir=work / name, progress=False)
straight = run("straight")
run("w", rounds=5)
resumed = run("w")
leaves = zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state), strict=True)
print(json.dumps({
    "records": records(work / "w") == records(work / "straight"),
    "summary": summary(work / "w") == summary(work / "straight"),
    "state": all(np.array_equal(a, b) for a, b in leaves),
}))
"""


def test_rounds_per_call_resume_is_bit_identical(tmp_path):
    # Straight: blocks of rounds 0-3, 3-4, 4-7, 7-8, ...; stopped after 5: 4-5, then 5-8, ...
    # With XLA's default optimisations a round compiled alone and one inside a loop
    # differ in the last bits, so every block must run the same loop executable. (The
    # suite's --xla_backend_optimization_level=0 hides that difference: not here.)
    env = dict(os.environ)
    flags = env.pop("XLA_FLAGS", "").split()
    flags = [f for f in flags if f != "--xla_backend_optimization_level=0"]
    if flags:  # XLA reads a value that does not start with "--" as a file name
        env["XLA_FLAGS"] = " ".join(flags)
    proc = subprocess.run(
        [sys.executable, "-c", RPC_SCRIPT, str(tmp_path), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {
        "records": True,
        "summary": True,
        "state": True,
    }


@pytest.mark.parametrize(
    "rounds_per_call,checkpoint_every,expected", [(3, 2, [2, 4, 6, 7]), (1, 0, [3, 6, 7])]
)
def test_checkpoint_cadence_and_blocks(digits_small, rounds_per_call, checkpoint_every, expected):
    model = models.create("linear", feature_shape=(64,), num_classes=10)
    algo = algorithms.fed_avg(
        model,
        client_optimizer=optax.sgd(0.1),
        server_optimizer=optax.sgd(1.0),
        epochs=1,
        batch_size=10,
    )
    saved = []
    result = simulate.run(
        algo,
        digits_small,
        rounds=7,
        clients_per_round=4,
        eval_every=3,
        seed=0,
        progress=False,
        rounds_per_call=rounds_per_call,
        checkpoint_every=checkpoint_every,
        on_checkpoint=lambda r, state, extra: saved.append((r, extra)),
    )
    assert [r for r, _ in saved] == expected
    assert [r["round"] for r in result.history] == [3, 6, 7]
    last = saved[-1][1]
    assert last["uplink_bytes"] == result.summary["uplink_bytes"]
    assert last["last_record"] == result.history[-1]


def test_resume_into_another_model_is_an_error_and_keeps_checkpoints(tmp_path, capsys):
    from fedjax_kd import cli

    base = ["run", "--workdir", str(tmp_path), "--no-progress", "--config.rounds=2"]
    base += [
        "--config.eval_every=1",
        "--config.data.num_clients=10",
        "--config.clients_per_round=2",
    ]
    base += ["--config.client.epochs=1"]
    assert cli.main([*base, "--config.model.student=linear"]) == 0
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    capsys.readouterr()
    code = cli.main([*base, "--config.model.student=mlp-8", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and "--overwrite" in err[-1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_fedkd_cannot_be_extended_and_flags_need_a_workdir(tmp_path, capsys):
    """FedKD's threshold schedule spans config.rounds: a longer run is another run."""
    from fedjax_kd import cli

    base = ["run", "--workdir", str(tmp_path), "--no-progress", "--config.eval_every=1"]
    base += ["--config.data.num_clients=10", "--config.clients_per_round=2"]
    base += ["--config.client.epochs=1", "--config.algorithm.name=fedkd"]
    base += ["--config.model.student=linear", "--config.model.teacher=mlp-8"]
    assert cli.main([*base, "--config.rounds=2"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--config.rounds=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rounds 2 -> 3" in err[0], err
    for flag in ("--overwrite", "--resume"):
        assert cli.main(["run", "--no-progress", "--config.rounds=1", flag]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{flag} needs --workdir" in err[0], err


def test_fedkd_with_a_fixed_energy_horizon_extends_bit_for_bit(tmp_path, capsys):
    """fedkd.energy_rounds > 0: the schedule no longer spans the run, so 2 -> 3 rounds
    resumed equals 3 rounds at once (every record, and the same thresholds)."""
    import json

    from fedjax_kd import cli

    base = ["run", "--no-progress", "--config.eval_every=1", "--config.checkpoint_every=1"]
    base += ["--config.data.num_clients=10", "--config.clients_per_round=2"]
    base += ["--config.client.epochs=1", "--config.algorithm.name=fedkd"]
    base += ["--config.model.student=linear", "--config.model.teacher=mlp-8"]
    base += ["--config.fedkd.energy_rounds=4"]
    parts, whole = tmp_path / "parts", tmp_path / "whole"
    assert cli.main([*base, "--config.rounds=2", "--workdir", str(parts)]) == 0
    assert cli.main([*base, "--config.rounds=3", "--workdir", str(parts)]) == 0
    assert cli.main([*base, "--config.rounds=3", "--workdir", str(whole)]) == 0
    capsys.readouterr()

    def records(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(r).items() if "wall" not in k} for r in lines]

    assert records(parts) == records(whole)
    # T(r) = 0.95 + 0.03 * (r + 1) / 4: the horizon is 4 rounds, not the run's 3.
    thresholds = [r["energy_threshold"] for r in records(whole)]
    assert thresholds == pytest.approx([0.9575, 0.965, 0.9725], rel=1e-6)
