"""Workdir integrity: one run at a time, atomic files, metrics checked on resume, full disks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import one_error_line

from fedjax_kd import cli, experiment, workdir

SMALL = ["--no-progress", "--config.model.student=linear", "--config.data.num_clients=20"]
SMALL += ["--config.clients_per_round=4", "--config.client.epochs=1"]


def records(path: Path) -> list[dict]:
    """metrics.jsonl without its wall times (the only numbers that may differ)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if "wall" not in k} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Six rounds, evaluated and checkpointed every round, uninterrupted."""
    work = tmp_path_factory.mktemp("reference") / "w"
    argv = ["run", *SMALL, "--config.rounds=6", "--config.eval_every=1"]
    assert cli.main([*argv, "--config.checkpoint_every=1", "--workdir", str(work)]) == 0
    return records(work / "metrics.jsonl")


def test_hold_is_exclusive_names_the_holder_and_is_released(tmp_path):
    d = tmp_path / "w"
    with workdir.hold(d):
        holder = json.loads((d / ".lock").read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(workdir.WorkdirError, match=f"in use by pid {os.getpid()}") as e:
            with workdir.hold(d):
                pass
        assert "--overwrite" not in str(e.value)  # never a destructive hint
    with workdir.hold(d):  # released at the end of the block
        pass


def test_a_busy_workdir_refuses_a_second_run_and_a_killed_holder_leaves_no_lock(tmp_path):
    work = tmp_path / "w"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    long_run = ["run", *SMALL, "--config.rounds=100000", "--config.eval_every=100000"]
    first = subprocess.Popen(
        [sys.executable, "-m", "fedjax_kd.cli", *long_run, "--workdir", str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not (work / ".lock").is_file() or str(first.pid) not in (work / ".lock").read_text():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run never took the workdir"
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "fedjax_kd.cli", "run", *SMALL, "--workdir", str(work)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert second.returncode == 2
        line = one_error_line(second.stderr)
        assert f"is in use by pid {first.pid}" in line and "--overwrite" not in line, line
        assert first.poll() is None  # the live run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    with workdir.hold(work):  # the OS dropped the dead holder's lock
        pass


def test_two_runs_started_together_leave_one_clean_record(tmp_path, reference):
    """A real race: both start at once; the loser exits 2 in one line (or, when the winner
    was already done, resumes its finished run); metrics.jsonl has each round once."""
    work = tmp_path / "w"
    argv = ["run", *SMALL, "--config.rounds=6", "--config.eval_every=1"]
    argv += ["--config.checkpoint_every=1", "--workdir", str(work)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fedjax_kd.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 2]), outs
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode == 2:
            assert "is in use by pid" in one_error_line(err)
        assert "Traceback" not in err
    assert records(work / "metrics.jsonl") == reference


def test_metrics_are_repaired_from_the_checkpoint_and_said(tmp_path, capsys, reference):
    work = tmp_path / "w"
    base = ["run", *SMALL, "--config.eval_every=1", "--config.checkpoint_every=2"]
    base += ["--workdir", str(work)]
    assert cli.main([*base, "--config.rounds=4"]) == 0
    metrics = work / "metrics.jsonl"
    metrics.unlink()  # deleted by hand
    capsys.readouterr()
    assert cli.main([*base, "--config.rounds=6"]) == 0
    err = capsys.readouterr().err
    assert "resuming from round 4" in err and "4 missing" in err, err
    assert records(metrics) == reference

    # A duplicated row and a line cut short are repaired and said, too.
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], lines[0], *lines[1:4], lines[4][:10]]) + "\n")
    assert cli.main([*base, "--config.rounds=6", "--config.checkpoint_every=2"]) == 0
    err = capsys.readouterr().err
    assert "resuming from round 6" in err and "malformed" in err and "did not match" in err, err
    assert records(metrics) == reference


def test_reconcile_metrics_hand_computed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"round": r, "acc": r / 10} for r in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    every = lambda r: True  # noqa: E731
    # The checkpoint of round 2 kept rows 1-2: rows 3-4 are dropped (recomputed).
    kept, note = workdir.reconcile_metrics(path, rows[:2], 2, every)
    assert note == "2 row(s) after round 2 dropped, to be recomputed"
    assert workdir.read_records(path) == (rows[:2], 0) and kept == rows[:2]
    # Nothing to do: no note and the same file.
    assert workdir.reconcile_metrics(path, rows[:2], 2, every) == (rows[:2], "")
    # A row that differs from the checkpoint's is replaced by the checkpoint's.
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"round": 2, "acc": 9}) + "\n{")
    _, note = workdir.reconcile_metrics(path, rows[:2], 2, every)
    assert "1 missing, 1 differing" in note and "1 malformed" in note, note
    assert workdir.read_records(path) == (rows[:2], 0)
    # An older checkpoint without records: the file's own rows up to it are kept.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, note = workdir.reconcile_metrics(path, None, 3, lambda r: r != 2)
    assert note.startswith("1 row(s)")
    assert workdir.read_records(path) == ([rows[0], rows[2]], 0) and kept == [rows[0], rows[2]]


def test_a_rerun_keeps_the_finished_summary_until_it_has_a_new_one(tmp_path, monkeypatch):
    work = tmp_path / "w"
    base = ["run", *SMALL, "--config.eval_every=1", "--workdir", str(work)]
    assert cli.main([*base, "--config.rounds=2"]) == 0
    before = (work / "summary.json").read_text()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the rerun dies in its first seconds

    monkeypatch.setattr(experiment.simulate, "run", killed)
    assert cli.main([*base, "--config.rounds=3"]) == 130
    assert (work / "summary.json").read_text() == before  # still the finished run's
    monkeypatch.undo()
    assert cli.main([*base, "--config.rounds=3"]) == 0
    assert json.loads((work / "summary.json").read_text())["rounds"] == 3
    assert not list(work.glob("*.tmp"))  # atomic writes leave no temporary files


def test_a_busy_sweep_directory_is_refused(tmp_path, capsys):
    root = tmp_path / "sweep"
    with workdir.hold(root):
        code = cli.main(
            [
                "sweep",
                *SMALL,
                "--config.rounds=1",
                "--grid",
                "client.epochs=1",
                "--workdir",
                str(root),
            ]
        )
    assert code == 2
    assert f"in use by pid {os.getpid()}" in one_error_line(capsys.readouterr().err)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_a_full_disk_is_one_line_and_the_run_resumes_after_space_is_freed(
    tmp_path, capsys, reference
):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("cannot mount a small tmpfs here (needs root on Linux)")
    try:
        work = disk / "w"
        argv = ["run", *SMALL, "--config.rounds=6", "--config.eval_every=1"]
        argv += ["--config.checkpoint_every=1", "--workdir", str(work)]
        # Room for the config, the metrics and a few checkpoints (each needs its
        # arrays twice plus checkpoint.SPACE_MARGIN free before it is written).
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (2 * 2**20 - 150 * 2**10))
        code = cli.main(argv)
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and "No space left on device" in line and "resume" in line, line
        written = records(work / "metrics.jsonl")
        assert 1 < len(written) < 6 and written == reference[: len(written)]  # kept
        filler.unlink()
        assert cli.main(argv) == 0
        assert "resuming from round" in capsys.readouterr().err
        assert records(work / "metrics.jsonl") == reference
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
