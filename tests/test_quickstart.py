"""The quick-start notebook runs top to bottom on the committed models (as a new user runs it)."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(data_dir, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "docs" / "quickstart.ipynb", as_version=4)
    # a fresh kernel, like a notebook user's: one CPU device, the repository's data dir
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAXROB_DATA_DIR"] = str(data_dir)
    # the repository importable even where the editable install points elsewhere
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "docs")}})
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))
    assert "DiffusionModel" in text and "Classifier" in text
    assert "worst_of@4" in text and "top singular values" in text
    assert not any(o.get("output_type") == "error" for c in nb.cells
                   for o in c.get("outputs", []))
