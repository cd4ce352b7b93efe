"""What the persistent compilation cache saves: compile_s of a cold, a warm and an uncached run.

Each repetition runs the same ``fedjax-kd run`` three times, each in a fresh
process: with an empty cache directory (cold: it compiles and fills the
cache), again with that directory (warm: it loads the executables), and with
the cache off. It prints one JSON object: every run's ``compile_s`` and
``wall_s`` (from its summary.json), the medians, and the ratio
warm / cold of the medians (issue 13's target: at most 0.2), so the three
kinds of run are compared side by side on the same noisy machine.

Usage::

    python experiments/compile_cache.py                      # the embedded default, 3 reps
    python experiments/compile_cache.py --reps 5 -- --config.algorithm.name=teacher_student
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def one_run(workdir: Path, cache_dir: str, overrides: list[str]) -> dict:
    """``fedjax-kd run`` in a fresh process; its summary.json."""
    env = {**os.environ, "FEDJAX_KD_CACHE_DIR": cache_dir}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "-m", "fedjax_kd.cli", "run", "--no-progress", "--workdir"]
    done = subprocess.run([*cmd, str(workdir), *overrides], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: the run failed: {done.stderr.strip()[-400:]}")
    return json.loads((workdir / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """Runs the repetitions and prints the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="repetitions of (cold, warm, off)")
    p.add_argument("overrides", nargs="*", help="--config.KEY=VALUE flags for every run")
    args = p.parse_args(argv)
    if args.reps < 1:
        print("error: --reps must be >= 1", file=sys.stderr)
        return 2
    runs = {"cold": [], "warm": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            cache_dir = Path(tmp) / f"cache{rep}"
            for kind, where in (("cold", str(cache_dir)), ("warm", str(cache_dir)), ("off", "off")):
                summary = one_run(Path(tmp) / f"{kind}{rep}", where, args.overrides)
                runs[kind].append({k: summary[k] for k in ("compile_s", "wall_s")})
                print(f"rep {rep} {kind}: compile_s {summary['compile_s']}", file=sys.stderr)
    medians = {k: statistics.median(r["compile_s"] for r in v) for k, v in runs.items()}
    result = {
        "overrides": args.overrides,
        "runs": runs,
        "median_compile_s": medians,
        "warm_over_cold": round(medians["warm"] / medians["cold"], 3),
        "off_over_cold": round(medians["off"] / medians["cold"], 3),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
