"""Verify your own gradients: the toolkit tinyslim's own tests use, for the op or adapter you write.

    import numpy as np
    from tinyslim.testing import gradcheck
    x = np.random.default_rng(0).uniform(-3, 3, (4, 5))
    gradcheck(lambda x: MySiLU.apply(x), x)      # silent, or GradcheckError with a side-by-side report

What is here (nothing needs torch or hypothesis to import; torch is imported when a torch check runs):

gradcheck(fn, *inputs)                          backward vs central differences, float64, rel. error < 1e-6
assert_matches_torch(fn, torch_fn, *inputs)     forward + every input gradient vs torch autograd, float64
assert_module_matches_torch(module, twin, inputs, name_map)
                                                outputs + every trainable parameter's gradient vs torch
check_adapter_invariants(method, ...)           what every adapter method must satisfy (no-op at init,
                                                frozen base, adapter-only grads, save/load, merge)
assert_close(actual, expected, rtol, atol)      np.allclose with a readable report
uniform, away_from_zero, distinct               value domains: keep inputs where finite differences work
as_layout, LAYOUTS                              the same values in a non-contiguous memory layout
randomize_parameters(module, seed)              initialisation is too kind a test: random weights
tinyslim.testing.strategies                     hypothesis strategies (needs hypothesis): shapes, arrays,
                                                views, gate patterns, low-rank problems, GPT configs

Every failing check raises CheckError (an AssertionError); gradcheck raises its subclass GradcheckError.
"""
from __future__ import annotations

from .adapters import check_adapter_invariants
from .arrays import LAYOUTS, as_layout, away_from_zero, distinct, randomize_parameters, uniform
from .gradcheck import InputCheck, gradcheck, numerical_grad, relative_error
from .report import CheckError, GradcheckError, assert_close
from .torch_check import assert_matches_torch, assert_module_matches_torch, copy_to_torch, require_torch

__all__ = ["gradcheck", "GradcheckError", "CheckError", "InputCheck", "numerical_grad", "relative_error",
           "assert_close", "assert_matches_torch", "assert_module_matches_torch", "copy_to_torch", "require_torch",
           "check_adapter_invariants", "uniform", "away_from_zero", "distinct", "LAYOUTS", "as_layout",
           "randomize_parameters", "strategies"]


def __getattr__(name):
    if name == "strategies":  # imported on first use: it needs hypothesis, the rest does not
        import importlib
        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module 'tinyslim.testing' has no attribute {name!r}")
