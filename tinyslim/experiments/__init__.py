"""The toy worlds in which each paper's claim is tested (``shared/spec/experiments.md``).

continual -- scenario A: a method trained through a sequence of tasks; accuracy matrix, ACC, BWT
             and the general capability it loses (``run_continual``).
metrics   -- ACC / BWT / forgetting on an accuracy matrix (pure functions).
"""
from .continual import ContinualConfig, run_continual
from .metrics import average_accuracy, backward_transfer

__all__ = ["ContinualConfig", "run_continual", "average_accuracy", "backward_transfer"]
