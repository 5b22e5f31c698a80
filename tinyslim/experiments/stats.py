"""How a claim's verdict is earned: paired per-seed differences, a 95% interval, three verdicts.

A claim row tests one ordering, "A > B". On every reported seed s both sides are measured on the same
data and base model, so the seed's difference d_s = A_s − B_s removes what the seed shares (its task
split, its edit stream). Over n seeds:

    effect  = mean(d)
    ci95    = effect ± t_{0.975, n−1} · sd(d) / √n        (paired t interval; sd with n − 1)
    verdict = "supported"     the interval lies above 0   (the claim's direction)
              "contradicted"  the interval lies below 0
              "inconclusive"  the interval contains 0, or n < 2

A threshold claim ("reliability ≥ 0.9") is the same test with d_s = value_s − 0.9.

The t interval assumes roughly normal differences; with 5 seeds it is the honest small-sample
choice (a bootstrap over 5 values cannot reach 95% coverage). When every difference is the same
(sd = 0), the interval is that one point: a difference that never varies is decided by its sign.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["VERDICTS", "t_quantile_975", "paired_interval", "verdict"]

VERDICTS = ("supported", "contradicted", "inconclusive")

# Student's t, two-sided 95% (the 0.975 quantile), for 1..30 degrees of freedom (standard tables)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (beyond 30: the normal's 1.96
    plus the first-order correction 2.4/df, within 0.002 of the exact value)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def paired_interval(a, b=None) -> dict:
    """{"effect", "ci95": [lo, hi], "n", "diffs"} for the per-seed differences a − b (b None: a are the
    differences already). NaN entries (a seed where a side could not be measured) are an error."""
    d = np.asarray(a, dtype=np.float64) - (0.0 if b is None else np.asarray(b, dtype=np.float64))
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"need a 1-D list of per-seed values, got shape {d.shape}")
    if np.isnan(d).any():
        raise ValueError(f"per-seed differences contain NaN: {d.tolist()}")
    n, effect = d.size, float(d.mean())
    if n < 2:
        return {"effect": effect, "ci95": None, "n": n, "diffs": d.tolist()}
    half = t_quantile_975(n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
    return {"effect": effect, "ci95": [effect - half, effect + half], "n": n, "diffs": d.tolist()}


def verdict(interval: dict) -> str:
    """supported / contradicted / inconclusive (see the module docstring)."""
    ci = interval["ci95"]
    if ci is None:
        return "inconclusive"
    if ci[0] > 0:
        return "supported"
    if ci[1] < 0:
        return "contradicted"
    return "inconclusive"
