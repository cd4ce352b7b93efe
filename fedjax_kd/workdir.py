"""A run's workdir: held by one run at a time, written atomically, checked on resume.

What a run directory holds (``experiment.run``): ``config.json``,
``metrics.jsonl`` (one evaluation record a line, appended as it happens),
``summary.json`` (at the end) and ``checkpoints/`` (:mod:`fedjax_kd.checkpoint`;
each checkpoint also keeps the evaluation records up to its round). This
module holds the rules that keep those files whole:

* **One run at a time.** :func:`hold` takes an advisory lock on
  ``DIR/.lock`` (``fcntl.flock``) for as long as the run lives; the OS
  releases it when the process ends, however it ends, so a SIGKILL never
  leaves a stale lock. A second run on a held workdir fails at once, naming
  the holder (its pid, command and start time). Sweeps hold their root the
  same way, and each point's run its own directory.
* **Atomic replace.** :func:`write_atomic` writes a temporary file beside the
  target, fsyncs it and renames it over the target: a reader (or a kill at
  any moment) sees the old file or the new one, never a part.
* **Metrics against checkpoints.** :func:`reconcile_metrics` compares
  ``metrics.jsonl`` with the records a restored checkpoint kept and rewrites
  it from them when rows are missing, extra, cut short or changed, saying so.
* **Write errors are one line.** :func:`write_error` turns an ``OSError``
  (a full disk, a read-only directory) into a :class:`WorkdirError` that
  names the path and the cause; what was written before stays, so the same
  command resumes once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

LOCK_NAME = ".lock"


class WorkdirError(ValueError):
    """A workdir that cannot be used or written (one-line message naming the path)."""


def write_error(path: str | os.PathLike, error: OSError) -> WorkdirError:
    """The one-line :class:`WorkdirError` for an OS error while writing ``path``."""
    cause = error.strerror or str(error)
    hint = ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free some space and run the same command again to resume"
    return WorkdirError(f"cannot write {path}: {cause}{hint}")


def _holder_text() -> str:
    """Who holds the lock, for the next one who tries: pid, host, command, start time."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    command = " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]) if sys.argv else "?"
    return json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": started}
    )


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return (
            f"pid {holder['pid']} on {holder['host']} ({holder['command']}, "
            f"since {holder['since']})"
        )
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def hold(directory: str | os.PathLike, what: str = "--workdir") -> Iterator[Path]:
    """Holds ``directory`` for one run (or one sweep) until the block ends.

    Creates the directory if needed and takes an exclusive advisory lock on
    ``directory/.lock`` without waiting. The lock file records the holder;
    the OS drops the lock when the process exits, even on SIGKILL.

    Raises:
      WorkdirError: the directory is held by another process (naming it), or
        cannot be created or locked.
    """
    directory = Path(directory)
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WorkdirError(f"{what} {directory}: cannot write there ({e.strerror})") from None
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks, run unguarded
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                raise WorkdirError(
                    f"{what} {directory} is in use by {_describe_holder(holder)}; wait for it "
                    f"to finish, or use another {what}"
                ) from None
            except OSError as e:
                raise WorkdirError(f"{what} {directory}: cannot lock it ({e.strerror})") from None
        with contextlib.suppress(OSError):  # the holder's note is a courtesy
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_text().encode(), 0)
        yield directory
    finally:
        os.close(fd)  # releases the lock


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replaces ``path`` by ``text`` atomically (temporary file, fsync, rename).

    Raises:
      OSError: the write failed; ``path`` is unchanged and the temporary file
        is removed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def append_line(path: str | os.PathLike, line: str) -> None:
    """Appends ``line`` and a newline to ``path`` and flushes it to the disk.

    A kill or a full disk can cut the line short; :func:`reconcile_metrics`
    repairs that on resume.
    """
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: str | os.PathLike) -> tuple[list[dict], int]:
    """The JSON-object lines of ``path`` and the number of other (malformed) lines."""
    records, malformed = [], 0
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return [], 0
    except (OSError, UnicodeDecodeError):
        return [], 1
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            malformed += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int):
            records.append(record)
        else:
            malformed += 1
    return records, malformed


def reconcile_metrics(
    path: str | os.PathLike,
    kept: Sequence[dict] | None,
    round_: int,
    keep: Callable[[int], bool],
) -> tuple[list[dict], str]:
    """Makes ``metrics.jsonl`` hold exactly the records up to a restored checkpoint.

    Args:
      path: the run's ``metrics.jsonl``.
      kept: the evaluation records the checkpoint of ``round_`` saved (None: an
        older checkpoint without them; then the file's own rows are trusted).
      round_: the checkpoint's round; later rows are recomputed by the resumed
        run and dropped here.
      keep: ``keep(round) -> bool``, whether a record of a round up to
        ``round_`` belongs to this run (an evaluation round of its config).

    Returns:
      ``(records, note)``: the records the file now holds, and what was done,
      for the ``resuming`` line ("" when the file already held exactly the
      checkpoint's records and nothing after them).

    Raises:
      OSError: the file could not be rewritten (it is then unchanged).
    """
    rows, malformed = read_records(path)
    later = sum(1 for r in rows if r["round"] > round_)
    mine = [r for r in rows if r["round"] <= round_ and keep(r["round"])]
    expected = (
        mine if kept is None else [r for r in kept if r["round"] <= round_ and keep(r["round"])]
    )
    notes = []
    if later:
        notes.append(f"{later} row(s) after round {round_} dropped, to be recomputed")
    # Compared as JSON text: what the file holds, and NaN equal to NaN.
    mine_text = [json.dumps(r, sort_keys=True) for r in mine]
    expected_text = [json.dumps(r, sort_keys=True) for r in expected]
    missing = sum(1 for r in expected_text if r not in mine_text)
    extra = sum(1 for r in mine_text if r not in expected_text)
    if kept is not None and mine_text != expected_text:
        details = [f"{n} {what}" for n, what in ((missing, "missing"), (extra, "differing")) if n]
        notes.append(
            f"metrics.jsonl did not match the checkpoint of round {round_} ("
            + (", ".join(details) or "rows out of order")
            + "); rewrote it from the checkpoint's records"
        )
    if malformed:
        notes.append(f"{malformed} malformed line(s) of metrics.jsonl dropped (cut short?)")
    if malformed or [json.dumps(r, sort_keys=True) for r in rows] != expected_text:
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in expected))
    return expected, "; ".join(notes)
