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
NUM_FEATURES = 60  # of the default input, features:60 (FedProx's Synthetic-IID)
NUM_CLASSES = 10  # of features:N and image:HxWxC inputs (tokens:T:V has V)
DEFAULT_INPUT = f"features:{NUM_FEATURES}"
INPUT_KINDS = ("features", "image", "tokens")
INPUT_SYNTAX = (
    "features:N, image:HxWxC or tokens:T:V (e.g. features:60, image:32x32x3, tokens:80:81)"
)
PROBE_CLIENTS = 32
AUTO_BURST_S = 0.02  # default burst: at least this long for the fastest method
MAX_AUTO_BURST = 10
USAGE = (
    "fedjax-kd bench [--clients 10,100,1000,10000] [--json PATH] "
    "[--algorithms fedavg,teacher_student] [--reps 5] [--examples-per-client 64] "
    "[--max-loop-seconds S] [--batch-size 32] [--epochs 1] [--lr 0.05] "
    "[--input features:60|image:HxWxC|tokens:T:V] [--student mlp-64] [--teacher mlp-256-256] "
    "[--dtype f32[,bf16]] [--donate] "
    "[--chunk-size C] [--compare-chunk C] [--burst B] [--seed 0]"
)


class BenchError(ValueError):
    """A user mistake in the benchmark's settings (reported as one ``error:`` line)."""


@dataclass(frozen=True)
class BenchInput:
    """What one example of the synthetic cohort is (``--input``, see :func:`parse_input`).

    Attributes:
      text: the canonical ``--input`` value, e.g. ``image:32x32x3``.
      kind: ``features`` (float32 Synthetic-IID features), ``image`` (uint8
        pixels) or ``tokens`` (int32 token ids, next-token labels).
      shape: one example's shape: ``(N,)``, ``(H, W, C)`` or ``(T,)``.
      num_classes: 10 for features and images, the vocabulary V for tokens.
      dtype: the stored dtype of ``x``: ``float32``, ``uint8`` or ``int32``.
    """

    text: str
    kind: str
    shape: tuple[int, ...]
    num_classes: int
    dtype: str

    @property
    def model_inputs(self) -> str:
        """The ``ModelSpec.inputs`` a model needs to take it: ``features`` or ``tokens``."""
        return "tokens" if self.kind == "tokens" else "features"

    def describe(self) -> str:
        """One phrase for messages and the table, e.g. ``uint8 pixels [32, 32, 3], 10 classes``."""
        what = {"features": "float32 features", "image": "uint8 pixels", "tokens": "int32 tokens"}
        classes = f"vocabulary {self.num_classes}" if self.kind == "tokens" else "10 classes"
        return f"{what[self.kind]} {list(self.shape)}, {classes}"


def _sizes(text: str, sep: str) -> tuple[int, ...] | None:
    """Positive integers separated by ``sep``, or None if any part is not one."""
    parts = text.split(sep)
    if not all(p.isascii() and p.isdigit() for p in parts):
        return None
    values = tuple(int(p) for p in parts)
    return values if min(values) >= 1 else None


def parse_input(text: str) -> BenchInput:
    """The ``--input`` value as a :class:`BenchInput`; :class:`BenchError` naming the mistake.

    * ``features:N``: N float32 features of FedProx's Synthetic-IID (10 classes);
      ``features:60`` is the default and the benchmark's original workload.
    * ``image:HxWxC``: uint8 pixels (10 classes), e.g. ``image:32x32x3`` (CIFAR).
    * ``tokens:T:V``: T int32 token ids in ``[0, V)`` and the next token as the
      label (V classes), e.g. ``tokens:80:81`` (Shakespeare).
    """
    kind, colon, rest = str(text).strip().partition(":")
    if kind not in INPUT_KINDS:
        raise BenchError(
            f"--input: unknown input kind {kind!r} in {text!r}; expected {INPUT_SYNTAX}"
        )
    if not colon:
        raise BenchError(f"--input {text}: give the shape after a colon; expected {INPUT_SYNTAX}")
    if kind == "features":
        sizes = _sizes(rest, "x")
        if sizes is None or len(sizes) != 1:
            raise BenchError(
                f"--input {text}: expected features:N with a positive integer N, e.g. features:60"
            )
        return BenchInput(f"features:{sizes[0]}", kind, sizes, NUM_CLASSES, "float32")
    if kind == "image":
        sizes = _sizes(rest, "x")
        if sizes is None or len(sizes) != 3:
            raise BenchError(
                f"--input {text}: expected image:HxWxC with positive integers H, W and C "
                "(height, width, channels), e.g. image:32x32x3"
            )
        return BenchInput("image:" + "x".join(map(str, sizes)), kind, sizes, NUM_CLASSES, "uint8")
    sizes = _sizes(rest, ":")
    if sizes is None or len(sizes) != 2 or sizes[1] < 2:
        raise BenchError(
            f"--input {text}: expected tokens:T:V with a sequence length T >= 1 and a "
            "vocabulary V >= 2, e.g. tokens:80:81"
        )
    length, vocab = sizes
    return BenchInput(f"tokens:{length}:{vocab}", kind, (length,), vocab, "int32")


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
    input: str = DEFAULT_INPUT
    max_loop_seconds: float | None = None
    dtypes: tuple[str, ...] = ("f32",)
    donate: bool = False
    chunk_size: int | None = None
    compare_chunk: int | None = None
    burst: int | None = None
    seed: int = 0

    @property
    def bench_input(self) -> BenchInput:
        """The parsed ``input`` (:class:`BenchError` if it is malformed)."""
        return parse_input(self.input)

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
        bench_input = self.bench_input
        from fedjax_kd.bench.workload import check_model  # builds the models: imports JAX

        for flag, name in (("--student", self.student), ("--teacher", self.teacher)):
            check_model(name, bench_input, flag=flag)


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
    parser.add_argument(
        "--input",
        metavar="KIND",
        default=d.input,
        help="the synthetic examples: features:N (Synthetic-IID, default features:60), "
        "image:HxWxC (uint8 pixels, 10 classes; e.g. image:32x32x3) or tokens:T:V "
        "(int32 tokens, next-token labels; e.g. tokens:80:81)",
    )
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
