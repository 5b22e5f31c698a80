"""Hypothesis strategies for property tests of ops, the low-rank kernel op and models (needs hypothesis).

    from hypothesis import given
    from tinyslim.testing import gradcheck, strategies as ts

    @given(x=ts.arrays(shape=ts.shapes(min_dims=0), lo=-4, hi=4))
    def test_silu_backward(x):
        gradcheck(silu, x)

shapes / broadcastable_shapes   shapes with size-1 (and optionally 0-d) dimensions; broadcastable tuples
arrays                          bounded, finite arrays of a dtype (values shrink to simple numbers)
seeded_arrays                   arrays from a value domain (tinyslim.testing.arrays) and a drawn seed
views                           the same values in a non-contiguous, transposed or reversed layout
gates / lowrank_problems        gate patterns and whole problems for the low-rank mixture op
gpt_configs                     small GPTConfigs that build and run in milliseconds

Shape legend: N tokens, D in, O out, r rank, E experts, k top-k.
"""
from __future__ import annotations

try:
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes
    from hypothesis.extra.numpy import arrays as _np_arrays
except ImportError as err:  # pragma: no cover - exercised by test_testing's subprocess check
    raise ImportError("tinyslim.testing.strategies needs hypothesis: `pip install hypothesis` (the rest of "
                      "tinyslim.testing — gradcheck, the torch checks — works without it)") from err

import numpy as np

from .arrays import LAYOUTS, as_layout, uniform

__all__ = ["seeds", "shapes", "broadcastable_shapes", "arrays", "seeded_arrays", "layouts", "views", "GATE_FORMS",
           "GATE_PATTERNS", "gates", "lowrank_problems", "gpt_configs"]


def seeds():
    return st.integers(0, 2**32 - 1)


def _strategy(value):
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


# ---- shapes ----------------------------------------------------------------------------------------

def shapes(min_dims: int = 1, max_dims: int = 3, min_side: int = 1, max_side: int = 4):
    """Array shapes with every side in [min_side, max_side] (size-1 dimensions included); min_dims=0 adds ()."""
    return array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def broadcastable_shapes(num_shapes: int = 2, min_dims: int = 0, max_dims: int = 3, max_side: int = 4,
                         signature: str | None = None):
    """Tuples of shapes that broadcast together (size-1 and missing leading dimensions), e.g. ((3, 1), (4,)).

    signature: a gufunc signature such as "(n,k),(k,m)->(n,m)" for matmul-like ops; the shapes then get
    up to max_dims broadcast batch dimensions in front of the core ones.
    """
    if signature is not None:
        strategy = mutually_broadcastable_shapes(signature=signature, min_dims=min_dims, max_dims=max_dims,
                                                 max_side=max_side)
    else:
        strategy = mutually_broadcastable_shapes(num_shapes=num_shapes, min_dims=min_dims, max_dims=max_dims,
                                                 max_side=max_side)
    return strategy.map(lambda result: result.input_shapes)


# ---- arrays ----------------------------------------------------------------------------------------

def arrays(dtype=np.float64, shape=None, lo: float = -2.0, hi: float = 2.0):
    """Arrays of `dtype` with finite values in [lo, hi] (no NaN, inf or subnormals).

    shape: a tuple or a strategy (default shapes()). Values are drawn element by element, so a failing
    example shrinks to simple numbers (0.0, 1.0…). Ops with kinks or ties need a value domain instead:
    use seeded_arrays(values=away_from_zero) or distinct.
    """
    dtype = np.dtype(dtype)
    elements = st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                         width=8 * dtype.itemsize)
    return _np_arrays(dtype, shapes() if shape is None else shape, elements=elements)


@st.composite
def seeded_arrays(draw, values=uniform(), shape=None, dtype=np.float64):
    """An array from a value domain ``values(rng, shape)`` with a drawn seed (fast for larger arrays;
    hypothesis shrinks the shape and the seed)."""
    shape = draw(_strategy(shapes() if shape is None else shape))
    return values(np.random.default_rng(draw(seeds())), shape).astype(dtype)


def layouts():
    """One of LAYOUTS ("fortran", "swapped", "strided", "reversed"); see tinyslim.testing.as_layout."""
    return st.sampled_from(LAYOUTS)


@st.composite
def views(draw, array=None):
    """An array (default: arrays()) as a read-only view with the same values in a non-C-contiguous layout:
    column-major, transposed, strided or reversed. An op must give the same result as on a copy."""
    a = draw(arrays() if array is None else _strategy(array))
    return as_layout(a, draw(layouts()))


# ---- the low-rank mixture op (docs/methods.md §8) ------------------------------------------------------

GATE_FORMS = ("dense", "topk", "index")
GATE_PATTERNS = ("identical", "uniform", "zipf", "distinct", "segment")


def _softmax(z, axis=-1):
    z = np.exp(z - z.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def _assign(rng, pattern, N, E):
    """Per-token expert ids (N,) for one assignment pattern."""
    if pattern == "identical":  # every token to the same expert
        return np.full(N, rng.integers(E))
    if pattern == "uniform":
        return rng.integers(0, E, N)
    if pattern == "zipf":  # a few popular experts, a long tail: p_e ∝ 1 / rank^1.5
        p = 1.0 / np.arange(1, E + 1) ** 1.5
        return rng.permutation(E)[rng.choice(E, N, p=p / p.sum())]
    if pattern == "distinct":  # no two tokens share an expert while E allows it, then cycle
        return np.resize(rng.permutation(E), N)
    if pattern == "segment":  # one huge segment and a few stragglers
        idx = np.full(N, rng.integers(E))
        stray = rng.random(N) < 0.1
        idx[stray] = rng.integers(0, E, int(stray.sum()))
        return idx
    raise ValueError(f"unknown gate pattern {pattern!r}; choose one of {', '.join(GATE_PATTERNS)}")


@st.composite
def gates(draw, N=st.integers(1, 8), E=st.integers(1, 5), forms=GATE_FORMS, patterns=GATE_PATTERNS, k=None,
          dtype=np.float64, empty: bool = True):
    """Gates for mixture_lowrank in one of three forms (the spellings kernels.as_gates accepts):

    dense    G (N, E): a softmax over experts per token
    topk     (idx (N, k) int32, w (N, k)): k distinct experts per token, w a softmax over the picked k
    index    idx (N,) int32: one expert per token, assigned identical / uniform / zipf / distinct / segment

    N, E, k: ints or strategies (k defaults to 1..E). empty=True leaves some rows with no expert — a zero
    dense row, an empty top-k slot (idx −1, whose weight must get no gradient), index −1 — so the op's skip
    path is exercised too.
    """
    N, E = draw(_strategy(N)), draw(_strategy(E))
    form = draw(st.sampled_from(forms))
    rng = np.random.default_rng(draw(seeds()))
    drop = (rng.random(N) < 0.2) if empty else np.zeros(N, bool)
    if form == "dense":
        G = _softmax(2.0 * rng.standard_normal((N, E)))
        G[drop] = 0.0
        return G.astype(dtype)
    if form == "topk":
        k = draw(_strategy(st.integers(1, E) if k is None else k))
        idx = np.argsort(rng.random((N, E)), axis=1)[:, :k].astype(np.int32)
        w = _softmax(2.0 * rng.standard_normal((N, k))).astype(dtype)
        if empty and N:
            idx[rng.random((N, k)) < 0.15] = -1  # an empty slot keeps its (now meaningless) weight
        return idx, w
    idx = _assign(rng, draw(st.sampled_from(patterns)), N, E).astype(np.int32)
    idx[drop] = -1
    return idx


@st.composite
def lowrank_problems(draw, dtype=np.float64, forms=GATE_FORMS, patterns=GATE_PATTERNS, sizes: str = "small",
                     masks=st.booleans(), empty: bool = True):
    """One problem for mixture_lowrank / kernels.forward: dict(x, A, B, gates, scale, in_mask, out_mask).

    sizes="small": every dimension 1..9 (fast enough for gradcheck); "ragged": also N = 0 and sizes that
    are not multiples of a tile (31, 67, 131…). scale is a number or per expert (E,); the masks are 0/1
    (E, D) and (E, O) arrays or None. Values are standard normal, from a drawn seed.
    """
    small = st.integers(1, 9)
    if sizes == "ragged":
        N = draw(st.one_of(st.integers(0, 9), st.sampled_from([31, 64, 67, 131])))
        D = draw(st.one_of(small, st.sampled_from([16, 33, 64, 100])))
        O = draw(st.one_of(small, st.sampled_from([16, 31, 72, 129])))
    elif sizes == "small":
        N, D, O = draw(small), draw(small), draw(small)
    else:
        raise ValueError(f"sizes must be 'small' or 'ragged', got {sizes!r}")
    r = draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    E = draw(st.integers(1, 5))
    g = draw(gates(N=N, E=E, forms=forms, patterns=patterns, dtype=dtype, empty=empty))
    with_masks, per_expert = draw(_strategy(masks)), draw(st.booleans())
    rng = np.random.default_rng(draw(seeds()))
    return dict(
        x=rng.standard_normal((N, D)).astype(dtype),
        A=rng.standard_normal((E, r, D)).astype(dtype),
        B=rng.standard_normal((E, O, r)).astype(dtype),
        gates=g,
        scale=rng.uniform(0.5, 2, E).astype(dtype) if per_expert else 0.75,
        in_mask=(rng.random((E, D)) < 0.7).astype(dtype) if with_masks else None,
        out_mask=(rng.random((E, O)) < 0.7).astype(dtype) if with_masks else None,
    )


# ---- models ----------------------------------------------------------------------------------------

@st.composite
def gpt_configs(draw, dtype: str = "float64", max_layers: int = 2, max_heads: int = 2, bias=st.booleans()):
    """Small GPTConfigs: 1..max_heads heads of 2..8 channels, 1..max_layers blocks, vocabulary 5..20,
    context 4..8, with or without Linear biases. float64 by default, for exact gradient checks."""
    from ..nn import GPTConfig

    n_head = draw(st.integers(1, max_heads))
    return GPTConfig(vocab_size=draw(st.integers(5, 20)), block_size=draw(st.integers(4, 8)),
                     n_layer=draw(st.integers(1, max_layers)), n_head=n_head,
                     n_embd=n_head * draw(st.integers(2, 8)), bias=draw(_strategy(bias)), dtype=dtype)
