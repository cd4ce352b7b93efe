"""What every ``fedjax-kd`` subcommand shares for reporting a user's mistake.

Light on purpose (standard library only): ``fedjax-kd --help``, ``report``
and argument errors must not start JAX.
"""

from __future__ import annotations

import argparse
import sys


def fail(message: str, code: int = 2) -> int:
    """Prints one ``error: MESSAGE`` line on stderr; returns the exit code (2: a user mistake)."""
    print(f"error: {message}", file=sys.stderr)
    return code


class ErrorParser(argparse.ArgumentParser):
    """argparse that reports a mistake as one ``error:`` line with the usage (exit 2)."""

    def __init__(self, *args, default_usage: str = "", **kwargs):
        """Like ``ArgumentParser``; ``default_usage`` is shown when ``usage`` is not set."""
        super().__init__(*args, **kwargs)
        self.default_usage = default_usage

    def error(self, message: str):  # noqa: D102 - argparse's hook
        fail(f"{message} (usage: {self.usage or self.default_usage})")
        raise SystemExit(2)


def empty_path_flag(args: argparse.Namespace, names) -> str | None:
    """The first ``--NAME`` of ``names`` that ``args`` holds as an empty path (or None).

    An empty ``--workdir ""`` would mean the current directory and ``--config ""``
    a file called ``.``: a mistake, refused in one line by the caller.
    """
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            return f"--{name}"
    return None


def output_file_error(path: str, flag: str) -> str | None:
    """Why the file ``path`` (given as ``flag``) cannot be written, or None when it can.

    Checked before the work that produces it starts: an empty path, a
    directory, a parent that cannot be created, or a file that cannot be
    opened for writing (no permission, a read-only file system). A missing
    parent directory is created; the probe leaves no file behind.
    """
    import os

    if not path.strip():
        return f"{flag}: the path is empty; give a file path"
    if os.path.isdir(path):
        return f"{flag} {path}: is a directory; give a file path"
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        return f"{flag} {path}: cannot create its directory {parent} ({e.strerror or e})"
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        return f"{flag} {path}: cannot write there ({e.strerror or e})"
    if not existed:
        try:
            os.remove(path)
        except OSError:
            pass
    return None
