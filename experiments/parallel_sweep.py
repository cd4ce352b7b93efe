"""8 seeds as one parallel sweep vs 8 sequential runs: wall-clock ratio (issue 13, item 3).

Each repetition runs, in fresh processes and each with an empty compilation
cache directory (what a user's first sweep meets):

* ``parallel``: ``fedjax-kd sweep --seeds 0,...,7 --parallel 8`` (one program);
* ``sequential``: ``fedjax-kd sweep --seeds 0,...,7`` (one run after another,
  in one process, sharing one compilation cache);
* ``processes``: ``fedjax-kd run --config.seed=k`` for k = 0..7, one process
  each, sharing one compilation cache (a shell loop).

for the default config, for teacher_student, and for the default config with
two client learning rates x 4 seeds (hyperparameters as arguments of one
program; any ``--config.KEY=VALUE`` after ``--`` replaces the three). The
order of the three ways rotates between repetitions. It then compares the
parallel and sequential sweeps' records point by point: identical
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

#: name -> (overrides, grid): the grid's points times the seeds are the sweep.
CONFIGS = {
    "default": ([], None),
    "teacher_student": (
        ["--config.algorithm.name=teacher_student", "--config.data.proxy_fraction=0.1"],
        None,
    ),
    # Hyperparameters as arguments: two learning rates share the program too.
    "default_lr_grid": ([], ("client.lr", ["0.1", "0.05"])),
}


def _sweep(workdir: Path, seeds: int, parallel: int, overrides, grid, cache: Path) -> float:
    """Wall seconds of one ``fedjax-kd sweep`` process."""
    command = [
        sys.executable, "-m", "fedjax_kd", "sweep", "--workdir", str(workdir), "--no-progress",
        "--seeds", ",".join(map(str, range(seeds))), "--parallel", str(parallel), *overrides,
    ]  # fmt: skip
    if grid is not None:
        command += ["--grid", f"{grid[0]}={','.join(grid[1])}"]
    env = {**os.environ, "FEDJAX_KD_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def _processes(workdir: Path, seeds: int, overrides, grid, cache: Path) -> float:
    """Wall seconds of one ``fedjax-kd run`` process per point, one after another."""
    env = {**os.environ, "FEDJAX_KD_CACHE_DIR": str(cache)}
    values = [None] if grid is None else grid[1]
    start = time.perf_counter()
    for value, seed in [(v, s) for v in values for s in range(seeds)]:
        point = [] if value is None else [f"--config.{grid[0]}={value}"]
        command = [sys.executable, "-m", "fedjax_kd", "run", "--no-progress", "--workdir",
                   str(workdir / f"{value}_seed{seed}"), f"--config.seed={seed}", *overrides,
                   *point]  # fmt: skip
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
    configs = {"custom": (extra, None)} if extra is not None else CONFIGS
    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "seeds": args.seeds,
        "reps": args.reps,
        "configs": {},
    }
    for name, (overrides, grid) in configs.items():
        seeds = args.seeds if grid is None else max(1, args.seeds // len(grid[1]))
        points = seeds * (1 if grid is None else len(grid[1]))
        ways = ["parallel", "sequential", "processes"]
        times = {how: [] for how in ways}
        comparison = None
        for rep in range(args.reps):
            order = ways[rep % 3 :] + ways[: rep % 3]
            root = Path(tempfile.mkdtemp(prefix="parallel_sweep_"))
            try:
                for how in order:
                    cache = root / f"cache_{how}"
                    if how == "processes":
                        seconds = _processes(root / how, seeds, overrides, grid, cache)
                    else:
                        parallel = points if how == "parallel" else 1
                        seconds = _sweep(root / how, seeds, parallel, overrides, grid, cache)
                    times[how].append(round(seconds, 3))
                comparison = _compare(root / "parallel", root / "sequential")
            finally:
                shutil.rmtree(root, ignore_errors=True)
            print(f"{name} rep {rep}: {times}", file=sys.stderr, flush=True)
        medians = {how: statistics.median(times[how]) for how in ways}
        out["configs"][name] = {
            "overrides": overrides,
            "grid": grid,
            "seeds": seeds,
            "points": points,
            **{f"{how}_s": times[how] for how in ways},
            **{f"median_{how}_s": medians[how] for how in ways},
            "ratio_sequential_over_parallel": round(medians["sequential"] / medians["parallel"], 2),
            "ratio_processes_over_parallel": round(medians["processes"] / medians["parallel"], 2),
            "records_parallel_vs_sequential": comparison,
        }
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
