"""Reading and checking the run files ``fedjax-kd report`` reads.

A run directory holds ``config.json``, ``metrics.jsonl`` and, once finished,
``summary.json`` (what ``fedjax-kd run --workdir`` and ``fedjax-kd sweep``
write). :func:`find_runs` finds them; :func:`load_run` reads one, checking
every file and line (:func:`parse_json`, :func:`check_config`,
:func:`check_summary`, :func:`check_row`), and either raises one
:class:`ReportError` naming the file and line or, with ``skip_malformed``,
skips what is malformed with one warning per file. A value the report reads
that is ``null`` or absent is ``None`` here (a missing value); the rules are
listed in :mod:`fedjax_kd.report`'s docstring, which groups, summarises and
writes what this module returns. No JAX, no numpy.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

#: Keys of a ``metrics.jsonl`` row the report reads besides ``--metric``.
READ_KEYS = ("cumulative_uplink_bytes", "cumulative_downlink_bytes", "wall_s")
#: Deepest nesting of a JSON value in a run file (a ``config.json`` is 2 or 3 deep).
MAX_DEPTH = 32
#: Largest magnitude of a number the report computes with: means, stds and
#: plots of such numbers cannot overflow.
MAX_ABS = 1e100
#: Largest ``round`` (exact as a float64, as the plots need).
MAX_ROUND = 2**53


class ReportError(ValueError):
    """A user mistake (no runs found, an unknown metric, a malformed run file,
    an unwritable ``--out``), or a failed write; ``code`` is the exit code.

    The report's one error: raised here for run files and by
    :mod:`fedjax_kd.report` for options and writes.
    """

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class Malformed(ValueError):
    """Why a JSON value or line of a run file is not what the report reads."""


class Run(NamedTuple):
    """One run directory, as checked by :func:`load_run`.

    Attributes:
      path: the directory.
      config: its ``config.json`` flattened to dotted keys, as written
        (the report's grouping fills keys other runs have from the schema).
      records: one dict per evaluation (a valid line of ``metrics.jsonl``):
        ``round`` (an int) and, for the metric and :data:`READ_KEYS`, a float
        (possibly NaN or infinite) or ``None`` (null or absent).
      finished: whether a valid ``summary.json`` exists.
      numeric: the keys with a number in some line (what ``--metric`` may name).
      notes: what was ignored or skipped in this run's files.
      summary_rounds: the ``rounds`` of ``summary.json`` (None: none).
    """

    path: Path
    config: dict
    records: list[dict]
    finished: bool
    numeric: frozenset = frozenset()
    notes: tuple = ()
    summary_rounds: int | None = None


def find_runs(dirs: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories (with ``config.json`` and ``metrics.jsonl``) under ``dirs``, sorted.

    Raises:
      ReportError: a ``DIR`` that is not a directory.
    """
    found: dict[str, Path] = {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ReportError(f"not a directory: {d}")
        for root, subdirs, files in os.walk(d):
            subdirs.sort()
            if "config.json" in files and "metrics.jsonl" in files:
                found.setdefault(os.path.realpath(root), Path(root))
    return sorted(found.values())


def shorten(text: str, limit: int = 60) -> str:
    """``text``, cut to ``limit`` characters with a trailing ``…`` when longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _kind(value) -> str:
    """What a JSON value is, for a message: ``"a string"``, ``"an array"``, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {shorten(repr(value), 30)}"
    return {str: "a string", list: "an array", dict: "an object"}[type(value)]


def _check_tree(value) -> None:
    """Raises Malformed when ``value`` nests deeper than :data:`MAX_DEPTH` or holds a
    string that is no Unicode text (an unpaired ``\\ud800`` escape: it cannot be printed)."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    raise Malformed(
                        "holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)"
                    ) from None
            continue
        if isinstance(node, dict):
            children = [*node.keys(), *node.values()]
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth >= MAX_DEPTH:
            raise Malformed(f"nested deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def parse_json(raw: bytes):
    """The JSON value of ``raw`` (UTF-8; ``NaN``/``Infinity`` allowed, as Python writes them).

    Raises:
      Malformed: not UTF-8, not JSON, nested deeper than :data:`MAX_DEPTH`, or
        a string that is not Unicode text.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Malformed(f"not UTF-8 text (byte {e.start + 1})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise Malformed(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, and an integer of more than 4300 digits
        raise Malformed(f"not JSON ({shorten(str(e))})") from None
    _check_tree(value)
    return value


def _number(row: dict, key: str) -> float | None:
    """``row[key]`` as a float (NaN and infinities kept); None: null or absent.

    Raises:
      Malformed: not a number, or a magnitude over :data:`MAX_ABS`.
    """
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Malformed(f"'{key}' is {_kind(value)}, expected a number or null")
    if (isinstance(value, int) or math.isfinite(value)) and abs(value) > MAX_ABS:
        raise Malformed(f"'{key}' is {_kind(value)}, out of range (magnitude over {MAX_ABS:g})")
    return float(value)


def _integer(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ROUND:
        raise Malformed(f"'{what}' is {_kind(value)}, expected an integer in [0, 2**53]")
    return value


def check_row(value, metric: str, previous: int | None = None) -> dict:
    """One line of ``metrics.jsonl`` as the report reads it.

    Args:
      value: the line's JSON value.
      metric: the reported key.
      previous: the round of the file's previous valid line (rounds must increase).

    Returns:
      ``{"round": int, metric: float | None, READ_KEYS...: float | None}``.

    Raises:
      Malformed: not an object, no integer ``round``, a round not after
        ``previous``, or a read value that is not a number or null.
    """
    if not isinstance(value, dict):
        raise Malformed(f"expected a JSON object, got {_kind(value)}")
    if value.get("round") is None:
        raise Malformed("no 'round'")
    r = _integer(value["round"], "round")
    if previous is not None and r <= previous:
        raise Malformed(f"round {r} after round {previous} (rounds must increase)")
    row = {"round": r}
    for key in dict.fromkeys((metric, *READ_KEYS)):
        row[key] = _number(value, key)
    return row


def check_config(value) -> dict:
    """A ``config.json`` value flattened to dotted keys.

    Raises:
      Malformed: not an object, a dotted key given twice (``"a.b"`` and
        ``{"a": {"b"}}``), a NaN or infinite number, a ``seed`` that is not an
        integer or an ``algorithm.name`` that is not a string.
    """
    if not isinstance(value, dict):
        raise Malformed(f"expected a JSON object, got {_kind(value)}")
    flat: dict = {}
    stack = [("", value)]
    while stack:
        prefix, node = stack.pop()
        for key, v in node.items():
            if isinstance(v, dict):
                stack.append((f"{prefix}{key}.", v))
                continue
            if f"{prefix}{key}" in flat:
                name = shorten(repr(f"{prefix}{key}"))
                raise Malformed(f"the key {name} is given twice (dotted and nested)")
            flat[f"{prefix}{key}"] = v
            leaves = [v]
            while leaves:
                leaf = leaves.pop()
                if isinstance(leaf, list):
                    leaves.extend(leaf)
                elif isinstance(leaf, dict):
                    leaves.extend(leaf.values())
                elif isinstance(leaf, float) and not math.isfinite(leaf):
                    name = shorten(repr(f"{prefix}{key}"))
                    raise Malformed(f"{name} holds {leaf!r}; config numbers are finite")
    seed = flat.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise Malformed(f"'seed' is {_kind(seed)}, expected an integer")
    name = flat.get("algorithm.name")
    if name is not None and not isinstance(name, str):
        raise Malformed(f"'algorithm.name' is {_kind(name)}, expected a string")
    return dict(sorted(flat.items()))


def check_summary(value) -> int | None:
    """The ``rounds`` of a ``summary.json`` value (None: not given).

    Raises:
      Malformed: not an object, or ``rounds`` not an integer.
    """
    if not isinstance(value, dict):
        raise Malformed(f"expected a JSON object, got {_kind(value)}")
    rounds = value.get("rounds")
    return None if rounds is None else _integer(rounds, "rounds")


def load_run(
    path: str | os.PathLike, metric: str = "test_accuracy", skip_malformed: bool = False
) -> tuple[Run | None, list[str]]:
    """Reads and checks one run directory (the rules: :mod:`fedjax_kd.report`'s docstring).

    An incomplete last line of ``metrics.jsonl`` (no newline after it, not
    JSON) in an unfinished run is a line being written: ignored, and noted.
    Config keys missing from ``config.json`` (added to the schema since the
    run) take their defaults when the runs are grouped (in :mod:`fedjax_kd.report`).

    Args:
      path: the run directory.
      metric: the reported ``metrics.jsonl`` key.
      skip_malformed: skip what is malformed or unreadable instead of raising.

    Returns:
      ``(run, warnings)``: ``run`` is None when its ``config.json`` or
      ``metrics.jsonl`` is skipped; one warning per skipped file or per file
      with skipped lines.

    Raises:
      ReportError: (without ``skip_malformed``) a malformed or unreadable
        file, or line, named with its path and line number.
    """
    path = Path(path)
    warnings: list[str] = []

    def bad_file(file: Path, reason: str, then: str) -> None:
        if not skip_malformed:
            raise ReportError(f"{file}: {reason} (--skip-malformed skips it)")
        warnings.append(f"{file}: {reason}; {then}")

    def read(file: Path, check, then: str) -> tuple[bool, object]:
        try:
            return True, check(parse_json(file.read_bytes()))
        except OSError as e:
            bad_file(file, f"cannot read it ({e.strerror or e})", then)
        except Malformed as e:
            bad_file(file, str(e), then)
        return False, None

    ok, config = read(path / "config.json", check_config, "run skipped")
    if not ok:
        return None, warnings
    finished, summary_rounds = False, None
    if (path / "summary.json").is_file():
        finished, summary_rounds = read(
            path / "summary.json", check_summary, "the run counts as unfinished"
        )
    file = path / "metrics.jsonl"
    try:
        lines = file.read_bytes().split(b"\n")
    except OSError as e:
        bad_file(file, f"cannot read it ({e.strerror or e})", "run skipped")
        return None, warnings
    records, numeric, notes, skipped = [], set(), [], []
    previous = None
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            value = parse_json(raw)
        except Malformed as e:
            if i == len(lines) and not finished:  # no newline after it: being written
                notes.append(f"{file} line {i} is incomplete (being written?); ignored")
                continue
            reason = str(e)
        else:
            try:
                records.append(check_row(value, metric, previous))
            except Malformed as e:
                reason = str(e)
            else:
                previous = records[-1]["round"]
                numeric.update(
                    k
                    for k, v in value.items()
                    if k != "round" and isinstance(v, int | float) and not isinstance(v, bool)
                )
                continue
        if not skip_malformed:
            raise ReportError(f"{file} line {i}: {reason} (--skip-malformed skips such lines)")
        skipped.append(f"line {i}: {reason}")
    if skipped:
        shown = "; ".join(skipped[:3]) + ("; …" if len(skipped) > 3 else "")
        s = "s" if len(skipped) > 1 else ""
        warnings.append(f"{file}: skipped {len(skipped)} malformed line{s} ({shown})")
    if finished and summary_rounds is not None and records:
        if records[-1]["round"] != summary_rounds:
            notes.append(
                f"{path}: summary.json says {summary_rounds} rounds, metrics.jsonl ends at "
                f"round {records[-1]['round']}"
            )
    run = Run(path, config, records, finished, frozenset(numeric), tuple(notes), summary_rounds)
    return run, warnings
