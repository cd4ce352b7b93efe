"""Knob check: rounds inside one compiled loop (``rounds_per_call``) vs one round per call.

Runs the embedded default (digits, FedAvg, 100 rounds) with
``rounds_per_call`` 1 and 10, interleaved ``--reps`` times in one process, and
prints JSON with the median seconds of the rounds themselves (wall minus
compile) and their ratio. Usage::

    python experiments/rounds_per_call.py --reps 5
"""

import argparse
import json
import statistics

from fedjax_kd import experiment


def main() -> None:
    """Interleaves the two settings and prints one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--block", type=int, default=10)
    args = parser.parse_args()
    times = {1: [], args.block: []}
    accuracy = {}
    for _ in range(args.reps):
        for n in times:
            cfg = experiment.resolve(overrides=[("rounds_per_call", str(n))])
            s = experiment.run(cfg, progress=False).summary
            times[n].append(s["wall_s"] - s["compile_s"])
            accuracy[n] = s["test_accuracy"]
    med = {n: statistics.median(t) for n, t in times.items()}
    print(
        json.dumps(
            {
                "rounds": 100,
                "median_round_seconds": {str(n): round(v, 4) for n, v in med.items()},
                "speedup_block_vs_1": round(med[1] / med[args.block], 3),
                "test_accuracy": {str(n): a for n, a in accuracy.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
