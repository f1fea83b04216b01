"""The notebooks in notebooks/ run top to bottom (nbclient, a fresh kernel, a temporary working folder) without error,
and their committed copies hold executed outputs with real figures."""

from __future__ import annotations

import base64
import io
import shutil

import pytest
from conftest import ROOT, SHARED_DATA

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Executing all five takes about 2 minutes on 2 idle cores (JAX compilation dominates), so they run in the default
# suite, which is what CI runs.


def _figures(nb) -> list[bytes]:
    return [base64.b64decode(out["data"]["image/png"]) for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_holds_executed_outputs_and_figures(path):
    nbformat = pytest.importorskip("nbformat")
    mpimg = pytest.importorskip("matplotlib.image")
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "notebook saved without executing every cell"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"saved outputs hold an error: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    figures = _figures(nb)
    assert figures, "no figure in the saved outputs"
    for png in figures:
        img = mpimg.imread(io.BytesIO(png), format="png")
        assert min(img.shape[:2]) > 100 and img[..., :3].std() > 0.02  # a real picture, not a blank canvas


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(path, work / path.name)
    if SHARED_DATA.exists():  # the notebooks read real data through this variable when it is there
        monkeypatch.setenv("JAXCNMF_SHARED_DATA", str(SHARED_DATA))
    nb = nbformat.read(work / path.name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    assert _figures(nb), "the notebook drew no figure"
