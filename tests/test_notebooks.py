"""Execute every student notebook (CI runs them): a cell that raises fails the test.

The notebooks are committed with their outputs; here they run again (outputs are not compared), each in
``notebooks/`` (so ``import _helpers`` works) with its own time limit. 04 runs a shortened ``tiny`` job
into a temporary directory when ``runs/default`` has no export.
"""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook execution needs the `test` extra (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="notebook execution needs the `test` extra (nbclient)")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# per-cell time limits (seconds): generous multiples of the measured times on 2 CPU cores
TIMEOUTS = {"04_a_real_run.ipynb": 300, "05_parity_and_its_regime.ipynb": 600}
EXPECTED = ["01_ar_is_a_schedule.ipynb", "02_velocities_and_euler.ipynb",
            "03_decentralized_equals_centralized.ipynb", "04_a_real_run.ipynb", "05_parity_and_its_regime.ipynb"]


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("outputs") for c in code[:1]), "the notebook is committed without outputs"
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the committed notebook has no figures"
    assert path.stat().st_size < 600_000, f"{path.name} is {path.stat().st_size} bytes (keep it under ~600 KB)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUTS.get(path.name, 120), kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors == []
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert outputs.strip(), "the notebook printed nothing"
