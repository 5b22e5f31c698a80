"""The low-rank mixture kernel behind one function, in three backends (docs/methods.md §8).

Shape legend: N tokens, D in, O out, r rank, E experts, k top-k.
    x (N, D)   A (E, r, D)   B (E, O, r)   y, dy (N, O)
    gates: dense G (N, E) | top-k (idx (N, k) int, w (N, k)) | per-token idx (N,) int (see gates.py)

    y = forward(x, A, B, gates, scale, in_mask, out_mask)       y_n = Σ_e g[n,e] s_e B'_e A'_e x_n
    dx, dA, dB, dgate = backward(dy, x, A, B, gates, scale, in_mask, out_mask)

Backends: "numpy" (reference.py, always there), "cpu" (the compiled C/OpenMP module), "cuda" (the
CUDA library, for arrays on a GPU). The cpu kernel comes in numbered versions (cpu.VERSIONS: v1 plain
loops, v2 on optimised); "cpu" runs the newest, "cpu.v1", "cpu.v2" … a given one. ``TINYSLIM_BACKEND=numpy|cpu|cuda`` picks one; by default NumPy
inputs go to "cpu" when it is built (else "numpy") and GPU arrays to "cuda". Both functions validate
everything in Python first (problem.py): inputs are made C-contiguous (a copy when they are not),
index arrays become int32, and mistakes raise ValueError / TypeError, never reach C.
"""
from __future__ import annotations

import functools
import os
import types

import numpy as np

from . import reference
from .gates import DenseGates, IndexGates, TopKGates, as_gates
from .problem import Problem, check_dy, prepare

__all__ = ["forward", "backward", "available_backends", "get_backend", "set_num_threads", "get_num_threads",
           "info_lines", "DenseGates", "TopKGates", "IndexGates", "as_gates", "prepare", "Problem", "BACKENDS"]

BACKENDS = ("numpy", "cpu", "cuda")


# ---- the numpy backend: the reference on the equivalent dense gates ------------------------------------
def _numpy_forward(p: Problem) -> np.ndarray:
    G, _ = reference.dense_gates(p.form, p.idx, p.w, p.N, p.E, p.dtype)
    return reference.forward(p.x, p.A, p.B, G, p.scale, p.in_mask, p.out_mask)


def _numpy_backward(p: Problem, dy, needs):
    G, listed = reference.dense_gates(p.form, p.idx, p.w, p.N, p.E, p.dtype)
    if not needs[3] or p.form == "index":
        listed = np.zeros_like(listed)  # no dgate wanted: skip its work
    dx, dA, dB, dG = reference.backward(dy, p.x, p.A, p.B, G, p.scale, p.in_mask, p.out_mask, listed=listed)
    dgate = None
    if needs[3] and p.form == "dense":
        dgate = dG
    elif needs[3] and p.form == "topk":  # dw[n, j] = dG[n, idx[n, j]]; empty slots get 0
        dgate = np.where(p.idx >= 0, np.take_along_axis(dG, np.maximum(p.idx, 0), axis=1), 0).astype(p.dtype)
    return tuple(g if want else None for g, want in zip((dx, dA, dB), needs[:3])) + (dgate,)


_numpy = types.SimpleNamespace(name="numpy", available=True, reason="always available (the reference)",
                               forward=_numpy_forward, backward=_numpy_backward)


def _split(name: str):
    """'cpu.v1' → ('cpu', 1); any other name → (name, None)."""
    base, dot, version = name.partition(".v")
    if not dot:
        return name, None
    if base != "cpu" or not version.isdigit():
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} (or cpu.v1, cpu.v2 … for "
                         "one version of the cpu kernel)")
    return base, int(version)


_ENV = os.environ
_MODULES: dict = {}  # name → backend module (or namespace): looked up on every call, so cached


def _module(name: str):
    mod = _MODULES.get(name)
    if mod is None:
        mod = _MODULES[name] = _load(name)
    return mod


def _load(name: str):
    name, version = _split(name)
    if version is not None:
        from . import cpu
        cpu._check_version(version)
        return types.SimpleNamespace(name=f"cpu.v{version}", available=cpu.available, reason=cpu.reason,
                                     forward=functools.partial(cpu.forward, version=version),
                                     backward=functools.partial(cpu.backward, version=version))
    if name == "numpy":
        return _numpy
    if name == "cpu":
        from . import cpu
        return cpu
    if name == "cuda":
        from . import cuda
        return cuda
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def available_backends() -> dict:
    """{name: (available, reason)} for "numpy", "cpu", "cuda"."""
    return {name: (bool(_module(name).available), str(_module(name).reason)) for name in BACKENDS}


def get_backend(name: str | None = None, *, device: bool = False) -> str:
    """The backend to use: `name`, else $TINYSLIM_BACKEND, else the best one available for the inputs.

    Naming a backend that is unavailable raises RuntimeError with the reason.
    """
    name = name or _ENV.get("TINYSLIM_BACKEND", "").strip().lower() or None
    if name is None:
        if device:
            name = "cuda"
        else:
            name = "cpu" if _module("cpu").available else "numpy"
    mod = _module(name)
    if not mod.available:
        raise RuntimeError(f"the {name} backend is unavailable: {mod.reason}")
    return name


def _backend_for(p: Problem, backend: str | None):
    if not p.device:  # the common case, once per call: a host backend that was resolved before
        mod = _HOST.get(backend or _ENV.get("TINYSLIM_BACKEND"))
        if mod is not None:
            return mod
    name = get_backend(backend, device=p.device)
    if p.device and name != "cuda":
        raise ValueError(f"the inputs live on a GPU but the {name} backend works on host arrays; use "
                         "backend='cuda' or pass NumPy arrays")
    if name == "cuda" and p.dtype != np.float32:
        raise TypeError(f"the cuda backend is float32 only, got {p.dtype}; use the cpu or numpy backend for float64")
    mod = _module(name)
    if not p.device and name != "cuda" and name == (backend or _ENV.get("TINYSLIM_BACKEND") or name):
        _HOST[backend or _ENV.get("TINYSLIM_BACKEND")] = mod
    return mod


_HOST: dict = {}  # backend argument or $TINYSLIM_BACKEND (None: the default) → an available host backend


_ALL = (True, True, True, True)


def forward(x, A, B, gates, scale=1.0, in_mask=None, out_mask=None, *, backend: str | None = None):
    """y (N, O) = Σ_e g[n,e] · s_e · B'_e A'_e x_n for one of the three gate forms.

    Inputs are validated and made C-contiguous (non-contiguous inputs are copied). Entries whose gate
    times scale is zero are skipped: a row with no active entry is exactly 0.
    """
    p = prepare(x, A, B, gates, scale, in_mask, out_mask)
    if p.empty and not p.device:
        return np.zeros((p.N, p.O), dtype=p.dtype)
    return _backend_for(p, backend).forward(p)


def backward(dy, x, A, B, gates, scale=1.0, in_mask=None, out_mask=None, *, backend: str | None = None,
             needs=_ALL):
    """(dx, dA, dB, dgate) for the upstream gradient dy (N, O) of ``forward``.

    dx is the kernel's part only (the frozen W0ᵀ dy is added elsewhere). dgate has the shape of the
    gate weights (dG (N, E) dense, dw (N, k) top-k; None for the index form). `needs` (four bools)
    skips outputs nobody wants; those come back as None.
    """
    p = prepare(x, A, B, gates, scale, in_mask, out_mask)
    dy = check_dy(p, dy)
    if needs is not _ALL:
        needs = tuple(bool(n) for n in needs)
    if len(needs) != 4:
        raise ValueError(f"needs must be four bools (dx, dA, dB, dgate), got {len(needs)}")
    if p.empty and not p.device:
        zeros = (np.zeros_like(p.x), np.zeros_like(p.A), np.zeros_like(p.B),
                 None if p.form == "index" else np.zeros_like(p.w))
        return tuple(z if want else None for z, want in zip(zeros, needs))
    return _backend_for(p, backend).backward(p, dy, needs)


# ---- threads and the report ------------------------------------------------------------------------
def set_num_threads(n: int) -> None:
    """Threads of the cpu backend (OpenMP). n <= 0 restores the default (OMP_NUM_THREADS or all cores)."""
    os.environ["TINYSLIM_NUM_THREADS"] = str(max(int(n), 0))
    cpu = _module("cpu")
    cpu.set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads the cpu backend uses (1 without OpenMP)."""
    cpu = _module("cpu")
    if cpu.available:
        return cpu.get_num_threads()
    env = os.environ.get("TINYSLIM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or ""
    return int(env) if env.strip().isdigit() and int(env) > 0 else 1


def info_lines() -> list[str]:
    """A human-readable report of the kernel backends (printed by `python -m tinyslim info`)."""
    lines = []
    avail = available_backends()
    for name in BACKENDS:
        ok, why = avail[name]
        lines.append(f"  {'✓' if ok else '✗'} {name:<6} {why}")
    try:
        default = get_backend()
    except (RuntimeError, ValueError) as exc:  # e.g. TINYSLIM_BACKEND names a missing or unknown backend
        default = f"none ({exc})"
    cpu = _module("cpu")
    cuda = _module("cuda")
    env = os.environ.get("TINYSLIM_BACKEND")
    lines = ["kernel backends:"] + lines + [
        f"  default for NumPy arrays: {default}" + (f" (TINYSLIM_BACKEND={env})" if env else ""),
        f"  {cpu.build_info()}",
        f"  OpenMP: {'on' if cpu.has_openmp() else 'off'}, threads: {get_num_threads()}"
        f" (TINYSLIM_NUM_THREADS={os.environ.get('TINYSLIM_NUM_THREADS', '-')},"
        f" OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')},"
        f" OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}"
        f"{' set by tinyslim' if getattr(cpu, 'WAIT_POLICY_DEFAULTED', False) else ''})",
        f"  CUDA library (nvcc build): {'present' if cuda.library_path() else 'not built'}"
        + (f" at {cuda.library_path()}" if cuda.library_path() else ""),
        f"  GPU: {cuda.device_summary()}",
    ]
    return lines
