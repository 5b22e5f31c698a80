"""Binding to the CUDA library ``tinyslim/kernels/_lowrank_cuda.so`` (cffi ABI mode, ``ffi.dlopen``).

Shape legend: N tokens, D in, O out, r rank, E experts, K gate entries per token.
    x (N, D)   A (E, r, D)   B (E, O, r)   y, dy (N, O)        float32 only

Inputs may be objects with ``__cuda_array_interface__`` (torch CUDA tensors, CuPy arrays): the kernels
read them in place and the outputs are allocated the same way (torch in → torch out, on the same
device and stream). NumPy inputs are copied to the GPU and the results copied back. Index arrays,
``scale`` and the masks are small and always uploaded from the host.

Importing never fails: without the library, a driver or a GPU, ``available`` is False and ``reason``
says which.
"""
from __future__ import annotations

import os

import numpy as np

from .problem import DeviceArray, Problem

__all__ = ["available", "reason", "forward", "backward", "library_path", "device_summary", "CDEF"]

# the same declarations as the CUDA section of ext/lowrank.h (tests/test_kernels.py checks they match)
CDEF = """
int tsl_cuda_forward(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                     const float *x, const float *A, const float *B,
                     const int32_t *idx, const float *w, const float *scale,
                     const float *in_mask, const float *out_mask,
                     float *y, void *stream);
int tsl_cuda_backward(int64_t N, int64_t D, int64_t O, int64_t r, int64_t E, int64_t K,
                      const float *x, const float *A, const float *B,
                      const int32_t *idx, const float *w, const float *scale,
                      const float *in_mask, const float *out_mask, const float *dy,
                      float *dx, float *dA, float *dB, float *dgate, void *stream);
int tsl_cuda_device_count(int *count);
int tsl_cuda_device_name(int device, char *name, int length);
const char *tsl_cuda_error_string(int error);
int tsl_cuda_malloc(void **ptr, size_t bytes);
int tsl_cuda_free(void *ptr);
int tsl_cuda_memcpy(void *dst, const void *src, size_t bytes, int kind);
int tsl_cuda_synchronize(void);
"""

LIBRARY = os.environ.get("TINYSLIM_CUDA_LIBRARY") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                  "_lowrank_cuda.so")
MAX_RANK = 512  # shared memory holds 2 × 8 tokens × r floats per block
H2D, D2H = 1, 2

ffi = lib = None
available = False
reason = "not checked"
_devices: list[str] = []


def _load():
    global ffi, lib, available, reason
    if not os.path.exists(LIBRARY):
        reason = (f"CUDA library not built ({LIBRARY} missing: nvcc was not found at build time or "
                  "TINYSLIM_NO_CUDA=1)")
        return
    try:
        from cffi import FFI
        ffi = FFI()
        ffi.cdef(CDEF)
        lib = ffi.dlopen(LIBRARY)
    except Exception as exc:  # OSError from dlopen, ImportError without cffi
        reason = f"CUDA library present but could not be loaded ({exc})"
        ffi = lib = None
        return
    count = ffi.new("int *")
    err = lib.tsl_cuda_device_count(count)
    if err:
        reason = f"CUDA library built, but no usable GPU ({_error(err)})"
        return
    if count[0] == 0:
        reason = "CUDA library built, but no GPU found"
        return
    name = ffi.new("char[256]")
    for d in range(count[0]):
        _devices.append(ffi.string(name).decode() if not lib.tsl_cuda_device_name(d, name, 256) else f"GPU {d}")
    available = True
    reason = f"{count[0]} GPU(s): {', '.join(_devices)}"


def _error(err: int) -> str:
    return f"CUDA error {err}: {ffi.string(lib.tsl_cuda_error_string(err)).decode()}"


try:
    _load()
except Exception as exc:  # never let an import fail
    available, reason = False, f"CUDA check failed ({exc})"


def library_path() -> str | None:
    return LIBRARY if os.path.exists(LIBRARY) else None


def device_summary() -> str:
    return ", ".join(_devices) if _devices else f"none ({reason})"


def _check(err: int, what: str):
    if err:
        raise RuntimeError(f"{what} failed: {_error(err)}")


# ---- one call's device memory ---------------------------------------------------------------------------
class _Call:
    """Pointers for one call: device arrays are used in place, host arrays are uploaded; outputs are
    allocated like the device inputs (torch / CuPy), or with cudaMalloc for all-NumPy calls."""

    def __init__(self, p: Problem):
        self.owned = []   # cudaMalloc'ed pointers to free
        self.keep = []    # objects that must outlive the call
        self.template = next((a.obj for a in (p.x, p.A, p.B, p.w) if isinstance(a, DeviceArray)), None)
        self.stream = ffi.NULL
        self.device_ctx = None
        mod = type(self.template).__module__.split(".")[0] if self.template is not None else ""
        if mod == "torch":
            import torch
            self.device_ctx = torch.cuda.device(self.template.device)
            self.stream = ffi.cast("void *", torch.cuda.current_stream(self.template.device).cuda_stream)
        elif mod == "cupy":
            import cupy
            self.device_ctx = self.template.device
            self.stream = ffi.cast("void *", cupy.cuda.get_current_stream().ptr)

    def __enter__(self):
        if self.device_ctx is not None:
            self.device_ctx.__enter__()
        return self

    def __exit__(self, *exc):
        for ptr in self.owned:
            lib.tsl_cuda_free(ptr)  # cudaFree waits for the kernels that use it
        if self.device_ctx is not None:
            self.device_ctx.__exit__(*exc)

    def _malloc(self, nbytes: int):
        ptr = ffi.new("void **")
        _check(lib.tsl_cuda_malloc(ptr, max(int(nbytes), 1)), "cudaMalloc")
        self.owned.append(ptr[0])
        return ptr[0]

    def ptr(self, a, ctype="float"):
        """Device pointer of a DeviceArray (made contiguous if needed) or of an uploaded host array."""
        if a is None:
            return ffi.NULL
        if isinstance(a, DeviceArray):
            if not a.contiguous:
                if not hasattr(a.obj, "contiguous"):
                    raise ValueError("a GPU input is not C-contiguous; make it contiguous first "
                                     "(cupy.ascontiguousarray)")
                a = DeviceArray(a.obj.contiguous())
            self.keep.append(a)
            return ffi.cast(f"{ctype} *", a.ptr)
        host = np.ascontiguousarray(a)
        dev = self._malloc(host.nbytes)
        if host.nbytes:
            _check(lib.tsl_cuda_memcpy(dev, ffi.cast("void *", host.ctypes.data), host.nbytes, H2D), "upload")
        return ffi.cast(f"{ctype} *", dev)

    def empty(self, shape):
        """(pointer, result) for a float32 output of `shape`; result is what the caller gets back."""
        if self.template is None:
            dev = self._malloc(int(np.prod(shape)) * 4)
            return ffi.cast("float *", dev), ("host", dev, shape)
        mod = type(self.template).__module__.split(".")[0]
        if mod == "torch":
            import torch
            out = torch.empty(shape, dtype=torch.float32, device=self.template.device)
        elif mod == "cupy":
            import cupy
            out = cupy.empty(shape, dtype=np.float32)
        else:
            raise TypeError(f"cannot allocate GPU outputs like a {type(self.template).__name__}; pass torch "
                            "tensors, CuPy arrays or NumPy arrays")
        return ffi.cast("float *", DeviceArray(out).ptr), ("device", out, shape)

    def result(self, handle):
        if handle is None:
            return None
        kind, obj, shape = handle
        if kind == "device":
            return obj
        host = np.empty(shape, dtype=np.float32)
        if host.nbytes:
            _check(lib.tsl_cuda_memcpy(ffi.cast("void *", host.ctypes.data), obj, host.nbytes, D2H), "download")
        return host


def _require(p: Problem):
    if not available:
        raise RuntimeError(f"the cuda backend is unavailable: {reason}")
    if p.dtype != np.float32:
        raise TypeError(f"the cuda backend is float32 only, got {p.dtype}")
    if p.r > MAX_RANK:
        raise ValueError(f"rank r = {p.r} is above the CUDA kernels' limit of {MAX_RANK}")


def _common(c: _Call, p: Problem):
    return (p.N, p.D, p.O, p.r, p.E, p.K, c.ptr(p.x), c.ptr(p.A), c.ptr(p.B), c.ptr(p.idx, "int32_t"),
            c.ptr(p.w), c.ptr(p.scale), c.ptr(p.in_mask), c.ptr(p.out_mask))


def forward(p: Problem):
    """y (N, O): a torch / CuPy array for GPU inputs, a NumPy array for NumPy inputs."""
    _require(p)
    with _Call(p) as c:
        y, y_handle = c.empty((p.N, p.O))
        _check(lib.tsl_cuda_forward(*_common(c, p), y, c.stream), "tsl_cuda_forward")
        return c.result(y_handle)


def backward(p: Problem, dy, needs=(True, True, True, True)):
    """(dx, dA, dB, dgate) like cpu.backward, allocated like the inputs; None where not needed."""
    _require(p)
    with _Call(p) as c:
        shapes = ((p.N, p.D), (p.E, p.r, p.D), (p.E, p.O, p.r),
                  None if p.form == "index" else ((p.N, p.E) if p.form == "dense" else (p.N, p.K)))
        outs = [c.empty(shape) if (want and shape is not None) else (ffi.NULL, None)
                for shape, want in zip(shapes, needs)]
        _check(lib.tsl_cuda_backward(*_common(c, p), c.ptr(dy), *(ptr for ptr, _ in outs), c.stream),
               "tsl_cuda_backward")
        return tuple(c.result(handle) for _, handle in outs)
