"""All federated (distillation) algorithms on digits and Synthetic under label skew.

Grid: algorithms x {digits, synthetic} x Dirichlet alpha in {0.1, 0.5, 100} x
seeds; settings in ``experiments/configs/kd_benchmark.py``. Writes to ``--out``:

* ``runs.jsonl``: one line per run (config overrides, summary, history);
* ``table.md``: final test accuracy mean ± std over seeds, cumulative uplink
  and downlink bytes, wall time (mean), per (dataset, alpha, algorithm);
* ``accuracy_vs_round.png`` and ``accuracy_vs_uplink.png``.

Usage::

    python experiments/kd_benchmark.py --out experiments/results/kd_benchmark
    python experiments/kd_benchmark.py --quick --out /tmp/kd  # 1 seed, 4 rounds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedjax_kd import experiment

HERE = Path(__file__).resolve().parent


def load_benchmark_config():
    """Imports experiments/configs/kd_benchmark.py (not a package)."""
    spec = importlib.util.spec_from_file_location(
        "kd_benchmark_config", HERE / "configs" / "kd_benchmark.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_grid(args) -> list[dict]:
    """Runs every (dataset, alpha, algorithm, seed) and returns one record each."""
    cfg_module = load_benchmark_config()
    records = []
    grid = [
        (ds, alpha, algo, seed)
        for ds in args.datasets
        for alpha in args.alphas
        for algo in args.algorithms
        for seed in range(args.seeds)
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "runs.jsonl").open("w") as f:
        for i, (ds, alpha, algo, seed) in enumerate(grid):
            overrides = {
                **cfg_module.DATASET_OVERRIDES[ds],
                **cfg_module.ALGORITHM_OVERRIDES[algo],
                "algorithm.name": algo,
                "data.alpha": alpha,
                "seed": seed,
            }
            if args.rounds:
                overrides["rounds"] = args.rounds
                overrides["eval_every"] = max(1, args.rounds // 2)
            config = experiment.resolve(
                cfg_module.get_config(), [(k, str(v)) for k, v in overrides.items()]
            )
            start = time.perf_counter()
            result = experiment.run(config, progress=False)
            record = {
                "dataset": ds,
                "alpha": alpha,
                "algorithm": algo,
                "seed": seed,
                "overrides": overrides,
                "summary": result.summary,
                "history": result.history,
                "process_s": round(time.perf_counter() - start, 2),
            }
            records.append(record)
            f.write(json.dumps(record) + "\n")
            f.flush()
            print(
                f"[{i + 1}/{len(grid)}] {ds} alpha={alpha} {algo} seed={seed}: "
                f"acc {result.summary['test_accuracy']:.4f} ({record['process_s']} s)",
                file=sys.stderr,
            )
    return records


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def write_table(records: list[dict], path: Path) -> str:
    """Markdown table of mean ± std final accuracy, bytes and time per cell."""
    cells = defaultdict(list)
    for r in records:
        cells[(r["dataset"], r["alpha"], r["algorithm"])].append(r)
    lines = [
        "| dataset | alpha | algorithm | test accuracy (mean ± std) | seeds "
        "| uplink MB | downlink MB | wall s | vs FedAvg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (ds, alpha, algo), runs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        acc = np.array([r["summary"]["test_accuracy"] for r in runs])
        base = cells.get((ds, alpha, "fedavg"))
        verdict = ""
        if base and algo != "fedavg":
            b = np.array([r["summary"]["test_accuracy"] for r in base])
            diff = acc.mean() - b.mean()
            noise = acc.std() + b.std()
            verdict = (
                f"better (+{diff:.3f})"
                if diff > noise
                else f"worse ({diff:.3f})"
                if -diff > noise
                else f"no clear difference ({diff:+.3f})"
            )
        s = runs[0]["summary"]
        lines.append(
            f"| {ds} | {alpha:g} | {algo} | {acc.mean():.4f} ± {acc.std():.4f} | {len(runs)} "
            f"| {_mb(s['uplink_bytes'])} | {_mb(s['downlink_bytes'])} "
            f"| {np.mean([r['summary']['wall_s'] for r in runs]):.1f} | {verdict} |"
        )
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_plots(records: list[dict], out: Path) -> None:
    """Accuracy vs round and vs cumulative uplink bytes, one panel per (dataset, alpha)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dataset"], r["alpha"]) for r in records})
    algos = sorted({r["algorithm"] for r in records})
    for x_key, fname, xlabel in (
        ("round", "accuracy_vs_round.png", "round"),
        ("cumulative_uplink_bytes", "accuracy_vs_uplink.png", "cumulative uplink bytes"),
    ):
        fig, axes = plt.subplots(
            1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False, sharey=True
        )
        for ax, (ds, alpha) in zip(axes[0], panels, strict=True):
            for algo in algos:
                runs = [
                    r for r in records
                    if (r["dataset"], r["alpha"], r["algorithm"]) == (ds, alpha, algo)
                ]  # fmt: skip
                if not runs:
                    continue
                xs = [h[x_key] for h in runs[0]["history"]]
                ys = np.mean([[h["test_accuracy"] for h in r["history"]] for r in runs], axis=0)
                ax.plot(xs, ys, marker=".", label=algo)
            ax.set_title(f"{ds}, alpha={alpha:g}")
            ax.set_xlabel(xlabel)
            if x_key != "round":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("test accuracy (mean over seeds)")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def main(argv=None) -> int:
    """Parses arguments, runs the grid, writes the table and the plots."""
    cfg_module = load_benchmark_config()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--algorithms", default=",".join(cfg_module.ALGORITHM_OVERRIDES))
    p.add_argument("--datasets", default="digits,synthetic")
    p.add_argument("--alphas", default="0.1,0.5,100")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=0, help="override rounds (0: config's)")
    p.add_argument("--quick", action="store_true", help="1 seed, 4 rounds, alpha 0.5")
    args = p.parse_args(argv)
    args.algorithms = args.algorithms.split(",")
    args.datasets = args.datasets.split(",")
    args.alphas = [float(a) for a in args.alphas.split(",")]
    unknown = set(args.algorithms) - set(cfg_module.ALGORITHM_OVERRIDES)
    if unknown:
        print(f"error: unknown algorithms {sorted(unknown)}", file=sys.stderr)
        return 2
    if args.quick:
        args.seeds, args.rounds, args.alphas = 1, 4, [0.5]
    records = run_grid(args)
    out = Path(args.out)
    print(write_table(records, out / "table.md"))
    write_plots(records, out)
    print(f"wrote {out}/runs.jsonl, table.md, accuracy_vs_round.png, accuracy_vs_uplink.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
