"""analysis/tutorial.ipynb: committed without outputs, and run top to bottom in a fresh
kernel it draws its figures and tabulates every estimator."""

import json
import math
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from volume_ray.estimators import ESTIMATORS

TUTORIAL = Path(__file__).resolve().parents[1] / "analysis" / "tutorial.ipynb"
CELL_TIMEOUT = 300  # seconds; the slowest cell (the thermodynamic ladder) takes about 45
FIGURES = ("radius_distributions", "estimate_against_directions", "loss_slice")
# A cell appended to the run: it reads the notebook's estimator table back as JSON.
PROBE = "print(table.to_json(orient='records'))"


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> tuple[nbformat.NotebookNode, list[dict], Path]:
    """The tutorial executed in a fresh `python3` kernel whose working folder is a new
    temporary one; its `table` as records; and that folder."""
    notebook = nbformat.read(TUTORIAL, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
    folder = tmp_path_factory.mktemp("tutorial")
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
        resources={"metadata": {"path": str(folder)}},
    )  # fmt: skip
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    probe = notebook.cells.pop()
    printed = "".join(o.text for o in probe.outputs if o.get("name") == "stdout")
    return notebook, json.loads(printed), folder


def _code_cell(notebook: nbformat.NotebookNode, call: str) -> nbformat.NotebookNode:
    """The one code cell whose source makes `call`."""
    found = [c for c in notebook.cells if c.cell_type == "code" and call in c.source]
    assert len(found) == 1, f"expected one cell calling {call}, found {len(found)}"
    return found[0]


def test_committed_notebook_is_valid_and_stripped():
    notebook = nbformat.read(TUTORIAL, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    assert "widgets" not in notebook.metadata
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code, "the tutorial has no code"
    for cell in code:
        assert cell.outputs == [], f"outputs committed in cell:\n{cell.source[:200]}"
        assert cell.execution_count is None, f"execution count committed:\n{cell.source[:200]}"
    for cell in notebook.cells:
        assert not {"execution", "widgets"} & set(cell.metadata), cell.source[:200]


@pytest.mark.parametrize("figure", FIGURES)
def test_tutorial_draws_its_figures(executed, figure):
    notebook, _, _ = executed
    outputs = _code_cell(notebook, f"figures.{figure}(").outputs
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, f"figures.{figure} drew {len(images)} images, not 1"


def test_tutorial_tabulates_every_estimator_with_a_finite_estimate(executed):
    notebook, table, _ = executed
    assert [row["estimator"] for row in table] == list(ESTIMATORS)
    for row in table:
        assert math.isfinite(row["log_volume"]), row
        assert row["n_directions"] == 500 and row["n_params"] == 610, row
        if row["ci_valid"]:
            assert row["ci_low"] <= row["log_volume"] <= row["ci_high"], row
        else:  # only the paper's estimates, decided by one direction, withhold theirs
            assert row["estimator"] in ("paper", "censored_lower_bound"), row
            assert row["ess"] < 10, row
    by_name = {row["estimator"]: row for row in table}
    # Jensen: n * mean(ln r) <= log mean(r^n) over the same radii (none are censored here)
    assert by_name["typical"]["n_censored"] == 0
    assert by_name["typical"]["log_volume"] <= by_name["paper"]["log_volume"]
    shown = _code_cell(notebook, "table = volume_table(").outputs
    text = "".join(o.get("data", {}).get("text/plain", "") for o in shown)
    for estimator in ESTIMATORS:
        assert estimator in text, f"the displayed table does not name {estimator}"


def test_tutorial_writes_no_files(executed):
    _, _, folder = executed
    assert list(folder.iterdir()) == []
