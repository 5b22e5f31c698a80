"""Continual-learning metrics on an accuracy matrix (docs/methods.md §3.7, docs/experiments.md scenario A).

R[i][j] is the accuracy on task j after training through task i (i, j = 0..T−1; row i is filled
after task i). Pure functions of R: no model, no state.

    ACC (= AA) = (1/T) Σ_j R[T−1][j]                       accuracy on every task at the end
    BWT        = (1/(T−1)) Σ_{j<T−1} (R[T−1][j] − R[j][j])  how much later tasks undid earlier ones
    learning accuracy = (1/T) Σ_j R[j][j]                   plasticity: accuracy right after learning
    forgetting F_j = max_{i<T−1} R[i][j] − R[T−1][j]        the largest drop from the best seen (j < T−1)

Shape legend: T tasks.
"""
from __future__ import annotations

import numpy as np

__all__ = ["as_matrix", "average_accuracy", "backward_transfer", "learning_accuracy", "forgetting",
           "summarize", "mean_std"]


def as_matrix(R) -> np.ndarray:
    """R as a float (T, T) array, checked square with values in [0, 1]."""
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 1:
        raise ValueError(f"an accuracy matrix must be square (T, T) with T >= 1, got shape {R.shape}")
    if np.isnan(R).any() or R.min() < 0 or R.max() > 1:
        raise ValueError("accuracy matrix entries must be fractions in [0, 1] (no NaN); "
                         f"got range [{np.nanmin(R)}, {np.nanmax(R)}]")
    return R


def average_accuracy(R) -> float:
    """ACC: mean accuracy over all tasks after the last one."""
    R = as_matrix(R)
    return float(R[-1].mean())


def backward_transfer(R) -> float:
    """BWT: mean change of each earlier task's accuracy from right after it to the end (0 for T = 1;
    negative = forgetting, closer to 0 is better)."""
    R = as_matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean(R[-1, :-1] - np.diag(R)[:-1]))


def learning_accuracy(R) -> float:
    """Mean accuracy on each task right after training on it (the diagonal)."""
    return float(np.diag(as_matrix(R)).mean())


def forgetting(R) -> list[float]:
    """F_j for every task but the last: the best accuracy it ever had minus its final accuracy."""
    R = as_matrix(R)
    return [float(R[:-1, j][j:].max() - R[-1, j]) for j in range(R.shape[0] - 1)]


def summarize(R) -> dict:
    """ACC, BWT, learning accuracy and mean forgetting of one matrix."""
    F = forgetting(R)
    return {"acc": average_accuracy(R), "bwt": backward_transfer(R), "learning_acc": learning_accuracy(R),
            "forgetting": float(np.mean(F)) if F else 0.0}


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of one number over seeds."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_std of no values")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
