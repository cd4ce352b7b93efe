"""Peak memory of a 20,000-user Synthetic run against its arrays' size (issue 13, item 5).

Runs, each in a fresh process, ``fedjax-kd run`` on Synthetic(1, 1) with
20,000 users (about 7.8 M training examples, stored ragged), 2 rounds,
``client_chunk_size`` 1000, for each ``--clients`` value, and reads the
process's peak RSS (``getrusage(RUSAGE_CHILDREN)``). A separate process
builds the same dataset and sums its arrays' bytes (training, test). With
``--before TREE`` (another checkout, e.g. ``git worktree add /tmp/before
<commit>``) it runs the same commands with that tree first on the path and
checks that both print the same summary (wall and compile times aside).
Prints JSON.

Usage::

    python experiments/population_memory.py [--clients 1000,10000] [--before /tmp/before]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
FLAGS = [
    "--config.data.name=synthetic",
    "--config.data.num_clients=20000",
    "--config.rounds=2",
    "--config.eval_every=2",
    "--config.client_chunk_size=1000",
]

ARRAY_BYTES = """
import jax, json
from fedjax_kd import experiment
config = experiment.resolve(overrides=[(f.split("=")[0][9:], f.split("=")[1]) for f in {flags!r}])
d = experiment.build_dataset(config)
train = sum(a.nbytes for a in jax.tree.leaves(d.train))
print(json.dumps(train + d.test_x.nbytes + d.test_y.nbytes))
"""


def _peak_run(tree: Path, clients: int) -> tuple[int, dict]:
    """Peak RSS bytes of one ``fedjax-kd run`` and its summary (times removed)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "FEDJAX_KD_CACHE_DIR": "off"}
    script = (
        "import resource, subprocess, sys\n"
        "out = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True).stdout\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "print(next(line for line in out.splitlines() if line.startswith('{')))\n"
    )
    command = [sys.executable, "-c", script, sys.executable, "-m", "fedjax_kd", "run",
               "--no-progress", f"--config.clients_per_round={clients}", *FLAGS]  # fmt: skip
    lines = subprocess.run(command, env=env, cwd=tempfile.gettempdir(), capture_output=True,
                           text=True, check=True).stdout.splitlines()  # fmt: skip
    summary = json.loads(lines[1])
    for key in ("wall_s", "compile_s"):
        summary.pop(key, None)
    return int(lines[0]) * 1024, summary


def main(argv: list[str] | None = None) -> int:
    """Measures and prints the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1000,10000")
    p.add_argument("--before", type=Path)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    arrays = int(
        subprocess.run(
            [sys.executable, "-c", ARRAY_BYTES.format(flags=FLAGS)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
    )
    out = {"array_bytes": arrays, "runs": []}
    for clients in [int(c) for c in args.clients.split(",")]:
        row = {"clients_per_round": clients}
        trees = {"after": HERE}
        if args.before is not None:
            trees = {"before": args.before, **trees}
        summaries = {}
        for name, tree in trees.items():
            peak, summaries[name] = _peak_run(tree, clients)
            row[f"peak_bytes_{name}"] = peak
            row[f"peak_over_arrays_{name}"] = round(peak / arrays, 3)
        if args.before is not None:
            row["same_summary"] = summaries["before"] == summaries["after"]
        row["summary"] = summaries["after"]
        out["runs"].append(row)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
