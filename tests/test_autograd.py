"""The autograd engine: graph order, the documented rules for repeated backward, no_grad, custom
Functions, deep graphs, and the errors a user meets first (dtype, shape, gradient shape)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinyslim.functional as F
from tinyslim.autograd import Function, Tensor, enable_grad, is_grad_enabled, no_grad
from tinyslim.testing import gradcheck
from tinyslim.testing import strategies as ts


def leaf(values, dtype=np.float64):
    return Tensor(np.asarray(values, dtype=dtype), requires_grad=True)


class Counted(Function):
    """y = 3x, counting backward calls and recording the gradient each call received."""

    calls: list = []

    @staticmethod
    def forward(ctx, x):
        return 3.0 * x

    @staticmethod
    def backward(ctx, g):
        Counted.calls.append(g.copy())
        return (3.0 * g,)  # d(3x)/dx = 3


# ---- graph order -------------------------------------------------------------------------------


def test_a_tensor_used_twice_gets_the_sum_of_both_gradients():
    x = leaf([1.0, -2.0, 3.0])
    (x * x).sum().backward()  # d(x²)/dx = 2x: both operands of mul are x
    np.testing.assert_array_equal(x.grad, 2 * x.data)
    y = leaf([1.0, 2.0])
    (y + y + y).sum().backward()
    np.testing.assert_array_equal(y.grad, [3.0, 3.0])


def test_diamond_with_paths_of_different_lengths():
    # x → a = 3x (counted) → b = exp(a) → c = b·a → d = c + a: a is consumed at three depths (by exp, by
    # the product and by the sum), so its backward may run only after all three contributions arrived
    Counted.calls = []
    x = leaf([0.1, -0.2, 0.3])
    a = Counted.apply(x)
    b = a.exp()
    d = (b * a + a).sum()
    d.backward()
    av = 3 * x.data
    da = np.exp(av) * av + np.exp(av) + 1  # the three paths into a, summed before a's backward runs
    assert len(Counted.calls) == 1, "a node's backward must run once, after all of its consumers"
    np.testing.assert_allclose(Counted.calls[0], da, rtol=1e-14)
    np.testing.assert_allclose(x.grad, 3 * da, rtol=1e-14)


def test_wide_diamond_against_torch(torch):
    x_np = np.array([[0.3, -0.7], [1.1, 0.4]])
    x = leaf(x_np)
    h = x.tanh()
    y = (h @ h.T + h * 2.0 - (h.exp() / (h * h + 1.0))).mean()
    y.backward()
    xt = torch.tensor(x_np, requires_grad=True)
    ht = torch.tanh(xt)
    yt = (ht @ ht.T + ht * 2.0 - (ht.exp() / (ht * ht + 1.0))).mean()
    yt.backward()
    np.testing.assert_allclose(y.data, yt.item(), rtol=1e-13)
    np.testing.assert_allclose(x.grad, xt.grad.numpy(), rtol=1e-12, atol=1e-14)


# ---- repeated backward: the three rules in autograd.py's docstring -----------------------------


def test_rule_1_leaf_gradients_accumulate_across_different_graphs():
    x = leaf([1.0, 2.0])
    (x * 3.0).sum().backward()
    (x * x).sum().backward()  # a second, different graph
    np.testing.assert_array_equal(x.grad, 3.0 + 2 * x.data)
    x.zero_grad()
    assert x.grad is None
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 3.0])


def test_rule_2_backward_through_a_freed_graph_raises():
    x = leaf([1.0, 2.0])
    loss = (x * x).sum()
    loss.backward()
    first = x.grad.copy()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()
    np.testing.assert_array_equal(x.grad, first)  # never silent double counting


def test_rule_2_a_shared_subgraph_is_freed_too():
    x = leaf([1.0, 2.0])
    z = x * x
    z.sum().backward()
    with pytest.raises(RuntimeError, match="second time"):
        (z * 2.0).sum().backward()  # reaches z's node, freed by the first backward


def test_rule_2_retain_graph_allows_a_second_backward_that_accumulates():
    x = leaf([1.0, -2.0])
    y = x.tanh()
    y.retain_grad()
    loss = (y * 2.0).sum()
    loss.backward(retain_graph=True)
    once = x.grad.copy()
    loss.backward()  # allowed: the graph was retained; accumulates by rule 1
    np.testing.assert_allclose(x.grad, 2 * once, rtol=1e-15)
    np.testing.assert_array_equal(y.grad, [4.0, 4.0])  # a retained non-leaf grad accumulates as well
    with pytest.raises(RuntimeError):
        loss.backward()  # the second call did not retain: now it is freed


def test_rule_3_non_leaf_tensors_keep_no_grad_unless_retained():
    x = leaf([1.0, 2.0])
    y = x * 2.0
    z = y.exp()
    z.retain_grad()
    z.sum().backward()
    assert y.grad is None and not y.is_leaf
    np.testing.assert_array_equal(z.grad, [1.0, 1.0])
    np.testing.assert_allclose(x.grad, 2 * np.exp(2 * x.data), rtol=1e-15)


# ---- no_grad -----------------------------------------------------------------------------------


def test_no_grad_records_no_graph():
    x = leaf([1.0, 2.0])
    with no_grad():
        assert not is_grad_enabled()
        y = (x * x).exp().sum()
        with enable_grad():
            w = x * 2.0
    assert is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    assert w.requires_grad and not w.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()
    assert x.grad is None


def test_no_grad_is_restored_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            1 / 0
    assert is_grad_enabled()


def test_detach_cuts_the_graph():
    x = leaf([1.0, 2.0])
    y = (x * 2.0).detach()
    assert not y.requires_grad and y.is_leaf
    (x * y).sum().backward()
    np.testing.assert_array_equal(x.grad, y.data)


# ---- backward's arguments ----------------------------------------------------------------------


def test_backward_on_a_non_scalar_needs_a_gradient():
    x = leaf([[1.0, 2.0], [3.0, 4.0]])
    y = x * 2.0
    with pytest.raises(RuntimeError, match=r"scalar.*\(2, 2\)"):
        y.backward()
    y.backward(np.array([[1.0, 0.0], [0.0, -1.0]]))
    np.testing.assert_array_equal(x.grad, [[2.0, 0.0], [0.0, -2.0]])


def test_backward_rejects_a_gradient_of_the_wrong_shape():
    y = leaf([1.0, 2.0, 3.0]) * 2.0
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        y.backward(np.ones(2))


class WrongShape(Function):
    @staticmethod
    def forward(ctx, x):
        return x.sum(keepdims=True)

    @staticmethod
    def backward(ctx, g):
        return (g,)  # wrong: shape (1,) instead of the input's


class TooManyGrads(Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g, g


def test_a_function_returning_a_bad_gradient_is_named_in_the_error():
    x = leaf([1.0, 2.0, 3.0])
    with pytest.raises(RuntimeError, match=r"WrongShape.*\(1,\).*\(3,\)"):
        WrongShape.apply(x).sum().backward()
    with pytest.raises(RuntimeError, match="TooManyGrads.backward returned 2 gradients for 1 inputs"):
        TooManyGrads.apply(x).sum().backward()


# ---- a custom Function, checked like the built-in ops -----------------------------------------


class SiLU(Function):
    """silu(x) = x·σ(x)."""

    @staticmethod
    def forward(ctx, x):
        s = 1.0 / (1.0 + np.exp(-x))
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return (g * s * (1.0 + x * (1.0 - s)),)  # product rule with σ' = σ(1 - σ)


@given(x=ts.arrays(shape=ts.shapes(min_dims=0, max_dims=3, max_side=4), lo=-4.0, hi=4.0),
       seed=st.integers(0, 2**32 - 1))
def test_custom_function_matches_finite_differences(x, seed):
    # composed with built-in ops; every entry checked (max_entries=None), relative error < 1e-6
    gradcheck(lambda x: (SiLU.apply(x) * 2.0).exp(), x, max_entries=None, seed=seed)


def test_custom_function_under_no_grad_and_with_constant_inputs():
    with no_grad():
        y = SiLU.apply(leaf([1.0]))
    assert not y.requires_grad
    y = SiLU.apply(Tensor(np.array([1.0])))  # no input requires grad: nothing is recorded
    assert not y.requires_grad and y.is_leaf


# ---- deep graphs -------------------------------------------------------------------------------


def test_a_10k_op_chain_does_not_recurse():
    assert sys.getrecursionlimit() < 10_000  # a recursive topological sort would fail here
    x = leaf([1.0, -1.0])
    y = x
    for _ in range(10_000):
        y = y * 0.9999
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [0.9999**10_000] * 2, rtol=1e-10)
    z = x
    for _ in range(10_000):
        z = z + 1.0
    del z  # dropping a deep graph without backward must not overflow the C stack either


# ---- errors a user meets first -----------------------------------------------------------------


@pytest.mark.parametrize("op", [F.add, F.sub, F.mul, F.div, F.matmul])
def test_mixing_float32_and_float64_raises_type_error(op):
    a = Tensor(np.ones((2, 2), dtype=np.float32), requires_grad=True)
    b = Tensor(np.ones((2, 2), dtype=np.float64))
    with pytest.raises(TypeError, match="float32.*float64"):
        op(a, b)
    with pytest.raises(TypeError, match="float64.*float32"):
        op(b, a)


def test_linear_dtype_mismatch_raises_type_error():
    with pytest.raises(TypeError, match="float32.*float64"):
        F.linear(Tensor(np.ones((2, 3), dtype=np.float32)), Tensor(np.ones((4, 3))))


def test_python_numbers_take_the_tensor_dtype():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = 2.0 * x + 1 - x / 3.0
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


@pytest.mark.parametrize("op", [F.add, F.sub, F.mul, F.div])
def test_non_broadcastable_shapes_raise_value_error_naming_both(op):
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4,\)"):
        op(Tensor(np.ones((2, 3))), Tensor(np.ones(4)))


def test_only_floating_tensors_can_require_grad():
    with pytest.raises(TypeError, match="int64"):
        Tensor(np.arange(3), requires_grad=True)


# ---- Tensor's operators route to the ops, reflected ones included -----------------------------


def test_operators_and_reflected_operators():
    x_np = np.array([[0.5, 1.5], [2.0, 0.25]])
    x = leaf(x_np)
    W = np.array([[1.0, -1.0], [0.5, 2.0]])
    y = (2.0 - x) * (1.0 / x) + np.ones(2) + (W @ x) + (x @ W) - x.T + (-x) ** 2 + x[0] + x[[1, 1]]
    y = y.sum(axis=0).mean()
    y.backward()
    # by hand: the (2, 2) sum Y reaches y with weight 1/2 per entry (sum over rows, mean of 2 columns)
    dY = np.full((2, 2), 0.5)
    dx = -2.0 / x_np**2 * dY  # (2 - x)/x = 2/x - 1
    dx += W.T @ dY + dY @ W.T  # W @ x and x @ W
    dx -= dY.T  # -x.T
    dx += 2 * x_np * dY  # (-x)² = x²
    dx[0] += dY.sum(axis=0)  # x[0] is broadcast over both rows
    dx[1] += dY.sum(axis=0)  # x[[1, 1]] holds row 1 twice
    np.testing.assert_allclose(x.grad, dx, rtol=1e-13)
