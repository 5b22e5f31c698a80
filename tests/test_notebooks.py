"""Tutorials work as notebooks: converted with jupytext, run by a real IPython kernel (nbclient) in fast mode.

A figure must show inline (an image/png output in the notebook), which it does only if the tutorial
leaves matplotlib's backend to the kernel (no forced "Agg"); the PNG under runs/tutorials/ must still be
written, and the tutorial's own checks must pass. Two tutorials with plots are enough to hold the rule, and
tutorial 11 runs here too: the torch path (torch and transformers imported in the kernel) as a notebook;
tests/test_tutorials.py runs every tutorial as a script.
"""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = {"03_forgetting": "03_forgetting_matrix.png", "09_kernel": "09_roofline.png",
             "11_toy_to_real": "11_two_engines.png"}
MISSING = ("the notebook test needs jupytext, nbclient and ipykernel (test extras): run `make test`, or "
           "`pip install -e '.[test]'`")


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_tutorial_runs_as_a_notebook_and_shows_its_figures_inline(name, tmp_path, monkeypatch):
    try:
        import jupytext
        from nbclient import NotebookClient
    except ImportError:
        pytest.skip(MISSING)
    if name == "11_toy_to_real":
        pytest.importorskip("transformers")  # the torch path (torch and transformers: the torch extra)
    nb = jupytext.read(ROOT / "tutorials" / f"{name}.py")
    assert any(c.cell_type == "markdown" for c in nb.cells) and any(c.cell_type == "code" for c in nb.cells)
    # the kernel inherits this environment: fast mode, the checkout importable, and no backend chosen for it
    monkeypatch.setenv("TINYSLIM_FAST", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} showed no figure inline (is a backend forced?)"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "checks passed" in text
    assert (tmp_path / "runs" / "tutorials" / NOTEBOOKS[name]).is_file()  # the script's PNG is still written
