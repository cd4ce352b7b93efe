"""``fedjax-kd report``: a table and two plots over the run directories of sweeps and runs.

Command::

    fedjax-kd report DIR... --out OUTDIR [--metric test_accuracy] [--target 0.9]
        [--columns KEY,...] [--baseline KEY=VALUE] [--panels KEY,...]

Every directory under each ``DIR`` (``DIR`` included) that holds
``config.json`` and ``metrics.jsonl`` (what ``fedjax-kd run --workdir`` and
``fedjax-kd sweep`` write) is a run. Runs whose configs are equal except for
``seed`` form a group (a key missing from an older ``config.json`` counts as
its default); a group is labelled by the config keys whose values
differ between groups (``algorithm.name=feddf, data.alpha=0.1``), or, when
there is one group, by its ``algorithm.name``.

Writes to ``OUTDIR``:

* ``report.md``: one row per group: label, number of seeds, the final
  evaluation's metric as mean ± std over seeds, the best evaluation's metric
  (each seed's best round, then mean ± std), the final round, the mean
  cumulative uplink and downlink bytes at that round and the mean wall time
  there (``wall_s`` of the final evaluation: the run's seconds so far,
  compilation included). ``std`` is the SAMPLE standard deviation
  (``ddof=1``), shown as ``n/a`` for a single seed. With ``--target T``, also
  the rounds to reach ``T`` (McMahan et al.'s measure of speed): each seed's
  first evaluation round with the metric ``>= T`` (``<=`` for a loss), then
  mean ± std; "not reached" when a seed never gets there.
* ``report.json``: the same numbers, plus each group's curve (per round: mean
  and std of the metric, mean cumulative total and uplink bytes) and, per
  group, ``selected`` (the values of the keys named by the options below) and
  ``vs_baseline``, machine-readable.
* ``accuracy_vs_round.png``: the metric's mean over seeds per evaluation round,
  with a shaded ±std band.
* ``accuracy_vs_bytes.png`` and ``accuracy_vs_uplink.png``: the same against
  the mean cumulative uplink + downlink bytes, and uplink bytes alone.

Options for large grids:

* ``--columns data.name,data.alpha,algorithm.name``: these config keys become
  the table's first columns and order its rows (numbers numerically); the
  ``group`` column is left out when they tell every group apart.
* ``--baseline algorithm.name=fedavg``: a "vs" column comparing each group
  with its baseline group, the group with that value that agrees with it on
  every key varying among the groups with that value (for a grid of
  algorithms x alphas: the FedAvg group of the same alpha; keys tied to one
  algorithm, like ``fedprox.mu``, do not count). The difference of the final
  means is "better"/"worse" when it exceeds the sum of the two groups' sample
  stds, else "no clear difference" (no verdict with one seed).
* ``--panels data.name,data.alpha``: each plot gets one panel per combination
  of these keys' values.

Runs of one group evaluated at different rounds (an unfinished run, another
``eval_every``) are aggregated over the rounds they all have; the report says
so in its notes, and "final" is then the last common round. A run without
``summary.json`` (unfinished) counts, and is noted. No run found: exit code 2
with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedjax_kd.cli_util import fail
from fedjax_kd.configs import flatten
from fedjax_kd.report_plot import BYTES_PLOT, ROUND_PLOT, UPLINK_PLOT
from fedjax_kd.report_plot import format_value as _format_value

USAGE = (
    "fedjax-kd report DIR [DIR ...] --out OUTDIR [--metric test_accuracy] [--target T] "
    "[--columns KEY,...] [--baseline KEY=VALUE] [--panels KEY,...]"
)
#: Sample standard deviation over seeds (NaN / ``None`` / ``n/a`` for one seed).
DDOF = 1
_MISSING = "<missing>"


class ReportError(ValueError):
    """A user mistake: no runs found, an unknown metric, an unwritable ``--out``."""


class Run(NamedTuple):
    """One run directory.

    Attributes:
      path: the directory.
      config: its ``config.json`` flattened to dotted keys, as written
        (:func:`_group_runs` fills keys other runs have from the schema).
      records: the parsed lines of ``metrics.jsonl`` (one per evaluation).
      finished: whether ``summary.json`` exists.
    """

    path: Path
    config: dict
    records: list[dict]
    finished: bool


def _find_runs(dirs: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories (with ``config.json`` and ``metrics.jsonl``) under ``dirs``, sorted.

    Raises:
      ReportError: a ``DIR`` that is not a directory.
    """
    found: dict[str, Path] = {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ReportError(f"not a directory: {d}")
        for root, subdirs, files in os.walk(d):
            subdirs.sort()
            if "config.json" in files and "metrics.jsonl" in files:
                found.setdefault(os.path.realpath(root), Path(root))
    return sorted(found.values())


@functools.cache
def _schema_defaults() -> dict:
    from fedjax_kd.configs import default

    return flatten(default.get_config().to_dict())


def _load_run(path: str | os.PathLike) -> Run:
    """Reads one run directory; a torn last line of ``metrics.jsonl`` is ignored.

    Config keys missing from ``config.json`` (added to the schema since the
    run) take their defaults when the runs are grouped (:func:`_group_runs`),
    so old and new runs of the same config group together.

    Raises:
      ReportError: unreadable ``config.json`` or ``metrics.jsonl``.
    """
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        lines = (path / "metrics.jsonl").read_text().splitlines()
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: cannot read the run ({e})") from None
    if not isinstance(config, dict):
        raise ReportError(f"{path}/config.json: expected a JSON object")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break  # written while we read it
            raise ReportError(f"{path}/metrics.jsonl: line {i + 1} is not JSON") from None
    return Run(path, flatten(config), records, (path / "summary.json").is_file())


def _complete(runs: Sequence[Run]) -> list[Run]:
    """Runs whose configs lack keys that others have take the schema's defaults there.

    Only then is the schema (``configs/default.py``, which imports the
    algorithms and so JAX) loaded: runs written by one version of the code
    all have the same keys.
    """
    keys = set().union(*(run.config for run in runs)) if runs else set()
    if all(set(run.config) == keys for run in runs):
        return list(runs)
    defaults = _schema_defaults()
    fill = {k: defaults[k] for k in keys if k in defaults}
    return [run._replace(config={**fill, **run.config}) for run in runs]


#: Config keys that do not define an experiment: runs differing only in these
#: are seeds of one group (``checkpoint_every`` changes no result).
NOT_GROUPED = ("seed", "checkpoint_every")


def _group_runs(runs: Sequence[Run]) -> list[tuple[str, dict, list[Run]]]:
    """Groups runs whose configs are equal except ``seed`` (and ``checkpoint_every``).

    Returns:
      ``(label, differing, runs)`` per group in order of first appearance:
      ``differing`` maps the keys whose values differ between groups (sorted)
      to this group's values; ``label`` is ``"k=v, k=v"`` of those (the
      ``algorithm.name`` when there is one group).
    """
    groups: dict[str, list[Run]] = {}
    for run in _complete(runs):
        rest = {k: v for k, v in run.config.items() if k not in NOT_GROUPED}
        groups.setdefault(json.dumps(rest, sort_keys=True), []).append(run)
    members = list(groups.values())
    keys = {key for group in members for key in group[0].config if key not in NOT_GROUPED}
    differing = sorted(
        k for k in keys if len({json.dumps(g[0].config.get(k, _MISSING)) for g in members}) > 1
    )
    out = []
    for group in members:
        values = {k: group[0].config.get(k, _MISSING) for k in differing}
        if len(members) == 1:
            label = _format_value(group[0].config.get("algorithm.name", "run"))
        else:
            label = ", ".join(f"{k}={_format_value(v)}" for k, v in values.items())
        out.append((label, values, group))
    return out


def _stats(values: Sequence[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    std = float(np.std(a, ddof=DDOF)) if len(a) > DDOF else None
    return {"mean": float(np.mean(a)), "std": std, "values": [float(v) for v in a]}


def _number_at(record: dict, key: str) -> float | None:
    value = record.get(key)
    return float(value) if isinstance(value, int | float) else None


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def rounds_to_target(records: Sequence[dict], metric: str, target: float) -> int | None:
    """First evaluation round whose ``metric`` reaches ``target`` (None: never).

    "Reaches" is ``>=`` for accuracies and ``<=`` for anything else (losses).
    """
    higher_is_better = "accuracy" in metric
    for r in sorted((r for r in records if metric in r and "round" in r), key=lambda r: r["round"]):
        if (r[metric] >= target) if higher_is_better else (r[metric] <= target):
            return int(r["round"])
    return None


def _summarize_group(
    label: str, differing: dict, runs: Sequence[Run], metric: str, target: float | None = None
) -> dict:
    """The numbers of one group (one row of the table, one curve of each plot)."""
    higher_is_better = "accuracy" in metric
    notes = []
    recorded = [run for run in runs if any(metric in r and "round" in r for r in run.records)]
    if recorded and len(recorded) < len(runs):
        notes.append(
            f"{len(runs) - len(recorded)} of {len(runs)} runs have no '{metric}' record yet "
            "(just started); left out"
        )
    all_runs, runs = runs, recorded
    by_round = [
        {r["round"]: r for r in run.records if metric in r and "round" in r} for run in runs
    ]
    round_sets = [set(rounds) for rounds in by_round]
    common = sorted(set.intersection(*round_sets)) if round_sets else []
    if any(s != round_sets[0] for s in round_sets):
        ranges = sorted({f"{min(s)}..{max(s)}" if s else "none" for s in round_sets})
        notes.append(
            f"runs have different eval rounds ({', '.join(ranges)}); aggregated over the "
            f"{len(common)} common rounds" + (f", final = round {common[-1]}" if common else "")
        )
    unfinished = sum(not run.finished for run in all_runs)
    if unfinished:
        notes.append(f"{unfinished} of {len(all_runs)} runs unfinished (no summary.json)")
    seeds = [run.config.get("seed") for run in all_runs]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    if repeated:
        notes.append(f"seeds {repeated} appear more than once (separate runs of the same config)")
    group = {
        "label": label,
        "config": differing,
        "seeds": seeds,
        "runs": [str(run.path) for run in all_runs],
        "num_runs": len(all_runs),
        "unfinished": unfinished,
        "common_rounds": common,
        "notes": notes,
        "final": None,
        "best": None,
        "round": None,
        "uplink_bytes": None,
        "downlink_bytes": None,
        "wall_s": None,
        "rounds_to_target": None,
        "vs_baseline": None,
        "curve": [],
    }
    if target is not None and runs:
        reached = [rounds_to_target(run.records, metric, target) for run in runs]
        hits = [r for r in reached if r is not None]
        group["rounds_to_target"] = {
            "target": target,
            "per_seed": reached,
            "reached": len(hits),
            "stats": _stats(hits) if len(hits) == len(runs) else None,
        }
    if not runs:
        notes.append(f"no run of this group records '{metric}'")
        return group
    if not common:
        notes.append(f"no evaluation round with '{metric}' common to all runs")
        return group
    final = [rounds[common[-1]] for rounds in by_round]
    best_fn = max if higher_is_better else min
    group.update(
        final=_stats([r[metric] for r in final]),
        best=_stats([best_fn(rounds[t][metric] for t in common) for rounds in by_round]),
        round=common[-1],
        uplink_bytes=_mean_or_none([_number_at(r, "cumulative_uplink_bytes") for r in final]),
        downlink_bytes=_mean_or_none([_number_at(r, "cumulative_downlink_bytes") for r in final]),
        wall_s=_mean_or_none([_number_at(r, "wall_s") for r in final]),
    )
    for t in common:
        stats = _stats([rounds[t][metric] for rounds in by_round])
        total = [
            None if up is None or down is None else up + down
            for up, down in (
                (
                    _number_at(rounds[t], "cumulative_uplink_bytes"),
                    _number_at(rounds[t], "cumulative_downlink_bytes"),
                )
                for rounds in by_round
            )
        ]
        uplink = [_number_at(rounds[t], "cumulative_uplink_bytes") for rounds in by_round]
        group["curve"].append(
            {
                "round": t,
                "mean": stats["mean"],
                "std": stats["std"],
                "bytes": _mean_or_none(total),
                "uplink": _mean_or_none(uplink),
            }
        )
    return group


def parse_baseline(text: str) -> tuple[str, str]:
    """``"algorithm.name=fedavg"`` -> ``("algorithm.name", "fedavg")``.

    Raises:
      ReportError: no ``=``, or an empty key or value.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ReportError(f"--baseline {text!r}: expected KEY=VALUE, e.g. algorithm.name=fedavg")
    return key.strip(), value.strip()


def _matches(value, text: str) -> bool:
    """Whether a config value is the one written ``text`` (``100`` matches ``100.0``)."""
    if _format_value(value) == text:
        return True
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(text) == value
        except ValueError:
            return False
    return False


def compare(stats: dict, base: dict, higher_is_better: bool = True) -> dict:
    """A group's final stats against its baseline's: difference of means and a verdict.

    "better" ("worse") when the difference of the means exceeds the sum of the
    two sample standard deviations in the good (bad) direction, else "no
    clear difference"; ``None`` when either has one seed (no spread).

    Returns:
      ``{"diff": mean - base mean, "noise": std + base std or None, "verdict": ...}``.
    """
    diff = stats["mean"] - base["mean"]
    if stats["std"] is None or base["std"] is None:
        return {"diff": diff, "noise": None, "verdict": None}
    noise = stats["std"] + base["std"]
    gain = diff if higher_is_better else -diff
    verdict = "better" if gain > noise else "worse" if -gain > noise else "no clear difference"
    return {"diff": diff, "noise": noise, "verdict": verdict}


def _add_baseline(groups: list[dict], configs: list[dict], key: str, value: str, metric: str):
    """Fills each group's ``vs_baseline`` (see the module docstring's ``--baseline``)."""
    base = [i for i, c in enumerate(configs) if _matches(c.get(key, _MISSING), value)]
    if not base:
        seen = sorted({_format_value(c.get(key, _MISSING)) for c in configs})
        raise ReportError(f"--baseline {key}={value}: no group has it ({key}: {', '.join(seen)})")
    keys = set().union(*(configs[i] for i in base)) - set(NOT_GROUPED)
    varying = [
        k for k in sorted(keys) if len({json.dumps(configs[i].get(k, _MISSING)) for i in base}) > 1
    ]
    for i, g in enumerate(groups):
        if i in base:
            g["vs_baseline"] = {"baseline": g["label"], "is_baseline": True}
            continue
        same = [
            j
            for j in base
            if all(
                json.dumps(configs[j].get(k, _MISSING)) == json.dumps(configs[i].get(k, _MISSING))
                for k in varying
            )
        ]
        if not same:
            continue  # e.g. an alpha without a baseline run: no comparison
        (j,) = same  # two baseline groups differ in a varying key
        entry = {"baseline": groups[j]["label"], "is_baseline": False}
        if g["final"] is not None and groups[j]["final"] is not None:
            entry.update(compare(g["final"], groups[j]["final"], "accuracy" in metric))
        g["vs_baseline"] = entry


def _sort_key(values: Sequence) -> tuple:
    """Numbers before strings, numbers numerically."""
    return tuple(
        (0, float(v), "")
        if isinstance(v, int | float) and not isinstance(v, bool)
        else (1, 0.0, _format_value(v))
        for v in values
    )


def summarize(
    dirs: Sequence[str | os.PathLike],
    metric: str = "test_accuracy",
    target: float | None = None,
    *,
    columns: Sequence[str] = (),
    baseline: str | None = None,
    panels: Sequence[str] = (),
) -> dict:
    """Finds, loads and groups the runs under ``dirs``; the content of ``report.json``.

    Args:
      dirs: searched recursively for run directories.
      metric: the ``metrics.jsonl`` key reported.
      target: also report the rounds to reach it.
      columns: config keys shown as the table's first columns; they order the groups.
      baseline: ``"KEY=VALUE"``: compare each group with its baseline group.
      panels: config keys splitting each plot into panels.

    Raises:
      ReportError: no run directories, no run records ``metric``, a key of
        ``columns``/``baseline``/``panels`` that no run has, or no group with
        the baseline's value.
    """
    paths = _find_runs(dirs)
    if not paths:
        raise ReportError(
            "no run directories (with config.json and metrics.jsonl) under "
            + ", ".join(str(d) for d in dirs)
        )
    runs = [_load_run(p) for p in paths]
    if not any(metric in r for run in runs for r in run.records):
        available = sorted(
            {
                k
                for run in runs
                for r in run.records
                for k, v in r.items()
                if k != "round" and isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        raise ReportError(
            f"no run records metric '{metric}' (available: {', '.join(available) or 'none'})"
        )
    grouped = _group_runs(runs)
    configs = [members[0].config for _, _, members in grouped]
    base_key, base_value = parse_baseline(baseline) if baseline else (None, None)
    selected = list(dict.fromkeys([*columns, *panels, *([base_key] if base_key else [])]))
    for key in selected:
        if not any(key in c for c in configs):
            option = (
                "--columns" if key in columns else "--panels" if key in panels else "--baseline"
            )
            raise ReportError(f"{option}: no run has the config key '{key}'")
    groups = [_summarize_group(*g, metric, target) for g in grouped]
    for g, c in zip(groups, configs, strict=True):
        g["selected"] = {k: c.get(k, _MISSING) for k in selected}
    if base_key:
        _add_baseline(groups, configs, base_key, base_value, metric)
    if columns:
        groups.sort(key=lambda g: _sort_key([g["selected"][k] for k in columns]))
    return {
        "metric": metric,
        "target": target,
        "columns": list(columns),
        "baseline": baseline,
        "panels": list(panels),
        "std": f"sample standard deviation over seeds (ddof={DDOF}); null for one seed",
        "best": ("max" if "accuracy" in metric else "min") + " over the common eval rounds, "
        "per seed, then mean and std",
        "dirs": [str(d) for d in dirs],
        "num_runs": len(runs),
        "groups": groups,
    }


def _human_bytes(n: float | None) -> str:
    """``12345678`` -> ``"12.3 MB"`` (decimal units); ``None`` -> ``"n/a"``."""
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _mean_std(stats: dict | None) -> str:
    if stats is None:
        return "n/a"
    std = "n/a" if stats["std"] is None else f"{stats['std']:.4f}"
    return f"{stats['mean']:.4f} ± {std}"


def _rounds_to_target(entry: dict | None) -> str:
    if entry is None:
        return "n/a"
    if entry["stats"] is None:
        return f"not reached ({entry['reached']} of {len(entry['per_seed'])} seeds)"
    stats = entry["stats"]
    std = "n/a" if stats["std"] is None else f"{stats['std']:.1f}"
    return f"{stats['mean']:.1f} ± {std}"


def _vs_baseline(entry: dict | None) -> str:
    if entry is not None and entry["is_baseline"]:
        return "baseline"
    if entry is None or "diff" not in entry:
        return "n/a"  # no baseline group, or one of the two records no metric
    diff = f"{entry['diff']:+.4f}".replace("-0.0000", "+0.0000")
    if entry["verdict"] is None:
        return f"{diff} (one seed)"
    return f"{entry['verdict']} ({diff})"


def format_markdown(summary: dict) -> str:
    """``report.md`` for the output of :func:`summarize`."""
    m = summary["metric"]
    target = summary.get("target")
    columns = summary.get("columns") or []
    baseline = summary.get("baseline")
    groups = summary["groups"]
    best = "max" if "accuracy" in m else "min"
    # The label column is left out when the chosen columns tell every group apart.
    keyed = {json.dumps([g["selected"][k] for k in columns]) for g in groups} if columns else ()
    with_label = len(keyed) < len(groups)
    numbers = [
        "seeds",
        f"final {m} (mean ± sample std, ddof={DDOF})",
        f"best-round {m} ({best} per seed, mean ± std)",
        "rounds",
        "uplink (mean)",
        "downlink (mean)",
        "wall s (mean)",
    ]
    if target is not None:
        numbers.append(f"rounds to {m} {target:g} (mean ± std)")
    head = [*columns, *(["group"] if with_label else []), *numbers]
    if baseline:
        head.append(f"vs {baseline}")  # words: left-aligned
    text = (
        f"{summary['num_runs']} runs in {len(groups)} groups from "
        + ", ".join(f"`{d}`" for d in summary["dirs"])
        + f". ± is the sample standard deviation over seeds (ddof={DDOF}); "
        "bytes are cumulative at the final round and wall s is the run's time there "
        "(compilation included), mean over seeds."
    )
    if baseline:
        text += (
            f" vs {baseline}: against the group with {baseline} that agrees on every key "
            f"varying among such groups; better/worse when the difference of the final "
            f"means exceeds the sum of the two sample stds."
        )
    lines = [
        f"# Report: {m}",
        "",
        text,
        "",
        "| " + " | ".join(head) + " |",
        "|" + "".join("---:|" if h in numbers else "---|" for h in head),
    ]
    for g in groups:
        cells = [_format_value(g["selected"][k]) for k in columns]
        if with_label:
            cells.append(g["label"])
        cells += [
            str(g["num_runs"]),
            _mean_std(g["final"]),
            _mean_std(g["best"]),
            str(g["round"]) if g["round"] is not None else "n/a",
            _human_bytes(g["uplink_bytes"]),
            _human_bytes(g["downlink_bytes"]),
            "n/a" if g["wall_s"] is None else f"{g['wall_s']:.1f}",
        ]
        if target is not None:
            cells.append(_rounds_to_target(g["rounds_to_target"]))
        if baseline:
            cells.append(_vs_baseline(g["vs_baseline"]))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = [f"* {g['label']}: {note}" for g in groups for note in g["notes"]]
    if baseline:
        alone = [g["label"] for g in groups if g["vs_baseline"] is None]
        if alone:
            notes.append(f"* no {baseline} group to compare with: {'; '.join(alone)}")
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += [
        "",
        f"![{m} vs round]({ROUND_PLOT})",
        "",
        f"![{m} vs cumulative bytes]({BYTES_PLOT})",
        "",
        f"![{m} vs cumulative uplink bytes]({UPLINK_PLOT})",
        "",
    ]
    return "\n".join(lines)


def plot(summary: dict, out: str | os.PathLike) -> list[Path]:
    """Writes the three PNGs into ``out`` (:func:`fedjax_kd.report_plot.plot`).

    Raises:
      ReportError: matplotlib missing.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError("report needs matplotlib (pip install matplotlib)") from None
    from fedjax_kd import report_plot

    return report_plot.plot(summary, out)


def make_report(
    dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    metric: str = "test_accuracy",
    target: float | None = None,
    **options,
) -> dict:
    """Writes ``report.md``, ``report.json`` and the three PNGs into ``out``; returns the summary.

    ``options``: ``columns``, ``baseline``, ``panels`` of :func:`summarize`.

    Raises:
      ReportError: see :func:`summarize`; ``out`` not writable; matplotlib missing.
    """
    summary = summarize(dirs, metric, target, **options)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
        (out / "report.md").write_text(format_markdown(summary))
        plot(summary, out)
    except OSError as e:
        raise ReportError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return summary


def _keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",")]
    if any(not k for k in keys):
        raise argparse.ArgumentTypeError(f"expected KEY,KEY,... got {text!r}")
    return list(dict.fromkeys(keys))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``fedjax-kd report`` arguments to ``parser`` (see :func:`run`)."""
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="searched recursively for runs")
    parser.add_argument("--out", required=True, metavar="OUTDIR", help="report.md/json and PNGs")
    parser.add_argument(
        "--metric",
        default="test_accuracy",
        help="metrics.jsonl key to report (default test_accuracy)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="also report the rounds until the metric reaches this value",
    )
    parser.add_argument(
        "--columns",
        type=_keys,
        default=[],
        metavar="KEY,...",
        help="config keys shown as the table's first columns, ordering its rows",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="KEY=VALUE",
        help="compare each group with the group that has KEY=VALUE and agrees on the keys "
        "varying among those (e.g. algorithm.name=fedavg)",
    )
    parser.add_argument(
        "--panels",
        type=_keys,
        default=[],
        metavar="KEY,...",
        help="one plot panel per combination of these config keys' values",
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``fedjax-kd report`` with parsed ``args``; returns the exit code."""
    if args.target is not None and not np.isfinite(args.target):
        return fail(f"--target must be a finite number, got {args.target}")
    try:
        summary = make_report(
            args.dirs,
            args.out,
            args.metric,
            args.target,
            columns=args.columns,
            baseline=args.baseline,
            panels=args.panels,
        )
    except ReportError as e:
        return fail(str(e))
    print(format_markdown(summary).split("\n\n![")[0])
    print(f"wrote {args.out}/report.md, report.json, {ROUND_PLOT}, {BYTES_PLOT}, {UPLINK_PLOT}")
    return 0
