"""Shared test set-up: hypothesis profiles, import from a source checkout, the torch oracle.

Hypothesis profiles (choose with the environment variable HYPOTHESIS_PROFILE, default "ci"):

* ``ci``        15 examples per test, derandomized: the same examples on every run and every machine
                (with the pinned hypothesis and the same Python), no example database. ``make test``.
* ``dev``       30 fresh random examples per test on every run: exploration. A failure is saved in
                ``.hypothesis/`` and replayed first on the next ``dev`` run until it passes.
                ``make test-explore`` (``make test-explore SEED=7`` replays one run: --hypothesis-seed).
* ``thorough``  300 random examples per test (before a release, or after touching an op's backward).

torch is a test-only dependency (the float64 oracle). Tests that need it either take the
session fixture ``torch`` or carry the marker ``@pytest.mark.torch``; both skip, with a message
saying how to install it, when torch is absent.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# ---- `import tinyslim` from a source checkout (no install needed) ------------------------------
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout wins over any installed copy

# ---- hypothesis profiles -----------------------------------------------------------------------
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=_QUIET)
settings.register_profile("dev", max_examples=30, deadline=None, print_blob=True, suppress_health_check=_QUIET)
settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=_QUIET)
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")  # a newcomer's `pytest` never fails at random
if _PROFILE not in ("ci", "dev", "thorough"):
    raise pytest.UsageError(f"HYPOTHESIS_PROFILE={_PROFILE!r} is unknown; use one of ci, dev, thorough")
settings.load_profile(_PROFILE)

# ---- torch, the oracle -------------------------------------------------------------------------
TORCH_MISSING = ("torch is not installed: it is the test-only float64 oracle for tinyslim's ops, model and "
                 "optimizers. Install it with `pip install torch==2.13.0` (CPU build) or run `make test`.")
try:
    import torch as _torch
except ImportError:
    _torch = None
else:
    _torch.set_num_threads(1)  # the CI machine has 2 shared cores; the oracle's tensors are tiny
HAVE_TORCH = _torch is not None


def pytest_configure(config):
    config.addinivalue_line("markers", "torch: the test compares against PyTorch (skipped when torch is absent)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("torch") is not None and not HAVE_TORCH:
        pytest.skip(TORCH_MISSING)


@pytest.fixture(scope="session")
def torch():
    """The torch module (single-threaded), or a skip with instructions when it is not installed."""
    if not HAVE_TORCH:
        pytest.skip(TORCH_MISSING)
    return _torch
