"""Every notebook runs top to bottom on CPU within its time budget, and is stored without outputs.

Parametrised over notebooks/*.ipynb, so new notebooks are picked up automatically. Executed with
nbclient in a fresh kernel with CI=1 (each notebook's first cell then shrinks the work).
"""

import json
import time
from pathlib import Path

import pytest

NB_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
BUDGET_S = 90
ALLOWED_NB_METADATA = {"kernelspec", "language_info"}


def _ids(paths):
    return [p.name for p in paths]


def test_notebooks_exist_and_are_numbered():
    assert len(NOTEBOOKS) >= 3, "notebooks/01..03 are missing"
    prefixes = [p.name[:3] for p in NOTEBOOKS]
    assert all(p[:2].isdigit() and p[2] == "_" for p in prefixes), prefixes
    assert len(set(prefixes)) == len(prefixes), f"duplicate notebook numbers: {prefixes}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stripped(path):
    nb = json.loads(path.read_text())
    assert set(nb["metadata"]) <= ALLOWED_NB_METADATA, f"metadata noise: {sorted(nb['metadata'])}"
    for cell in nb["cells"]:
        assert not cell.get("metadata"), f"cell {cell.get('id')} carries metadata {cell['metadata']}"
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"cell {cell.get('id')} has outputs; strip them before committing"
            )
    ids = [cell.get("id") for cell in nb["cells"]]
    assert None not in ids and len(set(ids)) == len(ids), "cell ids must be present and unique (nbformat renames copies)"
    first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert "setup(" in "".join(first_code["source"]), "the first code cell must call setup() (CPU/CI detection)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_has_the_recurring_structure(path):
    """Opens with "What you will see", closes with "What to remember" and "Try this", holds at least
    one exercise (a checker from the library, then a folded solution), and no algorithm code: the only
    functions a notebook defines are the learner's answers that an exercise checker receives."""
    nb = json.loads(path.read_text())
    cells = [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]
    assert cells[0][0] == "markdown" and "## What you will see" in cells[0][1]
    tail = "\n".join(src for kind, src in cells[-2:] if kind == "markdown")
    assert "## What to remember" in tail and "## Try this" in tail
    checks = [i for i, (kind, src) in enumerate(cells) if kind == "code" and "exercises.check_" in src]
    assert checks, "no exercise checker cell"
    assert any(
        cells[j][0] == "markdown" and "<details>" in cells[j][1]
        for i in checks
        for j in range(i + 1, min(i + 3, len(cells)))
    ), "an exercise needs a folded solution right after its checker"
    for kind, src in cells:
        if kind == "code" and "def " in src:
            assert "exercises.check_" in src, f"a notebook defines a function outside an exercise: {src[:80]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes(path, monkeypatch, executed_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("CI", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=BUDGET_S, kernel_name="python3", resources={"metadata": {"path": str(NB_DIR)}}
    )
    t0 = time.perf_counter()
    client.execute()
    took = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors
    assert took < BUDGET_S, f"{path.name} took {took:.0f} s on this machine (budget {BUDGET_S} s)"
    # every code cell ran and the figure cells produced something to look at
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
    shown = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("output_type") in ("display_data", "execute_result")
    ]
    assert shown, f"{path.name} displays nothing"
    executed_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, executed_dir / path.name)  # the site test builds its pages from these
