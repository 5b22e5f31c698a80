"""The low-rank mixture kernel (docs/methods.md §8): every backend against the NumPy reference, the reference
against torch autograd, the §8.5 invariants, the autograd Function against central differences, and
validation of what reaches C. CUDA tests are in tests/test_kernels_cuda.py (`pytest -k cuda`).

Shape legend: N tokens, D in, O out, r rank, E experts, k top-k.
    x (N, D)   A (E, r, D)   B (E, O, r)   G (N, E)   y, dy (N, O)
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyslim import kernels
from tinyslim.autograd import Tensor
from tinyslim.kernels import reference
from tinyslim.lowrank import mixture_lowrank

HOST_BACKENDS = [name for name in ("numpy", "cpu") if kernels.available_backends()[name][0]]
if "cpu" in HOST_BACKENDS:  # every numbered version of the C kernel, by name ("cpu" is the newest)
    from tinyslim.kernels import cpu as _cpu
    HOST_BACKENDS += [f"cpu.v{v}" for v in sorted(_cpu.VERSIONS) if v != _cpu.LATEST]
CPU = pytest.mark.skipif(not kernels.available_backends()["cpu"][0],
                         reason=f"cpu backend: {kernels.available_backends()['cpu'][1]}")
# example counts follow the loaded profile (HYPOTHESIS_PROFILE=ci|dev|thorough, see conftest.py)
MANY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(MANY, max_examples=max(5, settings().max_examples // 2))


# ---- helpers ------------------------------------------------------------------------------------------
def check(name, got, want, tol):
    """max|got − want| ≤ tol · max(1, max|want|), with a readable report (first values side by side)."""
    if want is None:
        assert got is None, f"{name}: expected None, got an array"
        return
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != expected {want.shape}"
    if want.size == 0:
        return
    diff = np.abs(got - want)
    bound = tol * max(1.0, float(np.max(np.abs(want))))
    if not np.all(diff <= bound):  # also catches NaN
        at = np.unravel_index(np.nanargmax(np.where(np.isnan(diff), np.inf, diff)), diff.shape)
        first = "\n".join(f"    {g:+.8e}  {w:+.8e}" for g, w in zip(got.ravel()[:5], want.ravel()[:5]))
        raise AssertionError(f"{name}: max |diff| {diff[at]:.3e} at {at} > {bound:.3e}\n"
                             f"    got             expected\n{first}")


TOL = {np.float64: 1e-10, np.float32: 3e-5}


def make_gates(rng, form, N, E, dtype, k=2, pattern="uniform", zero_rows=True):
    """Gates of one form; some rows are all zero / −1 so the skip path is always exercised."""
    if form == "dense":
        G = rng.standard_normal((N, E)).astype(dtype)
        G[rng.random((N, E)) < 0.25] = 0
        if zero_rows and N:
            G[rng.random(N) < 0.2] = 0
        return G
    if form == "topk":
        k = min(k, E)
        idx = np.argsort(rng.random((N, E)), axis=1)[:, :k].astype(np.int32)
        w = rng.standard_normal((N, k)).astype(dtype)
        if zero_rows and N:
            idx[rng.random((N, k)) < 0.15] = -1
            w[rng.random((N, k)) < 0.15] = 0
        return idx, w
    if pattern == "identical":
        idx = np.full(N, rng.integers(0, E), dtype=np.int32)
    elif pattern == "distinct":
        idx = (np.arange(N) % E).astype(np.int32)
    elif pattern == "segment":  # one huge segment and a few stragglers
        idx = np.zeros(N, dtype=np.int32)
        idx[rng.random(N) < 0.1] = rng.integers(0, E)
    else:
        idx = rng.integers(0, E, N).astype(np.int32)
    if zero_rows and N:
        idx[rng.random(N) < 0.2] = -1
    return idx


@st.composite
def problems(draw, dtype=np.float64, forms=("dense", "topk", "index")):
    """A random problem: ragged sizes, r = 1, E = 1, k = E, N = 0/1, masks, scalar or per-expert scale."""
    small = st.integers(1, 9)
    N = draw(st.one_of(st.integers(0, 9), st.sampled_from([31, 64, 67, 131])))
    D = draw(st.one_of(small, st.sampled_from([16, 33, 64, 100])))
    O = draw(st.one_of(small, st.sampled_from([16, 31, 72, 129])))
    r = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 9, 16, 17]))  # both CPU micro-kernels, padded ranks
    E = draw(st.integers(1, 5))
    form = draw(st.sampled_from(forms))
    k = draw(st.integers(1, E))
    pattern = draw(st.sampled_from(["uniform", "identical", "distinct", "segment"]))
    masks = draw(st.booleans())
    per_expert = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return dict(
        x=rng.standard_normal((N, D)).astype(dtype),
        A=rng.standard_normal((E, r, D)).astype(dtype),
        B=rng.standard_normal((E, O, r)).astype(dtype),
        gates=make_gates(rng, form, N, E, dtype, k=k, pattern=pattern),
        scale=rng.uniform(0.5, 2, E).astype(dtype) if per_expert else 0.75,
        in_mask=(rng.random((E, D)) < 0.7).astype(dtype) if masks else None,
        out_mask=(rng.random((E, O)) < 0.7).astype(dtype) if masks else None,
        dy=rng.standard_normal((N, O)).astype(dtype),
    )


def run(prob, backend, **kw):
    args = {k: v for k, v in prob.items() if k != "dy"}
    y = kernels.forward(**args, backend=backend)
    grads = kernels.backward(prob["dy"], **args, backend=backend, **kw)
    return (y,) + tuple(grads)


def as64(prob):
    def cast(v):
        if isinstance(v, tuple):
            return (v[0], v[1].astype(np.float64))
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            return v.astype(np.float64)
        return v
    return {k: cast(v) for k, v in prob.items()}


NAMES = ("y", "dx", "dA", "dB", "dgate")


# ---- every backend against the float64 reference ---------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@MANY
@given(data=st.data())
def test_backend_matches_reference(backend, dtype, data):
    prob = data.draw(problems(dtype=dtype))
    want = run(as64(prob), "numpy")
    got = run(prob, backend)
    for name, g, w in zip(NAMES, got, want):
        if g is not None:
            assert g.dtype == dtype, f"{name} came back as {g.dtype}"
        check(f"{backend} {name}", g, w, TOL[dtype])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, True, False), (False, False, False, True)])
def test_backward_computes_only_what_is_needed(backend, needs):
    rng = np.random.default_rng(1)
    prob = dict(x=rng.standard_normal((70, 20)), A=rng.standard_normal((3, 4, 20)), B=rng.standard_normal((3, 9, 4)),
                gates=make_gates(rng, "topk", 70, 3, np.float64), scale=0.5, in_mask=None, out_mask=None,
                dy=rng.standard_normal((70, 9)))
    full = run(prob, "numpy")
    part = run(prob, backend, needs=needs)
    for name, want, got, wanted in zip(NAMES[1:], full[1:], part[1:], needs):
        if wanted:
            check(name, got, want, 1e-12)
        else:
            assert got is None, f"{name} was not asked for but came back"


@CPU
@pytest.mark.parametrize("form", ["dense", "topk", "index"])
def test_cpu_threads_agree(form):
    """1 thread and 2 threads give the same numbers (dA, dB reduce in a different order: allclose)."""
    rng = np.random.default_rng(2)
    N, D, O, r, E = 300, 40, 24, 4, 4
    prob = dict(x=rng.standard_normal((N, D)), A=rng.standard_normal((E, r, D)), B=rng.standard_normal((E, O, r)),
                gates=make_gates(rng, form, N, E, np.float64), scale=0.5, in_mask=None, out_mask=None,
                dy=rng.standard_normal((N, O)))
    two_threads_match_one(prob)


def two_threads_match_one(prob):
    """Runs prob on the cpu backend with 1 and with 2 threads, checks that they agree (y and dx bit for bit:
    every row belongs to one thread; dA, dB sum the threads' parts in another order), returns the 2-thread run."""
    before = kernels.get_num_threads()
    try:
        kernels.set_num_threads(1)
        one = run(prob, "cpu")
        kernels.set_num_threads(2)
        two = run(prob, "cpu")
    finally:
        kernels.set_num_threads(before)
    for name, a, b in zip(NAMES, one, two):
        check(name, a, b, 1e-13)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1]), "y and dx are per-row: bit-identical"
    return two


# ---- the reference against torch autograd (float64) --------------------------------------------------
@FEW
@given(prob=problems(dtype=np.float64))
def test_reference_matches_torch(prob):
    torch = pytest.importorskip("torch")
    N, E = prob["x"].shape[0], prob["A"].shape[0]
    form = kernels.as_gates(prob["gates"]).form
    g = kernels.as_gates(prob["gates"])
    G_np, listed = reference.dense_gates(form, getattr(g, "idx", None), getattr(g, "w", getattr(g, "G", None)),
                                         N, E, np.float64)
    t = {k: torch.tensor(prob[k], requires_grad=True) for k in ("x", "A", "B")}
    G = torch.tensor(G_np, requires_grad=True)
    s = torch.as_tensor(np.broadcast_to(np.asarray(prob["scale"], np.float64), (E,)).copy())
    A = t["A"] if prob["in_mask"] is None else t["A"] * torch.tensor(prob["in_mask"])[:, None, :]
    B = t["B"] if prob["out_mask"] is None else t["B"] * torch.tensor(prob["out_mask"])[:, :, None]
    h = torch.einsum("nd,erd->ner", t["x"], A)        # (N, E, r)
    u = torch.einsum("ner,eor->neo", h, B)             # (N, E, O)
    y = torch.einsum("ne,neo->no", G * s, u)           # (N, O)
    dy = torch.tensor(prob["dy"])
    dx, dA, dB, dG = torch.autograd.grad(y, (t["x"], t["A"], t["B"], G), dy, allow_unused=True)

    args = {k: v for k, v in prob.items() if k not in ("dy", "gates")}
    y_ref = reference.forward(G=G_np, **{k: args[k] for k in ("x", "A", "B", "scale", "in_mask", "out_mask")})
    grads = reference.backward(prob["dy"], G=G_np, listed=listed,
                               **{k: args[k] for k in ("x", "A", "B", "scale", "in_mask", "out_mask")})
    check("y", y_ref, y.detach().numpy(), 1e-12)
    for name, ours, theirs in zip(("dx", "dA", "dB"), grads[:3], (dx, dA, dB)):
        check(name, ours, theirs.numpy(), 1e-12)
    check("dG", grads[3], np.where(listed, dG.numpy(), 0), 1e-12)


# ---- §8.5 invariants -----------------------------------------------------------------------------------
def _one_hot_problem(rng, N=90, D=21, O=13, r=3, E=4, dtype=np.float64):
    idx = rng.integers(-1, E, N).astype(np.int32)
    G = np.zeros((N, E), dtype)
    G[np.flatnonzero(idx >= 0), idx[idx >= 0]] = 1
    w = (idx[:, None] >= 0).astype(dtype)
    base = dict(x=rng.standard_normal((N, D)).astype(dtype), A=rng.standard_normal((E, r, D)).astype(dtype),
                B=rng.standard_normal((E, O, r)).astype(dtype), scale=rng.uniform(0.5, 2, E).astype(dtype))
    return base, idx, G, w, rng.standard_normal((N, O)).astype(dtype)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_invariant_1_gate_forms_agree(backend):
    """Dense, top-k and index forms give equal y and gradients for equivalent gates."""
    base, idx, G, w, dy = _one_hot_problem(np.random.default_rng(3))
    dense = run(dict(base, gates=G, dy=dy), backend)
    topk = run(dict(base, gates=(idx[:, None], w), dy=dy), backend)
    index = run(dict(base, gates=idx, dy=dy), backend)
    for name, a, b, c in zip(NAMES[:4], dense, topk, index):
        check(f"{name} dense vs top-k", b, a, 1e-12)
        check(f"{name} dense vs index", c, a, 1e-12)
    dw_from_dG = np.where(idx >= 0, dense[4][np.arange(len(idx)), np.maximum(idx, 0)], 0)[:, None]
    check("dw = dG[n, idx]", topk[4], dw_from_dG, 1e-12)
    assert index[4] is None, "the index form has no gate gradient"


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_invariant_2_single_expert_is_plain_lora(backend, dtype):
    rng = np.random.default_rng(4)
    N, D, O, r, s = 77, 19, 23, 4, 0.25
    x, A, B = (rng.standard_normal(shape).astype(dtype) for shape in ((N, D), (r, D), (O, r)))
    y = kernels.forward(x, A[None], B[None], np.ones((N, 1), dtype), s, backend=backend)
    check("E=1, G=1 vs s·(x Aᵀ) Bᵀ", y, s * (x @ A.T) @ B.T, TOL[dtype])
    y0 = kernels.forward(x, A[None], B[None], np.zeros(N, np.int32), s, backend=backend)
    check("index ≡ 0 vs plain LoRA", y0, y, TOL[dtype])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("form", ["dense", "topk", "index"])
def test_invariant_3_zero_gates_give_exact_zero_rows(backend, form):
    """Rows with no active entry are exactly +0.0 even when their x is NaN (skipped, not 0·NaN)."""
    rng = np.random.default_rng(5)
    N, D, O, r, E = 40, 17, 11, 3, 3
    x = rng.standard_normal((N, D)).astype(np.float32)
    A, B = rng.standard_normal((E, r, D)).astype(np.float32), rng.standard_normal((E, O, r)).astype(np.float32)
    dead = np.arange(N) % 3 == 0
    x[dead] = np.nan
    if form == "dense":
        gates = rng.standard_normal((N, E)).astype(np.float32)
        gates[dead] = 0
    elif form == "topk":
        idx = np.argsort(rng.random((N, E)), axis=1)[:, :2].astype(np.int32)
        w = rng.standard_normal((N, 2)).astype(np.float32)
        idx[dead, 0] = -1
        w[dead, 1] = 0  # one empty slot, one zero weight
        gates = (idx, w)
    else:
        gates = rng.integers(0, E, N).astype(np.int32)
        gates[dead] = -1
    y = kernels.forward(x, A, B, gates, 0.5, backend=backend)
    assert np.array_equal(y[dead], np.zeros((dead.sum(), O), np.float32)), "skipped rows must be exactly 0"
    assert not np.signbit(y[dead]).any(), "skipped rows must be +0.0"
    assert np.isfinite(y[~dead]).all()
    dy = rng.standard_normal((N, O)).astype(np.float32)
    dx, dA, dB, _ = kernels.backward(dy, x, A, B, gates, 0.5, backend=backend, needs=(True, True, True, False))
    assert np.array_equal(dx[dead], np.zeros_like(dx[dead])), "skipped rows get no dx"
    assert np.isfinite(dA).all() and np.isfinite(dB).all(), "skipped NaN rows must not reach dA, dB"


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_invariant_4_rank_space_dG_equals_explicit(backend):
    """dG[n,e] = s_e ⟨g, h⟩ (rank space) equals the explicit ⟨dy_n, s_e u_{n,e}⟩ with u = B'A'x (O-space)."""
    rng = np.random.default_rng(6)
    N, D, O, r, E = 50, 14, 26, 3, 4
    x, A, B = rng.standard_normal((N, D)), rng.standard_normal((E, r, D)), rng.standard_normal((E, O, r))
    G, s, dy = rng.standard_normal((N, E)), rng.uniform(0.5, 2, E), rng.standard_normal((N, O))
    m_in, m_out = (rng.random((E, D)) < 0.6).astype(float), (rng.random((E, O)) < 0.6).astype(float)
    Am, Bm = reference.masked_factors(A, B, m_in, m_out)
    u = np.einsum("eor,erd,nd->neo", Bm, Am, x)                       # (N, E, O)
    explicit = s * np.einsum("no,neo->ne", dy, u)
    *_, dG = kernels.backward(dy, x, A, B, G, s, m_in, m_out, backend=backend)
    check("dG", dG, explicit, 1e-12)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_invariant_5_padded_ranks_get_zero_gradient(backend):
    """Experts of different ranks zero-padded to r_max: padded rows of A / columns of B get exactly 0."""
    rng = np.random.default_rng(7)
    N, D, O, E, ranks = 60, 12, 10, 3, (1, 3, 4)
    A, B = np.zeros((E, 4, D)), np.zeros((E, O, 4))
    for e, re in enumerate(ranks):
        A[e, :re], B[e, :, :re] = rng.standard_normal((re, D)), rng.standard_normal((O, re))
    x, G, dy = rng.standard_normal((N, D)), rng.standard_normal((N, E)), rng.standard_normal((N, O))
    _, dA, dB, _ = kernels.backward(dy, x, A, B, G, 0.5, backend=backend)
    for e, re in enumerate(ranks):
        assert np.array_equal(dA[e, re:], np.zeros_like(dA[e, re:])), f"expert {e}: padded A rows moved"
        assert np.array_equal(dB[e, :, re:], np.zeros_like(dB[e, :, re:])), f"expert {e}: padded B cols moved"


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_invariant_6_masks_equal_dense_masked_delta(backend):
    """Factor masks equal the dense diag(m_out) · B A · diag(m_in)."""
    rng = np.random.default_rng(8)
    N, D, O, r, E = 45, 16, 18, 5, 3
    x, A, B, G = (rng.standard_normal(s) for s in ((N, D), (E, r, D), (E, O, r), (N, E)))
    m_in, m_out = (rng.random((E, D)) < 0.5).astype(float), (rng.random((E, O)) < 0.5).astype(float)
    dW = m_out[:, :, None] * np.einsum("eor,erd->eod", B, A) * m_in[:, None, :]   # (E, O, D)
    want = np.einsum("ne,nd,eod->no", 0.5 * G, x, dW)
    check("masked y", kernels.forward(x, A, B, G, 0.5, m_in, m_out, backend=backend), want, 1e-12)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("form", ["dense", "topk", "index"])
def test_invariant_7_rows_are_independent(backend, form):
    rng = np.random.default_rng(9)
    N, D, O, r, E = 150, 33, 20, 4, 5
    x, A, B = rng.standard_normal((N, D)), rng.standard_normal((E, r, D)), rng.standard_normal((E, O, r))
    gates = make_gates(rng, form, N, E, np.float64)
    full = kernels.forward(x, A, B, gates, 0.5, backend=backend)
    rows = rng.permutation(N)[:37]
    sub = gates[rows] if not isinstance(gates, tuple) else (gates[0][rows], gates[1][rows])
    part = kernels.forward(x[rows], A, B, sub, 0.5, backend=backend)
    check("rows alone vs in the batch", part, full[rows], 1e-13)


# ---- the autograd Function against central differences (float64) ------------------------------------
def _numeric_grad(f, arr, h=1e-6):
    g = np.zeros_like(arr)
    for i in np.ndindex(arr.shape):
        old = arr[i]
        arr[i] = old + h
        up = f()
        arr[i] = old - h
        down = f()
        arr[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("form", ["dense", "topk", "index"])
@pytest.mark.parametrize("masks", [False, True])
def test_function_gradcheck(backend, form, masks):
    rng = np.random.default_rng(10)
    N, D, O, r, E = 6, 5, 4, 2, 3
    x, A, B = rng.standard_normal((N, D)), rng.standard_normal((E, r, D)), rng.standard_normal((E, O, r))
    s = rng.uniform(0.5, 2, E)
    m_in = (rng.random((E, D)) < 0.7).astype(float) if masks else None
    m_out = (rng.random((E, O)) < 0.7).astype(float) if masks else None
    R = rng.standard_normal((N, O))  # loss = Σ R ⊙ Δ
    gates = make_gates(rng, form, N, E, np.float64)
    if form == "dense":
        gw = gates
    elif form == "topk":
        gw = gates[1]
    tensors = {"x": Tensor(x, requires_grad=True), "A": Tensor(A, requires_grad=True), "B": Tensor(B, requires_grad=True)}
    if form == "dense":
        tensors["g"] = Tensor(gw, requires_grad=True)
        tgates = tensors["g"]
    elif form == "topk":
        tensors["g"] = Tensor(gw, requires_grad=True)
        tgates = (gates[0], tensors["g"])
    else:
        tgates = gates
    out = mixture_lowrank(tensors["x"], tensors["A"], tensors["B"], tgates, s, m_in, m_out, backend=backend)
    (out * Tensor(R)).sum().backward()

    arrays = {"x": x, "A": A, "B": B}
    if form != "index":
        arrays["g"] = gw

    def loss():
        g = arrays["g"] if form == "dense" else ((gates[0], arrays["g"]) if form == "topk" else gates)
        return float(np.sum(R * kernels.forward(arrays["x"], arrays["A"], arrays["B"], g, s, m_in, m_out,
                                                backend="numpy")))
    for name, arr in arrays.items():
        numeric = _numeric_grad(loss, arr)
        analytic = tensors[name].grad
        err = np.max(np.abs(analytic - numeric)) / max(1.0, np.max(np.abs(numeric)))
        assert err < 1e-6, f"{name}: gradient check relative error {err:.2e}"


def test_function_without_grad_inputs_returns_tensor():
    rng = np.random.default_rng(11)
    x, A, B = rng.standard_normal((4, 3)), rng.standard_normal((2, 2, 3)), rng.standard_normal((2, 5, 2))
    out = mixture_lowrank(Tensor(x), Tensor(A), Tensor(B), np.array([0, 1, -1, 1], np.int32), 2.0)
    assert isinstance(out, Tensor) and out.shape == (4, 5) and not out.requires_grad
    assert np.array_equal(out.data[2], np.zeros(5))


# ---- validation: mistakes raise in Python, never reach C ---------------------------------------------
def _valid(N=8, D=6, O=5, r=2, E=3, dtype=np.float32):
    rng = np.random.default_rng(12)
    return dict(x=rng.standard_normal((N, D)).astype(dtype), A=rng.standard_normal((E, r, D)).astype(dtype),
                B=rng.standard_normal((E, O, r)).astype(dtype))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_validation_messages(backend):
    p = _valid()
    G = np.ones((8, 3), np.float32)
    with pytest.raises(ValueError, match=r"A has shape \(3, 2, 7\) but x has 6 features; A must be \(E, r, D\)"):
        kernels.forward(p["x"], np.zeros((3, 2, 7), np.float32), p["B"], G, backend=backend)
    with pytest.raises(ValueError, match="B must be"):
        kernels.forward(p["x"], p["A"], np.zeros((3, 5, 4), np.float32), G, backend=backend)
    with pytest.raises(ValueError, match=r"G has shape \(8, 2\)"):
        kernels.forward(p["x"], p["A"], p["B"], G[:, :2], backend=backend)
    with pytest.raises(TypeError, match="A is float64 but x is float32"):
        kernels.forward(p["x"], p["A"].astype(np.float64), p["B"], G, backend=backend)
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.forward(p["x"].astype(np.int64), p["A"], p["B"], G, backend=backend)
    with pytest.raises(ValueError, match="expert 3 at position"):
        kernels.forward(p["x"], p["A"], p["B"], np.array([0, 1, 2, 3, 0, 0, 0, 0]), backend=backend)
    with pytest.raises(ValueError, match="expert -2"):
        kernels.forward(p["x"], p["A"], p["B"], np.array([0, 1, 2, -2, 0, 0, 0, 0]), backend=backend)
    idx = np.tile(np.array([[0, 1]], np.int32), (8, 1))
    idx[5] = [2, 2]
    with pytest.raises(ValueError, match="row 5 picks expert 2 twice"):
        kernels.forward(p["x"], p["A"], p["B"], (idx, np.ones((8, 2), np.float32)), backend=backend)
    with pytest.raises(TypeError, match="integers"):
        kernels.forward(p["x"], p["A"], p["B"], (idx.astype(np.float32), np.ones((8, 2), np.float32)),
                        backend=backend)
    with pytest.raises(ValueError, match="scale has shape"):
        kernels.forward(p["x"], p["A"], p["B"], G, np.ones(2), backend=backend)
    with pytest.raises(ValueError, match="in_mask has shape"):
        kernels.forward(p["x"], p["A"], p["B"], G, 1.0, np.ones((3, 5)), backend=backend)
    with pytest.raises(ValueError, match="dy has shape"):
        kernels.backward(np.ones((8, 4), np.float32), p["x"], p["A"], p["B"], G, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.forward(p["x"], p["A"], p["B"], G, backend="tpu")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_fast_path_checks_as_much_as_the_full_one(backend):
    """The common call (int32 indices, arrays already in shape) takes a shorter path through prepare; it
    must refuse exactly what the full checks refuse, with the same one-line messages."""
    p = _valid()
    bad = np.array([0, 1, 2, 3, 0, 0, 0, 0], np.int32)
    for gates in (bad, kernels.IndexGates(bad)):
        with pytest.raises(ValueError, match="expert 3 at position") as info:
            kernels.forward(p["x"], p["A"], p["B"], gates, backend=backend)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="expert -2"):
        kernels.forward(p["x"], p["A"], p["B"], np.array([0, -2, 0, 0, 0, 0, 0, 0], np.int32), backend=backend)
    idx, w = np.tile(np.array([[0, 1]], np.int32), (8, 1)), np.ones((8, 2), np.float32)
    idx[6] = [1, 1]
    with pytest.raises(ValueError, match="row 6 picks expert 1 twice"):
        kernels.forward(p["x"], p["A"], p["B"], (idx, w), backend=backend)
    idx[6] = [0, 3]
    with pytest.raises(ValueError, match="expert 3 at position"):
        kernels.forward(p["x"], p["A"], p["B"], kernels.TopKGates(idx, w), backend=backend)
    idx[6] = [-1, -1]  # two empty slots are allowed
    want = kernels.forward(p["x"], p["A"], p["B"], (idx, w), backend="numpy")
    check("empty slots", kernels.forward(p["x"], p["A"], p["B"], (idx, w), backend=backend), want, 1e-6)
    with pytest.raises(ValueError, match="idx has shape"):
        kernels.forward(p["x"], p["A"], p["B"], np.zeros(7, np.int32), backend=backend)
    with pytest.raises(ValueError, match="scale has shape"):
        kernels.forward(p["x"], p["A"], p["B"], np.zeros(8, np.int32), np.ones(2, np.float32), backend=backend)
    with pytest.raises(ValueError, match="out_mask has shape"):
        kernels.forward(p["x"], p["A"], p["B"], np.zeros(8, np.int32), 1.0, None, np.ones((3, 4), np.float32),
                        backend=backend)
    # plain LoRA's shared index is trusted without a range check because it cannot be changed
    from tinyslim.kernels.problem import zero_index
    z = zero_index(8)
    assert z is zero_index(8) and not z.any() and not z.flags.writeable
    with pytest.raises((ValueError, TypeError)):
        z[0] = 5
    with pytest.raises(ValueError):
        z.flags.writeable = True


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_empty_and_non_contiguous_inputs(backend):
    p = _valid(N=0)
    y = kernels.forward(p["x"], p["A"], p["B"], np.zeros((0, 3), np.float32), backend=backend)
    assert y.shape == (0, 5) and y.dtype == np.float32
    dx, dA, dB, dG = kernels.backward(np.zeros((0, 5), np.float32), p["x"], p["A"], p["B"],
                                      np.zeros((0, 3), np.float32), backend=backend)
    assert dx.shape == (0, 6) and np.array_equal(dA, np.zeros_like(dA)) and dG.shape == (0, 3)
    assert kernels.forward(p["x"], p["A"], p["B"], np.zeros(0, np.int32), backend=backend).shape == (0, 5)

    rng = np.random.default_rng(13)  # transposed / strided views give the same answer as copies
    xT = rng.standard_normal((12, 20)).T                 # (20, 12) F-ordered
    A = rng.standard_normal((3, 3, 24))[:, :, ::2]       # (3, 3, 12) strided
    Bs = rng.standard_normal((3, 7, 6))[:, :, ::2]       # (3, 7, 3) strided
    G = rng.standard_normal((40, 3))[::2]                # (20, 3) strided
    got = kernels.forward(xT, A, Bs, G, 0.5, backend=backend)
    want = kernels.forward(*(np.ascontiguousarray(a) for a in (xT, A, Bs, G)), 0.5, backend="numpy")
    check("strided inputs", got, want, 1e-12)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_non_finite_inputs_do_not_crash(backend):
    p = _valid(N=30, dtype=np.float64)
    x = p["x"].copy()
    x[0, 0], x[1, 1], x[2, 2] = np.nan, np.inf, -np.inf
    G = np.ones((30, 3))
    G[3, 0] = np.nan
    with np.errstate(all="ignore"):  # NumPy warns about the NaN arithmetic; the point is: no crash
        y = kernels.forward(x, p["A"], p["B"], G, backend=backend)
        grads = kernels.backward(np.full((30, 5), np.inf), x, p["A"], p["B"], G, backend=backend)
    assert y.shape == (30, 5) and all(g.shape for g in grads)
    assert np.isfinite(y[4:]).all(), "rows without non-finite inputs stay finite"


_MUTATIONS = ["shape_x", "shape_A", "shape_B", "dtype", "idx_high", "idx_low", "idx_float", "w_shape", "stride",
              "scale", "mask", "gates_kind", "order", "dup"]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@FEW
@given(data=st.data())
def test_fuzz_bindings_raise_never_crash(backend, data):
    """Random wrong shapes, dtypes, strides and indices: a result or ValueError/TypeError, nothing else."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    N, D, O, r, E, k = (data.draw(st.integers(0, 6)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6)),
                        data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)), 1)
    x, A, B = rng.standard_normal((N, D)), rng.standard_normal((E, r, D)), rng.standard_normal((E, O, r))
    form = data.draw(st.sampled_from(["dense", "topk", "index"]))
    gates = make_gates(rng, form, N, E, np.float64, k=k)
    scale, in_mask = 1.0, None
    mutations = data.draw(st.lists(st.sampled_from(_MUTATIONS), min_size=1, max_size=3))
    for m in sorted(mutations, key=lambda m: m == "gates_kind"):  # replace the gates last
        bump = data.draw(st.sampled_from([-1, 1, 2]))
        if m == "shape_x":
            x = rng.standard_normal((N, max(D + bump, 0)))
        elif m == "shape_A":
            A = rng.standard_normal(data.draw(st.sampled_from([(E, r), (E, r, D + 1), (E + 1, r, D), (r, D)])))
        elif m == "shape_B":
            B = rng.standard_normal(data.draw(st.sampled_from([(E, O, r + 1), (E + 1, O, r), (O, r)])))
        elif m == "dtype":
            x = x.astype(data.draw(st.sampled_from([np.float32, np.int32, np.complex64, np.float16, bool])))
        elif m == "idx_high" and form != "dense" and N:
            gates = (gates[0] + E, gates[1]) if form == "topk" else gates + E
        elif m == "idx_low" and form != "dense" and N:
            gates = (gates[0] - 3, gates[1]) if form == "topk" else gates - 3
        elif m == "idx_float" and form != "dense":
            gates = (gates[0].astype(float), gates[1]) if form == "topk" else gates.astype(float)
        elif m == "w_shape" and form == "topk":
            gates = (gates[0], rng.standard_normal((N, k + 1)))
        elif m == "stride":
            x = np.repeat(x, 2, axis=1)[:, ::2]
        elif m == "scale":
            scale = data.draw(st.sampled_from([np.ones(E + 1), np.ones((E, 1)), "a", None, np.nan]))
        elif m == "mask":
            in_mask = data.draw(st.sampled_from([np.ones((E, D + 1)), np.ones(E), "mask", np.ones((E, D), bool)]))
        elif m == "gates_kind":
            gates = data.draw(st.sampled_from([None, 3, [1, 2], (1,), (1, 2, 3), np.ones((N, E, 1)), "g"]))
        elif m == "order":
            x, A, B = np.asfortranarray(x), A[..., ::-1], B.astype(B.dtype.newbyteorder(">"))
        elif m == "dup" and form == "topk" and N and E > 1:
            idx = np.zeros((N, 2), np.int32)
            gates = (idx, np.ones((N, 2)))
    try:
        y = kernels.forward(x, A, B, gates, scale, in_mask, backend=backend)
        kernels.backward(np.ones_like(y), x, A, B, gates, scale, in_mask, backend=backend)
    except (ValueError, TypeError):
        pass


# ---- backend selection and the report ------------------------------------------------------------------
def test_backend_selection(monkeypatch):
    monkeypatch.delenv("TINYSLIM_BACKEND", raising=False)
    assert kernels.get_backend() == ("cpu" if kernels.available_backends()["cpu"][0] else "numpy")
    monkeypatch.setenv("TINYSLIM_BACKEND", "numpy")
    assert kernels.get_backend() == "numpy"
    monkeypatch.setenv("TINYSLIM_BACKEND", "gpu")
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.get_backend()
    if not kernels.available_backends()["cuda"][0]:
        with pytest.raises(RuntimeError, match="cuda backend is unavailable"):
            kernels.get_backend("cuda")
    assert set(kernels.available_backends()) == {"numpy", "cpu", "cuda"}
    assert any("none (unknown backend" in line for line in kernels.info_lines())
    monkeypatch.delenv("TINYSLIM_BACKEND")
    lines = kernels.info_lines()
    assert all(isinstance(line, str) for line in lines) and any("OpenMP" in line for line in lines)


@CPU
@pytest.mark.parametrize("form", ["dense", "topk", "index"])
def test_cpu_two_threads_split_every_phase(form):
    """A problem big enough for two threads in every phase of a call: N·k·r·(D+O) multiply-adds far above
    the 2·2²¹ that two threads need, and E·r·(D+O) = 16·16·400 > 65536, so the factors are packed and dA,
    dB reduced by both threads too (the phases wait for each other). Two threads agree with one (y, dx
    bit for bit: every row belongs to one thread) and with the float64 reference."""
    rng = np.random.default_rng(3)
    N, D, O, r, E = 1500, 240, 160, 16, 16
    prob = dict(x=rng.standard_normal((N, D)), A=rng.standard_normal((E, r, D)), B=rng.standard_normal((E, O, r)),
                gates=make_gates(rng, form, N, E, np.float64), scale=rng.uniform(0.5, 2, E),
                in_mask=(rng.random((E, D)) < 0.8).astype(np.float64),
                out_mask=(rng.random((E, O)) < 0.8).astype(np.float64), dy=rng.standard_normal((N, O)))
    for name, b, w in zip(NAMES, two_threads_match_one(prob), run(prob, "numpy")):
        check(name, b, w, 1e-12)


@CPU
def test_kernel_versions_by_name(monkeypatch):
    """'cpu' runs the newest version, 'cpu.v1' … one by number (also through TINYSLIM_BACKEND); an unknown
    version is a one-line error; v1 and the newest agree on a problem big enough to use threads."""
    from tinyslim.kernels import cpu
    assert cpu.LATEST == max(cpu.VERSIONS) == cpu.lib.tsl_kernel_versions() and 1 in cpu.VERSIONS
    rng = np.random.default_rng(5)
    x, A, B = rng.standard_normal((600, 40)), rng.standard_normal((3, 4, 40)), rng.standard_normal((3, 50, 4))
    gates = make_gates(rng, "topk", 600, 3, np.float64)
    want = kernels.forward(x, A, B, gates, 0.5, backend="numpy")
    for v in cpu.VERSIONS:
        check(f"v{v}", kernels.forward(x, A, B, gates, 0.5, backend=f"cpu.v{v}"), want, 1e-10)
    monkeypatch.setenv("TINYSLIM_BACKEND", "cpu.v1")
    check("TINYSLIM_BACKEND=cpu.v1", kernels.forward(x, A, B, gates, 0.5), want, 1e-10)
    for bad in ("cpu.v0", f"cpu.v{cpu.LATEST + 1}", "cpu.vx", "numpy.v1"):
        with pytest.raises(ValueError) as info:
            kernels.forward(x, A, B, gates, 0.5, backend=bad)
        assert "\n" not in str(info.value) and ("version" in str(info.value) or "unknown backend" in str(info.value))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("form", ["dense", "topk", "index"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_long_sums_are_blocked_correctly(backend, form, dtype):
    """D, O and the token count longer than the C kernel's inner blocks (v3: 64 rows of a sum at a time),
    ragged, with ranks on both micro-kernels and rank sides wide enough for the blocked panels."""
    rng = np.random.default_rng(11)
    for r, E in ((3, 2), (12, 3), (17, 5)):
        N, D, O = 150, 300, 261
        prob = dict(x=rng.standard_normal((N, D)), A=rng.standard_normal((E, r, D)), B=rng.standard_normal((E, O, r)),
                    gates=make_gates(rng, form, N, E, np.float64), scale=rng.uniform(0.5, 2, E),
                    in_mask=(rng.random((E, D)) < 0.7).astype(np.float64), out_mask=None,
                    dy=rng.standard_normal((N, O)))
        want = run(prob, "numpy")
        prob = {k: (v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else
                    (v[0], v[1].astype(dtype)) if isinstance(v, tuple) else v) for k, v in prob.items()}
        for name, got, w in zip(NAMES, run(prob, backend), want):
            check(f"{name} r={r}", got, w, TOL[dtype])


@CPU
def test_num_threads_roundtrip():
    before = kernels.get_num_threads()
    try:
        kernels.set_num_threads(1)
        assert kernels.get_num_threads() == 1
    finally:
        kernels.set_num_threads(before)
    assert kernels.get_num_threads() == before


def test_import_without_extension():
    """With no compiled module the package imports, reports why, and runs on NumPy."""
    code = ("import sys; sys.modules['tinyslim.kernels._lowrank_cpu'] = None\n"
            "import numpy as np\n"
            "from tinyslim import kernels\n"
            "ok, why = kernels.available_backends()['cpu']\n"
            "assert not ok and 'not found' in why, why\n"
            "assert kernels.get_backend() == 'numpy'\n"
            "y = kernels.forward(np.ones((2, 3)), np.ones((1, 2, 3)), np.ones((1, 4, 2)), np.zeros(2, np.int32))\n"
            "assert np.allclose(y, 6.0)\n"
            "print('\\n'.join(kernels.info_lines()))\n")
    env = dict(os.environ)
    env.pop("TINYSLIM_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "✗ cpu" in out.stdout


def test_header_is_cdef_parsable():
    cffi = pytest.importorskip("cffi")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = __import__("importlib.util").util.spec_from_file_location("build_cpu", os.path.join(root, "ext", "build_cpu.py"))
    mod = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ffi = cffi.FFI()
    ffi.cdef(mod._cdef())
    assert "tsl_cuda_forward" not in mod._cdef(), "the CUDA section must not reach the CPU module's cdef"


def test_benchmark_smoke(tmp_path, capsys):
    """benchmarks/bench_kernels.py runs end to end on the smallest shape and writes its JSON."""
    import importlib.util
    import json
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(root, "benchmarks", "bench_kernels.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--only", "lora N1 ", "--runs", "3", "--warmup", "1", "--json", str(out)]) == 0
    if kernels.available_backends()["cpu"][0]:
        result = json.loads(out.read_text())
        assert result["rows"] and result["rows"][0]["errors"]["ext"]["y"] < 1e-5
        assert result["blocked"] is False and result["rows"][0]["times"]["ext"]["fwd"]["runs"] >= 3
        assert bench.main(["--only", "lora N1 ", "--runs", "3", "--warmup", "1", "--blocked", "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["blocked"] is True and result["rows"][0]["times"]["ext"]["fwd"]["runs"] >= 3
        assert "back to back" in capsys.readouterr().out
    assert bench.main(["--device", "cuda"]) == 0  # without a GPU: says why, exits 0


@pytest.mark.skipif(not kernels.available_backends()["cpu"][0], reason="the C extension is not built")
@pytest.mark.parametrize("gates", ["index", "dense"])
def test_cpu_backward_is_bit_identical_run_to_run_on_a_parallel_sized_problem(gates):
    """Large enough to run on several threads: every thread sums its own dA, dB partials, so the
    block → thread map must be fixed (schedule(static)), or the float sums change from run to run."""
    rng = np.random.default_rng(0)
    N, D, O, r, E = 4096, 256, 256, 8, 4
    x = rng.standard_normal((N, D)).astype(np.float32)
    A = rng.standard_normal((E, r, D)).astype(np.float32)
    B = rng.standard_normal((E, O, r)).astype(np.float32)
    dy = rng.standard_normal((N, O)).astype(np.float32)
    g = rng.integers(0, E, N).astype(np.int32) if gates == "index" else rng.random((N, E)).astype(np.float32)
    before = kernels.get_num_threads()
    try:
        kernels.set_num_threads(2)
        runs = [kernels.backward(dy, x, A, B, g, 2.0, backend="cpu") for _ in range(6)]
    finally:
        kernels.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0][:3], other[:3]):
            assert np.array_equal(a, b)
