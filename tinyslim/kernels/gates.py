"""The three gate forms of the low-rank mixture op (docs/methods.md §8.1), as small named containers.

Shape legend: N tokens, E experts, k picks per token.

    DenseGates(G)        G (N, E) float           any real weights; dgate = dG (N, E)
    TopKGates(idx, w)    idx (N, k) int, w (N, k)  distinct experts per row (−1 = empty slot); dgate = dw
    IndexGates(idx)      idx (N,) int             one adapter per token, weight 1, −1 = base only; no dgate

Plain arrays work too: a 2-D float array is dense, a tuple ``(idx, w)`` is top-k and a 1-D integer
array is the per-token index. ``as_gates`` turns any of these into one of the three classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DenseGates", "TopKGates", "IndexGates", "as_gates"]


@dataclass(frozen=True)
class DenseGates:
    G: Any  # (N, E)
    form = "dense"


@dataclass(frozen=True)
class TopKGates:
    idx: Any  # (N, k) int
    w: Any    # (N, k)
    form = "topk"


@dataclass(frozen=True)
class IndexGates:
    idx: Any  # (N,) int
    form = "index"


def _is_int_array(a) -> bool:
    dtype = getattr(a, "dtype", None)
    if dtype is None:
        return False
    try:  # numpy dtypes and anything NumPy understands (torch dtypes are handled by the caller)
        return np.dtype(dtype).kind in "iu"
    except TypeError:
        return "int" in str(dtype)


def as_gates(gates):
    """One of DenseGates / TopKGates / IndexGates from any accepted spelling (see module docstring)."""
    if isinstance(gates, (DenseGates, TopKGates, IndexGates)):
        return gates
    if isinstance(gates, tuple):
        if len(gates) != 2:
            raise TypeError(f"top-k gates are a pair (idx, w), got a tuple of {len(gates)} items")
        return TopKGates(*gates)
    if isinstance(gates, (list, int, float)) or gates is None:
        raise TypeError(f"gates must be an array (dense G (N, E) or index (N,)), a pair (idx, w) or one of "
                        f"DenseGates / TopKGates / IndexGates, got {type(gates).__name__}")
    shape = getattr(gates, "shape", None)
    if shape is None:
        gates = np.asarray(gates)
        shape = gates.shape
    if len(shape) == 1 and _is_int_array(gates):
        return IndexGates(gates)
    if len(shape) == 2:
        return DenseGates(gates)
    raise TypeError(f"gates of shape {tuple(shape)} and dtype {getattr(gates, 'dtype', '?')}: expected a dense G "
                    "(N, E) float array, a pair (idx (N, k) int, w (N, k)), or a per-token index (N,) int array")
