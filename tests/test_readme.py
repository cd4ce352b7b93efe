"""README stays true: its Python example runs and CI runs its test command."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme():
    return (ROOT / "README.md").read_text()


def test_library_example_runs():
    block = re.search(r"```python\n(.*?)```", readme(), re.S).group(1)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["result"].summary["test_accuracy"] > 0.85
    assert float(namespace["metrics"]["train_loss"]) > 0


def test_ci_runs_the_readme_test_command():
    section = re.search(r"<!-- test-command -->\n```\n(.*?)\n```", readme(), re.S).group(1)
    extracted = subprocess.run(
        ["bash", str(ROOT / ".ci/run"), "--print-command"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    assert extracted.strip() == section
    assert "pytest" in section and "ruff check" in section and "ruff format --check" in section
