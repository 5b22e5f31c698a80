"""Binding to the compiled C/OpenMP kernel module ``tinyslim.kernels._lowrank_cpu`` (cffi API mode).

Shape legend: N tokens, D in, O out, r rank, E experts, K gate entries per token.
    x (N, D)   A (E, r, D)   B (E, O, r)   y, dy (N, O)   dgate like the gate weights

Takes a validated ``Problem`` (host arrays, see problem.py); importing never fails: when the module
was not built, ``available`` is False and ``reason`` says why.
"""
from __future__ import annotations

import functools
import os

import numpy as np

# OpenMP threads that finish early spin at the barrier for a long while by default (libgomp: up to
# ~300k spins). On a shared machine with more runnable threads than cores, a spinning thread holds
# a core that its sibling needs, and one call can stall for whole scheduler ticks (measured on a busy
# 2-core box: 30 ms median instead of 0.7 ms). Passive waiting is the safe default; the environment
# variable is read when libgomp loads (with the module below). Set OMP_WAIT_POLICY or GOMP_SPINCOUNT
# yourself to choose otherwise.
WAIT_POLICY_DEFAULTED = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
if WAIT_POLICY_DEFAULTED:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

try:
    from . import _lowrank_cpu as _mod
except ImportError as exc:  # not built (no C compiler, TINYSLIM_NO_EXT=1, or a failed build)
    _mod = None
    available = False
    reason = (f"compiled module not found ({exc}); build it with `python setup.py build_ext --inplace` "
              "(or `make ext`)")
else:
    available = True
    reason = "built (" + _mod.ffi.string(_mod.lib.tsl_build_info()).decode() + ")"

if _mod is not None:
    ffi, lib = _mod.ffi, _mod.lib
    _threads_env = os.environ.get("TINYSLIM_NUM_THREADS", "").strip()
    if _threads_env.isdigit():
        lib.tsl_set_num_threads(int(_threads_env))


def has_openmp() -> bool:
    return bool(available and lib.tsl_has_openmp())


def build_info() -> str:
    return ffi.string(lib.tsl_build_info()).decode() if available else "C kernels: not built"


def set_num_threads(n: int) -> None:
    if available:
        lib.tsl_set_num_threads(int(n))


def get_num_threads() -> int:
    return int(lib.tsl_get_num_threads()) if available else 1


VERSIONS = {1: "v1: the op as its equation in plain loops, one token and one expert at a time (ext/lowrank_v1.h)",
            2: "v2: token blocks, packed factors, register-tiled vector micro-kernels, OpenMP (ext/lowrank_v2.h)",
            3: "v3: v2 with GEMM-style register-blocked micro-kernels (ext/lowrank_v3.h)"}
LATEST = max(VERSIONS)


def _require():
    if not available:
        raise RuntimeError(f"the cpu backend is unavailable: {reason}")


def _check_version(version: int) -> int:
    if version not in VERSIONS:
        raise ValueError(f"unknown cpu kernel version {version!r}; there are {', '.join(map(str, VERSIONS))} "
                         f"(backend 'cpu' runs v{LATEST}, 'cpu.v1' … name one)")
    return version


# The C entry points by (version, dtype): the newest without a version argument, the others through
# tsl_*_version_*. Pointers into NumPy arrays come from ffi.from_buffer (no copy; ~10x cheaper than
# reading __array_interface__, which builds a dict each time); the arrays outlive the call.
_ENTRY: dict = {}
if available:
    for _v in VERSIONS:
        for _dt, _sfx in ((np.dtype(np.float32), "f32"), (np.dtype(np.float64), "f64")):
            _f, _b = getattr(lib, f"tsl_forward_version_{_sfx}"), getattr(lib, f"tsl_backward_version_{_sfx}")
            _ENTRY[_v, _dt] = ((getattr(lib, f"tsl_forward_{_sfx}"), getattr(lib, f"tsl_backward_{_sfx}"))
                               if _v == LATEST else (functools.partial(_f, _v), functools.partial(_b, _v)))
    _NULL, _buf = ffi.NULL, ffi.from_buffer
_ARRAY = {np.dtype(np.float32): "float[]", np.dtype(np.float64): "double[]"}


def forward(p, version: int = LATEST) -> np.ndarray:
    """y (N, O) for a validated Problem, computed by kernel `version` (the newest by default)."""
    fns = _ENTRY.get((version, p.dtype))
    if fns is None:
        _require()
        _check_version(version)
    at, buf, null = _ARRAY[p.dtype], _buf, _NULL
    y = np.empty((p.N, p.O), dtype=p.dtype)
    err = fns[0](p.N, p.D, p.O, p.r, p.E, p.K, buf(at, p.x), buf(at, p.A), buf(at, p.B),
                 null if p.idx is None else buf("int32_t[]", p.idx), null if p.w is None else buf(at, p.w),
                 buf(at, p.scale), null if p.in_mask is None else buf(at, p.in_mask),
                 null if p.out_mask is None else buf(at, p.out_mask), buf(at, y), 0)
    if err:
        raise MemoryError("the cpu kernel could not allocate its scratch memory")
    return y


def backward(p, dy, needs=(True, True, True, True), version: int = LATEST):
    """(dx, dA, dB, dgate) for a validated Problem and dy (N, O); None where not needed (or no gate)."""
    fns = _ENTRY.get((version, p.dtype))
    if fns is None:
        _require()
        _check_version(version)
    at, buf, null = _ARRAY[p.dtype], _buf, _NULL
    want_x, want_A, want_B, want_g = needs
    dx = np.empty_like(p.x) if want_x else None
    dA = np.empty_like(p.A) if want_A else None
    dB = np.empty_like(p.B) if want_B else None
    dg = np.empty_like(p.w) if (want_g and p.form != "index") else None
    err = fns[1](p.N, p.D, p.O, p.r, p.E, p.K, buf(at, p.x), buf(at, p.A), buf(at, p.B),
                 null if p.idx is None else buf("int32_t[]", p.idx), null if p.w is None else buf(at, p.w),
                 buf(at, p.scale), null if p.in_mask is None else buf(at, p.in_mask),
                 null if p.out_mask is None else buf(at, p.out_mask), buf(at, dy),
                 null if dx is None else buf(at, dx), null if dA is None else buf(at, dA),
                 null if dB is None else buf(at, dB), null if dg is None else buf(at, dg))
    if err:
        raise MemoryError("the cpu kernel could not allocate its scratch memory")
    return dx, dA, dB, dg
