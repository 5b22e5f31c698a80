"""Readable check reports (llm.c style): the worst entries side by side, the error per array, the inputs.

Every check in tinyslim.testing raises a ``CheckError`` (an ``AssertionError``, so pytest shows it as a
plain failure) whose message is the whole report; ``GradcheckError`` is the one ``gradcheck`` raises.
"""
from __future__ import annotations

import numpy as np

from ..autograd import Tensor

__all__ = ["CheckError", "GradcheckError", "assert_close", "format_array", "format_index", "worst_entries"]


class CheckError(AssertionError):
    """A tinyslim.testing check failed; ``str(error)`` (also ``error.report``) is the readable report."""

    def __init__(self, report: str):
        super().__init__(report)
        self.report = report


class GradcheckError(CheckError):
    """A backward disagrees with central finite differences (raised by ``gradcheck``).

    ``failures``: one ``(InputCheck, entries, analytic, numerical)`` per failing input — the flat indices
    compared and both gradients there — for a closer look than the report's five worst entries.
    """

    def __init__(self, report: str, failures=()):
        super().__init__(report)
        self.failures = list(failures)


def format_index(index) -> str:
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def format_array(a, indent: str = "      ") -> str:
    """An array's values (NumPy's summarised print for large ones), indented under its heading."""
    a = np.asarray(a)
    text = np.array2string(a, precision=6, threshold=64, edgeitems=3, max_line_width=100)
    return indent + text.replace("\n", "\n" + indent)


def unwrap(value):
    """A Tensor's array; anything else as it is."""
    return value.data if isinstance(value, Tensor) else value


def describe(value) -> str:
    """One line saying what an input is: 'float64 (3, 4)', 'int32 (5,)', or a short repr."""
    data = unwrap(value)
    if isinstance(data, np.ndarray):
        return f"{data.dtype} {data.shape}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def worst_entries(actual, expected, flat, shape, labels, score=None, top: int = 5) -> list[str]:
    """Table lines for the `top` entries with the largest `score` (default |actual − expected|).

    actual, expected: 1-D arrays of the compared entries; flat: their flat positions in an array of `shape`.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    diff = np.abs(actual - expected)
    rel = diff / np.maximum(np.maximum(np.abs(actual), np.abs(expected)), 1e-12)
    score = diff if score is None else score
    order = np.argsort(-np.where(np.isnan(score), np.inf, score), kind="stable")[:top]
    positions = {i: np.unravel_index(flat[i], shape) for i in order}
    width = max([len(format_index(p)) for p in positions.values()] + [5])
    lines = [f"    {'index':<{width}}  {labels[0]:>16}  {labels[1]:>16}  {'abs err':>9}  {'rel err':>9}"]
    for i in order:
        lines.append(f"    {format_index(positions[i]):<{width}}  {actual[i]:>+16.8e}  {expected[i]:>+16.8e}  "
                     f"{diff[i]:>9.2e}  {rel[i]:>9.2e}")
    return lines


def close_report(name: str, actual, expected, rtol: float, atol: float, labels=("actual", "expected")):
    """None when `actual` equals `expected` within |a − e| ≤ atol + rtol·|e| (np.allclose), else the report lines."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return [f"{name}: shape {actual.shape} from {labels[0]} but {expected.shape} from {labels[1]}"]
    a64, e64 = actual.astype(np.float64), expected.astype(np.float64)
    if np.allclose(a64, e64, rtol=rtol, atol=atol):
        return None
    diff = np.abs(a64 - e64)
    with np.errstate(divide="ignore", invalid="ignore"):  # tolerance 0: a bit-for-bit comparison
        excess = np.where(diff == 0, 0.0, diff / (atol + rtol * np.abs(e64)))  # > 1: out of tolerance
    bad = ~np.isclose(a64, e64, rtol=rtol, atol=atol)
    finite = diff[~np.isnan(diff)]
    nan = ", NaN present (never equal)" if finite.size < diff.size else ""
    rule = ("differ (compared bit for bit)" if rtol == 0 and atol == 0 else
            f"differ by more than atol + rtol·|{labels[1]}| (rtol {rtol:g}, atol {atol:g})")
    return ([f"{name}: {int(bad.sum())} of {bad.size} entries {rule}; max abs err {finite.max(initial=0.0):.3e}{nan}"]
            + worst_entries(a64.reshape(-1), e64.reshape(-1), np.arange(a64.size), a64.shape, labels,
                            score=excess.reshape(-1)))


def assert_close(actual, expected, *, rtol: float = 1e-10, atol: float = 1e-12, name: str = "values",
                 labels=("actual", "expected")):
    """Assert equal shapes and |actual − expected| ≤ atol + rtol·|expected| everywhere (np.allclose, NaN
    never equal), else raise ``CheckError`` with the worst entries side by side."""
    lines = close_report(name, actual, expected, rtol, atol, labels)
    if lines:
        raise CheckError("\n".join(lines))
