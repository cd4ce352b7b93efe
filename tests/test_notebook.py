"""The quickstart notebook: committed without outputs, and runs end to end."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import ipykernel  # noqa: F401 - the kernel the notebook runs on (a dev dependency)
import matplotlib  # noqa: F401 - the notebook plots (a dev dependency)
import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_quickstart.ipynb"
PYTHON_NAMES = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info)}


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [], f"cell {cell.get('id')} has stored outputs"
        assert cell.execution_count is None, f"cell {cell.get('id')} has an execution count"
    # The notebook uses the library, it does not redefine it.
    source = "\n".join(c.source for c in code_cells)
    assert "from fedjax_kd import experiment" in source


def _kernel_manager(tmp_path: Path):
    """Returns None if the ``python3`` kernelspec runs ``sys.executable``, else a manager that does.

    jupyter_client substitutes ``sys.executable`` for a spec whose ``argv[0]`` is a bare
    ``python``/``python3``/``python3.X``; any other argv (a spec installed for another
    interpreter) is replaced by a private kernelspec that launches this interpreter.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    from jupyter_client.manager import KernelManager

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        if spec.argv and (spec.argv[0] in PYTHON_NAMES or spec.argv[0] == sys.executable):
            return None
    except NoSuchKernel:
        pass
    kernel_dir = tmp_path / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (test)",
                "language": "python",
            }
        )
    )
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def test_notebook_executes(tmp_path, monkeypatch):
    # Headless, and with no backend forced from outside: the notebook must pick the inline one.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    # CPU only: the pytest process may already hold the accelerator's memory.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    num_cells = len(nb.cells)
    # An extra last cell (in memory only) reports which interpreter ran the kernel.
    probe = "import sys\nprint('KERNEL_PYTHON=' + sys.executable)"
    nb.cells.append(nbformat.v4.new_code_cell(probe))

    kwargs = {}
    km = _kernel_manager(tmp_path)
    if km is not None:
        kwargs["km"] = km
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
        **kwargs,
    )
    client.execute()  # raises CellExecutionError if any cell fails

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, errors

    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    match = re.search(r"KERNEL_PYTHON=(.+)", text)
    assert match and match.group(1).strip() == sys.executable, match and match.group(1)

    images = [
        out
        for cell in nb.cells[:num_cells]
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type in ("display_data", "execute_result") and "image/png" in out.data
    ]
    assert len(images) >= 2, "expected the accuracy curve and the label-distribution plot"

    match = re.search(r"'test_accuracy': ([0-9.eE+-]+)", text)
    assert match, "the notebook did not print result.summary"
    assert float(match.group(1)) > 0.8
