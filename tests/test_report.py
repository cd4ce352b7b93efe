"""fedjax-kd report: groups, mean ± std over seeds, common rounds, PNGs, one-line errors."""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedjax_kd import cli, report, report_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: Final accuracies per group (3 seeds each) and the config keys that tell them apart.
GROUPS = {
    ("fedavg", 0.5): [0.80, 0.82, 0.87],
    ("feddf", 0.1): [0.90, 0.91, 0.95],
}


def write_run(
    path,
    *,
    algorithm="fedavg",
    alpha=0.5,
    seed=0,
    accuracies=(0.5,),
    rounds=None,
    finished=True,
    mu=0.01,
):
    """A run directory as experiment.run writes it, with made-up numbers."""
    path.mkdir(parents=True)
    config = {
        "seed": seed,
        "rounds": 3,
        "data": {"name": "digits", "alpha": alpha},
        "algorithm": {"name": algorithm, "mu": mu},
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    rounds = rounds or list(range(1, len(accuracies) + 1))
    lines = []
    for r, acc in zip(rounds, accuracies, strict=True):
        record = {
            "round": r,
            "test_accuracy": acc,
            "test_loss": 1.0 - acc,
            "train_loss": 0.5,
            "uplink_bytes": 100,
            "downlink_bytes": 200,
            "cumulative_uplink_bytes": 100 * r,
            "cumulative_downlink_bytes": 200 * r,
            "wall_s": 0.1 * r,
        }
        lines.append(json.dumps(record))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (path / "summary.json").write_text(json.dumps({"test_accuracy": accuracies[-1]}))


def write_groups(root):
    for (algorithm, alpha), finals in GROUPS.items():
        for seed, final in enumerate(finals):
            # Three evals; the best round is the second (final + 0.01) for seed 0 only.
            best = final + 0.01 if seed == 0 else final - 0.05
            write_run(
                root / f"{algorithm}-{alpha}" / f"seed{seed}",
                algorithm=algorithm,
                alpha=alpha,
                seed=seed,
                accuracies=(0.1, best, final),
            )


def test_groups_mean_std_labels_and_files(tmp_path):
    write_groups(tmp_path / "runs")
    summary = report.make_report([tmp_path / "runs"], tmp_path / "out")
    by_label = {g["label"]: g for g in summary["groups"]}
    assert set(by_label) == {
        "algorithm.name=fedavg, data.alpha=0.5",
        "algorithm.name=feddf, data.alpha=0.1",
    }
    g = by_label["algorithm.name=fedavg, data.alpha=0.5"]
    assert g["num_runs"] == 3 and sorted(g["seeds"]) == [0, 1, 2]
    assert g["round"] == 3 and g["common_rounds"] == [1, 2, 3]
    # Hand-computed: mean 0.83, deviations -0.03, -0.01, 0.04 -> var 0.0026 / 2.
    assert g["final"]["mean"] == pytest.approx(0.83)
    assert g["final"]["std"] == pytest.approx(np.sqrt(0.0013))
    assert g["final"]["std"] == pytest.approx(np.std([0.80, 0.82, 0.87], ddof=1))
    # best per seed: 0.81, 0.82, 0.87 (seed 0's best is its second round).
    assert g["best"]["mean"] == pytest.approx(np.mean([0.81, 0.82, 0.87]))
    assert g["best"]["rounds"] == [2, 3, 3]
    assert g["uplink_bytes"] == 300 and g["downlink_bytes"] == 600
    assert g["wall_s"] == pytest.approx(0.3)  # the final evaluation's wall_s
    curve = {p["round"]: p for p in g["curve"]}
    assert curve[1]["mean"] == pytest.approx(0.1) and curve[3]["bytes"] == 900
    assert curve[3]["uplink"] == 300
    assert g["notes"] == [] and g["missing"] == {}

    out = tmp_path / "out"
    md = (out / "report.md").read_text()
    # Each header says what its column holds; the best cell names each seed's best round.
    assert (
        "| group | seeds | final round | final test_accuracy (mean ± sample std) "
        "| best test_accuracy, max per seed (mean ± std; round) "
        "| uplink bytes, cumulative (mean) | downlink bytes, cumulative (mean) "
        "| wall time, s (mean) |"
    ) in md
    assert (
        "| algorithm.name=fedavg, data.alpha=0.5 | 3 | 3 | 0.8300 ± 0.0361 "
        "| 0.8333 ± 0.0321 (rounds 2, 3, 3) | 300 B | 600 B | 0.3 |"
    ) in md
    assert "| algorithm.name=feddf, data.alpha=0.1 | 3 | 3 | 0.9200 ± 0.0265 |" in md
    assert "ddof=1" in md and "1 kB = 1000 B" in md
    assert json.loads((out / "report.json").read_text())["groups"] == json.loads(
        json.dumps(summary["groups"])
    )
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "accuracy_vs_uplink.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_one_group_is_labelled_by_its_algorithm_and_common_rounds(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "a", algorithm="fedprox", seed=0, accuracies=(0.5, 0.6, 0.7))
    write_run(root / "b", algorithm="fedprox", seed=1, accuracies=(0.4, 0.8), finished=False)
    [g] = report.summarize([root])["groups"]
    assert g["label"] == "fedprox"
    assert g["common_rounds"] == [1, 2] and g["round"] == 2
    assert g["final"]["values"] == [0.6, 0.8]  # round 2 of both, not seed 0's round 3
    assert g["final"]["mean"] == pytest.approx(0.7)
    assert any("2 common rounds" in n for n in g["notes"])
    assert any("1 of 2 runs unfinished" in n for n in g["notes"])
    assert g["unfinished"] == 1


def test_single_seed_has_no_std(tmp_path):
    write_run(tmp_path / "r", accuracies=(0.5, 0.6))
    summary = report.make_report([tmp_path], tmp_path / "out")
    assert summary["groups"][0]["final"]["std"] is None
    assert "0.6000 ± n/a" in (tmp_path / "out" / "report.md").read_text()


def test_cli_report(tmp_path, capsys):
    write_groups(tmp_path / "runs")
    out = tmp_path / "out"
    code = cli.main(["report", str(tmp_path / "runs"), "--out", str(out), "--metric", "test_loss"])
    assert code == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    # A loss: the best is each seed's min (0.19 at round 2 for seed 0, the final for the others).
    assert (
        "| algorithm.name=fedavg, data.alpha=0.5 | 3 | 3 | 0.1700 ± 0.0361 "
        "| 0.1667 ± 0.0321 (rounds 2, 3, 3) |"
    ) in stdout
    assert "best test_loss, min per seed" in stdout
    data = json.loads((out / "report.json").read_text())
    assert data["metric"] == "test_loss"
    for name in ("report.md", "accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        assert (out / name).is_file()
    assert (out / "accuracy_vs_uplink.png").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["{empty}"], "no run directories"),
        (["{missing}"], "not a directory"),
        (["{runs}", "--metric", "nope"], "no run records metric 'nope'"),
        (["{runs}", "--config.rounds=2"], "report takes no --config.KEY overrides"),
        (["{runs}", "--baseline", "algorithm.name"], "expected KEY=VALUE"),
        (
            ["{runs}", "--baseline", "algorithm.name=nope"],
            "no group has it (algorithm.name: fedavg)",
        ),
        (["{runs}", "--columns", "data.nope"], "--columns: no run has the config key 'data.nope'"),
        (["{runs}", "--panels", "data.alpha,"], "--panels"),
        ([], "--out"),
    ],
)
def test_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    write_run(tmp_path / "runs" / "r", accuracies=(0.5,))
    paths = dict(empty=tmp_path / "empty", missing=tmp_path / "missing", runs=tmp_path / "runs")
    argv = [a.format(**paths) for a in argv]
    code = cli.main(["report", *argv] + (["--out", str(tmp_path / "out")] if argv else []))
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "out" / "report.md").exists()


def test_rounds_to_target_hand_computed(tmp_path):
    # Seed 0 first reaches 0.8 at round 3, seed 1 at round 2 (0.85 >= 0.8), seed 2 at round 4.
    curves = {0: [0.5, 0.7, 0.8, 0.9], 1: [0.6, 0.85, 0.7, 0.9], 2: [0.1, 0.2, 0.3, 0.95]}
    for seed, accs in curves.items():
        write_run(tmp_path / "g" / f"seed{seed}", seed=seed, accuracies=accs)
    s = report.summarize([tmp_path], target=0.8)
    entry = s["groups"][0]["rounds_to_target"]
    assert entry["per_seed"] == [3, 2, 4]
    assert entry["stats"]["mean"] == pytest.approx(3.0)
    assert entry["stats"]["std"] == pytest.approx(1.0)  # sample std of 3, 2, 4
    # A loss reaches its target from above; a target nobody reaches is reported as such.
    assert report.rounds_to_target([{"round": 1, "test_loss": 0.4}], "test_loss", 0.5) == 1
    never = report.summarize([tmp_path], target=0.99)["groups"][0]["rounds_to_target"]
    assert never["stats"] is None and never["reached"] == 0
    out = tmp_path / "out"
    assert cli.main(["report", str(tmp_path / "g"), "--out", str(out), "--target", "0.8"]) == 0
    assert "rounds to test_accuracy ≥ 0.8 (mean ± std)" in (out / "report.md").read_text()
    assert "3.0 ± 1.0" in (out / "report.md").read_text()


def test_legend_labels_shorten_keys_only_when_unambiguous():
    groups = [
        {
            "label": "algorithm.name=feddf, data.alpha=0.1",
            "config": {"algorithm.name": "feddf", "data.alpha": 0.1},
        },
        {
            "label": "algorithm.name=fedavg, data.alpha=1.0",
            "config": {"algorithm.name": "fedavg", "data.alpha": 1.0},
        },
    ]
    assert report_plot.legend_labels(groups) == ["name=feddf, alpha=0.1", "name=fedavg, alpha=1.0"]
    clash = [
        {"label": "a.lr=0.1, b.lr=1.0", "config": {"a.lr": 0.1, "b.lr": 1.0}},
        {"label": "a.lr=0.2, b.lr=1.0", "config": {"a.lr": 0.2, "b.lr": 1.0}},
    ]
    assert report_plot.legend_labels(clash) == ["a.lr=0.1, b.lr=1.0", "a.lr=0.2, b.lr=1.0"]


def test_runs_without_records_and_groups_without_the_metric(tmp_path):
    # A just-started seed (empty metrics.jsonl) is left out, not blanking the row.
    write_run(tmp_path / "a" / "seed0", seed=0, accuracies=[0.5, 0.7])
    write_run(tmp_path / "a" / "seed1", seed=1, accuracies=[0.6, 0.9])
    (tmp_path / "a" / "seed2").mkdir(parents=True)
    config = json.loads((tmp_path / "a" / "seed0" / "config.json").read_text())
    config["seed"] = 2
    config["checkpoint_every"] = 5  # changes no result: still the same group
    (tmp_path / "a" / "seed2" / "config.json").write_text(json.dumps(config))
    (tmp_path / "a" / "seed2" / "metrics.jsonl").write_text("")
    s = report.summarize([tmp_path / "a"], target=0.8)
    (g,) = s["groups"]
    assert g["num_runs"] == 3 and g["final"]["mean"] == pytest.approx(0.8)
    assert g["rounds_to_target"]["per_seed"] == [None, 2]
    assert any("no 'test_accuracy' record yet" in note for note in g["notes"])
    # A metric one group never records: n/a for it, numbers for the other.
    other = tmp_path / "b" / "seed0"
    write_run(other, algorithm="feddf", seed=0, accuracies=[0.4])
    lines = (other / "metrics.jsonl").read_text().splitlines()
    lines = [json.dumps({**json.loads(x), "teacher_test_accuracy": 0.9}) for x in lines]
    (other / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    s = report.summarize([tmp_path / "a", tmp_path / "b"], "teacher_test_accuracy", 0.5)
    by_label = {g["label"]: g for g in s["groups"]}
    assert by_label["algorithm.name=fedavg"]["final"] is None
    assert by_label["algorithm.name=fedavg"]["rounds_to_target"] is None
    assert by_label["algorithm.name=feddf"]["rounds_to_target"]["per_seed"] == [1]


def test_help_and_report_start_without_jax(tmp_path):
    """`fedjax-kd --help`, `bench --help` and `report` import no JAX (a light start)."""
    write_groups(tmp_path / "runs")
    script = (
        "import sys\n"
        "from fedjax_kd import cli\n"
        "for argv in (['--help'], ['bench', '--help'], ['run', '--help'],"
        f" ['report', {str(tmp_path / 'runs')!r}, '--out', {str(tmp_path / 'out')!r}]):\n"
        "    code = cli.main(argv)\n"
        "    assert code == 0, (argv, code)\n"
        "heavy = sorted(m for m in ('jax', 'jaxlib', 'flax', 'optax') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "heavy: []" in out.stdout
    assert (tmp_path / "out" / "report.md").is_file()


#: Final accuracies (3 seeds, or 1) of a grid of algorithms x alphas; FedProx has its own mu.
BASELINE_GRID = {
    ("fedavg", 0.5): [0.80, 0.82, 0.87],  # mean 0.83, sample std 0.0361
    ("feddf", 0.5): [0.90, 0.91, 0.95],  # mean 0.92, std 0.0265: +0.09 > 0.0625, better
    ("fedprox", 0.5): [0.82, 0.83, 0.84],  # mean 0.83, std 0.01: +0.00, no clear difference
    ("fedavg", 0.1): [0.70, 0.70, 0.70],  # mean 0.70, std 0
    ("fedprox", 0.1): [0.60, 0.61, 0.62],  # mean 0.61, std 0.01: -0.09 < -0.01, worse
    ("feddf", 1.0): [0.90],  # no FedAvg at alpha 1.0: nothing to compare with
}


def write_baseline_grid(root):
    for (algorithm, alpha), finals in BASELINE_GRID.items():
        for seed, final in enumerate(finals):
            write_run(
                root / f"{algorithm}-{alpha}" / f"seed{seed}",
                algorithm=algorithm,
                alpha=alpha,
                seed=seed,
                accuracies=(0.1, final - 0.05, final),
                mu=0.1 if algorithm == "fedprox" else 0.01,  # a key tied to one algorithm
            )


def test_baseline_columns_and_panels_hand_computed(tmp_path):
    write_baseline_grid(tmp_path / "runs")
    out = tmp_path / "out"
    summary = report.make_report(
        [tmp_path / "runs"],
        out,
        columns=["data.alpha", "algorithm.name"],
        baseline="algorithm.name=fedavg",
        panels=["data.alpha"],
    )
    # --columns orders the groups: alpha numerically, then the algorithm.
    order = [
        (g["selected"]["data.alpha"], g["selected"]["algorithm.name"]) for g in summary["groups"]
    ]
    assert order == [
        (0.1, "fedavg"),
        (0.1, "fedprox"),
        (0.5, "fedavg"),
        (0.5, "feddf"),
        (0.5, "fedprox"),
        (1.0, "feddf"),
    ]
    vs = {k: g["vs_baseline"] for k, g in zip(order, summary["groups"], strict=True)}
    # The baseline of each group: FedAvg at its alpha (algorithm.mu, FedProx's own, is ignored).
    assert (
        vs[(0.5, "feddf")]["baseline"] == "algorithm.mu=0.01, algorithm.name=fedavg, data.alpha=0.5"
    )
    assert vs[(0.5, "feddf")]["diff"] == pytest.approx(0.09)
    assert vs[(0.5, "feddf")]["noise"] == pytest.approx(np.sqrt(0.0013) + np.sqrt(0.0007))
    assert vs[(0.5, "feddf")]["verdict"] == "better"
    assert vs[(0.5, "fedprox")]["verdict"] == "no clear difference"
    assert vs[(0.5, "fedprox")]["diff"] == pytest.approx(0.0, abs=1e-12)
    assert vs[(0.1, "fedprox")]["verdict"] == "worse"
    assert vs[(0.1, "fedprox")]["diff"] == pytest.approx(-0.09)
    assert vs[(0.1, "fedprox")]["noise"] == pytest.approx(0.01)
    assert vs[(0.1, "fedavg")]["is_baseline"] and vs[(0.5, "fedavg")]["is_baseline"]
    assert vs[(1.0, "feddf")] is None

    md = (out / "report.md").read_text()
    # The columns tell every group apart: no group column; the vs column last.
    assert "| data.alpha | algorithm.name | seeds | final round | final test_accuracy" in md
    assert md.count("| vs algorithm.name=fedavg |") == 1
    assert "|---|---|---:|---:|---:|---:|---:|---:|---:|---|" in md
    assert "| 0.5 | feddf | 3 | 3 | 0.9200 ± 0.0265 |" in md and "| better (+0.0900) |" in md
    assert "| 0.1 | fedprox | 3 | 3 | 0.6100 ± 0.0100 |" in md and "| worse (-0.0900) |" in md
    assert "| no clear difference (+0.0000) |" in md
    assert "| 0.5 | fedavg | 3 | 3 | 0.8300 ± 0.0361 |" in md and "| baseline |" in md
    assert "| 1.0 | feddf | 1 | 3 | 0.9000 ± n/a | 0.9000 ± n/a (round 3) |" in md
    assert "no algorithm.name=fedavg group to compare with" in md
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "accuracy_vs_uplink.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC

    # One panel per alpha; inside one, the legend names only what differs there.
    panels = report_plot.split_panels(summary["groups"], ["data.alpha"])
    assert [title for title, _ in panels] == ["data.alpha=0.1", "data.alpha=0.5", "data.alpha=1.0"]
    assert report_plot.legend_labels(panels[1][1]) == [
        "mu=0.01, name=fedavg",
        "mu=0.01, name=feddf",
        "mu=0.1, name=fedprox",
    ]
    assert report_plot.legend_labels(panels[2][1]) == [panels[2][1][0]["label"]]

    # Columns that do not tell the groups apart keep the group column.
    md = report.format_markdown(report.summarize([tmp_path / "runs"], columns=["algorithm.name"]))
    assert "| algorithm.name | group | seeds |" in md


def test_compare_one_seed_loss_and_value_matching():
    one = {"mean": 0.9, "std": None}
    assert report.compare(one, {"mean": 0.8, "std": 0.1}) == pytest.approx(
        {"diff": 0.1, "noise": None, "verdict": None}
    )
    # For a loss, lower is better.
    low, high = {"mean": 0.2, "std": 0.01}, {"mean": 0.5, "std": 0.01}
    assert report.compare(low, high, higher_is_better=False)["verdict"] == "better"
    assert report.compare(low, high, higher_is_better=True)["verdict"] == "worse"
    # Exactly the sum of the stds is not a difference.
    assert report.compare({"mean": 0.5, "std": 0.25}, {"mean": 0.0, "std": 0.25})["verdict"] == (
        "no clear difference"
    )
    assert report._matches(100.0, "100") and report._matches(True, "true")
    assert not report._matches("fedavg", "feddf")
    assert report.parse_baseline(" algorithm.name = fedavg ") == ("algorithm.name", "fedavg")


def test_cli_report_baseline_columns_panels(tmp_path, capsys):
    write_baseline_grid(tmp_path / "runs")
    argv = ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    argv += ["--columns", "data.alpha,algorithm.name", "--baseline", "algorithm.name=fedavg"]
    assert cli.main([*argv, "--panels", "data.alpha"]) == 0
    stdout = capsys.readouterr().out
    assert "| 0.5 | feddf | 3 | 3 | 0.9200 ± 0.0265 |" in stdout and "better (+0.0900)" in stdout
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["baseline"] == "algorithm.name=fedavg" and data["panels"] == ["data.alpha"]


def report_cli(capsys, *argv):
    """``fedjax-kd report ARGV``: (exit code, stderr lines)."""
    code = cli.main(["report", *map(str, argv)])
    return code, capsys.readouterr().err.strip().splitlines()


def strict_json(text):
    """json.loads that refuses NaN and Infinity (what report.json must never hold)."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


#: (file, its new content, the line number in the message or None, the reason in it).
MALFORMED = [
    ("metrics.jsonl", '{"round": 1, "test_accuracy": 0.5}\n[1, 2]\n', 2, "got an array"),
    ("metrics.jsonl", '{"round": "1", "test_accuracy": 0.5}\n', 1, "'round' is a string"),
    ("metrics.jsonl", '{"round": true, "test_accuracy": 0.5}\n', 1, "'round' is a boolean"),
    ("metrics.jsonl", '{"round": -1, "test_accuracy": 0.5}\n', 1, "'round' is the number -1"),
    ("metrics.jsonl", '{"test_accuracy": 0.5}\n', 1, "no 'round'"),
    ("metrics.jsonl", '{"round": 1, "test_accuracy": "0.5"}\n', 1, "'test_accuracy' is a string"),
    ("metrics.jsonl", '{"round": 1, "test_accuracy": [0.5]}\n', 1, "'test_accuracy' is an array"),
    ("metrics.jsonl", '{"round": 1, "wall_s": false, "test_accuracy": 0.5}\n', 1, "'wall_s'"),
    ("metrics.jsonl", '{"round": 1, "test_accuracy": 1e200}\n', 1, "out of range"),
    ("metrics.jsonl", '{"round": 1, "test_accuracy": 1' + "0" * 120 + "}\n", 1, "out of range"),
    ("metrics.jsonl", '{"round": 2, "test_accuracy": 0.5}\n{"round": 2}\n', 2, "round 2 after"),
    ("metrics.jsonl", '{"round": 1, "test_accuracy": 0.5\n{"round": 2}\n', 1, "not JSON"),
    ("metrics.jsonl", b'{"round": 1, "test_accuracy": 0.5, "x": "\xff"}\n', 1, "not UTF-8"),
    ("metrics.jsonl", '{"round": 1, "x": "\\ud800"}\n', 1, "unpaired UTF-16 surrogate"),
    ("metrics.jsonl", '{"round": 1, "x": ' + "[" * 40 + "]" * 40 + "}\n", 1, "nested deeper"),
    ("metrics.jsonl", '{"round": 1, "x": ' + "[" * 50000 + "]" * 50000 + "}\n", 1, "nested"),
    ("config.json", "[1, 2]", None, "expected a JSON object, got an array"),
    ("config.json", '{"seed": "0"}', None, "'seed' is a string, expected an integer"),
    ("config.json", '{"algorithm": {"name": 3}}', None, "'algorithm.name' is the number 3"),
    ("config.json", '{"client": {"lr": NaN}}', None, "'client.lr' holds nan"),
    ("config.json", '{"a.b": 1, "a": {"b": 2}}', None, "'a.b' is given twice"),
    ("config.json", "{", None, "not JSON"),
    ("config.json", "", None, "not JSON"),
    ("summary.json", "null", None, "expected a JSON object, got null"),
    ("summary.json", '{"rounds": 2.5}', None, "'rounds' is the number 2.5"),
]


@pytest.mark.parametrize("name,content,line,reason", MALFORMED)
def test_malformed_run_files_name_file_and_line(tmp_path, capsys, name, content, line, reason):
    run = tmp_path / "runs" / "r"
    write_run(run, accuracies=(0.5, 0.6))
    path = run / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    code, err = report_cli(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert code == 2, err
    where = f"{path} line {line}: " if line else f"{path}: "
    assert len(err) == 1 and err[0].startswith("error: " + where), err
    assert reason in err[0] and "--skip-malformed" in err[0], err
    assert not (tmp_path / "out").exists()


def test_skip_malformed_warns_once_per_file_and_reports_the_rest(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, accs in enumerate([(0.5, 0.7), (0.6, 0.9), (0.4, 0.4)]):
        write_run(runs / f"seed{seed}", seed=seed, accuracies=accs)
    # Seed 1: two bad lines among its rows (skipped: its rounds 1 and 2 remain).
    path = runs / "seed1" / "metrics.jsonl"
    rows = path.read_text().splitlines()
    path.write_text("\n".join([rows[0], "[]", '{"round": 1}', rows[1]]) + "\n")
    (runs / "seed2" / "config.json").write_text('{"seed": [2]}')  # the whole run is skipped
    (runs / "seed0" / "summary.json").write_text("[]")  # seed 0 counts as unfinished
    out = tmp_path / "out"
    code, err = report_cli(capsys, runs, "--out", out, "--skip-malformed")
    assert code == 0, err
    assert err == [
        f"warning: {runs / 'seed0' / 'summary.json'}: expected a JSON object, got an array; "
        "the run counts as unfinished",
        f"warning: {path}: skipped 2 malformed lines (line 2: expected a JSON object, got an "
        "array; line 3: round 1 after round 1 (rounds must increase))",
        f"warning: {runs / 'seed2' / 'config.json'}: 'seed' is an array, expected an integer; "
        "run skipped",
    ]
    data = strict_json((out / "report.json").read_text())
    (g,) = data["groups"]
    assert g["num_runs"] == 2 and g["unfinished"] == 1
    assert g["final"]["values"] == [0.7, 0.9] and g["best"]["rounds"] == [2, 2]
    assert len(data["skipped"]) == 3
    md = (out / "report.md").read_text()
    assert md.count("* skipped: ") == 3 and "1 of 2 runs unfinished" in md
    # Nothing left to report: one error line after the warnings.
    (runs / "seed0" / "config.json").write_text("0")
    (runs / "seed1" / "config.json").write_text("0")
    code, err = report_cli(capsys, runs, "--out", out, "--skip-malformed")
    assert code == 2 and [e.split(":")[0] for e in err] == ["warning"] * 3 + ["error"], err
    assert err[-1] == f"error: all 3 run directories under {runs} are malformed (skipped)"


def test_missing_values_are_counted_never_nan(tmp_path, capsys):
    """null, absent, NaN and Infinity are left out and counted; report.json stays strict JSON."""
    runs = tmp_path / "runs"
    for seed in range(3):
        write_run(runs / f"seed{seed}", seed=seed, accuracies=(0.2, 0.4, 0.6 + 0.1 * seed))

    def edit(seed, round_, **values):
        path = runs / f"seed{seed}" / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        rows[round_ - 1].update(values)
        rows[round_ - 1] = {k: v for k, v in rows[round_ - 1].items() if v != "absent"}
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    edit(0, 2, test_accuracy=None)  # null
    edit(1, 2, test_accuracy="absent")
    edit(2, 1, test_accuracy=float("nan"))  # written as NaN, as Python writes it
    edit(2, 3, cumulative_uplink_bytes=None, wall_s=float("inf"))
    out = tmp_path / "out"
    code, err = report_cli(capsys, runs, "--out", out, "--target", "0.3")
    assert code == 0, err
    (g,) = strict_json((out / "report.json").read_text())["groups"]
    # Round 3 is the only round every seed has a value at: 0.6, 0.7, 0.8.
    assert g["common_rounds"] == [3] and g["final"]["values"] == pytest.approx([0.6, 0.7, 0.8])
    assert g["final"]["mean"] == pytest.approx(0.7) and g["final"]["std"] == pytest.approx(0.1)
    # Rounds to 0.3 pass over the missing evaluations: seeds 0 and 1 reach it at round 3
    # (their round 2, 0.4, has no value), seed 2 at round 2 (its round 1 is NaN).
    assert g["rounds_to_target"]["per_seed"] == [3, 3, 2]
    assert g["missing"]["test_accuracy"] == {
        "evaluations": 3,
        "of": 9,
        "null_or_absent": 2,
        "nan_or_infinite": 1,
    }
    assert g["missing"]["cumulative_uplink_bytes"] == {"final_round_runs": 1, "of": 3}
    assert g["missing"]["wall_s"] == {"final_round_runs": 1, "of": 3}
    assert "cumulative_downlink_bytes" not in g["missing"] and g["downlink_bytes"] == 600
    assert g["uplink_bytes"] is None and g["wall_s"] is None
    md = (out / "report.md").read_text()
    cells = "| 3 | 3 | 0.7000 ± 0.1000 | 0.7000 ± 0.1000 (round 3) | – | 600 B | – | 2.7 ± 0.6 |"
    assert cells in md
    assert (
        "'test_accuracy' has no value in 3 of 9 evaluations (2 null or absent, 1 NaN or "
        "infinite); those evaluations are left out"
    ) in md
    assert "'cumulative_uplink_bytes' has no value at the final round in 1 of 3 runs" in md
    assert not [line for line in md.splitlines() if line.startswith("|") and "nan" in line]


def test_values_only_nan_or_only_null(tmp_path, capsys):
    write_run(tmp_path / "runs" / "r", accuracies=(0.5,))
    path = tmp_path / "runs" / "r" / "metrics.jsonl"
    path.write_text('{"round": 1, "test_accuracy": NaN, "test_loss": null}\n')
    out = tmp_path / "out"
    code, err = report_cli(capsys, tmp_path / "runs", "--out", out)
    assert code == 2 and err == [
        "error: no run records a finite value of metric 'test_accuracy' (only NaN/Inf)"
    ]
    code, err = report_cli(capsys, tmp_path / "runs", "--out", out, "--metric", "test_loss")
    assert code == 2 and err == [
        "error: no run records metric 'test_loss' (available: test_accuracy)"
    ]
    code, err = report_cli(capsys, tmp_path / "runs", "--out", out, "--metric", "round")
    assert code == 2 and "'round' is the evaluation's round" in err[0]


def test_a_line_being_written_is_ignored_only_while_the_run_is_unfinished(tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    write_run(run, accuracies=(0.5, 0.6), finished=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"round": 3, "test_acc')  # no newline: the writer is still at it
    out = tmp_path / "out"
    code, err = report_cli(capsys, tmp_path / "runs", "--out", out)
    assert code == 0 and err == []
    (g,) = json.loads((out / "report.json").read_text())["groups"]
    assert g["round"] == 2 and any("line 3 is incomplete (being written?)" in n for n in g["notes"])
    (run / "summary.json").write_text('{"rounds": 3}')  # finished: the line is corrupt
    code, err = report_cli(capsys, tmp_path / "runs", "--out", out)
    assert code == 2 and err[0].startswith(f"error: {run / 'metrics.jsonl'} line 3: not JSON")
    # A summary whose rounds disagree with the last metrics line is noted.
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().rsplit("\n", 1)[0])
    code, err = report_cli(capsys, tmp_path / "runs", "--out", out)
    assert code == 0, err
    (g,) = json.loads((out / "report.json").read_text())["groups"]
    assert any("summary.json says 3 rounds, metrics.jsonl ends at round 2" in n for n in g["notes"])


def report_files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_out_is_a_file_or_holds_a_directory_in_the_way(tmp_path, capsys):
    write_groups(tmp_path / "runs")
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    code, err = report_cli(capsys, tmp_path / "runs", "--out", blocker)
    assert code == 2 and err == [f"error: --out {blocker} exists and is not a directory"]
    assert blocker.read_text() == "mine"
    code, err = report_cli(capsys, tmp_path / "runs", "--out", blocker / "sub")
    assert code == 2 and err == [f"error: --out: cannot create {blocker / 'sub'} (Not a directory)"]
    out = tmp_path / "out"
    (out / "report.md" / "x").mkdir(parents=True)
    code, err = report_cli(capsys, tmp_path / "runs", "--out", out)
    assert code == 2 and err == [f"error: cannot write {out / 'report.md'} (Is a directory)"]
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]  # no temp files


@pytest.mark.parametrize(
    "err_no,code", [(errno.EACCES, 2), (errno.ENOSPC, 1), (errno.EDQUOT, 1), (errno.EROFS, 2)]
)
def test_a_failed_write_keeps_the_old_report(tmp_path, capsys, monkeypatch, err_no, code):
    """The OS refuses the third file: the old report stays whole, byte for byte."""
    write_groups(tmp_path / "runs")
    out = tmp_path / "out"
    assert report_cli(capsys, tmp_path / "runs", "--out", out)[0] == 0
    before = report_files(out)
    real_open, opened = os.open, []

    def refusing_open(path, flags, *args):
        if str(path).startswith(str(out)):
            opened.append(path)
            if len(opened) == 3:
                raise OSError(err_no, os.strerror(err_no), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    got, err = report_cli(capsys, tmp_path / "runs", "--out", out, "--metric", "test_loss")
    monkeypatch.undo()
    target = out / "accuracy_vs_round.png"  # report.json, report.md, then the first plot
    assert got == code and err == [f"error: cannot write {target} ({os.strerror(err_no)})"]
    assert report_files(out) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_permission_denied(tmp_path, capsys):
    write_groups(tmp_path / "runs")
    out = tmp_path / "out"
    assert report_cli(capsys, tmp_path / "runs", "--out", out)[0] == 0
    before = report_files(out)
    out.chmod(0o500)
    try:
        code, err = report_cli(capsys, tmp_path / "runs", "--out", out)
    finally:
        out.chmod(0o700)
    assert code == 2 and err == [f"error: cannot write {out / 'report.json'} (Permission denied)"]
    assert report_files(out) == before


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and a kernel that lets us mount; else the test is skipped)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True, timeout=30)


def test_out_of_space_on_a_real_filesystem_keeps_the_old_report(tmp_path, capsys, tiny_tmpfs):
    write_groups(tmp_path / "runs")
    out = tiny_tmpfs / "out"
    assert report_cli(capsys, tmp_path / "runs", "--out", out)[0] == 0
    before = report_files(out)
    with (tiny_tmpfs / "filler").open("wb", buffering=0) as f:  # fill the disk up
        with pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    code, err = report_cli(capsys, tmp_path / "runs", "--out", out, "--metric", "test_loss")
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: cannot write {out}/"), err
    assert err[0].endswith("(No space left on device)"), err
    assert report_files(out) == before  # every old file whole, no temporary file left


def test_plots_of_extreme_values_and_awkward_labels():
    """Numbers at the edge of what the report accepts, and labels matplotlib would parse."""
    curve = [
        {"round": 1, "mean": -1e100, "std": 1e100, "bytes": 1e100, "uplink": 0.0},
        {"round": 2**53, "mean": 1e100, "std": None, "bytes": 1e-300, "uplink": None},
    ]
    groups = [
        {"label": "a=$x", "config": {"a": "$x"}, "num_runs": 2, "curve": curve},
        {"label": "a=$$\n|", "config": {"a": "$$\n|"}, "num_runs": 1, "curve": curve[:1]},
        {"label": "a=\x00", "config": {"a": "\x00"}, "num_runs": 1, "curve": []},
    ]
    images = report_plot.render({"metric": "$loss_", "groups": groups})
    assert list(images) == [
        "accuracy_vs_round.png",
        "accuracy_vs_bytes.png",
        "accuracy_vs_uplink.png",
    ]
    assert all(data[:8] == PNG_MAGIC and len(data) > 1000 for data in images.values())
