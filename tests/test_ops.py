"""Every op of tinyslim.functional, driven by one table (MiniTorch style).

Each row of ``OPS`` says: the op's name in ``functional.__all__``, how to call it in tinyslim, how
to call the same maths in torch (float64), and a hypothesis strategy that draws its inputs (shapes
with size-1 dimensions and broadcasting, values inside the op's domain and away from its kinks;
integer arguments — targets, token ids, indices — drawn separately as parameters). Five tests run
over every row:

* forward equals torch float64                       (rtol 1e-10, atol 1e-12)
* every input gradient equals torch autograd float64 (a random upstream gradient, not just sum)
* every input gradient equals central finite differences (relative error < 1e-6, docs/methods.md), on
  every entry of small inputs and 24 sampled entries of larger ones
* non-contiguous, read-only inputs (Fortran order, swapped axes, strided, reversed views) give
  the same results and are never written to
* float32 inputs run, keep float32 in the output and the gradients, and agree with float64

``test_table_covers_every_op`` fails when ``functional.__all__`` gains an op without a row.

The machinery is the public toolkit ``tinyslim.testing`` (one implementation, two users: these tests
and a learner checking their own op): ``gradcheck``, ``assert_matches_torch``, ``assert_close``, the
value domains, ``as_layout`` and the shape strategies. This file adds only the table and its cases.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import tinyslim.functional as F
from tinyslim.autograd import Tensor, no_grad
from tinyslim.testing import (as_layout, assert_close, assert_matches_torch, away_from_zero, distinct, gradcheck,
                              uniform)
from tinyslim.testing import strategies as ts

try:  # the oracle; tests that need it carry @pytest.mark.torch (skipped with a message when absent)
    import torch
    import torch.nn.functional as TF
except ImportError:  # pragma: no cover
    torch = TF = None

# ---- cases: what a strategy draws --------------------------------------------------------------


@dataclass
class Case:
    arrays: tuple  # float64 inputs; every one receives a gradient
    params: dict  # everything else, passed by keyword to both callables (axes, ids, masks, seeds)
    seed: int  # drives the upstream gradient and the finite-difference entries


seeds = ts.seeds()
shapes = ts.shapes  # size-1 sides included; min_dims=0 adds 0-d arrays
# value domains (rng, shape -> float64 array inside the op's domain): uniform, away_from_zero, distinct


@st.composite
def elementwise(draw, values=uniform(), **params):
    shape = draw(shapes(min_dims=0))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    return Case((values(rng, shape),), {k: draw(v) for k, v in params.items()}, seed)


@st.composite
def broadcast_pair(draw, values_a=uniform(), values_b=uniform()):
    shape_a, shape_b = draw(ts.broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    return Case((values_a(rng, shape_a), values_b(rng, shape_b)), {}, seed)


@st.composite
def matmul_pair(draw):
    # core (n, k) @ (k, m) with up to two broadcast batch dimensions on either side
    shape_a, shape_b = draw(ts.broadcastable_shapes(signature="(n,k),(k,m)->(n,m)", max_dims=2, max_side=4))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    return Case((uniform()(rng, shape_a), uniform()(rng, shape_b)), {}, seed)


@st.composite
def linear_case(draw, bias):
    lead = draw(shapes(min_dims=0, max_dims=2))
    D, O = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    arrays = [rng.uniform(-2, 2, lead + (D,)), rng.uniform(-1, 1, (O, D))]
    if bias:
        arrays.append(rng.uniform(-1, 1, (O,)))
    return Case(tuple(arrays), {}, seed)


def axes_for(ndim):
    return st.one_of(st.none(), st.integers(-ndim, ndim - 1),
                     st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple))


@st.composite
def reduction(draw, values=uniform()):
    shape = draw(shapes())
    seed = draw(seeds)
    params = dict(axis=draw(axes_for(len(shape))), keepdims=draw(st.booleans()))
    return Case((values(np.random.default_rng(seed), shape),), params, seed)


@st.composite
def reshape_case(draw):
    shape = draw(shapes())
    n = math.prod(shape)
    targets = [(n,), (-1,), (1, n), (n, 1), tuple(reversed(shape)), shape + (1,), (1,) + shape]
    if len(shape) >= 2:
        targets += [(shape[0] * shape[1],) + shape[2:], (-1, shape[-1])]
    seed = draw(seeds)
    return Case((uniform()(np.random.default_rng(seed), shape),), dict(shape=draw(st.sampled_from(targets))), seed)


@st.composite
def transpose_case(draw):
    shape = draw(shapes())
    axes = draw(st.one_of(st.none(), st.permutations(range(len(shape))).map(tuple)))
    seed = draw(seeds)
    return Case((uniform()(np.random.default_rng(seed), shape),), dict(axes=axes), seed)


@st.composite
def index_for(draw, shape):
    """A NumPy index: basic (ints, slices with any step, Ellipsis) or fancy (integer arrays with repeats, masks)."""
    ndim = len(shape)
    kind = draw(st.sampled_from(["basic", "fancy", "fancy-on-axis-1", "two-arrays", "mask"]))
    ints = lambda n: st.integers(-n, n - 1)  # noqa: E731
    if kind == "basic":
        m = draw(st.integers(1, ndim))
        ellipsis = m < ndim and draw(st.booleans())  # `..., i, j` indexes the last m dims, `i, j` the first m
        items = []
        for n in (shape[ndim - m:] if ellipsis else shape[:m]):
            items.append(draw(st.one_of(ints(n), st.builds(slice, st.none() | st.integers(-n - 1, n),
                                                          st.none() | st.integers(-n - 1, n),
                                                          st.sampled_from([None, 1, 2, -1, -2])))))
        return tuple([Ellipsis] + items if ellipsis else items)
    repeated = lambda n: st.lists(ints(n), min_size=1, max_size=6).map(np.array)  # noqa: E731
    if kind == "fancy" or ndim < 2:
        return draw(repeated(shape[0]))
    if kind == "fancy-on-axis-1":
        return (slice(None), draw(repeated(shape[1])))
    if kind == "two-arrays":  # an outer product of two index arrays, repeats included
        return (draw(repeated(shape[0]))[:, None], draw(repeated(shape[1]))[None, :])
    return draw(st.lists(st.booleans(), min_size=shape[0], max_size=shape[0]).map(np.array))


@st.composite
def getitem_case(draw):
    shape = draw(shapes())
    seed = draw(seeds)
    return Case((uniform()(np.random.default_rng(seed), shape),), dict(index=draw(index_for(shape))), seed)


@st.composite
def concat_case(draw):
    shape = list(draw(shapes()))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    arrays = []
    for size in draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)):
        shape[axis] = size
        arrays.append(rng.uniform(-2, 2, tuple(shape)))
    return Case(tuple(arrays), dict(axis=axis), seed)


@st.composite
def gather_case(draw):
    shape = draw(shapes())
    axis = draw(st.integers(0, len(shape) - 1))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    idx_shape = shape[:axis] + (draw(st.integers(1, 4)),) + shape[axis + 1:]
    idx = rng.integers(0, shape[axis], idx_shape)  # repeats are likely: the scatter-add must sum them
    return Case((rng.uniform(-2, 2, shape),), dict(idx=idx, axis=axis), seed)


@st.composite
def softmax_case(draw):
    shape = draw(shapes())
    seed = draw(seeds)
    return Case((uniform(-3, 3)(np.random.default_rng(seed), shape),),
                dict(axis=draw(st.integers(-len(shape), len(shape) - 1))), seed)


@st.composite
def cross_entropy_case(draw, variant):
    lead = draw(shapes(max_dims=2))  # (N,) or (B, T)
    V = draw(st.integers(2, 6))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    logits = rng.uniform(-3, 3, lead + (V,))
    targets = rng.integers(0, V, lead)
    params = dict(targets=targets, mask=None, ignore_index=-1)
    if variant == "ignore_index":
        # ignore_index may be a real class id (0 = the pad token of tinyslim's tokenizer) or a negative marker
        params["ignore_index"] = ignore = draw(st.sampled_from([-1, -100, 0]))
        drop = rng.random(lead) < 0.4
        drop.flat[rng.integers(drop.size)] = False  # at least one position counts
        targets[drop] = ignore
        if ignore == 0:
            targets[~drop] = rng.integers(1, V, int((~drop).sum()))
    elif variant == "mask":
        mask = (rng.random(lead) < 0.6).astype(draw(st.sampled_from([np.int64, np.float64, np.bool_])))
        mask.flat[rng.integers(mask.size)] = 1
        params["mask"] = mask
    return Case((logits,), params, seed)


@st.composite
def layer_norm_case(draw, affine):
    lead = draw(shapes(min_dims=0, max_dims=2))
    C = draw(st.integers(1, 6))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    arrays = [rng.uniform(-2, 2, lead + (C,))]
    if affine:
        arrays += [rng.uniform(0.5, 1.5, (C,)), rng.uniform(-1, 1, (C,))]
    return Case(tuple(arrays), {}, seed)


@st.composite
def embedding_case(draw):
    V, C = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, V, draw(shapes(max_dims=2)))  # repeated ids: their rows' gradients add up
    return Case((rng.uniform(-1, 1, (V, C)),), dict(idx=idx), seed)


@st.composite
def dropout_case(draw):
    shape = draw(shapes(min_dims=0))
    seed = draw(seeds)
    params = dict(p=draw(st.sampled_from([0.1, 0.5, 0.8])), mask_seed=draw(seeds))
    return Case((uniform()(np.random.default_rng(seed), shape),), params, seed)


@st.composite
def attention_case(draw):
    B, T, H, hd = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    seed = draw(seeds)
    qkv = np.random.default_rng(seed).uniform(-1.5, 1.5, (B, T, 3 * H * hd))
    return Case((qkv,), dict(n_head=H), seed)


@st.composite
def topk_case(draw):
    N, E = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    seed = draw(seeds)
    return Case((distinct(np.random.default_rng(seed), (N, E)),), dict(k=draw(st.integers(1, E))), seed)


# ---- torch references -------------------------------------------------------------------------


def _dims(axis, ndim):
    return tuple(range(ndim)) if axis is None else axis


def _torch_getitem(a, index):
    # the flat positions NumPy's index selects, gathered with torch (its backward sums repeats on its own)
    positions = np.arange(math.prod(a.shape)).reshape(a.shape)[index]
    return a.reshape(-1)[torch.from_numpy(np.array(positions))]  # (np.ascontiguousarray would make 0-d 1-d)


def _torch_cross_entropy(logits, targets, mask, ignore_index):
    # torch's reference: the masked mean of the per-position losses (reduction="none" gives 0 where ignored)
    V = logits.shape[-1]
    t = torch.from_numpy(targets.reshape(-1))
    losses = TF.cross_entropy(logits.reshape(-1, V), t, reduction="none", ignore_index=ignore_index)
    counted = t != ignore_index
    if mask is not None:
        counted &= torch.from_numpy(np.asarray(mask).reshape(-1) != 0)
    w = counted.to(logits.dtype)
    return (losses * w).sum() / w.sum()


def _dropout_keep(shape, p, mask_seed):
    return np.asarray(np.random.default_rng(mask_seed).random(shape) >= p)  # the same draw tinyslim's dropout makes


def _torch_dropout(x, p, mask_seed):
    return x * torch.from_numpy(_dropout_keep(tuple(x.shape), p, mask_seed)) / (1 - p)


def _torch_attention(qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.reshape(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))  # (B, H, T, hd)
    y = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, C)


def _not_two_channels(case):
    # Over C = 2 channels layer_norm's output is ±(1 - O(eps/d²)) whatever x is (shift and scale leave no other
    # direction), so its gradient is ~1e-6 of the output and float64 differences cannot resolve it to 1e-6.
    # The torch comparison covers C = 2; finite differences check every other C.
    return case.arrays[0].shape[-1] != 2


def _torch_topk_gating(logits, k):
    idx = torch.topk(logits, k, dim=1).indices  # sorted, largest first, like tinyslim's
    return torch.softmax(torch.gather(logits, 1, idx), dim=1)


# ---- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    name: str  # the row's id (an op may have several rows: with / without bias …)
    fn: str  # the name in functional.__all__
    ours: Callable  # (*Tensors, **params) -> Tensor
    ref: Callable  # (*torch float64 tensors, **params) -> torch.Tensor
    cases: st.SearchStrategy
    # where float64 central differences can resolve the gradient to 1e-6 (default: everywhere the strategy draws)
    fd_domain: Callable = lambda case: True

    def __repr__(self):
        return self.name


OPS = [
    Op("add", "add", F.add, lambda a, b: torch.add(a, b), broadcast_pair()),
    Op("sub", "sub", F.sub, lambda a, b: torch.sub(a, b), broadcast_pair()),
    Op("mul", "mul", F.mul, lambda a, b: torch.mul(a, b), broadcast_pair()),
    Op("div", "div", F.div, lambda a, b: torch.div(a, b), broadcast_pair(values_b=uniform(0.5, 2.0))),
    Op("neg", "neg", F.neg, lambda a: torch.neg(a), elementwise()),
    Op("pow", "pow", lambda a, exponent: F.pow(a, exponent), lambda a, exponent: torch.pow(a, exponent),
       elementwise(uniform(0.5, 2.0), exponent=st.sampled_from([2, 3, 0.5, -1.5, 1.7, 0]))),
    Op("exp", "exp", F.exp, lambda a: torch.exp(a), elementwise()),
    Op("log", "log", F.log, lambda a: torch.log(a), elementwise(uniform(0.1, 3.0))),
    Op("tanh", "tanh", F.tanh, lambda a: torch.tanh(a), elementwise(uniform(-3, 3))),
    Op("relu", "relu", F.relu, lambda a: torch.relu(a), elementwise(away_from_zero)),
    Op("matmul", "matmul", F.matmul, lambda a, b: torch.matmul(a, b), matmul_pair()),
    Op("linear", "linear", F.linear, lambda x, W, b: TF.linear(x, W, b), linear_case(bias=True)),
    Op("linear (no bias)", "linear", F.linear, lambda x, W: TF.linear(x, W), linear_case(bias=False)),
    Op("sum", "sum", F.sum, lambda a, axis, keepdims: torch.sum(a, dim=_dims(axis, a.ndim), keepdim=keepdims),
       reduction()),
    Op("mean", "mean", F.mean, lambda a, axis, keepdims: torch.mean(a, dim=_dims(axis, a.ndim), keepdim=keepdims),
       reduction()),
    Op("max", "max", F.max, lambda a, axis, keepdims: torch.amax(a, dim=_dims(axis, a.ndim), keepdim=keepdims),
       reduction(distinct)),
    Op("reshape", "reshape", F.reshape, lambda a, shape: a.reshape(shape), reshape_case()),
    Op("transpose", "transpose", F.transpose,
       lambda a, axes: a.permute(axes if axes is not None else tuple(reversed(range(a.ndim)))),
       transpose_case()),
    Op("getitem", "getitem", F.getitem, _torch_getitem, getitem_case()),
    Op("concat", "concat", lambda *ts, axis: F.concat(list(ts), axis=axis), lambda *ts, axis: torch.cat(ts, dim=axis),
       concat_case()),
    Op("gather", "gather", lambda a, idx, axis: F.gather(a, idx, axis=axis),
       lambda a, idx, axis: torch.gather(a, axis, torch.from_numpy(idx)), gather_case()),
    Op("gelu", "gelu", F.gelu, lambda a: TF.gelu(a, approximate="tanh"), elementwise(uniform(-3, 3))),
    Op("softmax", "softmax", F.softmax, lambda a, axis: torch.softmax(a, dim=axis), softmax_case()),
    Op("log_softmax", "log_softmax", F.log_softmax, lambda a, axis: torch.log_softmax(a, dim=axis), softmax_case()),
    Op("cross_entropy", "cross_entropy", F.cross_entropy, _torch_cross_entropy, cross_entropy_case("plain")),
    Op("cross_entropy (ignore_index)", "cross_entropy", F.cross_entropy, _torch_cross_entropy,
       cross_entropy_case("ignore_index")),
    Op("cross_entropy (loss mask)", "cross_entropy", F.cross_entropy, _torch_cross_entropy, cross_entropy_case("mask")),
    Op("layer_norm", "layer_norm", F.layer_norm,
       lambda x, w, b: TF.layer_norm(x, (x.shape[-1],), w, b, eps=1e-5), layer_norm_case(affine=True),
       fd_domain=_not_two_channels),
    Op("layer_norm (no affine)", "layer_norm", F.layer_norm,
       lambda x: TF.layer_norm(x, (x.shape[-1],), eps=1e-5), layer_norm_case(affine=False),
       fd_domain=_not_two_channels),
    Op("embedding", "embedding", lambda W, idx: F.embedding(idx, W),
       lambda W, idx: TF.embedding(torch.from_numpy(idx), W), embedding_case()),
    Op("dropout", "dropout", lambda x, p, mask_seed: F.dropout(x, p, rng=np.random.default_rng(mask_seed)),
       _torch_dropout, dropout_case()),
    Op("causal_self_attention", "causal_self_attention", F.causal_self_attention, _torch_attention, attention_case()),
    Op("topk_gating", "topk_gating", lambda logits, k: F.topk_gating(logits, k)[0], _torch_topk_gating, topk_case()),
]

ops = pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])


def test_table_covers_every_op():
    missing = sorted(set(F.__all__) - {op.fn for op in OPS})
    assert not missing, f"ops in functional.__all__ without a row in OPS (add one): {missing}"
    unknown = sorted({op.fn for op in OPS} - set(F.__all__))
    assert not unknown, f"rows in OPS for names not in functional.__all__: {unknown}"


# ---- running an op -----------------------------------------------------------------------------


def upstream_for(case, shape, dtype=np.float64):
    """A random upstream gradient ∂L/∂out: catches backward code that is only right for sum()."""
    return np.asarray(np.random.default_rng([case.seed, 7]).normal(size=shape), dtype=dtype)


def run_ours(op, case, arrays=None):
    """Forward and backward in tinyslim: (output, upstream gradient, input gradients)."""
    tensors = [Tensor(a, requires_grad=True) for a in (case.arrays if arrays is None else arrays)]
    out = op.ours(*tensors, **case.params)
    g = upstream_for(case, out.shape, out.dtype)
    out.backward(g)
    return out.data, g, [t.grad for t in tensors]


def call(op, case):
    """fn(*Tensors) for the toolkit: the row's op with the case's parameters."""
    return lambda *tensors: op.ours(*tensors, **case.params)


def forward_value(op, params):
    def f(arrays):
        with no_grad():
            return np.array(op.ours(*[Tensor(a) for a in arrays], **params).data)  # a copy: views would move
    return f


# ---- the five tests over the table -------------------------------------------------------------

TORCH, VIEWS = ("tinyslim", "torch"), ("views", "contiguous")  # the labels of a report's columns


@pytest.mark.torch
@ops
@given(data=st.data())
def test_forward_matches_torch(op, data):
    case = data.draw(op.cases, label="case")
    with no_grad():
        out = op.ours(*[Tensor(a) for a in case.arrays], **case.params)
    ref = op.ref(*[torch.tensor(a, dtype=torch.float64) for a in case.arrays], **case.params)
    assert out.dtype == np.float64
    assert_close(out.data, ref.numpy(), rtol=1e-10, atol=1e-12, name=f"{op.name} forward", labels=TORCH)


@pytest.mark.torch
@ops
@given(data=st.data())
def test_gradients_match_torch(op, data):
    # forward, and every input gradient (float64, shape of the input, never None) for a random upstream
    case = data.draw(op.cases, label="case")
    assert_matches_torch(call(op, case), lambda *tensors: op.ref(*tensors, **case.params), *case.arrays,
                         rtol=1e-10, atol=1e-12, seed=case.seed, name=op.name)


@ops
@given(data=st.data())
def test_gradients_match_finite_differences(op, data):
    # relative error < 1e-6 on every entry of small inputs and 24 sampled entries of larger ones
    case = data.draw(op.cases, label="case")
    assume(op.fd_domain(case))
    gradcheck(call(op, case), *case.arrays, rtol=1e-6, max_entries=24, seed=case.seed, name=op.name)


@ops
@given(data=st.data())
def test_non_contiguous_inputs(op, data):
    case = data.draw(op.cases, label="case")
    layouts = data.draw(st.lists(ts.layouts(), min_size=len(case.arrays), max_size=len(case.arrays)),
                        label="layouts")
    views = [as_layout(a, layout) for a, layout in zip(case.arrays, layouts)]
    assert all(np.array_equal(v, a) for v, a in zip(views, case.arrays))
    out, _, grads = run_ours(op, case)
    out_v, _, grads_v = run_ours(op, case, views)
    # the same maths; only the summation order inside BLAS may differ with the layout
    assert_close(out_v, out, rtol=1e-12, atol=1e-14, name=f"{op.name} forward on views", labels=VIEWS)
    for i, (gv, gc) in enumerate(zip(grads_v, grads)):
        assert gv.shape == case.arrays[i].shape
        assert_close(gv, gc, rtol=1e-12, atol=1e-14, name=f"{op.name} d/d input {i} on views", labels=VIEWS)
    assert all(np.array_equal(v, a) for v, a in zip(views, case.arrays)), f"{op.name} wrote into its input"


@ops
@given(data=st.data())
def test_float32_stays_float32(op, data):
    case = data.draw(op.cases, label="case")
    arrays32 = [a.astype(np.float32) for a in case.arrays]
    out32, g32, grads32 = run_ours(op, case, arrays32)
    assert out32.dtype == np.float32, f"{op.name}: float32 inputs gave a {out32.dtype} output"
    for i, g in enumerate(grads32):
        assert g.dtype == np.float32, f"{op.name}: float32 input {i} got a {g.dtype} gradient"
    # against float64 on the same (float32-rounded) inputs: only float32 arithmetic differs. docs/methods.md's
    # "equal" (rtol 1e-5, atol 1e-6), plus what a few float32 ulps on the inputs move the exact result by:
    # the error any float32 evaluation may have where the op is ill-conditioned (layer_norm of a nearly
    # constant row, where x - mean cancels), and ~0 elsewhere.
    arrays64 = [a.astype(np.float64) for a in arrays32]
    f = forward_value(op, case.params)
    out64 = f(arrays64)
    rng = np.random.default_rng([case.seed, 13])
    wobble = max(np.max(np.abs(f([a * (1 + 4 * np.finfo(np.float32).eps * rng.choice([-1.0, 1.0], a.shape))
                                  for a in arrays64]) - out64), initial=0.0) for _ in range(3))
    assert_close(out32, out64, rtol=1e-5, atol=1e-6 + wobble, name=f"{op.name} float32 forward",
                 labels=("float32", "float64"))


# ---- op-specific behaviour the table cannot express --------------------------------------------


@pytest.mark.torch
@given(case=topk_case())
def test_topk_indices_match_torch(case):
    logits = case.arrays[0]
    _, idx = F.topk_gating(Tensor(logits), case.params["k"])
    ref = torch.topk(torch.from_numpy(logits), case.params["k"], dim=1).indices.numpy()
    assert idx.dtype == np.int32 and np.array_equal(idx, ref)


def test_topk_ties_go_to_the_lower_index():
    _, idx = F.topk_gating(Tensor(np.array([[1.0, 3.0, 3.0, 0.0]])), 2)
    assert idx.tolist() == [[1, 2]]


def test_dropout_is_identity_in_eval_and_for_p_zero():
    x = Tensor(np.arange(6.0), requires_grad=True)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0, rng=np.random.default_rng(0)) is x


def test_dropout_keeps_expected_fraction_scaled():
    x = np.ones(20000)
    y = F.dropout(Tensor(x), 0.25, rng=np.random.default_rng(0)).data
    assert set(np.unique(y)) <= {0.0, 1 / 0.75}
    assert abs((y != 0).mean() - 0.75) < 0.02


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_dropout_rejects_bad_p(p):
    with pytest.raises(ValueError, match="p must lie"):
        F.dropout(Tensor(np.ones(3)), p, rng=np.random.default_rng(0))


def test_dropout_requires_rng_for_reproducibility():
    with pytest.raises(ValueError, match="rng"):
        F.dropout(Tensor(np.ones(3)), 0.5)


def test_cross_entropy_errors():
    logits = Tensor(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"targets must have shape \(2,\)"):
        F.cross_entropy(logits, np.zeros(3, dtype=int))
    with pytest.raises(TypeError, match="integer"):
        F.cross_entropy(logits, np.zeros(2))
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        F.cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match="masked or ignored"):
        F.cross_entropy(logits, np.array([0, 1]), mask=np.zeros(2))
    with pytest.raises(ValueError, match="masked or ignored"):
        F.cross_entropy(logits, np.array([-1, -1]))


def test_index_errors_name_the_range():
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        F.embedding(np.array([0, 4]), Tensor(np.zeros((4, 2))))
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        F.gather(Tensor(np.zeros((2, 3))), np.array([[0, 3]]), axis=1)
    with pytest.raises(TypeError, match="integers"):
        F.embedding(np.array([0.0]), Tensor(np.zeros((4, 2))))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\)"):
        F.matmul(Tensor(np.zeros((2, 3))), Tensor(np.zeros((4, 5))))
    with pytest.raises(ValueError, match="in_features = 3"):
        F.linear(Tensor(np.zeros((2, 4))), Tensor(np.zeros((5, 3))))
    with pytest.raises(ValueError, match="cannot reshape"):
        F.reshape(Tensor(np.zeros((2, 3))), (4, 2))
    with pytest.raises(ValueError, match="permutation"):
        F.transpose(Tensor(np.zeros((2, 3))), (0, 0))
    with pytest.raises(ValueError, match="differ off that axis"):
        F.concat([Tensor(np.zeros((2, 3))), Tensor(np.zeros((3, 3)))], axis=1)
    with pytest.raises(ValueError, match="n_head = 4"):
        F.causal_self_attention(Tensor(np.zeros((1, 2, 18))), 4)
    with pytest.raises(ValueError, match=r"k must lie in \[1, E = 3\]"):
        F.topk_gating(Tensor(np.zeros((2, 3))), 4)
