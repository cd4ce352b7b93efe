"""``fedjax-kd bench`` and ``python -m fedjax_kd.bench``: options in, table and JSON out."""

from __future__ import annotations

import argparse
import json
import sys

from fedjax_kd.bench.options import (
    USAGE,
    BenchConfig,
    BenchError,
    add_arguments,
)
from fedjax_kd.bench.table import format_table
from fedjax_kd.bench.timing import run_benchmark
from fedjax_kd.cli_util import ErrorParser, fail, output_file_error
from fedjax_kd.workdir import write_atomic

# --------------------------------------------------------------------------- CLI


def run(args: argparse.Namespace) -> int:
    """Runs ``fedjax-kd bench`` with parsed ``args``; returns the exit code."""
    config = BenchConfig(
        clients=tuple(args.clients),
        algorithms=tuple(args.algorithms),
        reps=args.reps,
        examples_per_client=args.examples_per_client,
        batch_size=args.batch_size,
        epochs=args.epochs,
        lr=args.lr,
        student=args.student,
        teacher=args.teacher,
        input=args.input,
        max_loop_seconds=args.max_loop_seconds,
        dtypes=tuple(args.dtype),
        donate=args.donate,
        chunk_size=args.chunk_size,
        compare_chunk=args.compare_chunk,
        burst=args.burst,
        seed=args.seed,
    )
    try:
        config.validate()
    except BenchError as e:
        return fail(str(e))
    if args.json is not None:
        problem = output_file_error(args.json, "--json")
        if problem:
            return fail(problem)
    try:
        rows = run_benchmark(config)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(format_table(rows))
    if args.json:
        try:  # atomically: a failed write leaves an earlier file as it was
            write_atomic(args.json, json.dumps(rows, indent=1) + "\n")
        except OSError as e:  # checked at the start; the disk can still fill up
            return fail(f"--json {args.json}: cannot write there ({e.strerror or e})", code=1)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m fedjax_kd.bench [options]``."""
    parser = ErrorParser(prog="fedjax-kd bench", usage=USAGE, description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argument mistakes (2) and --help (0)
        return int(e.code or 0)
    return run(args)
