"""Dump every evaluation record of chosen sweep points, and compare two dumps bit for bit.

How a redesign shows "behaviour unchanged": run the same points with the code
before and after (e.g. ``git worktree add /tmp/before <commit>``, then run
this script from outside the repository with ``PYTHONPATH=/tmp/before``) and
compare. Points come from a config file's ``get_sweep`` (the KD benchmark's by
default), filtered by ``KEY=VALUE`` selectors; each runs in this process
without a workdir. Wall times are left out: they are the only numbers that
may differ.

Usage::

    python experiments/histories.py dump OUT.json \\
        [algorithm.name=fedavg data.name=digits data.alpha=0.1 ...] [--config FILE] [--seeds 0]
    python experiments/histories.py compare BEFORE.json AFTER.json

``compare`` prints one line per point (``identical`` or the first differing
round and keys) and a JSON summary; it exits 1 when any point differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "kd_benchmark.py"


def dump(args) -> int:
    """Runs the selected points and writes ``{point name: [records]}`` to ``args.out``."""
    from fedjax_kd import experiment, sweep

    wanted = dict(s.split("=", 1) for s in args.select)
    base = experiment.load_config_file(str(args.config))
    plan = sweep.load_sweep_file(str(args.config)) or {"grid": None}
    points = sweep.expand_grid(plan["grid"])
    selected = [p for p in points if all(dict(p).get(k, v) == v for k, v in wanted.items())]
    if not selected:
        print(f"error: no point of {args.config} matches {wanted}", file=sys.stderr)
        return 2
    out = {}
    for overrides in selected:
        for seed in args.seeds:
            config = experiment.resolve(base, [*overrides, ("seed", str(seed))])
            result = experiment.run(config, progress=False)
            name = "__".join(f"{k}-{v}" for k, v in overrides) + f"__seed{seed}"
            out[name] = [{k: v for k, v in r.items() if "wall" not in k} for r in result.history]
            last = result.history[-1]
            print(f"{name}: test_accuracy {last['test_accuracy']:.6f}", file=sys.stderr)
    Path(args.out).write_text(json.dumps(out, sort_keys=True, indent=1) + "\n")
    return 0


def compare(args) -> int:
    """Compares two dumps point by point; exit 1 when any point differs."""
    a = json.loads(Path(args.before).read_text())
    b = json.loads(Path(args.after).read_text())
    differ = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            differ.append(name)
            print(f"{name}: only in {'after' if name not in a else 'before'}")
            continue
        first = next(
            (
                (x["round"], sorted(k for k in x if x[k] != y.get(k)))
                for x, y in zip(a[name], b[name], strict=False)
                if x != y
            ),
            None,
        )
        if first is None and len(a[name]) == len(b[name]):
            print(f"{name}: identical ({len(a[name])} records)")
        else:
            differ.append(name)
            print(f"{name}: differs at {first}")
    print(json.dumps({"points": len(set(a) | set(b)), "differ": differ}))
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    """``dump`` or ``compare``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out")
    d.add_argument("--config", default=DEFAULT_CONFIG, type=Path)
    d.add_argument("--seeds", default="0", type=lambda s: [int(x) for x in s.split(",")])
    d.add_argument("select", nargs="*", help="KEY=VALUE: keep the points with this value")
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    args = p.parse_args(argv)
    return dump(args) if args.command == "dump" else compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
