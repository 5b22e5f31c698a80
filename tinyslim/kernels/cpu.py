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

_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def has_openmp() -> bool:
    return bool(available and lib.tsl_has_openmp())


def build_info() -> str:
    return ffi.string(lib.tsl_build_info()).decode() if available else "C kernels: not built"


def set_num_threads(n: int) -> None:
    if available:
        lib.tsl_set_num_threads(int(n))


def get_num_threads() -> int:
    return int(lib.tsl_get_num_threads()) if available else 1


def _ptr(ctype: str, arr):
    """A C pointer into a NumPy array (NULL for None), without copying; the array must outlive the call.
    (ffi.from_buffer is ~10x cheaper than reading __array_interface__, which builds a dict each time.)"""
    if arr is None:
        return ffi.NULL
    return ffi.from_buffer(_ARRAY[ctype], arr)


_ARRAY = {"float": "float[]", "double": "double[]", "int32_t": "int32_t[]"}

VERSIONS = {1: "v1: the op as its equation in plain loops, one token and one expert at a time (ext/lowrank_v1.h)",
            2: "v2: token blocks, packed factors, register-tiled vector micro-kernels, OpenMP (ext/lowrank_v2.h)"}
LATEST = max(VERSIONS)


def _require():
    if not available:
        raise RuntimeError(f"the cpu backend is unavailable: {reason}")


def _gate_args(p, ctype):
    # dense: idx NULL, w = G;  top-k: idx, w;  index: idx, w NULL  (lowrank.h)
    return _ptr("int32_t", p.idx), _ptr(ctype, p.w)


def _check_version(version: int) -> int:
    if version not in VERSIONS:
        raise ValueError(f"unknown cpu kernel version {version!r}; there are {', '.join(map(str, VERSIONS))} "
                         f"(backend 'cpu' runs v{LATEST}, 'cpu.v1' … name one)")
    return version


def forward(p, version: int = LATEST) -> np.ndarray:
    """y (N, O) for a validated Problem, computed by kernel `version` (the newest by default)."""
    _require()
    ctype = _CTYPE[p.dtype]
    y = np.empty((p.N, p.O), dtype=p.dtype)
    idx, w = _gate_args(p, ctype)
    if version == LATEST:
        fn = lib.tsl_forward_f32 if ctype == "float" else lib.tsl_forward_f64
    else:
        vfn = lib.tsl_forward_version_f32 if ctype == "float" else lib.tsl_forward_version_f64
        fn = functools.partial(vfn, _check_version(version))
    err = fn(p.N, p.D, p.O, p.r, p.E, p.K, _ptr(ctype, p.x), _ptr(ctype, p.A), _ptr(ctype, p.B), idx, w,
             _ptr(ctype, p.scale), _ptr(ctype, p.in_mask), _ptr(ctype, p.out_mask), _ptr(ctype, y), 0)
    if err:
        raise MemoryError("the cpu kernel could not allocate its scratch memory")
    return y


def backward(p, dy, needs=(True, True, True, True), version: int = LATEST):
    """(dx, dA, dB, dgate) for a validated Problem and dy (N, O); None where not needed (or no gate)."""
    _require()
    ctype = _CTYPE[p.dtype]
    want_x, want_A, want_B, want_g = needs
    dx = np.empty_like(p.x) if want_x else None
    dA = np.empty_like(p.A) if want_A else None
    dB = np.empty_like(p.B) if want_B else None
    dg = np.empty_like(p.w) if (want_g and p.form != "index") else None
    idx, w = _gate_args(p, ctype)
    if version == LATEST:
        fn = lib.tsl_backward_f32 if ctype == "float" else lib.tsl_backward_f64
    else:
        vfn = lib.tsl_backward_version_f32 if ctype == "float" else lib.tsl_backward_version_f64
        fn = functools.partial(vfn, _check_version(version))
    err = fn(p.N, p.D, p.O, p.r, p.E, p.K, _ptr(ctype, p.x), _ptr(ctype, p.A), _ptr(ctype, p.B), idx, w,
             _ptr(ctype, p.scale), _ptr(ctype, p.in_mask), _ptr(ctype, p.out_mask), _ptr(ctype, dy),
             _ptr(ctype, dx), _ptr(ctype, dA), _ptr(ctype, dB), _ptr(ctype, dg))
    if err:
        raise MemoryError("the cpu kernel could not allocate its scratch memory")
    return dx, dA, dB, dg
