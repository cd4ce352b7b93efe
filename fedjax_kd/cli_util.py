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
