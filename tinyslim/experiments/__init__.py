"""The toy worlds in which each paper's claim is tested (``docs/experiments.md``).

continual   -- scenario A: a method trained through a sequence of tasks; accuracy matrix, ACC, BWT
               and the general capability it loses (``run_continual``, ``run_methods``).
composition -- scenario B: K frozen single-task LoRAs composed by sum, NLA and MoLE.
editing     -- scenario C: a stream of fact edits, ELDER against FT-LoRA.
metrics     -- ACC / BWT / forgetting on an accuracy matrix (pure functions).
suite       -- every world at one size ("quick", "full", "tiny") and seed(s): what `demo` and `run all` run.
claims      -- each paper's headline claim beside the toy result, held or not, seed by seed.
report      -- report.json, report.md and the plots of a suite run (plots.py draws them).
"""
from .continual import ContinualConfig, run_continual
from .metrics import average_accuracy, backward_transfer

__all__ = ["ContinualConfig", "run_continual", "average_accuracy", "backward_transfer"]
