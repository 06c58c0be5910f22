"""Every notebook runs headless, small: the cell tagged `parameters` is followed by an injected cell with
the notebook's own `metadata.workbench.test_parameters` (as papermill would), and MLflow logs to a
temporary store. Notebooks are committed without outputs, and their outputs hold no MLflow log lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from workbench.tracking import local_store_uri

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
#: Run against a new, empty store, whose first open creates and migrates its tables (as a new user's does).
ON_A_FRESH_STORE = {"01_quickstart.ipynb"}
#: An INFO line of MLflow's or alembic's loggers (`... INFO mlflow.store.db.utils: ...`,
#: `INFO  [alembic.runtime.migration] ...`).
LIBRARY_INFO_LINE = re.compile(r"\bINFO\b.*\b(mlflow|alembic)\b")


def with_test_parameters(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    overrides = notebook.metadata.get("workbench", {}).get("test_parameters", {})
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "a notebook has exactly one cell tagged `parameters`"
    source = "\n".join(f"{name} = {value!r}" for name, value in overrides.items())
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source or "pass"))
    return notebook


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_clean_and_runs(path, tracking_uri, tmp_path, monkeypatch):
    if path.name in ON_A_FRESH_STORE:
        tracking_uri = local_store_uri(tmp_path / "fresh-mlruns")
    raw = json.loads(path.read_text())
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, "committed with outputs"
            assert not cell["source"] or not "".join(cell["source"]).lstrip().startswith(("def ", "class ")), \
                "notebooks hold narrative and calls, not logic"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = with_test_parameters(nbformat.read(path, as_version=4))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    noise = [line for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "stream"
             for line in o["text"].splitlines() if LIBRARY_INFO_LINE.search(line)]
    assert not noise, noise
    if path.name in ON_A_FRESH_STORE:  # so the check above saw a store being created and migrated
        assert (tmp_path / "fresh-mlruns" / "mlflow.db").exists()
