"""The notebooks execute end to end on small sizes, so they never rot."""

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("GLUCAST_NB_SMALL", "1")
    monkeypatch.setenv("GLUCAST_ROOT", str(path.parents[1]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GLUCAST_WORKDIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert not errors, errors
    assert os.environ["GLUCAST_NB_SMALL"] == "1"


def test_the_four_notebooks_are_there():
    names = {p.name for p in NOTEBOOKS}
    assert {
        "01_data_and_simulator.ipynb",
        "02_train_compare_mlflow.ipynb",
        "03_closed_loop.ipynb",
        "04_alerts.ipynb",
    } <= names
