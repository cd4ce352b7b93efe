"""The ``fedjax-kd`` command.

Usage::

    fedjax-kd run [--config PATH[:VARIANT]] [--config.KEY=VALUE ...] [--workdir DIR]
                  [--overwrite | --resume] [--no-progress] [--no-compile-cache]
    fedjax-kd bench --clients 10,100,1000,10000 --json PATH   (see fedjax_kd/bench/)
    fedjax-kd sweep --config PATH[:VARIANT] --workdir DIR [--grid KEY=V1,V2]... [--seeds 0,1,2]
                    [--parallel N] [--config.KEY=VALUE ...] [--no-progress] [--no-compile-cache]
                    (see fedjax_kd/sweep.py)
    fedjax-kd report DIR... --out OUTDIR [--metric test_accuracy] [--target T]
                     [--columns KEY,...] [--baseline KEY=VALUE] [--panels KEY,...]
                     [--skip-malformed]
                     (see fedjax_kd/report.py)
    fedjax-kd list   the algorithms with their config keys, the models, the datasets

``--config`` takes ``PATH:VARIANT`` too: ``get_config("VARIANT")`` of the file.

A user's mistake (unknown key, wrong type, value out of range, unknown name,
missing config file) ends with exit code 2 and one line ``error: ...`` on
stderr, before anything is compiled. A run that diverges (non-finite update)
ends with exit code 1 and one line naming the round. ``run`` with a
``--workdir`` that holds checkpoints resumes from the last one (see
``experiment.run``); a different config there is an exit-2 error unless
``--resume`` or ``--overwrite`` is given.
"""

from __future__ import annotations

import functools
import json
import os
import sys

from fedjax_kd import __version__  # light: the package imports its names lazily
from fedjax_kd.cli_util import ErrorParser, empty_path_flag, fail

USAGE = (
    "fedjax-kd run [--config PATH[:VARIANT]] [--config.KEY=VALUE ...] [--workdir DIR] "
    "[--overwrite | --resume] [--no-progress] [--no-compile-cache] "
    "[--coordinator HOST:PORT --num-processes N --process-id I]"
)


def _split_overrides(tokens: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Separates ``--config.KEY=VALUE`` / ``--config.KEY VALUE`` from other tokens."""
    overrides, rest = [], []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--config."):
            body = tok[len("--config.") :]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                key, value = body, tokens[i + 1]
                i += 1
            else:
                raise SystemExit(fail(f"--config.{body} needs a value (--config.{body}=VALUE)"))
            overrides.append((key, value))
        else:
            rest.append(tok)
        i += 1
    return overrides, rest


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        message = f"environment variable {name} must be an integer, got {value!r}"
        raise SystemExit(fail(message)) from None


def _initialize_hosts(coordinator: str, num_processes: int, process_id: int) -> None:
    """``jax.distributed.initialize``; CPU processes talk through gloo collectives."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedjax-kd``; returns the process exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:  # e.g. `fedjax-kd run | head -1`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0


def _compile_cache(args) -> None:
    """Turns on JAX's persistent compilation cache unless ``--no-compile-cache``."""
    if not args.no_compile_cache:
        from fedjax_kd import cache

        cache.enable()


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ErrorParser(
        prog="fedjax-kd",
        description="Federated learning + distillation in JAX.",
        default_usage=USAGE,
    )
    parser.add_argument(
        "--version", action="version", version=f"fedjax-kd {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(
        dest="command", parser_class=functools.partial(ErrorParser, default_usage=USAGE)
    )
    run_p = sub.add_parser("run", help="run a federated simulation", usage=USAGE)
    run_p.add_argument("--config", help="Python file with get_config() (default: embedded)")
    run_p.add_argument(
        "--workdir",
        help="write config.json, metrics.jsonl, summary.json and checkpoints/ here; "
        "a rerun resumes from the last checkpoint",
    )
    again = run_p.add_mutually_exclusive_group()
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="start from scratch in a used --workdir (deletes its checkpoints and metrics)",
    )
    again.add_argument(
        "--resume",
        action="store_true",
        help="resume the --workdir's checkpoint even though its config.json differs",
    )
    run_p.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (default: on, in "
        "~/.cache/fedjax_kd/jax or $FEDJAX_KD_CACHE_DIR; see fedjax_kd/cache.py)",
    )
    hosts = run_p.add_argument_group(
        "multi-host", "one process per host; every process runs the same command"
    )
    hosts.add_argument(
        "--coordinator",
        default=os.environ.get("FEDJAX_KD_COORDINATOR"),
        help="address HOST:PORT of process 0 (env FEDJAX_KD_COORDINATOR)",
    )
    hosts.add_argument(
        "--num-processes",
        type=int,
        default=_env_int("FEDJAX_KD_NUM_PROCESSES"),
        help="number of processes (env FEDJAX_KD_NUM_PROCESSES)",
    )
    hosts.add_argument(
        "--process-id",
        type=int,
        default=_env_int("FEDJAX_KD_PROCESS_ID"),
        help="this process's id in [0, N) (env FEDJAX_KD_PROCESS_ID)",
    )
    sub.add_parser(
        "list",
        help="the algorithms (with their config keys), models and datasets",
        usage=("fedjax-kd list"),
    )
    from fedjax_kd.bench import options as bench_options  # light: no JAX until a run

    bench_p = sub.add_parser(
        "bench", help="vmap round vs per-client loop vs centralized", usage=bench_options.USAGE
    )
    bench_options.add_arguments(bench_p)
    from fedjax_kd import report, sweep  # light: JAX/matplotlib are imported when they run

    sweep_p = sub.add_parser("sweep", help="run a grid of configs x seeds", usage=sweep.USAGE)
    sweep.add_arguments(sweep_p)
    report_p = sub.add_parser(
        "report", help="table and plots over run directories", usage=report.USAGE
    )
    report.add_arguments(report_p)
    try:
        overrides, rest = _split_overrides(argv)
        args = parser.parse_args(rest)
    except SystemExit as e:  # argument mistakes (code 2) and --help (code 0)
        return int(e.code or 0)
    if args.command is None:
        return fail(f"missing command (usage: {USAGE} | fedjax-kd list|bench|sweep|report ...)")
    empty = empty_path_flag(args, ("config", "workdir", "out", "json"))
    if empty:
        return fail(f"{empty}: the path is empty; give a path")
    if args.command == "report" and not all(d.strip() for d in args.dirs):
        return fail("report: a DIR is empty; give the run directories")
    if args.command == "list":
        if overrides:
            return fail("list takes no --config.KEY overrides")
        from fedjax_kd import experiment

        print(experiment.describe_components())
        return 0
    if args.command == "sweep":
        args.overrides = overrides
        _compile_cache(args)
        return sweep.run(args)
    if args.command in ("report", "bench"):
        if overrides:
            return fail(f"{args.command} takes no --config.KEY overrides")
        if args.command == "report":
            return report.run(args)
        from fedjax_kd.bench import cli as bench_cli

        return bench_cli.run(args)

    if args.coordinator or args.num_processes or args.process_id is not None:
        if not (args.coordinator and args.num_processes and args.process_id is not None):
            return fail("multi-host runs need --coordinator, --num-processes and --process-id")
        if not 0 <= args.process_id < args.num_processes:
            return fail(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
        _initialize_hosts(args.coordinator, args.num_processes, args.process_id)

    _compile_cache(args)
    # Imported late so `fedjax-kd --help` and argument errors need no JAX start-up.
    from fedjax_kd import experiment
    from fedjax_kd.simulate import NonFiniteError

    try:
        config = experiment.load_config_file(args.config) if args.config else None
        config = experiment.resolve(config, overrides)
        result = experiment.run(
            config,
            workdir=args.workdir,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            resume=args.resume,
        )
    except experiment.ConfigError as e:
        return fail(str(e))
    except NonFiniteError as e:
        return fail(str(e), code=1)
    except OverflowError as e:  # a step count past int32 (e.g. epochs x steps), met in tracing
        return fail(f"a config value is too large to compile: {e}; use smaller counts")
    except KeyboardInterrupt:
        return fail("interrupted", code=130)
    import jax

    if jax.process_index() != 0:
        return 0  # process 0 reports; every process holds the same results
    s = result.summary
    print(
        f"test_accuracy {s['test_accuracy']:.4f} after {s['rounds']} rounds; "
        f"wall {s['wall_s']:.1f} s (compile {s['compile_s']:.1f} s); "
        f"uplink {_human_bytes(s['uplink_bytes'])}, downlink {_human_bytes(s['downlink_bytes'])}"
    )
    print(json.dumps(s))
    if args.workdir:
        saved = "config.json, metrics.jsonl, summary.json"
        if jax.process_count() == 1:  # multi-host runs keep no checkpoints
            saved += ", checkpoints/"
        print(f"results in {args.workdir} ({saved})")
    else:
        print("nothing saved (no --workdir); pass --workdir DIR to keep metrics and checkpoints")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
