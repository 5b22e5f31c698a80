"""The same maths in tinyslim and in torch autograd (float64): outputs and every gradient must agree.

    assert_matches_torch(lambda x: silu(x), torch.nn.functional.silu, x)        # one op or expression
    assert_module_matches_torch(model, torch_twin, (idx, targets))             # a whole module

torch is the oracle, imported only when a check runs. Without it the checks skip under pytest and raise
ImportError elsewhere, saying how to install it. Gradients come from a random upstream gradient on
every output (a backward that is right only for ``.sum()`` fails).
"""
from __future__ import annotations

import os

import numpy as np

from ..autograd import Tensor
from .gradcheck import assemble, call, fn_name, input_names, split_inputs
from .report import CheckError, close_report, describe, format_array, unwrap, worst_entries

__all__ = ["require_torch", "assert_matches_torch", "assert_module_matches_torch", "copy_to_torch", "TORCH_MISSING"]

TORCH_MISSING = ("torch is not installed: it is the float64 oracle of tinyslim.testing's torch checks. "
                 "Install it with `pip install torch==2.13.0` (the CPU build is enough).")


def require_torch():
    """The torch module; without torch, pytest.skip under pytest and ImportError elsewhere."""
    try:
        import torch
    except ImportError:
        if "PYTEST_CURRENT_TEST" in os.environ:
            import pytest
            pytest.skip(TORCH_MISSING)
        raise ImportError(TORCH_MISSING) from None
    return torch


def _upstream(seed, shape, *stream):
    return np.random.default_rng([seed, 7, *stream]).normal(size=shape)  # [seed, 7]: the draw gradcheck makes


def _grad_lines(label, ours, ref, rtol, atol, allow_unused, shape, dtype):
    """Report lines for one input/parameter gradient (None when it matches)."""
    if ours is None:
        if ref is None and allow_unused:
            return None
        return [f"{label}: tinyslim gave NO gradient (None) but torch gives "
                + ("None too (pass allow_unused=True if the output does not depend on it)" if ref is None
                   else f"one with max |value| {np.max(np.abs(ref), initial=0.0):.3e}")]
    ours = np.asarray(ours)
    if ours.shape != shape or ours.dtype != dtype:
        return [f"{label}: gradient is {ours.dtype} {ours.shape}, expected {np.dtype(dtype)} {shape} (the input's)"]
    return close_report(label, ours, np.zeros(shape) if ref is None else ref, rtol, atol, ("tinyslim", "torch"))


def assert_matches_torch(fn, torch_fn, *inputs, rtol: float = 1e-10, atol: float = 1e-12, seed: int = 0,
                         upstream=None, allow_unused: bool = False, name: str | None = None):
    """Forward and every input gradient of fn (tinyslim) against torch_fn (torch autograd), in float64.

    fn(*tensors) -> Tensor and torch_fn(*torch_tensors) -> torch.Tensor compute the same maths. Floating
    NumPy arrays (and Tensors with requires_grad=True) become float64 leaves on both sides; other inputs
    are passed unchanged to both (close over anything torch needs converted). Equal means
    |tinyslim − torch| ≤ atol + rtol·|torch| entry by entry; an input that gets no gradient fails unless
    allow_unused and torch gives none either. Raises CheckError with the worst entries side by side.
    """
    torch = require_torch()
    name = name or fn_name(fn)
    arrays, positions, consts = split_inputs(inputs)
    if not arrays:
        raise ValueError(f"assert_matches_torch({name}): nothing to differentiate; pass floating NumPy arrays")
    names = input_names(fn, len(inputs))
    args, tensors = assemble(arrays, positions, consts, requires_grad=True)
    out = call(fn, args, name)
    targs = list(consts)
    leaves = []
    for a, i in zip(arrays, positions):
        targs[i] = torch.tensor(a, dtype=torch.float64, requires_grad=True)
        leaves.append(targs[i])
    ref = torch_fn(*targs)

    problems = []
    if out.dtype != np.float64:
        problems.append([f"forward: tinyslim returned {out.dtype} from float64 inputs"])
    lines = close_report("forward", out.data, ref.detach().numpy(), rtol, atol, ("tinyslim", "torch"))
    if lines:
        problems.append(lines)
    g = None
    if tuple(out.shape) == tuple(ref.shape) and out.requires_grad:
        g = _upstream(seed, out.shape) if upstream is None else np.asarray(upstream, dtype=np.float64)
        out.backward(g)
        ref_grads = (torch.autograd.grad(ref, leaves, torch.from_numpy(g), allow_unused=True)
                     if ref.requires_grad else [None] * len(leaves))
        for t, rg, i in zip(tensors, ref_grads, positions):
            lines = _grad_lines(f"d/d {names[i]}", t.grad, None if rg is None else rg.numpy(), rtol, atol,
                                allow_unused, t.shape, np.float64)
            if lines:
                problems.append(lines)
    elif not out.requires_grad:
        problems.append(["backward: tinyslim's output does not require grad (no graph was recorded)"])
    if problems:
        report = [f"{name} differs from torch (float64): {len(problems)} problem(s)"]
        for p in problems:
            report += ["  " + p[0]] + p[1:]
        report.append("  the inputs that failed (as float64):")
        checked = dict(zip(positions, arrays))
        for i, value in enumerate(inputs):
            v = checked.get(i, value)
            report.append(f"    {names[i]}{'' if i in checked else ' (constant)'} = {describe(v)}"
                          + (f"\n{format_array(v)}" if isinstance(v, np.ndarray) else ""))
        if g is not None:
            report.append(f"    upstream gradient = float64 {g.shape}\n{format_array(g)}")
        raise CheckError("\n".join(report))


# ---- modules ------------------------------------------------------------------------------------------

def _torch_name(name, name_map):
    if name_map is None:
        return name
    if callable(name_map):
        return name_map(name)
    return name_map.get(name, name)


def copy_to_torch(module, torch_module, name_map=None) -> dict:
    """Copy every parameter of a tinyslim Module into torch_module by name; returns {our name: torch param}.

    name_map: {tinyslim name: torch name} or a function of the tinyslim name (unmapped names stay as they
    are). Every torch parameter must receive a value and every tinyslim parameter must land somewhere; a
    tied parameter is listed once on both sides. The torch module is cast to float64 first.
    """
    torch = require_torch()
    torch_module.double()
    theirs = dict(torch_module.named_parameters())
    ours = {name: (_torch_name(name, name_map), p) for name, p in module.named_parameters()}
    unexpected = sorted(f"{n} → {t}" for n, (t, _) in ours.items() if t not in theirs)
    missing = sorted(set(theirs) - {t for t, _ in ours.values()})
    if unexpected or missing:
        raise KeyError(f"tinyslim and torch parameters do not match by name: tinyslim names with no torch "
                       f"parameter {unexpected}; torch parameters that get no value {missing}. Pass name_map="
                       "{tinyslim name: torch name}.")
    copied = {}
    with torch.no_grad():
        for name, (tname, p) in ours.items():
            target = theirs[tname]
            if tuple(target.shape) != tuple(p.shape):
                raise ValueError(f"{name} → {tname}: tinyslim has shape {tuple(p.shape)}, torch {tuple(target.shape)}"
                                 " (a transposed layout? tinyslim stores Linear weights (out, in) like torch)")
            target.copy_(torch.from_numpy(np.asarray(p.data, dtype=np.float64)))
            target.requires_grad_(bool(p.requires_grad))  # the torch twin trains exactly what tinyslim trains
            copied[name] = target
    return copied


def _as_outputs(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def assert_module_matches_torch(module, torch_module, inputs, name_map=None, *, rtol: float = 1e-10,
                                atol: float = 1e-12, grad_rtol: float = 1e-8, grad_floor: float = 1e-4,
                                seed: int = 0, upstream=None, allow_unused: bool = False) -> dict:
    """A tinyslim Module and its torch twin, same weights: equal outputs and equal gradients of every
    trainable parameter and every floating input.

    module: float64 parameters (e.g. GPTConfig(dtype="float64") or ``module.to(np.float64)``); its
    gradients are reset first. Weights are copied by name (see copy_to_torch, ``name_map``). inputs: the
    positional arguments of both forwards; floating arrays are differentiated, integer arrays go to torch
    as tensors, None and numbers as they are. Outputs (a Tensor or a tuple; None entries must match) must
    agree within |ours − torch| ≤ atol + rtol·|torch|. The backward runs from Σᵢ⟨outputᵢ, uᵢ⟩ with random
    uᵢ, or the given ``upstream`` (one entry per output; None leaves that output out, 1.0 is a plain
    ``loss.backward()``). Each gradient must have ‖ours − torch‖ ≤ grad_rtol·max(‖torch‖, grad_floor·‖all‖),
    with ‖all‖ the norm of torch's whole gradient (every parameter and input together). The floor is there
    because backprop rounds at ~1e-16 of the terms it sums, and those are of the size of the whole gradient:
    a gradient that is 1e-10 of the whole by cancellation (LayerNorm over 2 channels) carries a relative
    error near 1e-8 that no bug made. A real bug moves a gradient by far more than 1e-12 of the whole.
    Returns {"outputs": [(ours, torch) arrays], "grads": {name: (ours, torch)}} for extra assertions.
    """
    torch = require_torch()
    label = type(module).__name__
    not64 = sorted(n for n, p in module.named_parameters() if p.dtype != np.float64)
    if not64:
        raise TypeError(f"assert_module_matches_torch: {label} has non-float64 parameters {not64[:4]}; build it "
                        "in float64 (GPTConfig(dtype='float64'), Linear(..., dtype=np.float64)) or call "
                        "module.to(np.float64) first")
    params = copy_to_torch(module, torch_module, name_map)
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    ours_in, theirs_in, leaves = [], [], []  # leaves: (label, tinyslim Tensor, torch tensor)
    for i, value in enumerate(inputs):
        data = unwrap(value)
        if isinstance(data, np.ndarray) and np.issubdtype(data.dtype, np.floating):
            a = np.array(data, dtype=np.float64)
            t, tt = Tensor(a, requires_grad=True), torch.tensor(a, requires_grad=True)
            leaves.append((f"input {i}", t, tt))
            ours_in.append(t), theirs_in.append(tt)
        elif isinstance(data, np.ndarray):
            ours_in.append(data), theirs_in.append(torch.from_numpy(np.ascontiguousarray(data)))
        else:
            ours_in.append(value), theirs_in.append(value)

    module.zero_grad()
    outs, refs = _as_outputs(module(*ours_in)), _as_outputs(torch_module(*theirs_in))
    problems = []
    if len(outs) != len(refs):
        raise CheckError(f"{label}: {len(outs)} outputs from tinyslim but {len(refs)} from torch")
    compared = []
    for k, (o, r) in enumerate(zip(outs, refs)):
        if (o is None) != (r is None):
            problems.append([f"output {k}: {describe(o)} from tinyslim but {describe(r)} from torch"])
            continue
        if o is None:
            compared.append((None, None))
            continue
        o_np, r_np = np.asarray(o.data), r.detach().numpy()
        compared.append((o_np, r_np))
        lines = close_report(f"output {k}", o_np, r_np, rtol, atol, ("tinyslim", "torch"))
        if lines:
            problems.append(lines)
    if upstream is None:
        upstream = [None if o is None else _upstream(seed, o.shape, k) for k, o in enumerate(outs)]
    if len(upstream) != len(outs):
        raise ValueError(f"upstream has {len(upstream)} entries but the module returns {len(outs)} outputs")
    pairs = [(o, r, np.broadcast_to(np.asarray(u, np.float64), o.shape).copy())
             for o, r, u in zip(outs, refs, upstream) if u is not None and o is not None and o.requires_grad]

    grads = {}
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if pairs and all(tuple(o.shape) == tuple(r.shape) for o, r, _ in pairs):
        for j, (o, _, u) in enumerate(pairs):  # Σ⟨oᵢ, uᵢ⟩: leaf gradients accumulate across the calls
            o.backward(u, retain_graph=j < len(pairs) - 1)
        targets = [params[n] for n, _ in trainable] + [tt for _, _, tt in leaves]
        ref_grads = torch.autograd.grad([r for _, r, _ in pairs], targets,
                                        [torch.from_numpy(u) for _, _, u in pairs], allow_unused=True)
        ours_grads = [(n, p.grad, p.shape) for n, p in trainable] + [(n, t.grad, t.shape) for n, t, _ in leaves]
        errors = []
        whole = np.sqrt(sum(float(np.sum(rg.numpy() ** 2)) for rg in ref_grads if rg is not None))
        floor = grad_floor * whole  # gradients smaller than this are judged at the whole gradient's scale
        for (n, g, shape), rg in zip(ours_grads, ref_grads):
            ref = None if rg is None else rg.numpy()
            grads[n] = (g, ref)
            if g is None and not (allow_unused and ref is None):
                problems.append([f"d/d {n}: tinyslim gave NO gradient (None)"])
                continue
            if g is None:
                continue
            ref = np.zeros(shape) if ref is None else ref
            if g.shape != tuple(shape):
                problems.append([f"d/d {n}: gradient shape {g.shape}, parameter shape {tuple(shape)}"])
                continue
            norm = np.linalg.norm(ref)
            err = np.linalg.norm(g - ref) / max(norm, floor, np.finfo(np.float64).tiny)
            errors.append((err, n))
            if not err <= grad_rtol:
                scale = ("‖torch‖" if norm >= floor else
                         f"grad_floor·‖whole gradient‖ = {floor:.2e}, as ‖torch‖ = {norm:.2e} is below it")
                problems.append([f"d/d {n}: relative error {err:.3e} > grad_rtol {grad_rtol:g} "
                                 f"(‖tinyslim − torch‖ / {scale})"]
                                + worst_entries(g.reshape(-1), ref.reshape(-1), np.arange(g.size), g.shape,
                                                ("tinyslim", "torch")))
        if problems:
            problems.append(["every gradient's relative error, worst first:"]
                            + [f"    {e:.2e}  {n}" for e, n in sorted(errors, reverse=True)])
    if problems:
        report = [f"{label} differs from its torch twin (float64): {len(problems)} problem(s)"]
        for p in problems:
            report += ["  " + p[0]] + p[1:]
        report.append("  inputs: " + ", ".join(describe(v) for v in inputs))
        for i, value in enumerate(inputs):
            if isinstance(unwrap(value), np.ndarray):
                report.append(f"    input {i} =\n{format_array(unwrap(value))}")
        raise CheckError("\n".join(report))
    return {"outputs": compared, "grads": grads}
