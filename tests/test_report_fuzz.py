"""fedjax-kd report on random run files: never a traceback; exit 0, or 2 with one error line.

Random bytes and random JSON (objects, arrays, wrong types, nulls, huge
numbers, NaN/Infinity tokens, deep nesting) as ``metrics.jsonl``,
``config.json`` and ``summary.json``, mostly near a valid run so that the
code past the checks runs too. The main property stubs the PNG rendering
(matplotlib takes ~0.4 s a report) with a check of what the plots get; a
few examples draw the real PNGs.
"""

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path
from unittest import mock

import hypothesis.strategies as st
from hypothesis import given, settings

from fedjax_kd import cli, report_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: No deadline: an example writes files; no fixture is used, so no health check is suppressed.
SETTINGS = dict(deadline=None)

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),  # NaN and +-inf: written as the tokens NaN, Infinity, -Infinity
    st.text(max_size=6),
)
json_values = st.recursive(
    leaves,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4)
    ),
    max_leaves=12,
)
NASTY = st.sampled_from(
    [
        b"",
        b"{",
        b"[" * 3000,
        b'{"a":' * 2000 + b"1" + b"}" * 2000,
        b"1" * 5000,  # more digits than Python converts
        b"NaN",
        b"-Infinity",
        b"1e999",
        b"\xef\xbb\xbf{}",  # a byte-order mark
        b"\xff\xfe\x00",
        b'"\\ud800"',
        b'{"round": 1, "x": "\\udfff"}',
        b"{}{}",
        b'{"round": 1e400}',
        b'{"round": 3, "test_accuracy": 0.5',
    ]
)
good_values = st.one_of(
    st.floats(0, 1), st.integers(0, 10**6), st.none(), st.sampled_from([math.nan, math.inf, 0.5])
)
any_values = st.one_of(good_values, st.integers(), st.floats(), json_values)
READ = ("test_accuracy", "test_loss", "cumulative_uplink_bytes", "cumulative_downlink_bytes")


def dumps(value) -> bytes:
    return json.dumps(value).encode()


def all_finite(value) -> bool:
    """No NaN or infinity anywhere in a JSON value (what a config.json must hold)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        value = list(value.values())
    return all(map(all_finite, value)) if isinstance(value, list) else True


@st.composite
def metrics_files(draw, valid=False):
    kinds = ["valid"] if valid else ["valid", "valid", "mutated", "lines", "bytes"]
    kind = draw(st.sampled_from(kinds))
    if kind == "bytes":
        return draw(st.binary(max_size=120) | NASTY)
    values = good_values if kind == "valid" else any_values
    lines = []
    for r in sorted(draw(st.sets(st.integers(0, 12), min_size=kind == "valid", max_size=5))):
        row = {"round": r}
        for key in READ + ("wall_s",):
            if draw(st.integers(0, 6)):  # mostly present
                row[key] = draw(values)
        lines.append(dumps(row))
    if kind == "mutated" and draw(st.booleans()):
        at = draw(st.integers(0, len(lines)))
        lines.insert(at, draw(json_values.map(dumps) | NASTY | st.binary(max_size=30)))
    if kind == "lines":
        lines = draw(st.lists(json_values.map(dumps) | NASTY | st.binary(max_size=30), max_size=5))
    return b"\n".join(lines) + (b"\n" if draw(st.booleans()) else b"")


@st.composite
def config_files(draw, valid=False):
    kind = draw(st.sampled_from(["valid"] if valid else ["valid", "valid", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=60) | NASTY)
    if kind == "json":
        return dumps(draw(json_values))
    config = {
        "seed": draw(st.integers(0, 2)),
        "algorithm": {"name": draw(st.sampled_from(["fedavg", "feddf"]))},
        "data": {"alpha": draw(st.sampled_from([0.1, 0.5]))},
    }
    if draw(st.integers(0, 3)) == 0:  # a key of another type, or one the other runs lack
        key = draw(st.sampled_from(["extra", "data"] if valid else ["seed", "extra", "algorithm"]))
        config[key] = draw(json_values.filter(all_finite) if valid else json_values)
    return dumps(config)


finished = st.integers(0, 12).map(lambda r: dumps({"rounds": r, "test_accuracy": 0.5}))
summary_files = st.one_of(st.none(), finished, json_values.map(dumps), NASTY)  # none: unfinished
#: Half the examples: every file passes the checks (values may be null, NaN, Infinity).
runs = st.lists(
    st.tuples(config_files(valid=True), metrics_files(valid=True), st.none() | finished),
    min_size=1,
    max_size=3,
) | st.lists(st.tuples(config_files(), metrics_files(), summary_files), min_size=1, max_size=3)
options = st.tuples(
    st.sampled_from(["test_accuracy"] * 4 + ["test_loss", "cumulative_uplink_bytes", "nope"]),
    st.booleans(),  # --skip-malformed
    st.one_of(st.none(), st.floats(-2, 2)),  # --target
    st.sampled_from(
        [[], ["--columns", "data.alpha"], ["--baseline", "algorithm.name=fedavg"]]
        + [["--panels", "algorithm.name"], ["--columns", "algorithm.name,seed"]]
    ),
)


def refuse(token):
    raise ValueError(f"non-standard JSON token {token}")


def fake_render(summary: dict) -> dict[str, bytes]:
    """What the plots get: strict JSON with finite numbers, and the curves they draw."""
    json.dumps(summary, allow_nan=False)
    for g in summary["groups"]:
        for p in g["curve"]:
            assert all(v is None or math.isfinite(v) for v in p.values()), p
    return {name: PNG_MAGIC for name, _, _ in report_plot.FIGURES}


def report_on(files, opts, *, render=fake_render):
    """Writes the runs into a fresh directory and runs ``fedjax-kd report`` there.

    Returns:
      (exit code, stderr lines, the report.json text or None).
    """
    metric, skip, target, extra = opts
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        for i, (config, metrics, summary) in enumerate(files):
            run = root / f"run{i}"
            run.mkdir(parents=True)
            (run / "config.json").write_bytes(config)
            (run / "metrics.jsonl").write_bytes(metrics)
            if summary is not None:
                (run / "summary.json").write_bytes(summary)
        argv = ["report", str(root), "--out", str(Path(tmp) / "out"), "--metric", metric, *extra]
        argv += ["--skip-malformed"] * skip + [f"--target={target}"] * (target is not None)
        err, out = io.StringIO(), io.StringIO()
        with (
            mock.patch.object(report_plot, "render", render),
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(out),
        ):
            code = cli.main(argv)  # an exception here is the traceback the property forbids
        written = Path(tmp) / "out" / "report.json"
        text = written.read_text() if written.exists() else None
        if text is not None:
            assert (Path(tmp) / "out" / "report.md").read_text().startswith("# Report: ")
    return code, err.getvalue().splitlines(), text


def check(code, lines, text, skip):
    assert not any("Traceback" in line for line in lines), lines
    assert code in (0, 2), (code, lines)
    errors = [line for line in lines if line.startswith("error: ")]
    warnings = [line for line in lines if line.startswith("warning: ")]
    if code == 2:
        assert len(errors) == 1 and lines[-1] == errors[0], lines
        assert len(warnings) == len(lines) - 1 and (skip or not warnings), lines
        assert text is None
    else:
        assert warnings == lines and (skip or not warnings), lines
        summary = json.loads(text, parse_constant=refuse)  # strict JSON: no NaN, no Infinity
        assert summary["groups"] and len(summary["skipped"]) == len(warnings)


@settings(max_examples=150, **SETTINGS)  # ~3 s: an example takes 3-40 ms
@given(files=runs, opts=options)
def test_report_never_crashes_on_random_run_files(files, opts):
    code, lines, text = report_on(files, opts)
    check(code, lines, text, skip=opts[1])


valid_runs = st.lists(
    st.tuples(
        st.builds(
            lambda seed, alpha, name: dumps(
                {"seed": seed, "data": {"alpha": alpha}, "algorithm": {"name": name}}
            ),
            st.integers(0, 2),
            st.sampled_from([0.1, 1e100, -0.0]),
            st.sampled_from(["fedavg", "$x$", "a\nb", "$"]),
        ),
        metrics_files(valid=True),
        st.none(),
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=5, **SETTINGS)
@given(files=valid_runs)
def test_real_plots_of_random_runs(files):
    def render(summary):
        images = real_render(summary)
        assert all(data[:8] == PNG_MAGIC for data in images.values())
        return images

    real_render = report_plot.render
    code, lines, text = report_on(files, ("test_accuracy", True, None, []), render=render)
    check(code, lines, text, skip=True)
