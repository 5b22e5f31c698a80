"""The stability–plasticity frontier: comparing forgetting at matched learning.

A method that learns less also forgets less: measured with plain LoRA on rev → cap, a smaller learning
rate learned less and kept more of the base. So "method A forgets less than B" means something only at
the same learned accuracy. Scenario A therefore runs every method at several learning rates; each run is
one point (learned, kept), where

    learned = mean accuracy on each task right after training on it (the accuracy matrix's diagonal)
    kept    = top-1 agreement with the base model on held-out pydoc text after the last task

A method's frontier is its Pareto-optimal points (no other point of it learned more *and* kept more),
joined by straight lines. ``kept_at(points, L)`` reads it at learned accuracy L: the kept value of the
best point that learned at least L, linearly interpolated between neighbouring frontier points; None
above the method's best learned accuracy (no extrapolation).

Two methods are compared on one seed at the highest learned accuracy both reach,
L* = min(max learned of A, max learned of B): ``matched_difference`` returns kept_A(L*) − kept_B(L*).
"""
from __future__ import annotations

__all__ = ["pareto", "kept_at", "matched_level", "matched_difference"]


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto-optimal (learned, kept) points, sorted by learned (ascending; kept then descends)."""
    if not points:
        raise ValueError("a frontier needs at least one (learned, kept) point")
    best: list[tuple[float, float]] = []
    for learned, kept in sorted(points, key=lambda p: (-p[0], -p[1])):  # most learned first
        if not best or kept > best[-1][1]:
            best.append((float(learned), float(kept)))
    return best[::-1]


def kept_at(points: list[tuple[float, float]], learned: float) -> float | None:
    """The frontier's kept value at `learned` (see the module docstring); None beyond its reach."""
    front = pareto(points)
    if learned > front[-1][0]:
        return None
    if learned <= front[0][0]:
        return front[0][1]
    for (l0, k0), (l1, k1) in zip(front, front[1:]):
        if l0 < learned <= l1:
            return k0 + (k1 - k0) * (learned - l0) / (l1 - l0)
    raise AssertionError("unreachable: learned lies within the frontier's range")


def matched_level(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """L*: the highest learned accuracy that both frontiers reach."""
    return min(max(p[0] for p in a), max(p[0] for p in b))


def matched_difference(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> tuple[float, float]:
    """(kept_A(L*) − kept_B(L*), L*) for one seed's two frontiers."""
    level = matched_level(a, b)
    return kept_at(a, level) - kept_at(b, level), level
