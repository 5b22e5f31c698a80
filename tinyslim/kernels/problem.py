"""Validation of a low-rank mixture call, in Python, before any pointer reaches C or CUDA.

Shape legend: N tokens, D in, O out, r rank, E experts, K gate entries per token (E dense, k top-k,
1 index).   x (N, D)   A (E, r, D)   B (E, O, r)   dy (N, O)   scale (E)   masks (E, D), (E, O)

``prepare`` checks shapes, dtypes and index ranges and returns a ``Problem`` whose arrays are
C-contiguous, aligned, native-endian and of one float dtype (copies are made where needed), with the
index arrays as int32 and ``scale`` as an (E,) array. Every mistake is a ValueError (wrong shape or
value) or TypeError (wrong kind of object or dtype) that says what was expected. Objects with
``__cuda_array_interface__`` (torch CUDA tensors, CuPy arrays) are kept on the device as
``DeviceArray`` views; their index arrays are copied to the host to be checked.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .gates import DenseGates, IndexGates, TopKGates, as_gates

__all__ = ["Problem", "DeviceArray", "prepare", "check_dy", "is_device_array"]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def is_device_array(obj) -> bool:
    try:
        return hasattr(obj, "__cuda_array_interface__")
    except Exception:  # some objects raise other errors from the property
        return False


class DeviceArray:
    """A GPU array seen through ``__cuda_array_interface__``: pointer, shape, dtype; keeps `obj` alive."""

    def __init__(self, obj):
        cai = obj.__cuda_array_interface__
        self.obj = obj
        self.shape = tuple(int(s) for s in cai["shape"])
        self.dtype = np.dtype(cai["typestr"])
        self.ptr = int(cai["data"][0])
        strides = cai.get("strides")
        # C-contiguous: no strides given, or strides equal to the packed row-major ones
        self.contiguous = strides is None or tuple(strides) == _packed_strides(self.shape, self.dtype.itemsize)

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))

    def to_host(self) -> np.ndarray:
        obj = self.obj
        if hasattr(obj, "detach") and hasattr(obj, "cpu"):       # torch
            return obj.detach().cpu().numpy()
        if hasattr(obj, "get"):                                   # CuPy
            return obj.get()
        raise TypeError(f"cannot copy a {type(obj).__name__} from the GPU to check it; pass a NumPy array, a torch "
                        "tensor or a CuPy array")


def _packed_strides(shape, itemsize):
    strides, step = [], itemsize
    for s in reversed(shape):
        strides.append(step)
        step *= max(int(s), 1)
    return tuple(reversed(strides))


class Problem:
    """A validated call. Arrays are np.ndarray (host) or DeviceArray (GPU); the sizes are read once here."""
    __slots__ = ("x", "A", "B", "form", "idx", "w", "scale", "in_mask", "out_mask", "dtype", "device",
                 "N", "D", "O", "r", "E", "K", "empty")

    def __init__(self, x, A, B, form, idx, w, scale, in_mask, out_mask, dtype, device):
        self.x, self.A, self.B = x, A, B
        self.form = form          # "dense" | "topk" | "index"
        self.idx, self.w = idx, w  # idx: None (dense), int32 (N, K) top-k or (N,) index, on the host;
        #                            w: (N, E) dense, (N, K) top-k, None index
        self.scale = scale        # (E,) of the float dtype (host)
        self.in_mask, self.out_mask = in_mask, out_mask  # (E, D), (E, O) or None
        self.dtype, self.device = dtype, device  # device: some float input lives on a GPU
        self.N, self.D = x.shape
        self.E, self.r = A.shape[0], A.shape[1]
        self.O = B.shape[1]
        self.K = self.E if form == "dense" else (1 if form == "index" else idx.shape[1])
        # nothing to compute: the outputs are all zeros (or have no elements)
        self.empty = min(self.N, self.D, self.O, self.r, self.E, self.K) == 0


def _shape(a):
    return tuple(a.shape)


def _float_input(name: str, obj, *, dtype=None):
    """A float array (host: contiguous, aligned, native-endian) or a DeviceArray; checks the dtype."""
    if type(obj) is np.ndarray and obj.flags.c_contiguous and obj.flags.aligned and obj.dtype in FLOAT_DTYPES \
            and obj.dtype.isnative and (dtype is None or obj.dtype == dtype):
        return obj  # the common case, checked cheaply (this runs on every call)
    if obj is None:
        raise TypeError(f"{name} is None; expected an array")
    if hasattr(obj, "requires_grad") and hasattr(obj, "data") and isinstance(getattr(obj, "data"), np.ndarray):
        obj = obj.data  # a tinyslim Tensor
    if is_device_array(obj):
        arr = DeviceArray(obj)
    else:
        if isinstance(obj, (str, bytes, dict, set)):
            raise TypeError(f"{name} must be an array, got {type(obj).__name__}")
        try:
            arr = np.asarray(obj)
        except Exception as exc:
            raise TypeError(f"{name} could not be read as an array ({exc})") from None
        if arr.dtype.kind == "f" and not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {arr.dtype}; the kernel works in float32 or float64 "
                        f"(convert with .astype(np.float32))")
    if dtype is not None and arr.dtype != dtype:
        raise TypeError(f"{name} is {arr.dtype} but x is {dtype}; give every float input the same dtype "
                        "(float32 or float64)")
    if isinstance(arr, np.ndarray):
        arr = np.require(arr, requirements=["C", "A"])
    return arr


def _cast_input(name: str, obj, dtype, shape):
    """Scale and masks: scalars / bool / any float dtype are cast to the working dtype (host only)."""
    if is_device_array(obj):
        obj = DeviceArray(obj).to_host()
    try:
        arr = np.asarray(obj)
    except Exception as exc:
        raise TypeError(f"{name} could not be read as an array ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} has dtype {arr.dtype}; expected numbers (float or bool)")
    return np.require(arr.astype(dtype, copy=False), requirements=["C", "A"])  # keeps 0-d as 0-d


_ONE = np.uint32(1)


def _index_input(name: str, obj, E: int, ndim: int):
    """An integer index array on the host as int32, every value in [−1, E−1]."""
    if type(obj) is np.ndarray and obj.dtype == np.int32 and obj.ndim == ndim and obj.flags.c_contiguous:
        # the common case, checked in one pass: −1 ≤ i ≤ E − 1  ⇔  (i + 1) as uint32 ≤ E (negatives wrap)
        if obj.size == 0 or (obj.view(np.uint32) + _ONE).max() <= E:
            return obj
    if is_device_array(obj):
        obj = DeviceArray(obj).to_host()
    if hasattr(obj, "numpy") and not isinstance(obj, np.ndarray):  # torch CPU tensor
        obj = obj.numpy()
    arr = np.asarray(obj)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} has dtype {arr.dtype}; expert indices must be integers (e.g. np.int32)")
    if arr.ndim != ndim:
        want = "(N,)" if ndim == 1 else "(N, k)"
        raise ValueError(f"{name} has shape {arr.shape} but must be {want}")
    if arr.size and (arr.min() < -1 or arr.max() >= E):
        bad = (arr < -1) | (arr >= E)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name} holds expert {int(arr[at])} at position {at} but there are only E = {E} "
                             f"experts (valid: -1 for none, 0 … {E - 1})")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _has_duplicates(idx: np.ndarray) -> bool:
    """Does a row of idx (N, k) name one expert twice (−1 excluded)? Column pairs for small k, else a sort."""
    k = idx.shape[1]
    if k <= 8:
        return any(np.any((idx[:, i] == idx[:, j]) & (idx[:, i] >= 0)) for i in range(k) for j in range(i + 1, k))
    srt = np.sort(idx, axis=1)
    return bool(np.any((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)))


_SCALES: dict = {}


def _full_scale(E: int, value: float, dtype) -> np.ndarray:
    """(E,) filled with a scalar scale: a cached read-only array (built once per E, value, dtype)."""
    key = (E, value, dtype)
    s = _SCALES.get(key)
    if s is None:
        if len(_SCALES) > 256:
            _SCALES.clear()
        s = np.full(E, value, dtype=dtype)
        s.flags.writeable = False
        _SCALES[key] = s
    return s


_ND, _I32 = np.ndarray, np.dtype(np.int32)
_ZERO_INDEX: dict = {}


def zero_index(N: int) -> np.ndarray:
    """(N,) int32 zeros that cannot be written to (backed by immutable bytes): every token on adapter 0,
    plain LoRA's index. prepare trusts it without the range check, since its values cannot change."""
    idx = _ZERO_INDEX.get(N)
    if idx is None:
        if len(_ZERO_INDEX) > 64:
            _ZERO_INDEX.clear()
        idx = _ZERO_INDEX[N] = np.frombuffer(bytes(4 * N), dtype=np.int32)
    return idx


def _host_array(a, dtype, shape) -> bool:
    """a is an aligned C-contiguous host ndarray of exactly this native dtype and shape."""
    return type(a) is _ND and a.dtype == dtype and a.shape == shape and a.flags.c_contiguous and a.flags.aligned


def _in_range(idx, E) -> bool:
    """Every value in [−1, E − 1] (−1 ≤ i ≤ E − 1  ⇔  (i + 1) as uint32 ≤ E: negatives wrap)."""
    return idx.size == 0 or (idx.max() < E and idx.min() >= -1)


def _prepare_fast(x, A, B, gates, scale, in_mask, out_mask):
    """The common call (host ndarrays already in shape, one float dtype, int32 indices), checked with as
    few operations as possible; None for anything else, which `prepare` then checks in full (and
    explains). It accepts exactly what the full checks accept, never more."""
    if type(x) is not _ND or type(A) is not _ND or type(B) is not _ND or x.ndim != 2 or A.ndim != 3 or B.ndim != 3:
        return None
    dtype = x.dtype
    if dtype not in FLOAT_DTYPES:
        return None
    N, D = x.shape
    E, r = A.shape[0], A.shape[1]
    O = B.shape[1]
    if not (_host_array(x, dtype, (N, D)) and _host_array(A, dtype, (E, r, D)) and _host_array(B, dtype, (E, O, r))):
        return None
    kind = type(gates)
    if kind is IndexGates:
        gates, kind = gates.idx, _ND
    if kind is _ND and gates.ndim == 1:  # per-token index
        if not _host_array(gates, _I32, (N,)) or (gates is not _ZERO_INDEX.get(N) and not _in_range(gates, E)):
            return None
        form, idx, w = "index", gates, None
    elif kind is _ND or kind is DenseGates:  # dense G (N, E)
        w = gates if kind is _ND else gates.G
        if not _host_array(w, dtype, (N, E)):
            return None
        form, idx = "dense", None
    elif kind is tuple or kind is TopKGates:  # top-k (idx, w), both (N, k)
        if kind is tuple:
            if len(gates) != 2:
                return None
            idx, w = gates
        else:
            idx, w = gates.idx, gates.w
        if type(idx) is not _ND or idx.ndim != 2 or idx.shape[0] != N:
            return None
        k = idx.shape[1]
        if not (_host_array(idx, _I32, (N, k)) and _host_array(w, dtype, (N, k)) and _in_range(idx, E)):
            return None
        if k == 2 and N and bool((idx[:, 0] == idx[:, 1]).any()):  # a repeat (or two empty slots): full check
            return None
        if k > 2:
            return None
        form = "topk"
    else:
        return None
    if type(scale) is float or type(scale) is int:
        s = _full_scale(E, float(scale), dtype)
    elif _host_array(scale, dtype, (E,)):
        s = scale
    else:
        return None
    if (in_mask is not None and not _host_array(in_mask, dtype, (E, D))) or \
            (out_mask is not None and not _host_array(out_mask, dtype, (E, O))):
        return None
    return Problem(x, A, B, form, idx, w, s, in_mask, out_mask, dtype, False)


def prepare(x, A, B, gates, scale=1.0, in_mask=None, out_mask=None) -> Problem:
    """Validate one call of the op and return the normalised Problem (see module docstring)."""
    p = _prepare_fast(x, A, B, gates, scale, in_mask, out_mask)
    if p is not None:
        return p
    x = _float_input("x", x)
    dtype = x.dtype
    A = _float_input("A", A, dtype=dtype)
    B = _float_input("B", B, dtype=dtype)
    if x.ndim != 2:
        raise ValueError(f"x has shape {_shape(x)} but must be (N, D): one row of D features per token "
                         "(flatten batch and time first)")
    N, D = x.shape
    if A.ndim != 3 or A.shape[2] != D:
        raise ValueError(f"A has shape {_shape(A)} but x has {D} features; A must be (E, r, D) with D = x.shape[1]")
    E, r = A.shape[0], A.shape[1]
    if B.ndim != 3 or B.shape[0] != E or B.shape[2] != r:
        raise ValueError(f"B has shape {_shape(B)} but A has shape {_shape(A)}; B must be (E, O, r) = "
                         f"({E}, O, {r}) with E, r taken from A")
    O = B.shape[1]

    if type(gates) is np.ndarray and gates.ndim == 1 and gates.dtype.kind in "iu":
        g = None  # a per-token index (what as_gates would say, without its checks of the other spellings)
    else:
        g = as_gates(gates)
    if g is None or isinstance(g, IndexGates):
        form, w = "index", None
        idx = _index_input("idx", gates if g is None else g.idx, E, ndim=1)
        if idx.shape[0] != N:
            raise ValueError(f"idx has shape {idx.shape} but x has N = {N} rows; the per-token index must be (N,)")
    elif isinstance(g, DenseGates):
        form, idx, w = "dense", None, _float_input("G", g.G, dtype=dtype)
        if _shape(w) != (N, E):
            raise ValueError(f"G has shape {_shape(w)} but must be (N, E) = ({N}, {E}): one weight per token "
                             "and expert")
    elif isinstance(g, TopKGates):
        form = "topk"
        idx = _index_input("idx", g.idx, E, ndim=2)
        w = _float_input("w", g.w, dtype=dtype)
        if idx.shape[0] != N:
            raise ValueError(f"idx has shape {idx.shape} but x has N = {N} rows; top-k idx must be (N, k)")
        if _shape(w) != idx.shape:
            raise ValueError(f"w has shape {_shape(w)} but idx has shape {idx.shape}; top-k weights must match "
                             "their indices")
        if N and _has_duplicates(idx):
            srt = np.sort(idx, axis=1)
            dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
            n, j = (int(i) for i in np.argwhere(dup)[0])
            raise ValueError(f"idx row {n} picks expert {int(srt[n, j + 1])} twice; top-k indices must be "
                             "distinct within a row (-1 for an empty slot may repeat)")
    else:  # pragma: no cover - as_gates returns one of the three
        raise TypeError(f"unknown gates {g!r}")

    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        s = _full_scale(E, float(scale), dtype)
    else:
        s = _cast_input("scale", scale, dtype, None)
    if s.ndim == 0:
        s = np.full(E, s, dtype=dtype)
    if s.shape != (E,):
        raise ValueError(f"scale has shape {s.shape} but must be a scalar or (E,) = ({E},): one scale per expert")
    if in_mask is not None:
        in_mask = _cast_input("in_mask", in_mask, dtype, None)
        if in_mask.shape != (E, D):
            raise ValueError(f"in_mask has shape {in_mask.shape} but must be (E, D) = ({E}, {D}): one input-channel "
                             "mask per expert")
    if out_mask is not None:
        out_mask = _cast_input("out_mask", out_mask, dtype, None)
        if out_mask.shape != (E, O):
            raise ValueError(f"out_mask has shape {out_mask.shape} but must be (E, O) = ({E}, {O}): one "
                             "output-channel mask per expert")
    device = type(x) is DeviceArray or type(A) is DeviceArray or type(B) is DeviceArray or type(w) is DeviceArray
    return Problem(x, A, B, form, idx, w, s, in_mask, out_mask, dtype, device)


def check_dy(p: Problem, dy):
    """The upstream gradient dy (N, O), in the problem's dtype."""
    dy = _float_input("dy", dy, dtype=p.dtype)
    if _shape(dy) != (p.N, p.O):
        raise ValueError(f"dy has shape {_shape(dy)} but the output is (N, O) = ({p.N}, {p.O})")
    return dy
