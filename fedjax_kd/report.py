"""``fedjax-kd report``: a table and two plots over the run directories of sweeps and runs.

Command::

    fedjax-kd report DIR... --out OUTDIR [--metric test_accuracy] [--target 0.9]
        [--columns KEY,...] [--baseline KEY=VALUE] [--panels KEY,...] [--skip-malformed]

Every directory under each ``DIR`` (``DIR`` included) that holds
``config.json`` and ``metrics.jsonl`` (what ``fedjax-kd run --workdir`` and
``fedjax-kd sweep`` write) is a run. Runs whose configs are equal except for
``seed`` form a group (a key missing from an older ``config.json`` counts as
its default); a group is labelled by the config keys whose values
differ between groups (``algorithm.name=feddf, data.alpha=0.1``), or, when
there is one group, by its ``algorithm.name``.

Writes to ``OUTDIR``:

* ``report.md``: one row per group: label; ``seeds`` (runs in the group);
  ``final round`` (the last evaluation round common to its runs); the metric
  there as mean ± std over seeds; the best value (each seed's best over the
  common rounds, then mean ± std) with the round(s) each seed reached it in;
  the mean cumulative uplink and downlink bytes at the final round (decimal
  units: 1 kB = 1000 B) and the mean wall time there (``wall_s`` of the final
  evaluation: the run's seconds so far, compilation included). ``std`` is the
  SAMPLE standard deviation (``ddof=1``), shown as ``n/a`` for a single seed.
  With ``--target T``, also the rounds to reach ``T`` (McMahan et al.'s
  measure of speed): each seed's first evaluation round with the metric
  ``>= T`` (``<=`` for a loss), then mean ± std; "not reached" when a seed
  never gets there. A value a run did not record is shown as ``–`` and the
  notes under the table say how many are missing, and where.
* ``report.json``: the same numbers, plus each group's curve (per round: mean
  and std of the metric, mean cumulative total and uplink bytes) and, per
  group, ``selected`` (the values of the keys named by the options below),
  ``vs_baseline`` and ``missing``, machine-readable (strict JSON: no NaN).
* ``accuracy_vs_round.png``: the metric's mean over seeds per evaluation round,
  with a shaded ±std band.
* ``accuracy_vs_bytes.png`` and ``accuracy_vs_uplink.png``: the same against
  the mean cumulative uplink + downlink bytes, and uplink bytes alone.

Every file is written to a temporary file in ``OUTDIR`` and renamed over the
old one (``os.replace``), so a failed write (out of space, permission denied)
leaves the previous report whole; it ends with one ``error:`` line naming the
path and the cause (exit code 1 when the disk is full or failing, 2 otherwise).

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

What the report reads is checked (:func:`fedjax_kd.report_runs.load_run`):
``config.json`` and ``summary.json`` must be JSON objects (``seed`` an
integer, config numbers finite), each line of ``metrics.jsonl`` a JSON object with an integer
``round`` (increasing down the file), and the values the report reads
(``--metric``, ``cumulative_uplink_bytes``, ``cumulative_downlink_bytes``,
``wall_s``) numbers or ``null``. A malformed file or line is an ``error:``
naming the file and line (exit code 2); with ``--skip-malformed`` it is
skipped with one ``warning:`` line per file instead (a malformed
``config.json`` skips its run; a malformed ``summary.json`` counts the run as
unfinished), and the report's notes list what was skipped. A ``null``, an
absent key, ``NaN`` or ``Infinity`` is a missing value: left out of the means
and counted in the notes. An incomplete last line of an unfinished run (being
written) is ignored, and noted.

Runs of one group evaluated at different rounds (an unfinished run, another
``eval_every``) are aggregated over the rounds they all have; the report says
so in its notes, and "final" is then the last common round. A run without
``summary.json`` (unfinished) counts, and is noted. No run found: exit code 2
with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import math
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fedjax_kd.cli_util import fail
from fedjax_kd.report_plot import BYTES_PLOT, ROUND_PLOT, UPLINK_PLOT
from fedjax_kd.report_plot import format_value as _format_value
from fedjax_kd.report_runs import READ_KEYS, ReportError, Run, find_runs, load_run, shorten

USAGE = (
    "fedjax-kd report DIR [DIR ...] --out OUTDIR [--metric test_accuracy] [--target T] "
    "[--columns KEY,...] [--baseline KEY=VALUE] [--panels KEY,...] [--skip-malformed]"
)
#: Sample standard deviation over seeds (NaN / ``None`` / ``n/a`` for one seed).
DDOF = 1
_MISSING = "<missing>"
#: The table's cell for a value no run recorded (the notes say which and how many).
MISSING_CELL = "–"
#: Write errors that are the machine's, not the user's (exit code 1, not 2).
_MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


@functools.cache
def _schema_defaults() -> dict:
    from fedjax_kd.configs import default, flatten

    return flatten(default.get_config().to_dict())


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


def _finite(value) -> float | None:
    """A finite number as a float; None for null, absent, NaN, infinite or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def rounds_to_target(records: Sequence[dict], metric: str, target: float) -> int | None:
    """First evaluation round whose ``metric`` reaches ``target`` (None: never).

    "Reaches" is ``>=`` for accuracies and ``<=`` for anything else (losses);
    evaluations without a finite value are passed over.
    """
    higher_is_better = "accuracy" in metric
    valued = [r for r in records if "round" in r and _finite(r.get(metric)) is not None]
    for r in sorted(valued, key=lambda r: r["round"]):
        if (r[metric] >= target) if higher_is_better else (r[metric] <= target):
            return int(r["round"])
    return None


def _best(rounds: dict, common: Sequence[int], metric: str, higher_is_better: bool) -> int:
    """The first of the ``common`` rounds with the best value of ``metric``."""
    pick = max if higher_is_better else min
    return pick(common, key=lambda t: rounds[t][metric])  # the first of equals


def _summarize_group(
    label: str, differing: dict, runs: Sequence[Run], metric: str, target: float | None = None
) -> dict:
    """The numbers of one group (one row of the table, one curve of each plot)."""
    higher_is_better = "accuracy" in metric
    notes = [note for run in runs for note in run.notes]
    missing: dict[str, dict] = {}
    has_value = [any(_finite(r.get(metric)) is not None for r in run.records) for run in runs]
    recorded = [run for run, ok in zip(runs, has_value, strict=True) if ok]
    if recorded and len(recorded) < len(runs):
        empty = sum(not run.records for run in runs)
        if empty:
            notes.append(
                f"{empty} of {len(runs)} runs have no '{metric}' record yet "
                "(just started); left out"
            )
        if len(runs) - len(recorded) - empty:
            notes.append(
                f"{len(runs) - len(recorded) - empty} of {len(runs)} runs have no value of "
                f"'{metric}' in any evaluation (null, absent, NaN or infinite); left out"
            )
    rows = [r for run in recorded for r in run.records]
    absent = sum(r.get(metric) is None for r in rows)
    non_finite = sum(r.get(metric) is not None and _finite(r[metric]) is None for r in rows)
    if absent or non_finite:
        missing[metric] = {
            "evaluations": absent + non_finite,
            "of": len(rows),
            "null_or_absent": absent,
            "nan_or_infinite": non_finite,
        }
        parts = [f"{absent} null or absent"] if absent else []
        parts += [f"{non_finite} NaN or infinite"] if non_finite else []
        notes.append(
            f"'{metric}' has no value in {absent + non_finite} of {len(rows)} evaluations "
            f"({', '.join(parts)}); those evaluations are left out"
        )
    all_runs, runs = runs, recorded
    by_round = [
        {r["round"]: r for r in run.records if _finite(r.get(metric)) is not None} for run in runs
    ]
    round_sets = [set(rounds) for rounds in by_round]
    common = sorted(set.intersection(*round_sets)) if round_sets else []
    if any(s != round_sets[0] for s in round_sets):
        ranges = sorted({f"{min(s)}..{max(s)}" for s in round_sets})
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
        "missing": missing,
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
    best_rounds = [_best(rounds, common, metric, higher_is_better) for rounds in by_round]
    group.update(
        final=_stats([r[metric] for r in final]),
        best={
            **_stats([rounds[t][metric] for rounds, t in zip(by_round, best_rounds, strict=True)]),
            "rounds": best_rounds,
        },
        round=common[-1],
    )
    for key, name in zip(READ_KEYS, ("uplink_bytes", "downlink_bytes", "wall_s"), strict=True):
        values = [_finite(r.get(key)) for r in final]
        group[name] = _mean_or_none(values)
        lacking = sum(v is None for v in values)
        if lacking:
            missing[key] = {"final_round_runs": lacking, "of": len(values)}
            notes.append(
                f"'{key}' has no value at the final round in {lacking} of {len(values)} runs; "
                f"shown as {MISSING_CELL}"
            )
    for t in common:
        stats = _stats([rounds[t][metric] for rounds in by_round])
        up = [_finite(rounds[t].get("cumulative_uplink_bytes")) for rounds in by_round]
        down = [_finite(rounds[t].get("cumulative_downlink_bytes")) for rounds in by_round]
        total = [None if u is None or d is None else u + d for u, d in zip(up, down, strict=True)]
        group["curve"].append(
            {
                "round": t,
                "mean": stats["mean"],
                "std": stats["std"],
                "bytes": _mean_or_none(total),
                "uplink": _mean_or_none(up),
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
    """Numbers before strings, numbers numerically (ints exactly, however large)."""
    return tuple(
        (0, v, "")
        if isinstance(v, int | float) and not isinstance(v, bool)
        else (1, 0, _format_value(v))
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
    skip_malformed: bool = False,
    warn: Callable[[str], None] | None = None,
) -> dict:
    """Finds, loads and groups the runs under ``dirs``; the content of ``report.json``.

    Args:
      dirs: searched recursively for run directories.
      metric: the ``metrics.jsonl`` key reported.
      target: also report the rounds to reach it.
      columns: config keys shown as the table's first columns; they order the groups.
      baseline: ``"KEY=VALUE"``: compare each group with its baseline group.
      panels: config keys splitting each plot into panels.
      skip_malformed: skip malformed or unreadable files and lines (each
        named in ``skipped`` of the result, and passed to ``warn``) instead of
        raising.
      warn: called with each warning as it happens (one per skipped file or
        per file with skipped lines).

    Raises:
      ReportError: no run directories, a malformed run file (without
        ``skip_malformed``), no run records ``metric``, a key of
        ``columns``/``baseline``/``panels`` that no run has, or no group with
        the baseline's value.
    """
    if metric == "round":
        raise ReportError("--metric round: 'round' is the evaluation's round, not a metric")
    paths = find_runs(dirs)
    if not paths:
        raise ReportError(
            "no run directories (with config.json and metrics.jsonl) under "
            + ", ".join(str(d) for d in dirs)
        )
    runs, skipped = [], []
    for path in paths:
        run, warnings = load_run(path, metric, skip_malformed)
        for message in warnings:
            skipped.append(message)
            if warn is not None:
                warn(message)
        if run is not None:
            runs.append(run)
    if not runs:
        raise ReportError(
            f"all {len(paths)} run directories under {', '.join(str(d) for d in dirs)} "
            "are malformed (skipped)"
        )
    if not any(_finite(r[metric]) is not None for run in runs for r in run.records):
        if any(metric in run.numeric for run in runs):
            raise ReportError(f"no run records a finite value of metric '{metric}' (only NaN/Inf)")
        available = [
            k if k.isprintable() else shorten(repr(k))
            for k in sorted(set().union(*(run.numeric for run in runs)))
        ]
        if len(available) > 20:
            available = [*available[:20], f"… {len(available) - 20} more"]
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
        "per seed, then mean and std; rounds: the (first) round of each seed's best",
        "missing": "null, absent, NaN and infinite values are left out and counted per group",
        "dirs": [str(d) for d in dirs],
        "num_runs": len(runs),
        "skipped": skipped,
        "groups": groups,
    }


def _human_bytes(n: float | None) -> str:
    """``12345678`` -> ``"12.3 MB"`` (decimal units); ``None`` -> :data:`MISSING_CELL`."""
    if n is None:
        return MISSING_CELL
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _mean_std(stats: dict | None) -> str:
    if stats is None:
        return MISSING_CELL
    std = "n/a" if stats["std"] is None else f"{stats['std']:.4f}"
    return f"{stats['mean']:.4f} ± {std}"


def _best_cell(stats: dict | None) -> str:
    """``0.8233 ± 0.0321 (rounds 2, 3, 3)``: mean ± std, then each seed's best round."""
    if stats is None:
        return MISSING_CELL
    rounds = stats["rounds"]
    if len(set(rounds)) == 1:
        where = f"round {rounds[0]}"
    elif len(rounds) <= 5:
        where = "rounds " + ", ".join(str(t) for t in rounds)
    else:
        where = f"rounds {min(rounds)}–{max(rounds)}"
    return f"{_mean_std(stats)} ({where})"


def _rounds_to_target(entry: dict | None) -> str:
    if entry is None:
        return MISSING_CELL
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


def _cell(text: str) -> str:
    """Text that stays inside one cell of a Markdown table."""
    return " ".join(text.replace("|", "\\|").splitlines())


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
        "final round",
        f"final {m} (mean ± sample std)",
        f"best {m}, {best} per seed (mean ± std; round)",
        "uplink bytes, cumulative (mean)",
        "downlink bytes, cumulative (mean)",
        "wall time, s (mean)",
    ]
    if target is not None:
        reach = "≥" if "accuracy" in m else "≤"
        numbers.append(f"rounds to {m} {reach} {target:g} (mean ± std)")
    head = [*columns, *(["group"] if with_label else []), *numbers]
    if baseline:
        head.append(f"vs {baseline}")  # words: left-aligned
    text = (
        f"{summary['num_runs']} runs in {len(groups)} groups from "
        + ", ".join(f"`{d}`" for d in summary["dirs"])
        + f". Every value is at the final round (the last evaluation common to a group's "
        f"runs) unless named otherwise; ± is the sample standard deviation over seeds "
        f"(ddof={DDOF}), n/a for one seed. The best value is each seed's {best} over the common "
        "rounds, with the round it was reached in (per seed). Bytes are cumulative from round 1 "
        "in decimal units (1 kB = 1000 B); wall time is the run's seconds until the final "
        f"evaluation (compilation included). {MISSING_CELL}: no value recorded (see the notes)."
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
        "| " + " | ".join(_cell(h) for h in head) + " |",
        "|" + "".join("---:|" if h in numbers else "---|" for h in head),
    ]
    for g in groups:
        cells = [_format_value(g["selected"][k]) for k in columns]
        if with_label:
            cells.append(g["label"])
        cells += [
            str(g["num_runs"]),
            MISSING_CELL if g["round"] is None else str(g["round"]),
            _mean_std(g["final"]),
            _best_cell(g["best"]),
            _human_bytes(g["uplink_bytes"]),
            _human_bytes(g["downlink_bytes"]),
            MISSING_CELL if g["wall_s"] is None else f"{g['wall_s']:.1f}",
        ]
        if target is not None:
            cells.append(_rounds_to_target(g["rounds_to_target"]))
        if baseline:
            cells.append(_vs_baseline(g["vs_baseline"]))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    notes = [f"* {g['label']}: {note}" for g in groups for note in g["notes"]]
    notes += [f"* skipped: {message}" for message in summary.get("skipped", [])]
    if baseline:
        alone = [g["label"] for g in groups if g["vs_baseline"] is None]
        if alone:
            notes.append(f"* no {baseline} group to compare with: {'; '.join(alone)}")
    if notes:
        lines += ["", "Notes:", "", *(" ".join(n.splitlines()) for n in notes)]
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


def _render_plots(summary: dict) -> dict[str, bytes]:
    """The three PNGs (:func:`fedjax_kd.report_plot.render`), by file name.

    Raises:
      ReportError: matplotlib missing.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError("report needs matplotlib (pip install matplotlib)") from None
    from fedjax_kd import report_plot

    return report_plot.render(summary)


def write_files(out: str | os.PathLike, files: dict[str, bytes]) -> list[Path]:
    """Writes each ``files[name]`` to ``out/name`` atomically; returns the paths.

    All go to temporary files in ``out`` first (flushed to disk), then each is
    renamed over its old version (``os.replace``): a write that fails (disk
    full, permission denied) leaves every old file whole and no temporary
    file behind.

    Raises:
      ReportError: naming the path and the cause; ``code`` 1 when the disk is
        full or failing (:data:`_MACHINE_ERRNOS`), else 2.
    """
    out = Path(out)

    def failed(path: Path, e: OSError, what: str = "cannot write") -> ReportError:
        code = 1 if e.errno in _MACHINE_ERRNOS else 2
        return ReportError(f"{what} {path} ({e.strerror or e})", code=code)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ReportError(f"--out {out} exists and is not a directory") from None
    except OSError as e:
        raise failed(out, e, "--out: cannot create") from None
    temps: list[tuple[Path, Path]] = []
    target = out
    try:
        for name, data in files.items():
            target = out / name
            tmp = out / f".{name}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            temps.append((tmp, target))
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, target in temps:  # noqa: B007 - `target` names the file in the error
            os.replace(tmp, target)
    except OSError as e:
        for tmp, _ in temps:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        raise failed(target, e) from None
    return [target for _, target in temps]


def plot(summary: dict, out: str | os.PathLike) -> list[Path]:
    """Writes the three PNGs into ``out`` atomically (:func:`write_files`).

    Raises:
      ReportError: matplotlib missing; a failed write.
    """
    return write_files(out, _render_plots(summary))


def make_report(
    dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    metric: str = "test_accuracy",
    target: float | None = None,
    **options,
) -> dict:
    """Writes ``report.md``, ``report.json`` and the three PNGs into ``out``; returns the summary.

    ``options``: ``columns``, ``baseline``, ``panels``, ``skip_malformed``,
    ``warn`` of :func:`summarize`. Everything is rendered before the first
    byte is written, and written atomically (:func:`write_files`).

    Raises:
      ReportError: see :func:`summarize` and :func:`write_files`; matplotlib missing.
    """
    summary = summarize(dirs, metric, target, **options)
    files = {
        # Strict JSON: every number in a summary is finite (NaN would be a bug here).
        "report.json": (json.dumps(summary, indent=1, allow_nan=False) + "\n").encode(),
        "report.md": format_markdown(summary).encode(),
        **_render_plots(summary),
    }
    write_files(out, files)
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
    parser.add_argument(
        "--skip-malformed",
        action="store_true",
        help="skip malformed or unreadable run files and metrics.jsonl lines, with one "
        "warning per file, instead of stopping with an error",
    )


def _one_line(message: str) -> str:
    """A message as one line (a config value from a run file may hold a newline)."""
    return " ".join(message.splitlines())


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
            skip_malformed=args.skip_malformed,
            warn=lambda message: print(f"warning: {_one_line(message)}", file=sys.stderr),
        )
    except ReportError as e:
        return fail(_one_line(str(e)), code=e.code)
    print(format_markdown(summary).split("\n\n![")[0])
    print(f"wrote {args.out}/report.md, report.json, {ROUND_PLOT}, {BYTES_PLOT}, {UPLINK_PLOT}")
    return 0
