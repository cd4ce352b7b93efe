"""experiments/configs: every config documents itself and its smoke variant runs via the CLI."""

import itertools
import json
from pathlib import Path

import pytest

from fedjax_kd import cli, experiment

CONFIGS = sorted((Path(__file__).parent.parent / "experiments" / "configs").glob("*.py"))


def _points(sweep: dict) -> list[list[tuple[str, str]]]:
    grids = sweep["grid"] if isinstance(sweep["grid"], list) else [sweep["grid"]]
    points = []
    for grid in grids:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            points.append([(k, str(v)) for k, v in zip(keys, values, strict=True)])
    return points


def test_there_are_experiment_configs():
    names = {p.stem for p in CONFIGS}
    assert {
        "fedprox_stragglers",
        "mcmahan_noniid",
        "feddf_vs_fedavg",
        "teacher_student_vs_fedavg",
        "kd_benchmark",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_docstring_and_sweep_points_resolve(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = module.__doc__
    # The exact command, the runtime, the paper, the expected result, the smoke variant.
    assert f"fedjax-kd sweep --config experiments/configs/{path.name}" in doc
    assert "fedjax-kd report" in doc
    assert "Expected runtime on a 2-core CPU" in doc
    assert "arXiv" in doc
    assert "Expected" in doc and f"{path.name}:smoke" in doc
    base = experiment.load_config_file(str(path))
    for variant in (None, "smoke"):
        points = _points(module.get_sweep(variant))
        assert points
        for overrides in points:
            experiment.resolve(base, overrides)  # every point is a valid config
    assert module.get_sweep("smoke")["seeds"] == [0]
    assert len(module.get_sweep(None)["seeds"]) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_smoke_variant_runs_through_the_cli(path, tmp_path, capsys):
    code = cli.main(
        ["run", "--config", f"{path}:smoke", "--workdir", str(tmp_path), "--no-progress"]
    )
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    smoke = experiment.load_config_file(f"{path}:smoke")
    assert summary["rounds"] == smoke.rounds
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == smoke.rounds // smoke.eval_every


def test_unknown_variant_is_one_line_error(capsys):
    code = cli.main(["run", "--config", f"{CONFIGS[0]}:nope", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nope" in err[0]
