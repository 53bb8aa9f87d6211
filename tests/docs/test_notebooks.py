"""The notebooks run top to bottom at toy size and write their figures; the .ipynb match the .py."""

import os
import pathlib

import jupytext
import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
FIGURES = {
    "01_quickstart": ["quickstart_weights.png", "quickstart_training.png"],
    "02_why_continuous": [
        "pruning_functions_1d.png",
        "fig1_delta_f1_vs_f2.png",
        "fig2_predicted_vs_actual.png",
        "fig4_flip_rate.png",
    ],
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_at_toy_size_and_writes_its_figures(name, tmp_path, monkeypatch):
    monkeypatch.setenv("NOTEBOOK_SCALE", "toy")
    monkeypatch.setenv("NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )  # sste_jax uninstalled
    notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(FIGURES[name])
    for figure in FIGURES[name]:
        head = (tmp_path / figure).read_bytes()[:8]
        assert head == PNG_MAGIC, f"{figure} is not a PNG"
        assert (tmp_path / figure).stat().st_size > 5_000, f"{figure} looks empty"


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_committed_ipynb_is_generated_from_the_py_file(name):
    """The .ipynb files are `jupytext --to ipynb` of the .py files, outputs stripped: never edited by hand."""
    from_py = jupytext.read(NOTEBOOKS / f"{name}.py")
    committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in from_py.cells], (
        f"notebooks/{name}.ipynb is out of date: run `jupytext --to ipynb notebooks/{name}.py`"
    )
    for cell in committed.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"notebooks/{name}.ipynb has outputs"
