"""The settings and command-line options of ``fedjax-kd bench``, without JAX.

``fedjax-kd --help`` builds the bench subcommand's parser from this module, so
it imports only the standard library; :mod:`fedjax_kd.bench` re-exports these
names.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ALGORITHMS = ("fedavg", "teacher_student")
METHODS = ("vmap", "loop", "central")
DTYPES = ("f32", "bf16")
DEFAULT_CLIENTS = (10, 100, 1000, 10000)
NUM_FEATURES = 60
NUM_CLASSES = 10
PROBE_CLIENTS = 32
AUTO_BURST_S = 0.02  # default burst: at least this long for the fastest method
MAX_AUTO_BURST = 10
USAGE = (
    "fedjax-kd bench [--clients 10,100,1000,10000] [--json PATH] "
    "[--algorithms fedavg,teacher_student] [--reps 5] [--examples-per-client 64] "
    "[--max-loop-seconds S] [--batch-size 32] [--epochs 1] [--lr 0.05] "
    "[--student mlp-64] [--teacher mlp-256-256] [--dtype f32[,bf16]] [--donate] "
    "[--chunk-size C] [--compare-chunk C] [--burst B] [--seed 0]"
)


class BenchError(ValueError):
    """A user mistake in the benchmark's settings (reported as one ``error:`` line)."""


@dataclass(frozen=True)
class BenchConfig:
    """Settings of one benchmark run (see the module docstring)."""

    clients: tuple[int, ...] = DEFAULT_CLIENTS
    algorithms: tuple[str, ...] = ALGORITHMS
    reps: int = 5
    examples_per_client: int = 64
    batch_size: int = 32
    epochs: int = 1
    lr: float = 0.05
    student: str = "mlp-64"
    teacher: str = "mlp-256-256"
    max_loop_seconds: float | None = None
    dtypes: tuple[str, ...] = ("f32",)
    donate: bool = False
    chunk_size: int | None = None
    compare_chunk: int | None = None
    burst: int | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raises :class:`BenchError` naming the first bad setting."""
        if not self.clients or min(self.clients) < 1:
            raise BenchError("--clients needs positive integers, e.g. 10,100,1000")
        if not self.algorithms:
            raise BenchError(f"--algorithms needs at least one of {', '.join(ALGORITHMS)}")
        for name in self.algorithms:
            if name not in ALGORITHMS:
                raise BenchError(
                    f"--algorithms: unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}"
                )
        for name in self.dtypes:
            if name not in DTYPES:
                raise BenchError(f"--dtype: unknown dtype {name!r}; choose from f32, bf16")
        if self.reps < 1:
            raise BenchError(f"--reps must be >= 1, got {self.reps}")
        if self.batch_size < 1 or self.epochs < 1:
            raise BenchError("--batch-size and --epochs must be >= 1")
        if self.examples_per_client < 1 or self.examples_per_client % self.batch_size:
            raise BenchError(
                f"--examples-per-client ({self.examples_per_client}) must be a positive "
                f"multiple of --batch-size ({self.batch_size}), so that clients and central "
                "training run the same minibatches"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise BenchError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise BenchError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.burst is not None and self.burst < 1:
            raise BenchError(f"--burst must be >= 1, got {self.burst}")
        if self.compare_chunk is not None and self.compare_chunk < 1:
            raise BenchError(f"--compare-chunk must be >= 1, got {self.compare_chunk}")
        if self.max_loop_seconds is not None and not self.max_loop_seconds > 0:
            raise BenchError(f"--max-loop-seconds must be > 0, got {self.max_loop_seconds}")
        from fedjax_kd.bench.workload import forward_flops  # the models' names; imports JAX

        for flag, name in (("--student", self.student), ("--teacher", self.teacher)):
            forward_flops(name, NUM_FEATURES, NUM_CLASSES, flag=flag)


# --------------------------------------------------------------------------- CLI


def _positive_int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in names if v not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, bad)) or 'value ' + repr(text)}; "
                f"choose from {', '.join(choices)}"
            )
        return names

    return parse


def _number(kind, *, minimum, strict: bool):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = value <= minimum if strict else value < minimum
        if bad or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {minimum}, got {text!r}"
            )
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``fedjax-kd bench`` options to ``parser`` (see :func:`run`)."""
    d = BenchConfig()
    parser.add_argument(
        "--clients",
        type=_positive_int_list,
        default=d.clients,
        help="cohort sizes K, comma-separated (default 10,100,1000,10000)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list here")
    parser.add_argument(
        "--algorithms",
        type=_name_list(ALGORITHMS),
        default=d.algorithms,
        help="comma-separated: fedavg,teacher_student (default both)",
    )
    parser.add_argument(
        "--reps",
        type=_number(int, minimum=1, strict=False),
        default=d.reps,
        help="timed rounds per method; the median is reported (default 5)",
    )
    parser.add_argument(
        "--examples-per-client",
        type=_number(int, minimum=1, strict=False),
        default=d.examples_per_client,
        help="examples per client n (default 64)",
    )
    parser.add_argument(
        "--max-loop-seconds",
        type=_number(float, minimum=0, strict=True),
        default=None,
        help="skip the per-client loop where its rounds would take longer than this",
    )
    parser.add_argument(
        "--batch-size", type=_number(int, minimum=1, strict=False), default=d.batch_size
    )
    parser.add_argument("--epochs", type=_number(int, minimum=1, strict=False), default=d.epochs)
    parser.add_argument("--lr", type=_number(float, minimum=0, strict=True), default=d.lr)
    parser.add_argument("--student", default=d.student, help="student model (default mlp-64)")
    parser.add_argument("--teacher", default=d.teacher, help="teacher model (default mlp-256-256)")
    parser.add_argument(
        "--dtype",
        type=_name_list(DTYPES),
        default=d.dtypes,
        help="compute dtypes, comma-separated: f32 (default), bf16",
    )
    parser.add_argument(
        "--donate", action="store_true", help="add a vmap row that donates the state's buffers"
    )
    parser.add_argument(
        "--chunk-size",
        type=_number(int, minimum=1, strict=False),
        default=None,
        help="vmap rows: train the cohort in chunks of this many clients (default: all at once)",
    )
    parser.add_argument(
        "--compare-chunk",
        type=_number(int, minimum=1, strict=False),
        default=None,
        help="add a vmap row chunked by this many clients beside the main one (same rotation)",
    )
    parser.add_argument(
        "--burst",
        type=_number(int, minimum=1, strict=False),
        default=None,
        help="consecutive rounds per method and repetition (default: auto, 1 to 10)",
    )
    parser.add_argument("--seed", type=_number(int, minimum=0, strict=False), default=d.seed)
