"""Accuracy against epsilon: one table and one plot from a sweep of private runs.

Reads every finished run under the given directories (``config.json`` and
``summary.json``, as ``fedjax-kd sweep`` writes them), groups the runs by
dataset, algorithm and noise multiplier (non-private runs, ``dp.clip_norm``
and ``dp.output_clip_norm`` both 0, form their own group per dataset and
algorithm), and writes to ``--out``:

* ``tradeoff.json``: per group the seeds, the final ``test_accuracy`` (mean
  and sample std over seeds) and the final ``dp_epsilon`` (the same for every
  seed of a group: it depends on the sampling and the noise, not the data);
* ``tradeoff.md``: the same as a table;
* ``accuracy_vs_epsilon.png``: one panel per dataset, accuracy against
  epsilon (log scale) per algorithm, the non-private accuracy as a dashed
  line.

The JSON also goes to stdout. Usage::

    python experiments/privacy_tradeoff.py runs/private_digits runs/private_mnist1d \\
        --out experiments/results/private_distill
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def load(dirs: list[str]) -> list[dict]:
    """``{"data", "algorithm", "z", "private", "seed", "accuracy", "epsilon"}`` per finished run."""
    from fedjax_kd import report_runs

    runs = []
    for path in report_runs.find_runs(dirs):
        summary_file = path / "summary.json"
        if not summary_file.is_file():
            continue
        config = json.loads((path / "config.json").read_text())
        summary = json.loads(summary_file.read_text())
        dp = config.get("dp", {})
        private = dp.get("clip_norm", 0) > 0 or dp.get("output_clip_norm", 0) > 0
        runs.append(
            {
                "data": config["data"]["name"],
                "algorithm": config["algorithm"]["name"],
                "z": dp.get("noise_multiplier") if private else None,
                "private": private,
                "seed": config["seed"],
                "accuracy": summary["test_accuracy"],
                "epsilon": summary.get("dp_epsilon"),
            }
        )
    return runs


def group(runs: list[dict]) -> list[dict]:
    """One row per (dataset, algorithm, noise multiplier), sorted; non-private rows last."""
    groups = defaultdict(list)
    for r in runs:
        groups[(r["data"], r["algorithm"], r["private"], r["z"])].append(r)
    rows = []
    for (data, algorithm, private, z), members in groups.items():
        accuracies = [m["accuracy"] for m in members]
        epsilons = {m["epsilon"] for m in members}
        rows.append(
            {
                "data": data,
                "algorithm": algorithm,
                "private": private,
                "noise_multiplier": z,
                "seeds": sorted(m["seed"] for m in members),
                "accuracy_mean": statistics.fmean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
                "epsilon": epsilons.pop() if len(epsilons) == 1 else sorted(epsilons, key=str),
            }
        )
    rows.sort(
        key=lambda r: (r["data"], r["algorithm"], not r["private"], -(r["noise_multiplier"] or 0))
    )
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| data | algorithm | noise multiplier z | epsilon (delta 1e-5) | seeds "
        "| final test_accuracy (mean ± sample std) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        eps = r["epsilon"]
        eps_text = (
            "non-private"
            if not r["private"]
            else (f"{eps:.3g}" if isinstance(eps, float) else str(eps))
        )
        std = "n/a" if r["accuracy_std"] is None else f"{r['accuracy_std']:.4f}"
        z = "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:g}"
        lines.append(
            f"| {r['data']} | {r['algorithm']} | {z} | {eps_text} | {len(r['seeds'])} | "
            f"{r['accuracy_mean']:.4f} ± {std} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """One panel per dataset: accuracy against epsilon per algorithm (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["data"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, data in zip(axes[0], datasets, strict=True):
        mine = [r for r in rows if r["data"] == data]
        for i, algorithm in enumerate(sorted({r["algorithm"] for r in mine})):
            color = f"C{i}"
            points = sorted(
                (r["epsilon"], r["accuracy_mean"], r["accuracy_std"] or 0.0)
                for r in mine
                if r["algorithm"] == algorithm and r["private"] and isinstance(r["epsilon"], float)
            )
            if points:
                xs, ys, es = zip(*points, strict=True)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=color, label=algorithm)
            for r in mine:
                if r["algorithm"] == algorithm and not r["private"]:
                    ax.axhline(r["accuracy_mean"], color=color, linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("epsilon at delta 1e-5 (log scale)")
        ax.set_ylabel("final test accuracy")
        ax.set_title(f"{data} (dashed: non-private)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Writes the table, the JSON and the plot; prints the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="sweep directories (searched recursively)")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    runs = load(args.dirs)
    if not runs:
        print(f"error: no finished run under {' '.join(args.dirs)}", file=sys.stderr)
        return 2
    rows = group(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"runs": len(runs), "groups": rows}, indent=2)
    (out / "tradeoff.json").write_text(text + "\n")
    (out / "tradeoff.md").write_text(table(rows))
    plot(rows, out / "accuracy_vs_epsilon.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
