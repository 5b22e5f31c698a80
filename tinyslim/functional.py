"""Every differentiable op of tinyslim, forward and backward side by side.

Each op is a ``Function`` (see autograd.py) plus a small user-facing function. Every backward
line carries the reason its derivative is what it is. Shape legend: N tokens (rows), D in
features, O out features, B batch, T time, C channels, H heads, hd = C / H, V vocabulary,
E experts, k top-k.

Ops here: add, sub, mul, div, neg, pow, exp, log, tanh, relu, matmul, linear, sum, mean, max,
reshape, transpose, getitem, concat, gather, gelu (tanh form), softmax, log_softmax,
cross_entropy (ignore index / loss mask), layer_norm, embedding, dropout, causal self-attention,
top-k gating. The mixture low-rank op lives in lowrank.py (it dispatches to a kernel backend).
"""
from __future__ import annotations

import math

import numpy as np

from .autograd import Function, Tensor

__all__ = [
    "add", "sub", "mul", "div", "neg", "pow", "exp", "log", "tanh", "relu", "matmul", "linear",
    "sum", "mean", "max", "reshape", "transpose", "getitem", "concat", "gather", "gelu", "softmax",
    "log_softmax", "cross_entropy", "layer_norm", "embedding", "dropout", "causal_self_attention",
    "topk_gating",
]


# ---- helpers -----------------------------------------------------------------------------------

def _as_tensor(x, like=None) -> Tensor:
    """Wrap a Python number or array; numbers take the dtype of the tensor they meet."""
    if isinstance(x, Tensor):
        return x
    dtype = like.dtype if (like is not None and np.isscalar(x)) else None
    return Tensor(np.asarray(x, dtype=dtype))


def _binary_operands(op: str, a, b):
    a = _as_tensor(a, like=b if isinstance(b, Tensor) else None)
    b = _as_tensor(b, like=a)
    if (a.dtype != b.dtype and np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating)):
        raise TypeError(f"{op}: dtype mismatch, {a.dtype} and {b.dtype}; convert one of them first "
                        "(tinyslim never mixes float precisions silently)")
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} do not broadcast "
                         "(trailing dimensions must be equal or 1)") from None
    return a, b


def _unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a broadcast gradient back down to `shape` (broadcasting copied the value, so grads add)."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1)
    out = grad.sum(axis=axes, keepdims=True) if axes else grad
    return out.reshape(shape)


def _check_axis(op: str, axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{op}: axis {axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


# ---- elementwise arithmetic (broadcasting) ---------------------------------------------------

class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx, g):
        # d(a+b)/da = d(a+b)/db = 1; broadcast dims are summed back
        return _unbroadcast(g, ctx.shapes[0]), _unbroadcast(g, ctx.shapes[1])


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (a.shape, b.shape)
        return a - b

    @staticmethod
    def backward(ctx, g):
        # d(a-b)/da = 1, d(a-b)/db = -1
        return _unbroadcast(g, ctx.shapes[0]), _unbroadcast(-g, ctx.shapes[1])


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        # product rule: d(ab)/da = b, d(ab)/db = a
        ga = _unbroadcast(g * b, a.shape) if ctx.needs_input_grad[0] else None
        gb = _unbroadcast(g * a, b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        # d(a/b)/da = 1/b, d(a/b)/db = -a/b²
        ga = _unbroadcast(g / b, a.shape) if ctx.needs_input_grad[0] else None
        gb = _unbroadcast(-g * a / (b * b), b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, g):
        return (-g,)  # d(-a)/da = -1


class Pow(Function):
    @staticmethod
    def forward(ctx, a, *, exponent):
        ctx.save_for_backward(a)
        ctx.exponent = exponent
        return a ** exponent

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        p = ctx.exponent
        return (g * p * a ** (p - 1),)  # power rule: d(a^p)/da = p a^(p-1)


class Exp(Function):
    @staticmethod
    def forward(ctx, a):
        out = np.exp(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return (g * out,)  # d(e^a)/da = e^a


class Log(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return np.log(a)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return (g / a,)  # d(log a)/da = 1/a


class Tanh(Function):
    @staticmethod
    def forward(ctx, a):
        out = np.tanh(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return (g * (1 - out * out),)  # d(tanh a)/da = 1 - tanh² a


class Relu(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a > 0)
        return np.maximum(a, 0)

    @staticmethod
    def backward(ctx, g):
        (positive,) = ctx.saved_tensors
        return (g * positive,)  # slope 1 where a > 0, else 0 (0 at the kink, as torch)


def add(a, b):
    return Add.apply(*_binary_operands("add", a, b))


def sub(a, b):
    return Sub.apply(*_binary_operands("sub", a, b))


def mul(a, b):
    return Mul.apply(*_binary_operands("mul", a, b))


def div(a, b):
    return Div.apply(*_binary_operands("div", a, b))


def neg(a):
    return Neg.apply(_as_tensor(a))


def pow(a, exponent: float):
    if isinstance(exponent, Tensor) or not np.isscalar(exponent):
        raise TypeError(f"pow: the exponent must be a Python number, got {type(exponent).__name__}")
    return Pow.apply(_as_tensor(a), exponent=exponent)


def exp(a):
    return Exp.apply(_as_tensor(a))


def log(a):
    return Log.apply(_as_tensor(a))


def tanh(a):
    return Tanh.apply(_as_tensor(a))


def relu(a):
    return Relu.apply(_as_tensor(a))


# ---- matrix products -------------------------------------------------------------------------

class MatMul(Function):
    @staticmethod
    def forward(ctx, a, b):  # a (..., n, m) @ b (..., m, p) -> (..., n, p), batch dims broadcast
        ctx.save_for_backward(a, b)
        return np.matmul(a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        # d(AB) = dA B + A dB  =>  dA = G Bᵀ, dB = Aᵀ G (summed over broadcast batch dims)
        ga = _unbroadcast(np.matmul(g, np.swapaxes(b, -1, -2)), a.shape) if ctx.needs_input_grad[0] else None
        gb = _unbroadcast(np.matmul(np.swapaxes(a, -1, -2), g), b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb


def matmul(a, b):
    a, b = _as_tensor(a), _as_tensor(b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul: both operands need at least 2 dimensions, got shapes {a.shape} and {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not chain: "
                         f"a has {a.shape[-1]} columns but b has {b.shape[-2]} rows")
    a, b = _binary_operands("matmul", a, b) if a.dtype != b.dtype else (a, b)
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch dimensions {a.shape[:-2]} and {b.shape[:-2]} do not broadcast") from None
    return MatMul.apply(a, b)


class Linear(Function):
    @staticmethod
    def forward(ctx, x, W, b):  # x (..., D), W (O, D), b (O,) or None -> (..., O)
        x2 = x.reshape(-1, x.shape[-1])  # (N, D)
        y = x2 @ W.T  # (N, O)
        if b is not None:
            y += b
        ctx.save_for_backward(x2, W)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, W = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (N, O)
        need_x, need_W, need_b = ctx.needs_input_grad
        dx = (g2 @ W).reshape(ctx.x_shape) if need_x else None  # y = x Wᵀ  =>  dx = g W
        dW = g2.T @ x2 if need_W else None  # each output o adds W[o]·x  =>  dW[o] = Σ_n g[n,o] x[n]
        db = g2.sum(axis=0) if need_b else None  # the bias is added to every row
        return dx, dW, db


def linear(x, W, b=None):
    """y = x Wᵀ + b with W stored (out, in), as torch.nn.Linear and PEFT."""
    x, W = _as_tensor(x), _as_tensor(W)
    if W.ndim != 2:
        raise ValueError(f"linear: W must be 2-D (out, in), got shape {W.shape}")
    if x.ndim < 1 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"linear: x has shape {x.shape} but W is {W.shape}; x's last dimension must be "
                         f"in_features = {W.shape[1]}")
    if x.dtype != W.dtype:
        raise TypeError(f"linear: x is {x.dtype} but W is {W.dtype}; they must match")
    if b is not None:
        b = _as_tensor(b)
        if b.shape != (W.shape[0],):
            raise ValueError(f"linear: bias has shape {b.shape}, expected ({W.shape[0]},)")
    return Linear.apply(x, W, b)


# ---- reductions ------------------------------------------------------------------------------

def _normalize_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if np.isscalar(axis) else tuple(axis)
    return tuple(_check_axis("reduction", int(a), ndim) for a in axes)


class Sum(Function):
    @staticmethod
    def forward(ctx, a, *, axis, keepdims):
        ctx.shape, ctx.axes = a.shape, _normalize_axes(axis, a.ndim)
        return np.sum(a, axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        # every summed element contributes with weight 1: broadcast g back over the reduced axes
        g = np.expand_dims(g, ctx.axes) if g.ndim != len(ctx.shape) else g
        return (np.broadcast_to(g, ctx.shape).copy(),)


class Mean(Function):
    @staticmethod
    def forward(ctx, a, *, axis, keepdims):
        ctx.shape, ctx.axes = a.shape, _normalize_axes(axis, a.ndim)
        ctx.count = int(np.prod([a.shape[i] for i in ctx.axes])) if ctx.axes else 1
        return np.mean(a, axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        # each element carries weight 1/count in the mean
        g = np.expand_dims(g, ctx.axes) if g.ndim != len(ctx.shape) else g
        return (np.broadcast_to(g / ctx.count, ctx.shape).copy(),)


class Max(Function):
    @staticmethod
    def forward(ctx, a, *, axis, keepdims):
        ctx.axes = _normalize_axes(axis, a.ndim)
        out = np.max(a, axis=ctx.axes, keepdims=True)
        ctx.save_for_backward(a, out)
        return out if keepdims else np.squeeze(out, axis=ctx.axes)

    @staticmethod
    def backward(ctx, g):
        a, out = ctx.saved_tensors
        # only the maximal entries move the max; ties share the gradient equally
        winners = (a == out)
        g = np.expand_dims(g, ctx.axes) if g.ndim != a.ndim else g
        return (winners * (g / winners.sum(axis=ctx.axes, keepdims=True, dtype=g.dtype)),)  # count in g's dtype


def sum(a, axis=None, keepdims=False):
    return Sum.apply(_as_tensor(a), axis=axis, keepdims=keepdims)


def mean(a, axis=None, keepdims=False):
    a = _as_tensor(a)
    if a.size == 0:
        raise ValueError(f"mean of an empty tensor (shape {a.shape}) is undefined")
    return Mean.apply(a, axis=axis, keepdims=keepdims)


def max(a, axis=None, keepdims=False):
    a = _as_tensor(a)
    if a.size == 0:
        raise ValueError(f"max of an empty tensor (shape {a.shape}) is undefined")
    return Max.apply(a, axis=axis, keepdims=keepdims)


# ---- shape ops -------------------------------------------------------------------------------

class Reshape(Function):
    @staticmethod
    def forward(ctx, a, *, shape):
        ctx.shape = a.shape
        return a.reshape(shape)

    @staticmethod
    def backward(ctx, g):
        return (g.reshape(ctx.shape),)  # reshaping moves no values: reshape the gradient back


class Transpose(Function):
    @staticmethod
    def forward(ctx, a, *, axes):
        ctx.axes = axes
        return np.transpose(a, axes)

    @staticmethod
    def backward(ctx, g):
        # a permutation is undone by its inverse permutation
        inverse = None if ctx.axes is None else tuple(np.argsort(ctx.axes))
        return (np.transpose(g, inverse),)


class GetItem(Function):
    @staticmethod
    def forward(ctx, a, *, index):
        ctx.shape, ctx.index = a.shape, index
        return a[index]

    @staticmethod
    def backward(ctx, g):
        # each selected element receives its gradient; repeated (fancy) indices add up
        out = np.zeros(ctx.shape, dtype=g.dtype)
        np.add.at(out, ctx.index, g)
        return (out,)


class Concat(Function):
    @staticmethod
    def forward(ctx, *arrays, axis):
        ctx.axis = axis
        ctx.splits = np.cumsum([a.shape[axis] for a in arrays])[:-1]
        return np.concatenate(arrays, axis=axis)

    @staticmethod
    def backward(ctx, g):
        return tuple(np.split(g, ctx.splits, axis=ctx.axis))  # each input owns its slice


class Gather(Function):
    @staticmethod
    def forward(ctx, a, idx, *, axis):
        ctx.shape, ctx.idx, ctx.axis = a.shape, idx, axis
        return np.take_along_axis(a, idx, axis=axis)

    @staticmethod
    def backward(ctx, g):
        # scatter-add: the gathered entry's gradient goes back to where it was taken from
        out = np.zeros(ctx.shape, dtype=g.dtype)
        _scatter_add_along_axis(out, ctx.idx, g, ctx.axis)
        return out, None


def _scatter_add_along_axis(out, idx, values, axis):
    grids = list(np.indices(idx.shape, sparse=True))
    grids[axis] = idx
    np.add.at(out, tuple(grids), values)


def reshape(a, shape):
    a = _as_tensor(a)
    shape = tuple(shape) if not np.isscalar(shape) else (shape,)
    try:
        target = np.empty(a.shape, dtype=np.bool_).reshape(shape).shape
    except ValueError:
        raise ValueError(f"reshape: cannot reshape a tensor of shape {a.shape} ({a.size} elements) "
                         f"into {shape}") from None
    return Reshape.apply(a, shape=target)


def transpose(a, axes=None):
    a = _as_tensor(a)
    if axes is not None:
        axes = tuple(int(x) for x in axes)
        if sorted(x % a.ndim for x in axes) != list(range(a.ndim)) or len(axes) != a.ndim:
            raise ValueError(f"transpose: axes {axes} are not a permutation of the {a.ndim} dimensions of {a.shape}")
        axes = tuple(x % a.ndim for x in axes)
    return Transpose.apply(a, axes=axes)


def getitem(a, index):
    a = _as_tensor(a)
    if isinstance(index, Tensor):
        index = index.data
    try:
        np.empty(a.shape, dtype=np.bool_)[index]
    except IndexError as err:
        raise IndexError(f"index {index!r} is invalid for a tensor of shape {a.shape}: {err}") from None
    return GetItem.apply(a, index=index)


def concat(tensors, axis=0):
    tensors = [_as_tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("concat needs at least one tensor")
    axis = _check_axis("concat", axis, tensors[0].ndim)
    for t in tensors[1:]:
        if t.ndim != tensors[0].ndim or any(s != u for i, (s, u) in enumerate(zip(t.shape, tensors[0].shape)) if i != axis):
            raise ValueError(f"concat along axis {axis}: shapes {[t.shape for t in tensors]} differ off that axis")
    return Concat.apply(*tensors, axis=axis)


def gather(a, idx, axis=-1):
    """out[..., j] = a[..., idx[..., j]] along `axis` (np.take_along_axis); idx is not differentiated."""
    a = _as_tensor(a)
    idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
    axis = _check_axis("gather", axis, a.ndim)
    if not np.issubdtype(idx.dtype, np.integer) or idx.ndim != a.ndim:
        raise ValueError(f"gather: idx must be an integer array with {a.ndim} dimensions, got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= a.shape[axis]):
        raise IndexError(f"gather: indices must lie in [0, {a.shape[axis]}), got range [{idx.min()}, {idx.max()}]")
    return Gather.apply(a, idx, axis=axis)


# ---- activations and normalisations ----------------------------------------------------------

_GELU_C = math.sqrt(2.0 / math.pi)


class Gelu(Function):
    @staticmethod
    def forward(ctx, x):
        # GPT-2's tanh approximation: 0.5 x (1 + tanh(u)),  u = √(2/π) (x + 0.044715 x³)
        # (written as in-place passes over one buffer: this op touches the widest activations, 4C)
        t = np.multiply(x, x, out=np.empty_like(x))  # (out= keeps 0-d inputs arrays)
        t *= _GELU_C * 0.044715
        t += _GELU_C
        t *= x  # u
        np.tanh(t, out=t)  # t = tanh(u)
        ctx.save_for_backward(x, t)
        y = t + 1.0
        y *= x
        y *= 0.5
        return y

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        # product rule on 0.5·x·(1 + t), t = tanh(u):  dy/dx = 0.5·((1 − t²)·du/dx·x + t + 1),
        # du/dx = √(2/π)·(1 + 3·0.044715·x²)  (written x²·(3·0.044715·√(2/π)) + √(2/π))
        dudx = x * x * (3 * 0.044715 * _GELU_C) + _GELU_C
        return (np.asarray(((1.0 - t * t) * dudx * x + t + 1.0) * 0.5 * g),)  # (asarray: 0-d stays an array)


def gelu(x):
    return Gelu.apply(_as_tensor(x))


class Softmax(Function):
    @staticmethod
    def forward(ctx, x, *, axis):
        z = np.exp(x - x.max(axis=axis, keepdims=True))  # shift by the max: same result, no overflow
        p = z / z.sum(axis=axis, keepdims=True)
        ctx.save_for_backward(p)
        ctx.axis = axis
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        # Jacobian diag(p) - p pᵀ applied to g: p ⊙ (g - ⟨g, p⟩)
        return (p * (g - (g * p).sum(axis=ctx.axis, keepdims=True)),)


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx, x, *, axis):
        shifted = x - x.max(axis=axis, keepdims=True)
        out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        # d log p_i / d x_j = δ_ij - p_j  =>  g - softmax · Σ g
        return (g - np.exp(out) * g.sum(axis=ctx.axis, keepdims=True),)


def softmax(x, axis=-1):
    x = _as_tensor(x)
    return Softmax.apply(x, axis=_check_axis("softmax", axis, x.ndim))


def log_softmax(x, axis=-1):
    x = _as_tensor(x)
    return LogSoftmax.apply(x, axis=_check_axis("log_softmax", axis, x.ndim))


class CrossEntropy(Function):
    @staticmethod
    def forward(ctx, logits, targets, weights):  # logits (N, V), targets (N,) int, weights (N,) 0/1 float
        shifted = logits - logits.max(axis=1, keepdims=True)
        z = np.exp(shifted)
        zsum = z.sum(axis=1, keepdims=True)
        rows = np.arange(len(targets))
        logp_target = shifted[rows, targets] - np.log(zsum[:, 0])
        count = weights.sum()
        ctx.save_for_backward(z, zsum, targets, weights)
        ctx.count = count
        return np.asarray(-(weights * logp_target).sum() / count, dtype=logits.dtype)

    @staticmethod
    def backward(ctx, g):
        z, zsum, targets, weights = ctx.saved_tensors
        # d(-log softmax_t)/dlogits = softmax - onehot(t), averaged over the counted positions
        d = z / zsum
        d[np.arange(len(targets)), targets] -= 1.0
        d *= (g * weights / ctx.count)[:, None]
        return d, None, None


def cross_entropy(logits, targets, mask=None, ignore_index: int = -1):
    """Mean token cross-entropy over counted positions.

    logits (..., V); targets (...) integer class ids. A position counts when its target is not
    ``ignore_index`` and, if ``mask`` (same shape as targets) is given, its mask is non-zero.
    """
    logits = _as_tensor(logits)
    targets = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"cross_entropy: targets must be integer class ids, got dtype {targets.dtype}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"cross_entropy: logits have shape {logits.shape} so targets must have shape "
                         f"{logits.shape[:-1]}, got {targets.shape}")
    V = logits.shape[-1]
    counted = targets != ignore_index
    if mask is not None:
        mask = np.asarray(mask.data if isinstance(mask, Tensor) else mask)
        if mask.shape != targets.shape:
            raise ValueError(f"cross_entropy: mask has shape {mask.shape}, expected the targets' shape {targets.shape}")
        if mask.dtype.kind in "fc" and not np.all(np.isfinite(mask)):
            raise ValueError("cross_entropy: mask holds NaN or inf; it must be 0 (left out) or 1 (counted)")
        counted = counted & (mask != 0)
    live = targets[counted]
    if live.size and (live.min() < 0 or live.max() >= V):
        raise IndexError(f"cross_entropy: target ids must lie in [0, {V}), got range [{live.min()}, {live.max()}]")
    if not counted.any():
        raise ValueError("cross_entropy: every position is masked or ignored; the mean over no tokens is undefined")
    safe_targets = np.where(counted, targets, 0).reshape(-1)
    weights = counted.reshape(-1).astype(logits.dtype)
    return CrossEntropy.apply(reshape(logits, (-1, V)), safe_targets, weights)


class LayerNorm(Function):
    @staticmethod
    def forward(ctx, x, w, b, *, eps):  # x (..., C), w (C,), b (C,)
        C = x.shape[-1]
        xhat = x - x.mean(axis=-1, keepdims=True)  # centred
        var = np.einsum("...c,...c->...", xhat, xhat)[..., None] / C  # biased variance, as torch
        rstd = 1.0 / np.sqrt(var + eps)
        xhat *= rstd  # normalised
        ctx.save_for_backward(xhat, rstd, w)
        y = xhat * w if w is not None else xhat.copy()
        if b is not None:
            y += b
        return y

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        C = g.shape[-1]
        lead = tuple(range(g.ndim - 1))
        dw = np.einsum("nc,nc->c", g.reshape(-1, C), xhat.reshape(-1, C)) if need_w else None  # y = xhat·w + b
        db = g.sum(axis=lead) if need_b else None
        dx = None
        if need_x:
            dxhat = g * w if w is not None else g.copy()
            # xhat = (x - mean)·rstd: subtract the mean path and the variance path (llm.c layernorm_backward)
            proj = np.einsum("...c,...c->...", dxhat, xhat)[..., None] / C
            dx = dxhat
            dx -= dxhat.mean(axis=-1, keepdims=True)
            dx -= xhat * proj
            dx *= rstd
        return dx, dw, db


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    x = _as_tensor(x)
    C = x.shape[-1] if x.ndim else None
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (C,):
            raise ValueError(f"layer_norm: {name} has shape {tuple(p.shape)} but x has {C} channels; expected ({C},)")
    return LayerNorm.apply(x, weight, bias, eps=eps)


class Embedding(Function):
    @staticmethod
    def forward(ctx, idx, W):  # idx (...) int, W (V, C) -> (..., C)
        ctx.idx, ctx.V = idx, W.shape[0]
        return W[idx]

    @staticmethod
    def backward(ctx, g):
        # each row W[v] was copied to every position holding v: their gradients add up
        # (sort the positions by id and sum each run of equal ids; faster than np.add.at)
        C = g.shape[-1]
        flat = ctx.idx.reshape(-1)
        dW = np.zeros((ctx.V, C), dtype=g.dtype)
        if flat.size:
            order = np.argsort(flat, kind="stable")
            ids = flat[order]
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            dW[ids[starts]] = np.add.reduceat(g.reshape(-1, C)[order], starts, axis=0)
        return None, dW


def embedding(idx, W):
    W = _as_tensor(W)
    idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"embedding: token ids must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= W.shape[0]):
        raise IndexError(f"embedding: token ids must lie in [0, {W.shape[0]}), got range [{idx.min()}, {idx.max()}]")
    return Embedding.apply(idx, W)


class Dropout(Function):
    @staticmethod
    def forward(ctx, x, keep):  # keep: (same shape as x) float mask already divided by (1 - p)
        ctx.save_for_backward(keep)
        return x * keep

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return g * keep, None  # a kept entry passes its gradient scaled by 1/(1-p); a dropped one none


def dropout(x, p: float, rng: np.random.Generator | None = None, training: bool = True):
    """Inverted dropout: zero each entry with probability p, scale the rest by 1/(1-p)."""
    x = _as_tensor(x)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must lie in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout: pass rng= (a numpy Generator) so that runs are reproducible")
    keep = (rng.random(x.shape) >= p).astype(x.dtype) / x.dtype.type(1.0 - p)
    return Dropout.apply(x, keep)


# ---- attention -------------------------------------------------------------------------------

_CAUSAL_BIAS_CACHE: dict = {}


def _causal_bias(T: int, dtype) -> np.ndarray:
    key = (T, np.dtype(dtype))
    if key not in _CAUSAL_BIAS_CACHE:
        bias = np.zeros((T, T), dtype=dtype)
        bias[np.triu_indices(T, k=1)] = -np.inf  # position t may not look at t' > t
        _CAUSAL_BIAS_CACHE[key] = bias
    return _CAUSAL_BIAS_CACHE[key]


class CausalSelfAttention(Function):
    @staticmethod
    def forward(ctx, qkv, *, n_head):  # qkv (B, T, 3C) -> y (B, T, C)
        B, T, C3 = qkv.shape
        C = C3 // 3
        hd = C // n_head
        heads = qkv.reshape(B, T, 3, n_head, hd).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hd) views
        q, k, v = heads[0], heads[1], heads[2]
        scale = 1.0 / math.sqrt(hd)
        att = np.matmul(q * qkv.dtype.type(scale), k.transpose(0, 1, 3, 2))  # (B, H, T, T), scale on the small side
        att += _causal_bias(T, qkv.dtype)
        att -= att.max(axis=-1, keepdims=True)  # softmax row by row, shifted by the row max
        np.exp(att, out=att)
        att *= 1.0 / att.sum(axis=-1, keepdims=True)
        y = np.matmul(att, v)  # (B, H, T, hd)
        ctx.save_for_backward(q, k, v, att)
        ctx.scale = scale
        return y.transpose(0, 2, 1, 3).reshape(B, T, C)

    @staticmethod
    def backward(ctx, g):
        q, k, v, att = ctx.saved_tensors
        B, H, T, hd = q.shape
        gy = g.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
        dqkv = np.empty((B, T, 3, H, hd), dtype=g.dtype)
        # y = att v  =>  dv = attᵀ gy, datt = gy vᵀ
        dqkv[:, :, 2] = np.matmul(att.transpose(0, 1, 3, 2), gy).transpose(0, 2, 1, 3)
        datt = np.matmul(gy, v.transpose(0, 1, 3, 2))
        # softmax backward row by row: dS = att ⊙ (datt - Σ datt·att); masked entries have att = 0
        rowdot = np.einsum("bhij,bhij->bhi", datt, att)[..., None]
        datt -= rowdot
        datt *= att
        # scores = scale · q kᵀ  =>  dq = scale · dS k,  dk = scale · dSᵀ q (scale applied on the small side)
        s = g.dtype.type(ctx.scale)
        dqkv[:, :, 0] = np.matmul(datt, k * s).transpose(0, 2, 1, 3)
        dqkv[:, :, 1] = np.matmul(datt.transpose(0, 1, 3, 2), q * s).transpose(0, 2, 1, 3)
        return (dqkv.reshape(B, T, 3 * H * hd),)


def causal_self_attention(qkv, n_head: int):
    """Multi-head causal attention on the fused projection qkv = [q | k | v] (B, T, 3C)."""
    qkv = _as_tensor(qkv)
    if qkv.ndim != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"causal_self_attention: qkv must be (B, T, 3C), got shape {qkv.shape}")
    C = qkv.shape[-1] // 3
    if n_head < 1 or C % n_head:
        raise ValueError(f"causal_self_attention: C = {C} channels do not split into n_head = {n_head} heads")
    return CausalSelfAttention.apply(qkv, n_head=n_head)


# ---- top-k gating ----------------------------------------------------------------------------

class TopKSoftmax(Function):
    @staticmethod
    def forward(ctx, logits, idx):  # logits (N, E), idx (N, k) -> w (N, k)
        sel = np.take_along_axis(logits, idx, axis=1)
        z = np.exp(sel - sel.max(axis=1, keepdims=True))
        w = z / z.sum(axis=1, keepdims=True)
        ctx.save_for_backward(w, idx)
        ctx.E = logits.shape[1]
        return w

    @staticmethod
    def backward(ctx, g):
        w, idx = ctx.saved_tensors
        # softmax over the selected logits only; unselected logits get no gradient (selection is not differentiated)
        dsel = w * (g - (g * w).sum(axis=1, keepdims=True))
        dlogits = np.zeros((len(w), ctx.E), dtype=g.dtype)
        np.put_along_axis(dlogits, idx, dsel, axis=1)
        return dlogits, None


def topk_gating(logits, k: int):
    """Top-k routing: pick the k largest logits per row (ties to the lower index), softmax over them.

    Returns (weights Tensor (N, k), idx int32 array (N, k)). Gradients reach the selected logits.
    """
    logits = _as_tensor(logits)
    if logits.ndim != 2:
        raise ValueError(f"topk_gating: logits must be (N, E), got shape {logits.shape}")
    E = logits.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"topk_gating: k must lie in [1, E = {E}], got {k}")
    idx = np.argsort(-logits.data, axis=1, kind="stable")[:, :k].astype(np.int32)
    return TopKSoftmax.apply(logits, idx), idx
