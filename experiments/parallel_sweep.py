"""8 seeds as one parallel sweep vs 8 sequential runs: wall-clock ratio (issue 13, item 3).

Each repetition runs, in fresh processes and each with an empty compilation
cache directory (what a user's first sweep meets):

* ``fedjax-kd sweep --seeds 0,...,7 --parallel 8`` (one program, a vmap axis);
* ``fedjax-kd sweep --seeds 0,...,7`` (one run after another, in one process).

for the default config and for teacher_student (any ``--config.KEY=VALUE``
after ``--`` replaces those). The two orders alternate between repetitions.
It then compares the two sweeps' records point by point: identical
accuracies, and the largest difference of the test losses. Prints JSON (and
writes it with ``--json``).

Usage::

    python experiments/parallel_sweep.py [--reps 3] [--seeds 8] [--json OUT]
    python experiments/parallel_sweep.py -- --config.algorithm.name=fedprox
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "default": [],
    "teacher_student": [
        "--config.algorithm.name=teacher_student",
        "--config.data.proxy_fraction=0.1",
    ],
}


def _sweep(workdir: Path, seeds: int, parallel: int, overrides: list[str], cache: Path) -> float:
    """Wall seconds of one ``fedjax-kd sweep`` process."""
    command = [
        sys.executable, "-m", "fedjax_kd", "sweep", "--workdir", str(workdir), "--no-progress",
        "--seeds", ",".join(map(str, range(seeds))), "--parallel", str(parallel), *overrides,
    ]  # fmt: skip
    env = {**os.environ, "FEDJAX_KD_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def _compare(a: Path, b: Path) -> dict:
    """How the records of two sweeps of the same points differ."""
    same_accuracy = records = 0
    loss_diff = 0.0
    for metrics in sorted(a.glob("*/seed*/metrics.jsonl")):
        other = b / metrics.relative_to(a)
        ra = [json.loads(line) for line in metrics.read_text().splitlines()]
        rb = [json.loads(line) for line in other.read_text().splitlines()]
        for x, y in zip(ra, rb, strict=True):
            records += 1
            same_accuracy += x["test_accuracy"] == y["test_accuracy"]
            loss_diff = max(loss_diff, abs(x["test_loss"] - y["test_loss"]))
    return {"records": records, "same_accuracy": same_accuracy, "max_test_loss_diff": loss_diff}


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison and prints the JSON result."""
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else None
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(own)
    configs = {"custom": extra} if extra is not None else CONFIGS
    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "seeds": args.seeds,
        "reps": args.reps,
        "configs": {},
    }
    for name, overrides in configs.items():
        times = {"parallel": [], "sequential": []}
        comparison = None
        for rep in range(args.reps):
            order = ["parallel", "sequential"] if rep % 2 == 0 else ["sequential", "parallel"]
            root = Path(tempfile.mkdtemp(prefix="parallel_sweep_"))
            try:
                for how in order:
                    cache = root / f"cache_{how}"
                    parallel = args.seeds if how == "parallel" else 1
                    seconds = _sweep(root / how, args.seeds, parallel, overrides, cache)
                    times[how].append(round(seconds, 3))
                comparison = _compare(root / "parallel", root / "sequential")
            finally:
                shutil.rmtree(root, ignore_errors=True)
            print(f"{name} rep {rep}: {times}", file=sys.stderr, flush=True)
        par, seq = statistics.median(times["parallel"]), statistics.median(times["sequential"])
        out["configs"][name] = {
            "overrides": overrides,
            "parallel_s": times["parallel"],
            "sequential_s": times["sequential"],
            "median_parallel_s": par,
            "median_sequential_s": seq,
            "ratio": round(seq / par, 2),
            "records": comparison,
        }
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
