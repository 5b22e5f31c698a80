"""A tiny reverse-mode autograd on NumPy arrays.

Two classes carry the whole mechanism:

* ``Tensor`` wraps a NumPy array (``.data``), its gradient (``.grad``), a ``requires_grad`` flag,
  and — for tensors produced by an op — the node that made it (the ``Function`` class and its ctx).
* ``Function`` is one differentiable op with an explicit ``forward(ctx, *arrays)`` and
  ``backward(ctx, grad_out)``, like ``torch.autograd.Function``. Ops live in ``functional.py``.

``loss.backward()`` walks the graph once, in reverse topological order, and hands each node the
sum of the gradients of everything that used its output.

The rule for repeated backward calls (documented here, tested in tests/test_autograd.py):

1. Gradients of **leaf** tensors (``requires_grad=True``, made by the user) *accumulate*:
   ``.grad += ...`` across backward calls on *different* graphs, exactly like torch. Call
   ``zero_grad`` (``Module.zero_grad`` / optimizer) between steps.
2. A graph is **freed** after its backward: the saved arrays are dropped, and calling
   ``backward`` through any node of that graph again raises ``RuntimeError``. This is never
   silent double counting. Pass ``retain_graph=True`` to keep the graph for another backward;
   the second call then accumulates again into the leaves, by rule 1.
3. Intermediate (non-leaf) tensors do not keep ``.grad`` unless ``retain_grad()`` was called.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

__all__ = ["Tensor", "Function", "Context", "no_grad", "enable_grad", "is_grad_enabled", "tensor"]

_state = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def _set_grad_enabled(mode: bool):
    previous = is_grad_enabled()
    _state.grad_enabled = mode
    try:
        yield
    finally:
        _state.grad_enabled = previous


def no_grad():
    """Context manager: ops inside record no graph (evaluation, optimizer updates)."""
    return _set_grad_enabled(False)


def enable_grad():
    return _set_grad_enabled(True)


class Context:
    """Scratch space a Function's forward leaves for its backward."""

    def __init__(self):
        self.saved_tensors = ()
        self.needs_input_grad = ()

    def save_for_backward(self, *arrays):
        self.saved_tensors = arrays


_FREED = "freed"  # marker left on a node after its graph has been back-propagated


class Tensor:
    """A NumPy array with an optional gradient and a link to the op that produced it."""

    __slots__ = ("data", "grad", "requires_grad", "_node", "_retain_grad", "name", "__weakref__")
    __array_priority__ = 1000  # so that `ndarray + Tensor` calls Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, dtype=None, name: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        array = np.asarray(data, dtype=dtype)
        if requires_grad and not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {array.dtype}")
        self.data = array
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None  # (Function subclass, Context, input tensors) for op outputs
        self._retain_grad = False
        self.name = name

    # ---- array-like properties -------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)

    def __len__(self):
        return len(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        return Tensor(self.data)

    def retain_grad(self) -> "Tensor":
        self._retain_grad = True
        return self

    def zero_grad(self):
        self.grad = None

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{grad})"

    # ---- backward ----------------------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False):
        """Back-propagate from this tensor. ``grad`` defaults to 1 for a scalar."""
        if not self.requires_grad:
            raise RuntimeError("backward() called on a tensor that does not require grad "
                               "(no input of the computation had requires_grad=True, or it ran under no_grad())")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar output, got shape {self.shape}; "
                                   "pass grad= of the same shape")
            grad = np.ones_like(self.data)
        grad = np.asarray(grad, dtype=self.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"gradient has shape {grad.shape} but the tensor has shape {self.shape}")

        order = _topological_order(self)
        grads = {id(self): grad}
        for node in order:  # outputs before inputs
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._node is None:  # a leaf: accumulate (rule 1)
                node.grad = g.copy() if node.grad is None else node.grad + g
                continue
            if node._retain_grad:
                node.grad = g.copy() if node.grad is None else node.grad + g
            fn, ctx, inputs = node._node
            input_grads = fn.backward(ctx, g)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            if len(input_grads) != len(inputs):
                raise RuntimeError(f"{fn.__name__}.backward returned {len(input_grads)} gradients "
                                   f"for {len(inputs)} inputs")
            for inp, ig in zip(inputs, input_grads):
                if ig is None or not isinstance(inp, Tensor) or not inp.requires_grad:
                    continue
                if ig.shape != inp.shape:
                    raise RuntimeError(f"{fn.__name__}.backward returned a gradient of shape {ig.shape} "
                                       f"for an input of shape {inp.shape}")
                key = id(inp)
                grads[key] = ig if key not in grads else grads[key] + ig
            if not retain_graph:  # rule 2: free the graph as we go
                node._node = _FREED

    # ---- operators (implemented in functional.py) --------------------------------------------
    def __add__(self, other):
        return _F().add(self, other)

    def __radd__(self, other):
        return _F().add(other, self)

    def __sub__(self, other):
        return _F().sub(self, other)

    def __rsub__(self, other):
        return _F().sub(other, self)

    def __mul__(self, other):
        return _F().mul(self, other)

    def __rmul__(self, other):
        return _F().mul(other, self)

    def __truediv__(self, other):
        return _F().div(self, other)

    def __rtruediv__(self, other):
        return _F().div(other, self)

    def __neg__(self):
        return _F().neg(self)

    def __pow__(self, exponent):
        return _F().pow(self, exponent)

    def __matmul__(self, other):
        return _F().matmul(self, other)

    def __rmatmul__(self, other):
        return _F().matmul(other, self)

    def __getitem__(self, index):
        return _F().getitem(self, index)

    def sum(self, axis=None, keepdims=False):
        return _F().sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        return _F().mean(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        return _F().reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def transpose(self, *axes):
        return _F().transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else (axes or None))

    @property
    def T(self):
        return _F().transpose(self, None)

    def exp(self):
        return _F().exp(self)

    def log(self):
        return _F().log(self)

    def tanh(self):
        return _F().tanh(self)


def _F():
    from . import functional  # late import: functional.py imports this module
    return functional


def _topological_order(root: Tensor) -> list:
    """Nodes reachable from root, each after every node that consumes it (iterative DFS)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        if node._node is _FREED:
            raise RuntimeError("backward through a graph a second time: its saved values were freed by the first "
                               "backward. Use backward(retain_graph=True) the first time, or recompute the forward.")
        stack.append((node, True))
        if node._node is not None:
            for inp in node._node[2]:
                if isinstance(inp, Tensor) and inp.requires_grad and id(inp) not in visited:
                    stack.append((inp, False))
    order.reverse()
    return order


class Function:
    """One differentiable op. Subclasses define static ``forward`` and ``backward``.

    ``forward(ctx, *args, **kwargs)`` receives the NumPy arrays of Tensor arguments (other
    arguments as given) and returns an array. ``backward(ctx, grad_out)`` returns one gradient
    per positional argument (``None`` where there is none). Call ops with ``MyOp.apply(...)``.
    """

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad_out):
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs) -> Tensor:
        ctx = Context()
        arrays = [a.data if isinstance(a, Tensor) else a for a in args]
        needs = tuple(isinstance(a, Tensor) and a.requires_grad for a in args)
        track = is_grad_enabled() and any(needs)
        ctx.needs_input_grad = needs if track else (False,) * len(args)
        out = cls.forward(ctx, *arrays, **kwargs)
        result = Tensor(out)
        if track:
            result.requires_grad = True
            result._node = (cls, ctx, args)
        return result


def tensor(data, requires_grad=False, dtype=None) -> Tensor:
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)
