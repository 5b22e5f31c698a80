"""tinyslim.testing, the gradient-verification toolkit, tested the only way a checker can be: by planting
bugs and watching it catch them. A checker that cannot fail is a defect.

Planted bugs (each must be caught, and the report must show the failing input):
* a backward with a wrong sign                      (SiLU)
* a missing broadcast reduction                     (a row bias whose gradient takes row 0 instead of the sum)
* a transposed factor                               (x @ W with dW = gᵀ x instead of xᵀ g)
* a gate gradient that ignores the top-k mask       (top-k softmax differentiated over all E logits; and the
                                                     low-rank op's dw reading expert 0 for empty slots)
* adapters that break each invariant of check_adapter_invariants
and, against torch: a wrong gradient, a wrong forward, a missing gradient, a module with a wrong bias gradient.

Also: the strategies draw what they promise, the report has its parts, and tinyslim.testing imports without
torch and hypothesis.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tinyslim import functional as F
from tinyslim import kernels
from tinyslim import GPTConfig
from tinyslim.adapters import LoraConfig, LoraLinear, SeqLoRA, SeqLoraConfig, Streams, make_method
from tinyslim.autograd import Function, Tensor
from tinyslim.kernels import reference
from tinyslim.lowrank import mixture_lowrank
from tinyslim.nn import GPT, Linear
from tinyslim.testing import (CheckError, GradcheckError, as_layout, assert_close, assert_matches_torch,
                              assert_module_matches_torch, check_adapter_invariants, distinct, gradcheck,
                              numerical_grad, randomize_parameters)
from tinyslim.testing import strategies as ts
from tinyslim.testing.report import format_array

# the inner searches below: enough examples to find each bug, then shrink it (no explain phase: faster)
SEARCH = settings(max_examples=60, deadline=None, database=None, derandomize=True, print_blob=False,
                  phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))


def first_failure(test):
    """Run a hypothesis test that must fail; return the exception of its minimised failing example."""
    with pytest.raises(AssertionError) as info:
        test()
    return info.value


def table_rows(report: str, section: str) -> list:
    """[(index tuple, analytic, numerical)] of the worst-entries table under the line starting with `section`."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(section))
    rows = []
    for line in lines[start + 2:]:  # skip the heading line and the column names
        if not line.startswith("    ["):
            break
        *index, analytic, numerical, _, _ = line.split()
        rows.append((tuple(int(v) for v in re.findall(r"-?\d+", " ".join(index))), float(analytic), float(numerical)))
    return rows


def worst_row(report: str, section: str):
    return table_rows(report, section)[0]


# ---- planted bugs: the Functions -----------------------------------------------------------------------

class SiLU(Function):
    """silu(x) = x·σ(x), correct."""

    @staticmethod
    def forward(ctx, x):
        s = 1.0 / (1.0 + np.exp(-x))
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return (g * s * (1.0 + x * (1.0 - s)),)  # product rule with σ' = σ(1 − σ)


class SiLUWrongSign(SiLU):
    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return (g * s * (1.0 - x * (1.0 - s)),)  # BUG: − where the product rule gives +


class RowBias(Function):
    """y = x + b, x (N, C), b (1, C) broadcast over the rows; the backward forgets to sum over them."""

    @staticmethod
    def forward(ctx, x, b):
        return x + b

    @staticmethod
    def backward(ctx, g):
        return g, g[:1]  # BUG: db must be g.sum(axis=0, keepdims=True); row 0 only has the right shape


class SquareMatMul(Function):
    """y = x W, W (D, D); the backward uses the transposed factor."""

    @staticmethod
    def forward(ctx, x, W):
        ctx.save_for_backward(x, W)
        return x @ W

    @staticmethod
    def backward(ctx, g):
        x, W = ctx.saved_tensors
        return g @ W.T, g.T @ x  # BUG: dW = xᵀ g; gᵀ x is its transpose (the same shape only because W is square)


class TopKGatingDenseBackward(Function):
    """Top-k softmax gating whose backward differentiates the softmax over all E logits, ignoring the mask."""

    @staticmethod
    def forward(ctx, logits, idx):
        sel = np.take_along_axis(logits, idx, axis=1)
        w = np.exp(sel - sel.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        ctx.save_for_backward(logits, idx)
        return w

    @staticmethod
    def backward(ctx, g):
        logits, idx = ctx.saved_tensors
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)  # BUG: a softmax over every expert, not over the k picked ones
        g_full = np.zeros_like(logits)
        np.put_along_axis(g_full, idx, g, axis=1)
        return p * (g_full - (g_full * p).sum(axis=1, keepdims=True)), None


def topk_gating_dense_backward(logits, k):
    idx = np.argsort(-logits.data, axis=1, kind="stable")[:, :k]
    return TopKGatingDenseBackward.apply(logits, idx)


class LowRankTopKLeakyGate(Function):
    """mixture_lowrank's top-k form whose dw reads dG[n, idx] even for empty slots (idx −1 → expert 0)."""

    @staticmethod
    def forward(ctx, x, A, B, w, *, idx, scale):
        ctx.save_for_backward(x, A, B, w)
        ctx.idx, ctx.scale = idx, scale
        return kernels.forward(x, A, B, (idx, w), scale, backend="numpy")

    @staticmethod
    def backward(ctx, dy):
        x, A, B, w = ctx.saved_tensors
        G, _ = reference.dense_gates("topk", ctx.idx, w, x.shape[0], A.shape[0], x.dtype)
        dx, dA, dB, dG = reference.backward(dy, x, A, B, G, ctx.scale)
        dw = np.take_along_axis(dG, np.maximum(ctx.idx, 0), axis=1)  # BUG: empty slots must get 0
        return dx, dA, dB, dw


# ---- gradcheck catches each planted bug, with the failing input in the report ----------------------------

def test_gradcheck_passes_a_correct_function_and_returns_the_numbers():
    x = np.random.default_rng(0).uniform(-3, 3, (3, 4))
    results = gradcheck(lambda x: SiLU.apply(x), x)
    assert [(r.name, r.shape, r.checked, r.passed) for r in results] == [("x", (3, 4), 12, True)]
    assert results[0].relative_error < 1e-9


def test_wrong_sign_is_caught_with_the_worst_entries_side_by_side():
    x = np.random.default_rng(1).uniform(-3, 3, (3, 4))
    with pytest.raises(GradcheckError) as info:
        gradcheck(lambda x: SiLUWrongSign.apply(x) * 2.0, x, name="silu")
    report = str(info.value)
    assert report.startswith("gradcheck failed for silu: 1 of 1 input gradients disagree")
    assert "d/d x (3, 4): relative error" in report
    assert re.search(r"index\s+analytic\s+numerical\s+abs err\s+rel err", report)
    assert f"x = float64 (3, 4)\n{format_array(x)}" in report  # the failing input, every value
    # the worst row is what the report says: the analytic value is the buggy backward's, the numerical the truth
    index, analytic, numerical = worst_row(report, "d/d x")
    xi = x[index]
    s = 1 / (1 + np.exp(-xi))
    g = np.random.default_rng([0, 7]).normal(size=x.shape)[index]  # gradcheck's upstream for seed 0
    np.testing.assert_allclose(analytic, 2 * g * s * (1 - xi * (1 - s)), rtol=1e-7)
    np.testing.assert_allclose(numerical, 2 * g * s * (1 + xi * (1 - s)), rtol=1e-7)
    assert len(table_rows(report, "d/d x")) == 5  # the five worst of the twelve


def test_wrong_sign_found_and_minimised_by_hypothesis():
    @SEARCH
    @given(x=ts.arrays(shape=ts.shapes(min_dims=0), lo=-4, hi=4))
    def check(x):
        gradcheck(lambda x: SiLUWrongSign.apply(x), x)

    error = first_failure(check)
    assert isinstance(error, GradcheckError)
    # minimised: the smallest input that shows the bug is a single value; silu'(0) is ½ either way, so x ≠ 0
    match = re.search(r"x = float64 \((.*?)\)\n(.*)", str(error))
    assert match and match.group(1) == "", str(error)
    assert float(match.group(2).strip()) != 0.0


def test_missing_broadcast_reduction_is_caught_on_the_broadcast_input():
    rng = np.random.default_rng(2)
    x, b = rng.uniform(-1, 1, (3, 2)), rng.uniform(-1, 1, (1, 2))
    with pytest.raises(GradcheckError) as info:
        gradcheck(lambda x, b: RowBias.apply(x, b), x, b, name="row_bias")
    report = str(info.value)
    assert "1 of 2 input gradients disagree" in report
    assert "d/d b (1, 2)" in report and "d/d x" not in report.split("every input")[0]
    assert re.search(r"\n\s+x\s+\(3, 2\).* ok\n", report) and re.search(r"\n\s+b\s+\(1, 2\).* FAIL\n", report)
    assert f"b = float64 (1, 2)\n{format_array(b)}" in report and f"x = float64 (3, 2)\n{format_array(x)}" in report


def test_missing_broadcast_reduction_needs_a_broadcast_and_hypothesis_finds_one():
    @SEARCH
    @given(n=st.integers(1, 4), b=ts.arrays(shape=st.tuples(st.just(1), st.integers(1, 3))))
    def check(n, b):
        x = np.ones((n, b.shape[1]))
        gradcheck(lambda x, b: RowBias.apply(x, b), x, b)

    report = str(first_failure(check))
    assert "x = float64 (2, " in report  # minimised: two rows is the least broadcast that shows it


def test_transposed_factor_is_caught_and_minimised_to_a_2x2_factor():
    @SEARCH
    @given(D=st.integers(1, 4), data=st.data())
    def check(D, data):
        x = data.draw(ts.arrays(shape=st.tuples(st.integers(1, 3), st.just(D))), label="x")
        W = data.draw(ts.arrays(shape=(D, D)), label="W")
        gradcheck(lambda x, W: SquareMatMul.apply(x, W), x, W)

    error = first_failure(check)
    report = str(error)
    assert isinstance(error, GradcheckError)
    assert "d/d W (2, 2)" in report and "W = float64 (2, 2)" in report  # 1×1 cannot show a transpose
    assert re.search(r"\n\s+x\s+\(1, 2\).* ok\n", report)  # dx is right; one row is enough


def test_gate_gradient_that_ignores_the_topk_mask_is_caught():
    logits = distinct(np.random.default_rng(3), (4, 5))  # ties 0.08 apart: the selection never flips
    with pytest.raises(GradcheckError) as info:
        gradcheck(lambda logits: topk_gating_dense_backward(logits, 2), logits, name="topk_gating")
    report = str(info.value)
    assert "d/d logits (4, 5): relative error" in report and len(table_rows(report, "d/d logits")) == 5
    (result, entries, analytic, numerical), = info.value.failures  # every compared entry, not only the worst
    assert result.name == "logits" and list(entries) == list(range(20))
    unpicked = np.ones((4, 5), bool)
    np.put_along_axis(unpicked, np.argsort(-logits, axis=1, kind="stable")[:, :2], False, axis=1)
    assert np.all(numerical[unpicked.reshape(-1)] == 0.0)  # the truth: an unpicked logit moves nothing
    assert np.all(analytic[unpicked.reshape(-1)] != 0.0)  # the bug: the dense softmax moves every logit
    assert f"logits = float64 (4, 5)\n{format_array(logits)}" in report
    gradcheck(lambda logits: F.topk_gating(logits, 2)[0], logits)  # the library's own op passes


def test_lowrank_gate_gradient_for_empty_topk_slots_is_caught_on_an_empty_slot():
    @SEARCH
    @given(prob=ts.lowrank_problems(forms=("topk",), masks=False))
    def check(prob):
        idx, w = prob["gates"]
        gradcheck(lambda x, A, B, w, idx: LowRankTopKLeakyGate.apply(x, A, B, w, idx=idx, scale=prob["scale"]),
                  prob["x"], prob["A"], prob["B"], w, idx)

    report = str(first_failure(check))
    assert "1 of 4 input gradients disagree" in report and "d/d w" in report
    (n, j), analytic, numerical = worst_row(report, "d/d w")
    idx_text = report.split("idx (constant) = int32")[1].split("upstream")[0]
    idx = np.array([[int(v) for v in re.findall(r"-?\d+", line)] for line in idx_text.splitlines()[1:]
                    if re.search(r"\d", line)])
    assert idx[n, j] == -1 and numerical == 0.0 and analytic != 0.0  # the empty slot, shown with its idx


@settings(max_examples=max(5, settings().max_examples // 2))
@given(prob=ts.lowrank_problems())
def test_the_real_lowrank_op_passes_gradcheck_for_every_gate_form(prob):
    g, s, m_in, m_out = prob["gates"], prob["scale"], prob["in_mask"], prob["out_mask"]
    op = lambda x, A, B, gates: mixture_lowrank(x, A, B, gates, s, m_in, m_out, backend="numpy")  # noqa: E731
    if isinstance(g, tuple):
        gradcheck(lambda x, A, B, w, idx: op(x, A, B, (idx, w)), prob["x"], prob["A"], prob["B"], g[1], g[0])
    elif g.ndim == 2:
        gradcheck(op, prob["x"], prob["A"], prob["B"], g)
    else:
        gradcheck(op, prob["x"], prob["A"], prob["B"], g)


# ---- gradcheck's contract ----------------------------------------------------------------------------------

def test_numerical_grad_is_exact_for_quartics():
    x = np.array([-1.5, 0.3, 2.0])
    u = np.array([1.0, -2.0, 0.5])
    num = numerical_grad(lambda arrays: arrays[0] ** 4 - arrays[0] ** 3, [x], 0, u, np.arange(3))
    np.testing.assert_allclose(num, u * (4 * x**3 - 3 * x**2), rtol=1e-9)  # the stencil is exact to degree 4


def test_large_inputs_are_sampled_and_constants_pass_through():
    rng = np.random.default_rng(4)
    x, idx = rng.uniform(-1, 1, (10, 10)), rng.integers(0, 10, (10, 3))
    calls = []

    def fn(x, idx, p):
        calls.append(1)
        return F.gather(x, idx, axis=1) * p

    results = gradcheck(fn, x, idx, 3.0)
    assert len(results) == 1 and results[0].checked == 24  # 24 of 100 entries
    assert len(calls) == 1 + 4 * 24  # one backward pass, four forward evaluations per entry
    assert gradcheck(fn, x, idx, 3.0, max_entries=None)[0].checked == 100
    assert gradcheck(lambda x, W: x @ W, x, Tensor(np.eye(10)))[0].name == "x"  # a plain Tensor is constant


def test_gradcheck_says_what_is_wrong_with_its_call():
    x = np.ones((2, 2))
    with pytest.raises(ValueError, match="nothing to differentiate"):
        gradcheck(lambda i: F.embedding(i, Tensor(np.ones((3, 2)), requires_grad=True)), np.array([0, 1]))
    with pytest.raises(TypeError, match="tuple.*topk_gating"):
        gradcheck(lambda l: F.topk_gating(l, 1), x)
    with pytest.raises(TypeError, match="returned float32 from float64"):
        gradcheck(lambda x: Tensor(x.data.astype(np.float32), requires_grad=True), x.astype(np.float32))
    with pytest.raises(ValueError, match="NaN or inf"):
        gradcheck(lambda x: x * 2.0, np.array([np.nan]))
    with pytest.raises(ValueError, match="upstream has shape"):
        gradcheck(lambda x: x * 2.0, x, upstream=np.ones(3))


def test_a_missing_gradient_is_named_in_the_report():
    class Forgets(Function):
        @staticmethod
        def forward(ctx, a, b):
            return a * b

        @staticmethod
        def backward(ctx, g):
            return None, None  # BUG: no gradient at all

    x = np.array([1.0, 2.0])
    with pytest.raises(GradcheckError, match=r"d/d a \(2,\).*NO gradient \(None\)"):
        gradcheck(lambda a, b: Forgets.apply(a, b), x, x + 1)


# ---- assert_close --------------------------------------------------------------------------------------------

def test_assert_close_reports_the_worst_entry_and_nan():
    a = np.arange(6.0).reshape(2, 3)
    assert_close(a, a + 1e-13, rtol=1e-10, atol=1e-12)
    b = a.copy()
    b[1, 2] += 1e-3
    with pytest.raises(CheckError, match=r"(?s)1 of 6 entries differ.*\n\s+\[1, 2\]\s+\+5\.00100000e\+00"):
        assert_close(b, a, rtol=1e-10, atol=1e-12, name="y")
    with pytest.raises(CheckError, match="NaN present"):
        assert_close(np.array([np.nan]), np.array([np.nan]))
    with pytest.raises(CheckError, match=r"shape \(2, 3\) from actual but \(3, 2\)"):
        assert_close(a, a.T)


# ---- against torch --------------------------------------------------------------------------------------------

@pytest.mark.torch
def test_assert_matches_torch_passes_and_catches_a_wrong_sign():
    import torch.nn.functional as TF

    x = np.random.default_rng(5).uniform(-3, 3, (2, 3))
    assert_matches_torch(lambda x: SiLU.apply(x), TF.silu, x)
    with pytest.raises(CheckError) as info:
        assert_matches_torch(lambda x: SiLUWrongSign.apply(x), TF.silu, x, name="silu")
    report = str(info.value)
    assert report.startswith("silu differs from torch (float64): 1 problem(s)")
    assert re.search(r"\n  d/d x: \d of 6 entries differ by more than atol \+ rtol·\|torch\|", report)
    assert re.search(r"index\s+tinyslim\s+torch", report) and f"x = float64 (2, 3)\n{format_array(x)}" in report


@pytest.mark.torch
def test_assert_matches_torch_catches_a_wrong_forward_and_a_missing_gradient():
    import torch

    x = np.array([0.5, -1.0])
    with pytest.raises(CheckError, match=r"(?s)forward: 2 of 2 entries differ.*d/d x"):
        assert_matches_torch(lambda x: x * 2.0, lambda x: x * 3.0, x)
    with pytest.raises(CheckError, match=r"d/d b: tinyslim gave NO gradient \(None\)"):
        assert_matches_torch(lambda a, b: a * 2.0, lambda a, b: a * 2.0 + 0 * b, x, x)
    assert_matches_torch(lambda a, b: a * 2.0, lambda a, b: a * 2.0, x, x, allow_unused=True)
    # a missing broadcast reduction, with the broadcast input named
    with pytest.raises(CheckError, match=r"d/d b: 2 of 2 entries differ"):
        assert_matches_torch(lambda x, b: RowBias.apply(x, b), torch.add, np.ones((3, 2)), np.ones((1, 2)))


class BuggyBiasLinear(Linear):
    """A tinyslim Linear whose bias gradient forgets to sum over the rows."""

    def forward(self, x):
        return RowBias.apply(F.linear(x, self.weight), self.bias.reshape(1, -1))


@pytest.mark.torch
def test_assert_module_matches_torch_copies_weights_compares_every_gradient_and_maps_names():
    import torch

    rng = np.random.default_rng(6)
    ours = randomize_parameters(Linear(3, 2, dtype=np.float64), 0)
    x = rng.uniform(-1, 1, (4, 3))
    got = assert_module_matches_torch(ours, torch.nn.Linear(3, 2), (x,))
    assert set(got["grads"]) == {"weight", "bias", "input 0"}
    twin = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(KeyError, match=r"0\.weight"):
        assert_module_matches_torch(ours, twin, (x,))
    assert_module_matches_torch(ours, twin, (x,), name_map={"weight": "0.weight", "bias": "0.bias"})

    buggy = BuggyBiasLinear(3, 2, dtype=np.float64)
    buggy.load_state_dict(ours.state_dict())
    with pytest.raises(CheckError) as info:
        assert_module_matches_torch(buggy, torch.nn.Linear(3, 2), (x,))
    report = str(info.value)
    assert re.search(r"d/d bias: relative error .* > grad_rtol 1e-08", report)
    assert "d/d weight" not in report.split("every gradient")[0] and f"input 0 =\n{format_array(x)}" in report
    with pytest.raises(TypeError, match="float64"):
        assert_module_matches_torch(Linear(3, 2), torch.nn.Linear(3, 2), (x.astype(np.float32),))


@pytest.mark.torch
def test_assert_module_matches_torch_on_a_lora_layer_freezes_what_tinyslim_freezes():
    import torch

    class TorchLora(torch.nn.Module):
        def __init__(self, D, O, r, s):
            super().__init__()
            self.base_layer, self.s = torch.nn.Linear(D, O), s
            self.lora_A, self.lora_B = torch.nn.Parameter(torch.zeros(r, D)), torch.nn.Parameter(torch.zeros(O, r))

        def forward(self, x):
            return self.base_layer(x) + self.s * (x @ self.lora_A.T) @ self.lora_B.T

    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False)  # a non-zero B
    layer = config.make_layer(Linear(5, 3, dtype=np.float64), Streams(0))
    layer.base_layer.freeze()
    got = assert_module_matches_torch(layer, TorchLora(5, 3, 2, config.scale),
                                      (np.random.default_rng(7).uniform(-1, 1, (2, 4, 5)),))
    assert set(got["grads"]) == {"lora_A", "lora_B", "input 0"}  # the frozen base is not compared, nor trained


def test_torch_checks_skip_under_pytest_and_raise_elsewhere_without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(pytest.skip.Exception, match=r"pip install torch==2\.13\.0"):
        assert_matches_torch(lambda x: x, lambda x: x, np.ones(2))
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
        assert_matches_torch(lambda x: x, lambda x: x, np.ones(2))


def test_import_needs_neither_torch_nor_hypothesis():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['hypothesis'] = None\n"
            "import numpy as np, tinyslim.testing as T\n"
            "print(len(T.gradcheck(lambda x: x.tanh(), np.ones((2, 2)))))\n"
            "try:\n    T.assert_matches_torch(lambda x: x, lambda x: x, np.ones(1))\n"
            "except ImportError as e:\n    print('torch:', e)\n"
            "try:\n    from tinyslim.testing import strategies\n"
            "except ImportError as e:\n    print('hypothesis:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "1" and "pip install torch==2.13.0" in lines[1]
    assert "pip install hypothesis" in lines[2] and "works without it" in lines[2]


# ---- strategies draw what they promise -----------------------------------------------------------------------

@given(a=ts.arrays(dtype=np.float32, lo=-3, hi=3), shapes_=ts.broadcastable_shapes(num_shapes=3))
def test_arrays_are_bounded_finite_of_the_dtype_and_shapes_broadcast(a, shapes_):
    assert a.dtype == np.float32 and np.all(np.isfinite(a)) and np.all(np.abs(a) <= 3)
    assert all(side >= 1 for side in a.shape) and 1 <= a.ndim <= 3
    np.broadcast_shapes(*shapes_)


@given(v=ts.views(ts.arrays(shape=ts.shapes(min_dims=2, min_side=2))))
def test_views_are_read_only_and_not_c_contiguous(v):
    assert not v.flags.writeable and not v.flags.c_contiguous
    assert np.array_equal(as_layout(np.ascontiguousarray(v), "swapped"), v)


@given(g=ts.gates())
def test_gates_are_valid_for_the_kernel(g):
    if isinstance(g, tuple):
        idx, w = g
        assert idx.dtype == np.int32 and idx.shape == w.shape
        for row in idx:
            picked = row[row >= 0]
            assert len(set(picked)) == len(picked)  # distinct experts per row
        np.testing.assert_allclose(w.sum(axis=1), 1.0)
        N, E = idx.shape[0], 5
    elif g.ndim == 2:
        assert np.all(g >= 0) and np.all(np.isclose(g.sum(axis=1), 1.0) | (g.sum(axis=1) == 0))
        N, E = g.shape
    else:
        assert g.dtype == np.int32 and g.min() >= -1
        N, E = g.shape[0], 5
    rng = np.random.default_rng(0)
    x, A, B = rng.standard_normal((N, 3)), rng.standard_normal((E, 2, 3)), rng.standard_normal((E, 4, 2))
    assert kernels.forward(x, A, B, g, backend="numpy").shape == (N, 4)


@pytest.mark.parametrize("pattern, check", [  # N = 400 tokens over E = 4 experts
    ("identical", lambda counts: sorted(counts)[-2] == 0),
    ("distinct", lambda counts: counts.min() == counts.max() == 100),  # cycles through the experts
    ("segment", lambda counts: counts.max() >= 0.8 * 400),
    ("zipf", lambda counts: sorted(counts)[-1] > 1.5 * sorted(counts)[-2] > 0),  # p ∝ 1, 0.35, 0.19, 0.13
    ("uniform", lambda counts: counts.min() >= 0.15 * 400),
])
def test_index_gate_patterns(pattern, check):
    @settings(max_examples=5, database=None, deadline=None)
    @given(idx=ts.gates(N=400, E=4, forms=("index",), patterns=(pattern,), empty=False))
    def run(idx):
        assert idx.shape == (400,) and idx.min() >= 0
        counts = np.bincount(idx, minlength=4)
        assert check(counts), counts

    run()


@settings(max_examples=5)
@given(config=ts.gpt_configs(), seed=st.integers(0, 100))
def test_gpt_configs_build_small_float64_models(config, seed):
    model = GPT(config, seed=seed)
    assert config.dtype == "float64" and model.num_parameters() < 10_000
    logits, _ = model(np.zeros((1, config.block_size), dtype=np.int64))
    assert logits.shape == (1, config.block_size, config.vocab_size)


# ---- check_adapter_invariants ----------------------------------------------------------------------------------

@pytest.fixture
def numpy_backend(monkeypatch):
    monkeypatch.setenv("TINYSLIM_BACKEND", "numpy")  # tiny problems: the compiled kernel gains nothing here


@pytest.mark.parametrize("name", ["lora", "er", "ilora", "cola"])
def test_every_registered_method_satisfies_the_adapter_invariants(name, numpy_backend):
    method = make_method(name, r=2, **({"chain_len": 2} if name == "cola" else {}))
    assert check_adapter_invariants(method) == {
        "no-op at init": "ok", "adapter-only gradients": "ok", "frozen base": "ok", "save/load round trip": "ok",
        "merge": "ok"}


class GainLoraLinear(LoraLinear):
    """LoRA times a gain that lives outside the adapter arrays (so adapter_state_dict cannot save it)."""

    gain = 1.0

    def adapter_delta(self, x):
        return super().adapter_delta(x) * self.gain

    def delta_weight(self):
        return super().delta_weight() * self.gain  # merging stays right: only the round trip is broken


class UnscaledMergeLinear(LoraLinear):
    def delta_weight(self):
        A, B = self.factors()
        return B.data @ A.data  # BUG: merges B A without the scale s


@dataclass
class PlantedConfig(SeqLoraConfig):
    layer: type = LoraLinear

    def make_layer(self, base_layer, streams):
        return self.layer(base_layer, self.r, self.scale, self.lora_dropout, streams, self.init_lora_weights)


class Planted(SeqLoRA):
    name = "planted"
    config_class = PlantedConfig
    bug = None

    def attach(self, model, seed):
        super().attach(model, seed)
        if self.bug == "trainable layer norms":
            for n, p in model.named_parameters():
                if ".ln_" in n:
                    p.requires_grad = True

    def after_step(self, step, optimizer):
        for layer in self.layers():
            if self.bug == "decay the base":
                layer.base_layer.weight.data *= 0.999
            if self.bug == "hidden gain":
                layer.gain *= 0.5


@pytest.mark.parametrize("bug, broken, detail, count", [
    ("B starts random", "no-op at init", "logits with the fresh adapter vs the base model", 1),
    # trained LayerNorms are both not adapters and a base that moves
    ("trainable layer norms", "adapter-only gradients", "trainable parameters that are not adapter arrays", 2),
    ("decay the base", "frozen base", "frozen parameters changed: ['transformer.h.0.attn.c_attn.base_layer.weight'",
     1),
    ("hidden gain", "save/load round trip", "reloaded vs trained logits", 1),
    ("merge without the scale", "merge", "merged vs unmerged logits", 1),
])
def test_check_adapter_invariants_catches_each_planted_adapter_bug(bug, broken, detail, count, numpy_backend):
    layer = {"hidden gain": GainLoraLinear, "merge without the scale": UnscaledMergeLinear}.get(bug, LoraLinear)
    method = Planted(r=2, layer=layer, init_lora_weights=bug != "B starts random")
    method.bug = bug
    with pytest.raises(CheckError) as info:
        check_adapter_invariants(method)
    report = str(info.value)
    assert report.startswith(f"Planted (planted) breaks {count} adapter invariant(s):"), report
    assert f"[{broken}] " in report and detail in report
    assert f"{broken}: FAIL" in report and "set-up: PlantedConfig(r=2" in report


def test_check_adapter_invariants_wants_a_fresh_method(numpy_backend):
    method = make_method("lora", r=2)
    method.attach(GPT(GPTConfig(n_layer=1, n_embd=8, n_head=2, block_size=4)), 0)
    with pytest.raises(ValueError, match="fresh method"):
        check_adapter_invariants(method)


# ---- the README's "Verify your own gradient" ---------------------------------------------------------------------

def test_readme_example_runs():
    """The README's "Verify your own gradient", verbatim."""
    import numpy as np
    from tinyslim import Function
    from tinyslim.testing import gradcheck

    class SiLU(Function):
        """silu(x) = x·σ(x)"""

        @staticmethod
        def forward(ctx, x):
            s = 1.0 / (1.0 + np.exp(-x))
            ctx.save_for_backward(x, s)
            return x * s

        @staticmethod
        def backward(ctx, g):
            x, s = ctx.saved_tensors
            return (g * s * (1.0 + x * (1.0 - s)),)   # d(x·σ)/dx = σ + x·σ(1 − σ)

    x = np.random.default_rng(0).uniform(-4, 4, (3, 5))
    gradcheck(lambda x: SiLU.apply(x), x)             # silent when the backward is right


class _WrongSignExp(F.Exp):
    """tinyslim's own exp, with a planted sign bug in its backward."""

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return (-g * out,)  # planted bug: the sign


def test_gradcheck_accepts_rounding_noise_where_the_exact_gradient_is_zero():
    """Uniform logits under a temperature softmax: dL/dρ is exactly 0 and the backward gives ~1e-17,
    so a purely relative criterion fails. The atol floor (1e-10) accepts that, and still catches a bug."""
    def gate(logits, rho):
        return F.softmax(logits / F.exp(rho), axis=1)

    uniform_logits, rho = np.full((1, 3), 3.0), np.array(0.0)
    gradcheck(gate, uniform_logits, rho)
    with pytest.raises(GradcheckError, match="d/d"):
        gradcheck(lambda l, r: F.softmax(l / _WrongSignExp.apply(r), axis=1), uniform_logits + np.arange(3.0), rho)
