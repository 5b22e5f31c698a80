"""Test inputs that need only NumPy: value domains, memory layouts, random parameters.

A *value domain* is a function ``(rng, shape) -> float64 array`` that keeps values where an op is smooth
and finite differences are exact enough: away from kinks (relu at 0), from ties (max, top-k), from poles.
The hypothesis strategies in ``strategies.py`` draw a seed and a shape and call one of these.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["uniform", "away_from_zero", "distinct", "LAYOUTS", "as_layout", "randomize_parameters"]


def uniform(lo: float = -2.0, hi: float = 2.0):
    """The domain of values uniform in [lo, hi] (bounded and finite: safe for exp, tanh, softmax…)."""
    return lambda rng, shape: np.asarray(rng.uniform(lo, hi, shape), dtype=np.float64)


def away_from_zero(rng, shape):
    """|x| in [0.1, 2]: relu's kink at 0 stays 1e3 finite-difference steps away."""
    return np.asarray(rng.choice([-1.0, 1.0], shape) * rng.uniform(0.1, 2.0, shape), dtype=np.float64)


def distinct(rng, shape):
    """All values at least 0.08 apart, so max / top-k pick one clear winner that a step cannot change."""
    n = math.prod(shape)
    values = (rng.permutation(n) - n / 2) * 0.1 + rng.uniform(0.0, 0.02, n)
    return values.reshape(shape)


LAYOUTS = ("fortran", "swapped", "strided", "reversed")


def as_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """The same values in another memory layout (a view that is not C-contiguous), read-only.

    fortran: column-major copy · swapped: a transposed view (like ``a.T`` of a transposed buffer) ·
    strided: every other element of a wider buffer (like ``a[:, ::2]``) · reversed: negative strides.
    Read-only, so an op that writes into its input fails loudly.
    """
    a = np.asarray(a)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if a.ndim == 0:
        view = a.copy()
    elif layout == "fortran":
        view = np.asfortranarray(a)
    elif layout == "swapped" and a.ndim >= 2:
        view = np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    elif layout in ("strided", "swapped"):  # 1-D arrays have no axes to swap: strided instead
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        wide[..., ::2] = a
        view = wide[..., ::2]
    else:
        view = np.ascontiguousarray(a[::-1])[::-1]
    view.flags.writeable = False
    return view


def randomize_parameters(module, seed: int, std: float = 0.3):
    """Give every parameter of a tinyslim Module a random value, in place; returns the module.

    Initialisation leaves biases at 0, LayerNorm weights at 1 and LoRA's B at 0: too kind a test of a
    backward. Parameters named like a LayerNorm weight (``ln_*.weight``) get 1 + 0.2·N(0, 1), the others
    std·N(0, 1), in the parameters' own dtype.
    """
    rng = np.random.default_rng(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 2)
        is_ln_weight = name.endswith(".weight") and len(leaf) >= 2 and leaf[-2].startswith("ln_")
        value = 1.0 + 0.2 * rng.standard_normal(p.shape) if is_ln_weight else std * rng.standard_normal(p.shape)
        p.data[...] = value.astype(p.dtype)
    return module
