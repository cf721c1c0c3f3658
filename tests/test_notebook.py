"""The quickstart notebook executes top to bottom (SRD map, SAE, concept card, ICAT edges)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                   ).execute()
    elapsed = time.perf_counter() - start
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "top edges" in outputs and "accuracy" in outputs
    print(f"quickstart notebook: {elapsed:.1f} s")
