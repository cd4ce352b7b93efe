"""The PNGs of ``fedjax-kd report``: the metric vs round, vs total bytes, vs uplink bytes.

Input is :func:`fedjax_kd.report.summarize`'s output (each group's ``curve``:
per common evaluation round the mean and sample std over seeds of the metric,
the mean cumulative uplink + downlink bytes and the mean cumulative uplink
bytes). With ``panels`` (config keys, the report's ``--panels``), each figure
has one panel per combination of those keys' values, and a panel's legend
names groups by the keys that differ inside it. matplotlib is imported only
here, and only when a figure is drawn (Agg backend, no pyplot state); the
figures are rendered to bytes, which :func:`fedjax_kd.report.write_files`
writes atomically.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence

import numpy as np

ROUND_PLOT = "accuracy_vs_round.png"
BYTES_PLOT = "accuracy_vs_bytes.png"
UPLINK_PLOT = "accuracy_vs_uplink.png"
#: (file, curve key, x-axis label) of each figure.
FIGURES = (
    (ROUND_PLOT, "round", "round"),
    (BYTES_PLOT, "bytes", "cumulative uplink + downlink bytes (mean over seeds)"),
    (UPLINK_PLOT, "uplink", "cumulative uplink bytes (mean over seeds)"),
)
#: Panels per row of a figure with ``--panels``.
PANEL_COLUMNS = 3


def format_value(value) -> str:
    """A config value as the report writes it (``True`` -> ``true``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def legend_labels(groups: Sequence[dict]) -> list[str]:
    """Group labels for a plot legend: config keys shortened to their last part
    (``algorithm.name=feddf`` -> ``name=feddf``) when that stays unambiguous."""
    keys = sorted({k for g in groups for k in g["config"]})
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(keys) or not keys:
        return [g["label"] for g in groups]
    return [
        ", ".join(f"{short[k]}={format_value(v)}" for k, v in g["config"].items()) or g["label"]
        for g in groups
    ]


def split_panels(groups: Sequence[dict], panels: Sequence[str]) -> list[tuple[str, list[dict]]]:
    """``(title, groups)`` per combination of the ``panels`` keys' values, in order of appearance.

    Each group's ``selected`` maps the panel keys to its values. Inside a
    panel, a group's ``config`` keeps only the keys that differ between that
    panel's groups (the legend's keys); no ``panels``: one untitled panel.
    """
    if not panels:
        return [("", list(groups))]
    by_title: dict[str, list[dict]] = {}
    for g in groups:
        title = ", ".join(f"{k}={format_value(g['selected'][k])}" for k in panels)
        by_title.setdefault(title, []).append(g)
    out = []
    for title, members in by_title.items():
        keys = [
            k
            for k in (members[0]["config"] if members else {})
            if k not in panels and len({repr(m["config"].get(k)) for m in members}) > 1
        ]
        out.append((title, [{**m, "config": {k: m["config"][k] for k in keys}} for m in members]))
    return out


def _text(text: str) -> str:
    """``text`` drawn as written: a ``$`` would start matplotlib's math mode."""
    return text.replace("$", r"\$")


def render(summary: dict) -> dict[str, bytes]:
    """The three PNGs, by file name (:data:`FIGURES`).

    The legend sits below the axes (one line per group), so long labels never
    cover the curves. ``summary["panels"]`` (optional) splits every figure
    into panels (:func:`split_panels`), sharing the y axis. matplotlib's
    warnings (a glyph the font lacks, in a label) are not printed.

    Raises:
      ImportError: no matplotlib.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = summary["metric"]
    panels = split_panels(summary["groups"], summary.get("panels") or [])
    ncols = min(len(panels), PANEL_COLUMNS)
    nrows = math.ceil(len(panels) / ncols)
    most = max(len(members) for _, members in panels)
    if len(panels) == 1:
        size = (8, 4.5 + 0.22 * most)
    else:
        size = (4.6 * ncols, (3.4 + 0.2 * most) * nrows)
    images = {}
    for filename, x_key, x_label in FIGURES:
        fig = Figure(figsize=size, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        for i, (ax, (title, members)) in enumerate(zip(axes, panels, strict=False)):
            small = len(panels) > 1
            _draw_panel(ax, members, x_key, x_label, small=small)
            if i % ncols == 0:
                ax.set_ylabel(
                    _text(f"{metric} (mean ± sample std over seeds)"),
                    fontsize="small" if small else None,
                )
            if title:
                ax.set_title(_text(title), fontsize="medium")
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig.savefig(buffer, format="png", dpi=110)
        images[filename] = buffer.getvalue()
    return images


def _draw_panel(ax, groups: Sequence[dict], x_key: str, x_label: str, small: bool) -> None:
    all_x = []
    for g, name in zip(groups, legend_labels(groups), strict=True):
        points = [p for p in g["curve"] if p.get(x_key) is not None]
        if not points:
            continue
        x = np.array([p[x_key] for p in points], dtype=np.float64)
        y = np.array([p["mean"] for p in points])
        label = _text(f"{name} (n={g['num_runs']})")
        (line,) = ax.plot(x, y, marker="o", markersize=3, label=label)
        if all(p["std"] is not None for p in points):
            s = np.array([p["std"] for p in points])
            ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.2, linewidth=0)
        all_x.extend(x)
    if x_key != "round" and all_x and min(all_x) > 0 and max(all_x) > 100 * min(all_x):
        ax.set_xscale("log")
        x_label += ", log scale"
    ax.set_xlabel(x_label, fontsize="small" if small else None)
    ax.grid(alpha=0.3)
    if all_x:
        ax.legend(
            fontsize="x-small" if small else "small",
            loc="upper center",
            bbox_to_anchor=(0.5, -0.18 if small else -0.14),
            frameon=False,
        )
