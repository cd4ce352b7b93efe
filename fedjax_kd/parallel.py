"""Sweep points as one compiled program: seeds and hyperparameters on a vmap axis.

A run is a pure function of ``(config, seed)``, so points of a sweep that
share every shape can run side by side as a leading ``vmap`` axis of one
executable (:func:`fedjax_kd.simulate.run_parallel`): on a small model the
device (or the CPU's vector units) does the work of N runs in about the time
of one, and the program compiles once instead of N times.

Which points share a program (:func:`plan`): those whose configs are equal
but for ``seed`` and *continuous hyperparameters*, the float-valued keys of
the client, server and algorithm sections (learning rates, momenta, mu,
temperatures, distillation weights; :func:`continuous_keys`). The keys that
differ inside a group reach the compiled round as float32 arguments: the
algorithm is built inside the trace from the config with those values
traced (``build_algorithm`` on traced scalars). An algorithm whose builder
branches in Python on such a value cannot take it traced; the group then runs
again split by those values (a note says so), still in parallel over seeds.
Points whose datasets differ in shape (another number of clients, test or
proxy size) also run apart. A point's numbers equal its run alone up to float
rounding (``tests/test_parallel.py`` states the tolerance); a group of the
same points gives the same bits every time.

Each point keeps its own workdir exactly as ``fedjax-kd run`` writes it
(``config.json``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/``), so a
sweep interrupted during a group resumes per group, and ``fedjax-kd report``
reads the points as usual.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from fedjax_kd import experiment, simulate
from fedjax_kd import workdir as workdir_lib
from fedjax_kd.configs import flatten
from fedjax_kd.data import DATASET_SPECS

#: Sections whose float keys shape the data, not the round: never traced.
_DATA_SECTIONS = ("data", *DATASET_SPECS)

#: Run settings (no floats among them today); listed so that one never becomes traced.
_RUN_KEYS = (
    "seed",
    "rounds",
    # Static in the program or in the run's length: never traced hyperparameters.
    "attack.fraction",
    "attack.scale",
    "attack.noise_std",
    "attack.epsilon",
    "dp.clip_norm",
    "dp.noise_multiplier",
    "dp.delta",
    "dp.epsilon_budget",
    "server.trim_beta",
    "server.norm_bound",
    "server.clip_tau",
    "clients_per_round",
    "eval_every",
    "eval_batch_size",
    "client_chunk_size",
    "rounds_per_call",
    "checkpoint_every",
)

#: Errors JAX raises when Python code needs the value of a traced scalar.
_TRACER_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


def continuous_keys(config) -> list[str]:
    """The config keys that may differ inside one parallel group besides ``seed``.

    Float-valued keys outside the data sections (``data.*`` and the datasets'
    namespaces) and the run settings: learning rates, momenta, Adam's
    moments, FedProx's mu, temperatures, distillation weights.
    """
    return [
        key
        for key, value in flatten(config.to_dict()).items()
        if isinstance(value, float)
        and key.split(".")[0] not in _DATA_SECTIONS
        and key not in _RUN_KEYS
    ]


def _static_part(config, free: Sequence[str]) -> str:
    """The config without ``free`` keys and ``seed``: equal for points of one group."""
    flat = flatten(config.to_dict())
    return json.dumps({k: v for k, v in flat.items() if k not in free and k != "seed"})


def plan(configs: Sequence, parallel: int) -> list[list[int]]:
    """Groups of at most ``parallel`` config indices that may share one program.

    Points are grouped when their configs differ only in ``seed`` and
    :func:`continuous_keys`; groups keep the points' order (first
    appearance), and a group larger than ``parallel`` is cut into pieces.
    ``parallel <= 1`` gives one point per group.
    """
    if parallel <= 1:
        return [[i] for i in range(len(configs))]
    same = _split_by(
        range(len(configs)), lambda i: _static_part(configs[i], continuous_keys(configs[i]))
    )
    pieces = [
        members[j : j + parallel] for members in same for j in range(0, len(members), parallel)
    ]
    return sorted(pieces, key=lambda group: group[0])


def _differing(configs: Sequence) -> list[str]:
    """The continuous keys whose values differ among ``configs``."""
    flats = [flatten(c.to_dict()) for c in configs]
    return [k for k in continuous_keys(configs[0]) if len({f[k] for f in flats}) > 1]


def _builder(config, dataset, traced: Sequence[str]):
    """``build(hp) -> algorithm``: ``config`` with the ``traced`` keys set to ``hp``'s values."""
    fixed = experiment.build_algorithm(config, dataset) if not traced else None

    def build(hp):
        if fixed is not None:
            return fixed
        with_values = copy.deepcopy(config)
        for key in traced:
            experiment._set(with_values, key, hp[key])
        return experiment.build_algorithm(with_values, dataset)

    return build


def _shape_groups(datasets) -> list[list[int]]:
    """Indices of datasets with equal :func:`~fedjax_kd.simulate.dataset_shapes`."""
    return _split_by(range(len(datasets)), lambda i: simulate.dataset_shapes(datasets[i]))


def run_group(
    configs: Sequence,
    workdirs: Sequence[str | Path | None] | None = None,
    *,
    progress: bool = True,
) -> list[simulate.RunResult | simulate.NonFiniteError]:
    """Runs resolved ``configs`` (one group of :func:`plan`) as one program.

    Args:
      configs: resolved configs that differ only in ``seed`` and
        :func:`continuous_keys`.
      workdirs: one workdir per config (or None: write nothing), each
        written as ``fedjax-kd run --workdir`` writes it, resumed from its
        checkpoint if it has one.
      progress: one progress bar for the group.

    Returns:
      Per config, its :class:`~fedjax_kd.simulate.RunResult` or the
      :class:`~fedjax_kd.simulate.NonFiniteError` that stopped it.

    Raises:
      ConfigError: a user mistake (as :func:`fedjax_kd.experiment.run`), or
        the group's memory estimate exceeds the machine's.
    """
    configs = list(configs)
    workdirs = list(workdirs) if workdirs is not None else [None] * len(configs)
    if len(configs) != len(workdirs):
        raise ValueError("run_group: one workdir per config")
    if not configs:
        return []
    if len(configs) == 1:
        return [_run_alone(configs[0], workdirs[0], progress)]
    if jax.process_count() > 1:
        raise experiment.ConfigError("--parallel is not supported in multi-host runs")
    differing = _differing(configs)
    if any(_static_part(c, differing) != _static_part(configs[0], differing) for c in configs):
        raise ValueError("run_group: the configs differ in more than seed and continuous keys")
    # The first point is checked in full; the others differ only in their data.
    # Its algorithm serves every point's workdir as the template of the state.
    first_dataset, algorithm = experiment.build_run(configs[0])
    datasets = [first_dataset, *(experiment.build_checked_dataset(c) for c in configs[1:])]
    shape_groups = _shape_groups(datasets)
    for members in shape_groups:  # before any workdir is touched: N copies of one run
        if len(members) > 1:
            i = members[0]
            experiment._check_memory(configs[i], datasets[i], algorithm, len(members))
    results: list = [None] * len(configs)
    try:
        with contextlib.ExitStack() as held:
            opened = []
            for i, (config, workdir) in enumerate(zip(configs, workdirs, strict=True)):
                if workdir is None:
                    opened.append(None)
                    continue
                held.enter_context(workdir_lib.hold(workdir))
                rounds = experiment.dp_rounds(config, datasets[i])
                opened.append(
                    experiment.open_workdir(Path(workdir), config, algorithm, rounds=rounds)
                )
            for members in shape_groups:
                for same_start in _split_by(members, lambda i: _resume_round(opened[i])):
                    _run_members(
                        configs, datasets, opened, same_start, differing, progress, results
                    )
    except workdir_lib.WorkdirError as e:
        raise experiment.ConfigError(str(e)) from None
    return results


def _resume_round(opened) -> int:
    """The round a point resumes after (0: from scratch, or no workdir)."""
    return opened.restored.round if opened is not None and opened.restored is not None else 0


def _split_by(members, key) -> list[list[int]]:
    """``members`` split by ``key(i)``, in the order of first appearance."""
    parts: dict = {}
    for i in members:
        parts.setdefault(key(i), []).append(i)
    return list(parts.values())


def _run_members(configs, datasets, opened, members, differing, progress, results) -> None:
    """Runs ``members`` (indices) as one program, or split by value if they cannot be traced."""
    if len(members) == 1:
        i = members[0]
        results[i] = _simulate_points(configs, datasets, opened, members, [], progress)[0]
        return
    try:
        out = _simulate_points(configs, datasets, opened, members, differing, progress)
    except _TRACER_ERRORS as e:
        if not differing:
            raise
        first_line = str(e).strip().splitlines()[0]
        print(
            f"note: {', '.join(differing)} cannot reach this algorithm's compiled round as "
            f"arguments ({type(e).__name__}: {first_line}); running each value apart",
            file=sys.stderr,
        )
        for part in _split_by(members, lambda i: _static_part(configs[i], [])):
            _run_members(configs, datasets, opened, part, [], progress, results)
        return
    for i, result in zip(members, out, strict=True):
        results[i] = result


def _simulate_points(configs, datasets, opened, members, traced, progress) -> list:
    """``simulate.run_parallel`` over ``members`` with the ``traced`` keys as arguments."""
    config = configs[members[0]]
    points = []
    for i in members:
        flat = flatten(configs[i].to_dict())
        o = opened[i]
        points.append(
            simulate.Point(
                seed=configs[i].seed,
                dataset=datasets[i],
                hparams={k: flat[k] for k in traced},
                on_eval=o and o.on_eval,
                on_checkpoint=o and o.on_checkpoint,
                resume=o and o.restored,
            )
        )
    if len(points) == 1:  # what a run alone in its workdir does
        (point,) = points
        algorithm = experiment.build_algorithm(config, point.dataset)
        try:
            out = [
                experiment._simulate(
                    config,
                    point.dataset,
                    algorithm,
                    progress=progress,
                    on_eval=point.on_eval,
                    on_checkpoint=point.on_checkpoint,
                    resume=point.resume,
                )
            ]
        except simulate.NonFiniteError as e:
            out = [e]
    else:
        print(f"running {len(points)} points as one program", file=sys.stderr, flush=True)
        build = _builder(config, datasets[members[0]], traced)
        settings = {
            **experiment.run_settings(config, datasets[members[0]]),
            "progress": progress,
        }
        out = simulate.run_parallel(build, points, **settings)
    for i, result in zip(members, out, strict=True):
        if opened[i] is not None and not isinstance(result, simulate.NonFiniteError):
            opened[i].finish(result)
    return out


def _run_alone(config, workdir, progress):
    """One point: exactly ``fedjax-kd run`` (the same program and bits)."""
    try:
        return experiment.run(config, workdir=workdir, progress=progress)
    except simulate.NonFiniteError as e:
        return e


def run_all(
    configs: Sequence,
    workdirs: Sequence[str | Path | None] | None = None,
    *,
    parallel: int = 8,
    progress: bool = True,
) -> list[simulate.RunResult | simulate.NonFiniteError]:
    """Runs every config, up to ``parallel`` at once where they can share a program.

    The library call behind ``fedjax-kd sweep --parallel N``: :func:`plan`
    then :func:`run_group` for each group. Example::

      from fedjax_kd import experiment, parallel
      configs = [experiment.resolve(overrides=[("seed", str(s))]) for s in range(8)]
      results = parallel.run_all(configs, parallel=8, progress=False)
      print([r.summary["test_accuracy"] for r in results])
    """
    configs = [experiment.resolve(c) for c in configs]
    workdirs = list(workdirs) if workdirs is not None else [None] * len(configs)
    results: list = [None] * len(configs)
    for group in plan(configs, parallel):
        out = run_group([configs[i] for i in group], [workdirs[i] for i in group],
                        progress=progress)  # fmt: skip
        for i, result in zip(group, out, strict=True):
            results[i] = result
    return results
