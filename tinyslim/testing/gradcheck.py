"""gradcheck: a Function's backward against central finite differences, in float64.

    from tinyslim.testing import gradcheck
    gradcheck(lambda x, W: F.gelu(x @ W), x, W)     # passes silently, or raises GradcheckError

``fn`` takes Tensors and returns a Tensor. The check draws a random upstream gradient u (a backward
that is right only for ``.sum()`` fails), runs ``fn(...).backward(u)``, and compares every input's
gradient with the numerical derivative of ⟨fn(inputs), u⟩ at all entries of small inputs and a random
sample of larger ones. The pass criterion (docs/methods.md): relative error ‖analytic − numerical‖ /
max(‖analytic‖, ‖numerical‖) < 1e-6 over the checked entries of each input.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

from ..autograd import Tensor, no_grad
from .report import GradcheckError, describe, format_array, unwrap, worst_entries

__all__ = ["gradcheck", "numerical_grad", "relative_error", "InputCheck", "split_inputs", "input_names"]


def numerical_grad(f, arrays, i, upstream, entries, h=1e-4):
    """Central differences of ⟨f(arrays), upstream⟩ with respect to arrays[i], at the given flat entries.

    The fourth-order central stencil f'(x) ≈ [f(x-2h) - 8 f(x-h) + 8 f(x+h) - f(x+2h)] / 12h has
    truncation error O(h⁴), so h can be large enough (1e-4) that rounding in f (~1e-16 / h) stays far
    below 1e-6 even where the gradient is tiny next to the output (layer_norm over 2 channels). The
    outputs are combined entry by entry before the dot product with the upstream gradient.
    """
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    x = arrays[i]
    grad = np.empty(len(entries))
    for n, flat in enumerate(entries):
        pos = np.unravel_index(flat, x.shape)
        original = x[pos]
        f_at = {}
        for step in (-2, -1, 1, 2):
            x[pos] = original + step * h
            f_at[step] = f(arrays)
        x[pos] = original
        # pair the symmetric points first: where f does not depend on x the result is exactly 0
        combined = 8.0 * (f_at[1] - f_at[-1]) - (f_at[2] - f_at[-2])
        grad[n] = np.sum(combined * upstream) / (12 * h)
    return grad


def relative_error(numerical, analytic) -> float:
    """‖numerical − analytic‖ / max(‖numerical‖, ‖analytic‖, 1e-12): scale-free, 0 when both are 0."""
    scale = max(np.linalg.norm(numerical), np.linalg.norm(analytic), 1e-12)
    return float(np.linalg.norm(np.asarray(numerical) - np.asarray(analytic)) / scale)


# ---- which inputs are differentiated ------------------------------------------------------------

def _is_checked(value) -> bool:
    if isinstance(value, Tensor):
        return value.requires_grad
    return isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating)


def split_inputs(inputs):
    """(float64 copies of the differentiated inputs, their positions, the constants as given).

    Differentiated: floating NumPy arrays and Tensors with requires_grad=True. Everything else (integer
    index arrays, numbers, None, Tensors without requires_grad — cast to float64) is passed as a constant.
    """
    arrays, positions, consts = [], [], list(inputs)
    for i, value in enumerate(inputs):
        if _is_checked(value):
            arrays.append(np.array(unwrap(value), dtype=np.float64))
            positions.append(i)
            consts[i] = None
        elif isinstance(value, Tensor) and np.issubdtype(value.dtype, np.floating):
            consts[i] = Tensor(value.data.astype(np.float64))
    return arrays, positions, consts


def assemble(arrays, positions, consts, requires_grad):
    """The argument list for fn: Tensors at the differentiated positions, the constants elsewhere."""
    args = list(consts)
    tensors = []
    for a, i in zip(arrays, positions):
        args[i] = Tensor(a, requires_grad=requires_grad)
        tensors.append(args[i])
    return args, tensors


def input_names(fn, n: int) -> list[str]:
    """The parameter names of fn (``lambda x, W: ...`` → x, W), or "input i" where there are none."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(n):
        p = params[i] if i < len(params) else None
        positional = p is not None and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        names.append(p.name if positional else f"input {i}")
    return names


def fn_name(fn) -> str:
    name = getattr(fn, "__name__", "fn")
    return "fn" if name == "<lambda>" else name


def call(fn, args, name: str) -> Tensor:
    out = fn(*args)
    if not isinstance(out, Tensor):
        hint = " (fn returned a tuple: pick one output, e.g. `lambda l: F.topk_gating(l, 2)[0]`)" \
            if isinstance(out, tuple) else ""
        raise TypeError(f"{name}: fn must return a tinyslim Tensor, got {type(out).__name__}{hint}")
    return out


# ---- the check -------------------------------------------------------------------------------------

@dataclass
class InputCheck:
    """How one input's gradient compared: the numbers a report (and a passing run) gives."""

    name: str
    shape: tuple
    checked: int  # entries compared
    max_abs_error: float
    max_rel_error: float  # per entry: |a − n| / max(|a|, |n|, 1e-12)
    relative_error: float  # over the checked entries: the pass criterion
    passed: bool


def gradcheck(fn, *inputs, eps: float = 1e-4, rtol: float = 1e-6, atol: float = 1e-10, max_entries: int | None = 24,
              seed: int = 0, upstream=None, name: str | None = None) -> list[InputCheck]:
    """Check fn's backward against central differences in float64; raise GradcheckError with a report.

    fn(*tensors) -> Tensor. inputs: floating NumPy arrays (or Tensors with requires_grad=True) are
    differentiated, after a cast to float64; anything else is passed to fn unchanged (see split_inputs).
    Keep inputs where fn is smooth (see tinyslim.testing.arrays for value domains).

    eps: finite-difference step (4th-order stencil, see numerical_grad). rtol: the largest relative error
    allowed per input. atol: an input also passes when ‖analytic − numerical‖ ≤ atol — where the exact
    gradient is 0 (uniform softmax logits, say) both sides are pure rounding (~1e-17) and a relative error
    means nothing; a real bug differs by far more than 1e-10. max_entries: entries checked per input (a random sample beyond it; None = all).
    seed: draws the upstream gradient (unless ``upstream`` is given) and the sampled entries.
    Returns one InputCheck per differentiated input.
    """
    name = name or fn_name(fn)
    arrays, positions, consts = split_inputs(inputs)
    if not arrays:
        raise ValueError(f"gradcheck({name}): nothing to differentiate. Pass floating NumPy arrays (or Tensors "
                         "with requires_grad=True); integer arrays, numbers and plain Tensors are constants.")
    for a, i in zip(arrays, positions):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"gradcheck({name}): input {i} holds NaN or inf; finite differences need finite inputs")
    names = input_names(fn, len(inputs))

    args, tensors = assemble(arrays, positions, consts, requires_grad=True)
    out = call(fn, args, name)
    if out.dtype != np.float64:
        raise TypeError(f"gradcheck({name}): fn returned {out.dtype} from float64 inputs; a 1e-6 check needs "
                        "float64 all the way through (does fn cast, or use a float32 constant?)")
    if not out.requires_grad:
        raise ValueError(f"gradcheck({name}): the output does not depend on any differentiated input "
                         "(or fn ran under no_grad)")
    if upstream is None:  # a random ∂L/∂out: catches backward code that is only right for sum()
        upstream = np.random.default_rng([seed, 7]).normal(size=out.shape)
    upstream = np.asarray(upstream, dtype=np.float64)
    if upstream.shape != out.shape:
        raise ValueError(f"gradcheck({name}): upstream has shape {upstream.shape} but fn's output is {out.shape}")
    out.backward(upstream)

    def f(current):
        with no_grad():
            args_now, _ = assemble(current, positions, consts, requires_grad=False)
            return np.array(call(fn, args_now, name).data, dtype=np.float64)  # a copy: views would move

    rng = np.random.default_rng([seed, 11])
    results, failed = [], []
    for j, (x, t) in enumerate(zip(arrays, tensors)):
        size = x.size
        entries = (np.arange(size) if max_entries is None or size <= max_entries
                   else np.sort(rng.choice(size, max_entries, replace=False)))
        numerical = numerical_grad(f, arrays, j, upstream, entries, h=eps)
        missing = t.grad is None
        analytic = np.zeros(len(entries)) if missing else np.asarray(t.grad, np.float64).reshape(-1)[entries]
        diff = np.abs(analytic - numerical)
        rel = diff / np.maximum(np.maximum(np.abs(analytic), np.abs(numerical)), 1e-12)
        err = relative_error(numerical, analytic)
        # a missing gradient counts as 0: right only where fn does not depend on x
        ok = bool(err < rtol or np.linalg.norm(analytic - numerical) <= atol)
        result = InputCheck(names[positions[j]], x.shape, len(entries), float(diff.max(initial=0.0)),
                            float(rel.max(initial=0.0)), err, ok)
        results.append(result)
        if not ok:
            failed.append((result, entries, analytic, numerical, missing))
    if failed:
        raise GradcheckError(_report(name, results, failed, inputs, positions, arrays, upstream, eps, rtol,
                                     max_entries, seed, names), [f[:4] for f in failed])
    return results


def _report(name, results, failed, inputs, positions, arrays, upstream, eps, rtol, max_entries, seed, names):
    lines = [f"gradcheck failed for {name}: {len(failed)} of {len(results)} input gradients disagree with "
             f"central differences (relative error ≥ {rtol:g})"]
    for result, entries, analytic, numerical, missing in failed:
        total = int(np.prod(result.shape))
        lines.append(f"  d/d {result.name} {result.shape}: relative error {result.relative_error:.3e} over "
                     f"{result.checked} of {total} entries"
                     + (" — fn's backward gave NO gradient (None) for it" if missing else ""))
        lines += worst_entries(analytic, numerical, entries, result.shape, ("analytic", "numerical"))
    lines.append("  every input (relative error = ‖analytic − numerical‖ / max(‖analytic‖, ‖numerical‖)):")
    for r in results:
        lines.append(f"    {r.name:<10} {str(r.shape):<12} checked {r.checked:>4}  max abs err {r.max_abs_error:.2e}  "
                     f"max rel err {r.max_rel_error:.2e}  relative error {r.relative_error:.2e}  "
                     f"{'ok' if r.passed else 'FAIL'}")
    lines.append("  the inputs that failed (as float64):")
    checked = dict(zip(positions, arrays))
    for i, value in enumerate(inputs):
        if i in checked:
            lines.append(f"    {names[i]} = float64 {checked[i].shape}\n{format_array(checked[i])}")
        else:
            lines.append(f"    {names[i]} (constant) = {describe(value)}"
                         + (f"\n{format_array(value)}" if isinstance(value, np.ndarray) else ""))
    lines.append(f"    upstream gradient = float64 {upstream.shape}\n{format_array(upstream)}")
    lines.append(f"  (4th-order central differences, eps {eps:g}; at most "
                 f"{'all' if max_entries is None else max_entries} entries per input; seed {seed})")
    return "\n".join(lines)
