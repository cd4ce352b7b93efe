"""experiments/privacy_tradeoff.py: grouping, means and epsilon from hand-made run dirs."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "privacy_tradeoff.py"


@pytest.fixture(scope="module")
def tradeoff():
    spec = importlib.util.spec_from_file_location("privacy_tradeoff", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(root: Path, name: str, algorithm: str, seed: int, acc: float, z=None, eps=None):
    d = root / name
    d.mkdir(parents=True)
    dp = {"clip_norm": 1.0 if z else 0.0, "output_clip_norm": 0.0, "noise_multiplier": z or 1.0}
    config = {"data": {"name": "digits"}, "algorithm": {"name": algorithm}, "dp": dp, "seed": seed}
    (d / "config.json").write_text(json.dumps(config))
    (d / "metrics.jsonl").write_text(json.dumps({"round": 1, "test_accuracy": acc}) + "\n")
    summary = {"test_accuracy": acc, "rounds": 1}
    if eps is not None:
        summary["dp_epsilon"] = eps
    (d / "summary.json").write_text(json.dumps(summary))


def test_groups_means_and_the_table(tradeoff, tmp_path, capsys):
    for seed, acc in enumerate([0.5, 0.7, 0.6]):
        _run(tmp_path, f"p{seed}", "fedavg", seed, acc, z=2.0, eps=3.5)
    for seed, acc in enumerate([0.9, 0.8]):
        _run(tmp_path, f"n{seed}", "fedavg", seed, acc)
    assert tradeoff.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runs"] == 5
    private, public = out["groups"]
    assert private["private"] and private["noise_multiplier"] == 2.0 and private["epsilon"] == 3.5
    assert private["accuracy_mean"] == pytest.approx(0.6)
    assert private["accuracy_std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.6]))
    assert not public["private"] and public["accuracy_mean"] == pytest.approx(0.85)
    table = (tmp_path / "out" / "tradeoff.md").read_text()
    assert "| digits | fedavg | 2 | 3.5 | 3 | 0.6000 ± 0.1000 |" in table
    assert "| digits | fedavg | – | non-private | 2 |" in table
    assert (tmp_path / "out" / "accuracy_vs_epsilon.png").stat().st_size > 0


def test_no_run_is_one_error_line(tradeoff, tmp_path, capsys):
    assert tradeoff.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: no finished run")
