"""Execute every student notebook with the exercise solutions filled in (CI runs them): a cell that raises fails.

The notebooks are committed with their outputs, executed with the answer cells left blank (their check cells
print "not answered yet"). Here each notebook runs again (outputs are not compared), in ``notebooks/`` (so
``import _helpers`` works), with every answer cell (tagged ``exercise-N``) replaced by the block ``# %% exercise N``
of ``notebooks/solutions/<notebook>.py``; every check cell (tagged ``check-N``) must then print "correct". A wrong
answer must make its check cell fail (``test_a_wrong_answer_fails_its_check``). 04 runs a shortened ``tiny`` job
into a temporary directory when ``runs/default`` has no export (as in CI), and says so.
"""
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook execution needs the `test` extra (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="notebook execution needs the `test` extra (nbclient)")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
SOLUTIONS = NOTEBOOK_DIR / "solutions"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# per-cell time limits (seconds): generous multiples of the measured times on 2 CPU cores
TIMEOUTS = {"04_a_real_run.ipynb": 300, "05_parity_and_its_regime.ipynb": 600}
EXPECTED = ["01_ar_is_a_schedule.ipynb", "02_velocities_and_euler.ipynb",
            "03_decentralized_equals_centralized.ipynb", "04_a_real_run.ipynb", "05_parity_and_its_regime.ipynb"]


def _tag(cell, prefix: str) -> int | None:
    for tag in cell.get("metadata", {}).get("tags", []):
        m = re.fullmatch(rf"{prefix}-(\d+)", tag)
        if m:
            return int(m.group(1))
    return None


def solutions(path: Path) -> dict[int, str]:
    """``{N: code}`` from ``notebooks/solutions/<stem>.py``: the blocks after ``# %% exercise N``."""
    text = (SOLUTIONS / f"{path.stem}.py").read_text(encoding="utf-8")
    parts = re.split(r"^# %% exercise (\d+)\s*$", text, flags=re.MULTILINE)
    return {int(n): code.strip() + "\n" for n, code in zip(parts[1::2], parts[2::2])}


def _execute(nb, path: Path):
    client = nbclient.NotebookClient(nb, timeout=TIMEOUTS.get(path.name, 120), kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


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
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == [], "the committed notebook holds an error output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_ends_with_exercises_and_their_solutions(path):
    """2-3 exercises, each an answer cell left blank (``= None``), then its check cell (which printed "not answered
    yet" in the committed outputs); a solution block per exercise."""
    nb = nbformat.read(path, as_version=4)
    answers = [(i, _tag(c, "exercise")) for i, c in enumerate(nb.cells) if _tag(c, "exercise")]
    checks = {_tag(c, "check"): i for i, c in enumerate(nb.cells) if _tag(c, "check")}
    numbers = [n for _, n in answers]
    assert 2 <= len(numbers) <= 3 and numbers == list(range(1, len(numbers) + 1)), numbers
    for i, n in answers:
        assert "= None" in nb.cells[i].source, f"exercise {n}: the answer cell should start blank"
        assert checks.get(n) == i + 1, f"exercise {n}: its check cell must follow the answer cell"
        assert "H.check(" in nb.cells[i + 1].source
        assert "not answered yet" in _text(nb.cells[i + 1]), f"exercise {n}: committed check output"
    assert sorted(solutions(path)) == numbers


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_with_the_solutions(path):
    nb = nbformat.read(path, as_version=4)
    blocks = solutions(path)
    for cell in nb.cells:
        n = _tag(cell, "exercise")
        if n is not None:
            cell.source = blocks[n]
    _execute(nb, path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    assert "".join(_text(c) for c in code).strip(), "the notebook printed nothing"
    for cell in nb.cells:
        n = _tag(cell, "check")
        if n is not None:
            assert "correct" in _text(cell) and "not answered" not in _text(cell), (path.name, n, _text(cell))


def test_a_wrong_answer_fails_its_check():
    """Notebook 01 up to its first check cell, with a wrong answer (the AR table instead of the any-order one):
    the check cell raises."""
    path = NOTEBOOK_DIR / "01_ar_is_a_schedule.ipynb"
    nb = nbformat.read(path, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if _tag(c, "exercise") == 1)
    nb.cells = [c for c in nb.cells[:3] if c.cell_type == "code"] + nb.cells[first:first + 2]
    nb.cells[-2].source = "perm = [2, 0, 1]\nkappa_any = np.asarray(schedules.autoregressive(3).kappa)\n"
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="Exercise 1: not quite"):
        _execute(nb, path)
