"""``fedjax-kd sweep``: a grid of configs x seeds, run in this process.

Command::

    fedjax-kd sweep --config PATH[:VARIANT] --workdir DIR [--grid KEY=V1,V2,...]...
        [--seeds 0,1,2] [--parallel N] [--config.KEY=VALUE ...] [--no-progress]
        [--no-compile-cache]

The grid comes from the ``--grid`` flags (their cross product, in the order the
flags are given; the last key varies fastest) or, when there are none, from the
config file's optional ``get_sweep(variant=None)``::

    def get_sweep(variant=None):
        return {
            "grid": {"algorithm.name": ["fedavg", "fedprox"], "fedprox.mu": [0.01, 0.1]},
            # or a list of such dicts: the union of their cross products
            "seeds": [0, 1, 2],
        }

Seeds come from ``--seeds``, else ``get_sweep()["seeds"]``, else the config's
``seed``. No grid at all means one point (named ``base``) times the seeds.

Each point x seed runs ``experiment.run(config, workdir=DIR/<point>/seed<k>)``,
where the config is the file's (or the embedded default) with the
``--config.KEY`` overrides applied first, then the point's grid values, then
``seed=k``; values are override strings coerced by :func:`experiment.resolve`.
Every point's config is resolved (and every existing sub-workdir's
``config.json`` compared with it) before the first run starts, so a mistake ends
with exit code 2 and one ``error:`` line before anything compiles.

A point whose sub-workdir already has ``summary.json`` for the same number of
rounds is skipped, and an interrupted one resumes from its checkpoint
(``experiment.run``), so running the same command again finishes an
interrupted sweep; a larger ``--config.rounds`` extends every point. ``DIR/sweep.json`` lists
the points (``name``, ``overrides``, ``seed``, ``workdir``, ``status`` and the
final ``test_accuracy``); it is written before the first run and after each.
A run that diverges is recorded as ``diverged`` and the sweep goes on; the exit
code is then 1. Per-run lines go to stdout, ``[i/n] point seed k`` lines to
stderr; ``--no-progress`` turns off each run's progress bar.

Points run one after another, unless ``--parallel N``: then up to N points
whose configs differ only in the seed and continuous hyperparameters run as
one compiled program, a leading vmap axis (:mod:`fedjax_kd.parallel`); each
still gets its own sub-workdir, written as if it had run alone.

``fedjax-kd report DIR`` (``fedjax_kd/report.py``) tabulates and plots the result.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import itertools
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from fedjax_kd import workdir as workdir_lib
from fedjax_kd.cli_util import fail

USAGE = (
    "fedjax-kd sweep --workdir DIR [--config PATH[:VARIANT]] [--grid KEY=V1,V2,...]... "
    "[--seeds 0,1,2] [--parallel N] [--config.KEY=VALUE ...] [--no-progress] "
    "[--no-compile-cache]"
)
#: Name of the point without grid values (a sweep over seeds only).
BASE_NAME = "base"
#: Longest point name kept as is; longer ones are cut and get a hash suffix.
MAX_NAME_LENGTH = 120

Overrides = tuple[tuple[str, str], ...]


class Point(NamedTuple):
    """One run of a sweep: a grid point (``overrides``) with one ``seed``.

    Attributes:
      name: filesystem-safe name of the grid point (shared by its seeds).
      overrides: ``(dotted_key, value_string)`` pairs of the grid point.
      seed: the run's ``seed``.
      workdir: ``DIR/<name>/seed<seed>``.
    """

    name: str
    overrides: Overrides
    seed: int
    workdir: Path


def _config_error(message: str) -> Exception:
    from fedjax_kd.experiment import ConfigError  # JAX starts only when a sweep runs

    return ConfigError(message)


def value_string(value) -> str:
    """The override string of a grid value (``True`` -> ``true``, ``0.1`` -> ``0.1``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise _config_error(f"grid value {value!r} must be a string, number or boolean")


def point_name(overrides: Sequence[tuple[str, str]]) -> str:
    """A readable, filesystem-safe directory name for a grid point.

    ``[("algorithm.name", "fedprox"), ("fedprox.mu", "1.0")]`` ->
    ``algorithm.name-fedprox__fedprox.mu-1.0``. Characters other than letters,
    digits, ``.``, ``+``, ``-`` and ``_`` become ``_``; a name longer than
    :data:`MAX_NAME_LENGTH` is cut and ends in a hash of the full name. No
    overrides -> :data:`BASE_NAME`.
    """
    if not overrides:
        return BASE_NAME
    raw = "__".join(f"{key}-{value}" for key, value in overrides)
    name = re.sub(r"[^A-Za-z0-9.+_-]", "_", raw)
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(raw.encode()).hexdigest()[:10]
        name = f"{name[: MAX_NAME_LENGTH - 12]}__{digest}"
    return name


def parse_grid_flags(flags: Sequence[str]) -> dict[str, list[str]]:
    """``["KEY=V1,V2", ...]`` (the ``--grid`` flags) -> ``{KEY: ["V1", "V2"], ...}``."""
    grid: dict[str, list[str]] = {}
    for flag in flags:
        key, sep, values = flag.partition("=")
        key = key.strip()
        if not sep or not key:
            raise _config_error(f"--grid {flag!r}: expected KEY=V1,V2,...")
        if key in grid:
            raise _config_error(f"--grid: key '{key}' given twice")
        items = [v.strip() for v in values.split(",")]
        if not values.strip() or any(v == "" for v in items):
            raise _config_error(f"--grid {flag!r}: empty value (expected KEY=V1,V2,...)")
        grid[key] = items
    return grid


def _as_values(values) -> list[str]:
    """A grid entry's values as override strings (a scalar is one value)."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        values = [values]
    return [value_string(v) for v in values]


def expand_grid(grid: Mapping | Sequence[Mapping] | None) -> list[Overrides]:
    """The points of a grid: the cross product of its values, or a union of those.

    Args:
      grid: ``{key: [values...]}`` (a scalar counts as one value) or a list of
        such dicts; ``None`` or ``{}`` is the grid of one empty point.

    Returns:
      One ``((key, value_string), ...)`` tuple per point, keys in the grid's
      order and the last key varying fastest; the points of a list of grids in
      order, each point once.
    """
    grids = [grid] if grid is None or isinstance(grid, Mapping) else list(grid)
    if not grids:
        grids = [{}]
    points: list[Overrides] = []
    for g in grids:
        if g is None:
            g = {}
        if not isinstance(g, Mapping):
            raise _config_error(f"a grid must be a dict of key -> list of values, got {g!r}")
        keys, columns = [], []
        for key, values in g.items():
            if not isinstance(key, str):
                raise _config_error(f"grid key {key!r} must be a string")
            if key == "seed":
                raise _config_error("grid key 'seed': give seeds with --seeds or 'seeds'")
            values = _as_values(values)
            if not values:
                raise _config_error(f"grid key '{key}' has no values")
            keys.append(key)
            columns.append(values)
        for combo in itertools.product(*columns):
            point = tuple(zip(keys, combo, strict=True))
            if point not in points:
                points.append(point)
    return points


def make_points(
    grid_points: Sequence[Overrides], seeds: Sequence[int], workdir: str | os.PathLike
) -> list[Point]:
    """Every grid point x seed (seeds vary fastest), each with its sub-workdir.

    Raises:
      ConfigError: two grid points with the same directory name.
    """
    points, owners = [], {}
    for overrides in grid_points:
        name = point_name(overrides)
        if owners.setdefault(name, overrides) != overrides:
            raise _config_error(
                f"grid points {dict(owners[name])} and {dict(overrides)} have the same "
                f"directory name '{name}'"
            )
        for seed in seeds:
            points.append(Point(name, tuple(overrides), seed, Path(workdir) / name / f"seed{seed}"))
    return points


def _check_seeds(seeds, where: str) -> list[int]:
    if isinstance(seeds, str | bytes) or not isinstance(seeds, Sequence) or not seeds:
        raise _config_error(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    out: list[int] = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32:
            raise _config_error(f"{where}: seed {s!r} must be an integer in [0, 2**32)")
        if s not in out:
            out.append(s)
    return out


def load_sweep_file(path: str | os.PathLike) -> dict | None:
    """Loads the optional ``get_sweep(variant=None)`` of a config file ``PATH[:VARIANT]``.

    Returns:
      ``None`` when the file defines no ``get_sweep``; else
      ``{"grid": [{key: [value_string, ...]}, ...], "seeds": [int, ...] | None}``
      (``grid`` always a list of dicts; a missing ``grid`` is ``[]``).
      ``get_sweep`` receives the variant if it takes an argument.

    Raises:
      ConfigError: missing file, a failing ``get_sweep``, or a malformed result.
    """
    from fedjax_kd.experiment import load_config_module, user_code

    module, file, variant = load_config_module(path)
    get_sweep = getattr(module, "get_sweep", None)
    if get_sweep is None:
        return None
    try:
        takes_argument = bool(inspect.signature(get_sweep).parameters)
    except (TypeError, ValueError):
        takes_argument = True
    # sys.exit, Ctrl-C and any exception in the user's code: one error line.
    with user_code(file, "get_sweep()"):
        sweep = get_sweep(variant) if takes_argument else get_sweep()
    if not isinstance(sweep, Mapping) or set(sweep) - {"grid", "seeds"}:
        raise _config_error(
            f"get_sweep() in {file} must return a dict with keys 'grid' and/or 'seeds', "
            f"got {sweep!r}"
        )
    grid = sweep.get("grid") or []
    grids = [grid] if isinstance(grid, Mapping) else grid
    if not isinstance(grids, Sequence) or not all(isinstance(g, Mapping) for g in grids):
        raise _config_error(f"get_sweep() in {file}: 'grid' must be a dict or a list of dicts")
    expand_grid(grids)  # checks keys and values
    normalized = [{k: _as_values(vs) for k, vs in g.items()} for g in grids]
    seeds = sweep.get("seeds")
    if seeds is not None:
        seeds = _check_seeds(seeds, f"get_sweep() in {file}")
    return {"grid": normalized, "seeds": seeds}


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 0,1,2, got {text!r}"
        ) from None
    if any(not 0 <= s < 2**32 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be in [0, 2**32), got {text!r}")
    return list(dict.fromkeys(seeds))


def _parse_parallel(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``fedjax-kd sweep`` options to ``parser`` (see :func:`run`).

    ``--config.KEY=VALUE`` overrides are split off by ``cli.py`` and handed to
    :func:`run` as ``args.overrides``.
    """
    parser.add_argument(
        "--config",
        metavar="PATH[:VARIANT]",
        help="Python file with get_config([variant]) and optionally get_sweep([variant]) "
        "(default: the embedded default)",
    )
    parser.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help="runs go to DIR/<point>/seed<k>; DIR/sweep.json",
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a config key and its values; several flags give their cross product "
        "(default: the config file's get_sweep()['grid'])",
    )
    parser.add_argument(
        "--seeds",
        type=_parse_seeds,
        metavar="0,1,2",
        help="seeds of every point (default: get_sweep()['seeds'], else the config's seed)",
    )
    parser.add_argument(
        "--parallel",
        type=_parse_parallel,
        default=1,
        metavar="N",
        help="run up to N points that differ only in the seed and continuous hyperparameters "
        "(learning rates, mu, temperatures, weights) as one compiled program "
        "(fedjax_kd/parallel.py; default 1: one run at a time)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar per run")
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (fedjax_kd/cache.py)",
    )


def _check_existing(point: Point, config) -> None:
    """Refuses a sub-workdir that holds a run of another config.

    The comparison is ``experiment.config_conflicts``'s: keys a run may change
    when it resumes (a larger ``rounds`` extends the finished points, except
    for FedKD) are allowed, and a key missing from an older ``config.json``
    counts as its default.
    """
    from fedjax_kd import experiment

    try:
        diffs = experiment.config_conflicts(point.workdir, config)
    except ValueError as e:
        path = point.workdir / "config.json"
        raise _config_error(f"{path}: unreadable ({e}); remove that run directory") from None
    if diffs:
        raise _config_error(
            f"{point.workdir} holds a run of another config ({', '.join(diffs[:3])}); "
            "use another --workdir or remove that directory"
        )


def _write_json(path: Path, content) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    """Runs ``fedjax-kd sweep`` with parsed ``args``; returns the exit code.

    ``args.overrides``: the ``(key, value)`` pairs of the ``--config.KEY=VALUE``
    flags (applied before each point's grid values).
    """
    from fedjax_kd import experiment

    base_overrides = list(getattr(args, "overrides", None) or [])
    try:
        base = experiment.load_config_file(args.config) if args.config else None
        sweep = load_sweep_file(args.config) if args.config else None
        if args.grid:
            grid_points = expand_grid(parse_grid_flags(args.grid))
        else:
            grid_points = expand_grid(sweep["grid"] if sweep else None)
        seeds = args.seeds or (sweep and sweep["seeds"])
        if not seeds:
            seeds = [int(experiment.resolve(base, base_overrides).seed)]
        points = make_points(grid_points, seeds, args.workdir)
        configs = []
        for p in points:
            overrides = [*base_overrides, *p.overrides, ("seed", str(p.seed))]
            config = experiment.resolve(base, overrides)
            _check_existing(p, config)
            configs.append(config)
        root = Path(args.workdir)
        # Held for the whole sweep (each point's run holds its own directory too).
        held = contextlib.ExitStack()
        held.enter_context(workdir_lib.hold(root))
    except (experiment.ConfigError, workdir_lib.WorkdirError) as e:
        return fail(str(e))
    with held:
        return _run_points(args, root, points, configs, base_overrides, seeds)


def _run_points(args, root: Path, points, configs, base_overrides, seeds) -> int:
    """The sweep's runs in the held ``root`` (one after another, or in groups); the exit code."""
    from fedjax_kd import experiment, parallel
    from fedjax_kd.simulate import NonFiniteError

    records = [
        {
            "name": p.name,
            "overrides": dict(p.overrides),
            "seed": p.seed,
            "workdir": str(p.workdir),
            "status": "pending",
            "test_accuracy": None,
        }
        for p in points
    ]
    manifest = {
        "config": args.config,
        "base_overrides": [list(kv) for kv in base_overrides],
        "seeds": list(seeds),
        "points": records,
    }
    sweep_json = root / "sweep.json"
    diverged = 0
    try:
        _write_json(sweep_json, manifest)
        pending = []
        for i, (p, config, record) in enumerate(zip(points, configs, records, strict=True)):
            summary_path = p.workdir / "summary.json"
            try:
                done = json.loads(summary_path.read_text()) if summary_path.is_file() else None
            except ValueError:
                done = None
            if isinstance(done, dict) and done.get("rounds") == config.rounds:
                print(
                    f"[{i + 1}/{len(points)}] {p.name} seed {p.seed}", file=sys.stderr, flush=True
                )
                accuracy = done.get("test_accuracy")
                record.update(status="skipped", test_accuracy=accuracy)
                shown = f"{accuracy:.4f}" if isinstance(accuracy, float) else "?"
                message = f"skipped ({summary_path} exists), test_accuracy {shown}"
                print(f"{p.name} seed {p.seed}: {message}")
                sys.stdout.flush()
            else:
                pending.append(i)
        _write_json(sweep_json, manifest)
        for group in parallel.plan([configs[i] for i in pending], args.parallel):
            members = [pending[j] for j in group]
            for i in members:
                p = points[i]
                print(
                    f"[{i + 1}/{len(points)}] {p.name} seed {p.seed}", file=sys.stderr, flush=True
                )
            results = parallel.run_group(
                [configs[i] for i in members],
                [points[i].workdir for i in members],
                progress=not args.no_progress,
            )
            for i, result in zip(members, results, strict=True):
                p, record = points[i], records[i]
                if isinstance(result, NonFiniteError):
                    diverged += 1
                    record.update(status="diverged", error=str(result))
                    print(f"{p.name} seed {p.seed}: diverged ({result})")
                else:
                    accuracy = result.summary["test_accuracy"]
                    record.update(status="done", test_accuracy=accuracy)
                    print(f"{p.name} seed {p.seed}: test_accuracy {accuracy:.4f}")
            sys.stdout.flush()
            _write_json(sweep_json, manifest)
    except experiment.ConfigError as e:  # a dataset/model mistake found only when building
        return fail(str(e))
    except OverflowError as e:  # a step count past int32, met in tracing
        return fail(f"a config value is too large to compile: {e}; use smaller counts")
    except OSError as e:
        return fail(str(workdir_lib.write_error(e.filename or root, e)))
    except KeyboardInterrupt:
        return fail("interrupted (run the same command again to finish the sweep)", code=130)
    print(f"wrote {sweep_json} ({len(points)} runs)")
    if diverged:
        return fail(f"{diverged} of {len(points)} runs diverged (see {sweep_json})", code=1)
    return 0
