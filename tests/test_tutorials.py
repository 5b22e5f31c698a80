"""Every tutorial runs to the end in fast mode (TINYSLIM_FAST=1) and its own asserts hold."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
# the optional packages a tutorial needs (the test extras install them; without them it is skipped)
NEEDS = {"11_toy_to_real": ("torch", "transformers")}


def skip_without_its_packages(name: str) -> None:
    missing = [m for m in NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"tutorial {name} needs {', '.join(missing)} (the torch extra: pip install -e '.[torch]')")


def test_there_are_tutorials():
    assert len(TUTORIALS) >= 2


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(path, tmp_path):
    skip_without_its_packages(path.stem)
    env = dict(os.environ, TINYSLIM_FAST="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"{path.name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "checks passed" in out.stdout
