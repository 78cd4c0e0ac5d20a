"""Every tutorial notebook (`tutorials/*.ipynb`) runs top to bottom in smoke mode.

The notebooks read ``TFPRUNE_SMOKE=1`` and shrink their epochs and data; each
must finish within `TIMEOUT_S` (override with ``TFPRUNE_NOTEBOOK_TIMEOUT``).
They run in a temporary working directory, so files they write do not land
in the repository, and the executed notebook is not saved.
"""

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))
TIMEOUT_S = int(os.environ.get("TFPRUNE_NOTEBOOK_TIMEOUT", "600"))

_HOW = "is not installed (pip install -e '.[dev]')"
nbformat = pytest.importorskip("nbformat", reason=f"nbformat {_HOW}")
nbclient = pytest.importorskip("nbclient", reason=f"nbclient {_HOW}")


def _params():
    if not NOTEBOOKS:
        return [pytest.param(None, marks=pytest.mark.skip(reason="no notebook in tutorials/ yet"),
                             id="none")]
    return [pytest.param(nb, id=nb.stem) for nb in NOTEBOOKS]


@pytest.mark.parametrize("notebook", _params())
def test_tutorial_runs_in_smoke_mode(notebook, tmp_path, monkeypatch):
    # The kernel is a subprocess: it inherits this environment.
    monkeypatch.setenv("TFPRUNE_SMOKE", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    elapsed = time.perf_counter() - start
    assert elapsed < TIMEOUT_S, f"{notebook.name} took {elapsed:.0f} s in smoke mode"
    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{notebook.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"


def test_notebooks_are_valid_and_saved_without_errors():
    for notebook in NOTEBOOKS:
        nb = nbformat.read(notebook, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
                assert out.get("output_type") != "error", (
                    f"{notebook.name} is saved with an error output: {out.get('ename')}")
