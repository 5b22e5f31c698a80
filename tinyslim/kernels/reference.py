"""The low-rank mixture op in plain NumPy: the oracle every backend is tested against (docs/methods.md §8).

Shape legend: N tokens, D in features, O out features, r rank, E experts, k top-k.
    x (N, D)   A (E, r, D)   B (E, O, r)   G (N, E)   s (E)   m_in (E, D)   m_out (E, O)   y, dy (N, O)

Written for clarity: the dense reference forward of §8.2, split into one pass per expert,

    h_{n,e} = A'_e x_n      u_{n,e} = B'_e h_{n,e}      y_n = Σ_e G[n,e] · s_e · u_{n,e}

with A'_e = A_e ⊙ m_in_e and B'_e = m_out_e ⊙ B_e. An entry with G[n,e]·s_e = 0 is *skipped* (its
rows are never gathered), not multiplied by zero: a row whose gates are all zero is exactly +0.0,
even when x, A or B hold NaN (§8.1). The top-k and index forms are the same op on the equivalent
dense G (``dense_gates``). Works in the dtype it is given (float32 or float64).
"""
from __future__ import annotations

import numpy as np

__all__ = ["masked_factors", "dense_gates", "forward", "backward"]


def masked_factors(A, B, in_mask=None, out_mask=None):
    """A'_e = A_e ⊙ m_in_e (columns), B'_e = m_out_e ⊙ B_e (rows)."""
    Am = A if in_mask is None else A * in_mask[:, None, :]   # (E, r, D)
    Bm = B if out_mask is None else B * out_mask[:, :, None]  # (E, O, r)
    return Am, Bm


def dense_gates(form: str, idx, w, N: int, E: int, dtype):
    """The dense G (N, E) equivalent to a gate form, and `listed` (N, E): the entries that have a dgate.

    dense: G = w, every entry listed.  top-k: G[n, idx[n,j]] = w[n,j], the picked entries listed
    (idx −1 = empty slot).  index: G[n, idx[n]] = 1 (−1 = base only), nothing listed (no dgate).
    """
    if form == "dense":
        return np.asarray(w, dtype=dtype), np.ones((N, E), dtype=bool)
    G = np.zeros((N, E), dtype=dtype)
    listed = np.zeros((N, E), dtype=bool)
    if form == "topk":
        n, j = np.nonzero(idx >= 0)
        G[n, idx[n, j]] = w[n, j]
        listed[n, idx[n, j]] = True
    elif form == "index":
        n = np.flatnonzero(idx >= 0)
        G[n, idx[n]] = 1
    else:
        raise ValueError(f"unknown gate form {form!r}")
    return G, listed


def forward(x, A, B, G, scale, in_mask=None, out_mask=None):
    """y (N, O) = Σ_e G[:, e] · s_e · (x A'_eᵀ) B'_eᵀ, skipping entries with G·s = 0."""
    N, E = G.shape
    s = np.broadcast_to(np.asarray(scale, dtype=x.dtype), (E,))
    Am, Bm = masked_factors(A, B, in_mask, out_mask)
    y = np.zeros((N, B.shape[1]), dtype=x.dtype)
    for e in range(E):
        c = G[:, e] * s[e]                              # (N,) coefficient of expert e per token
        rows = np.flatnonzero(c)                        # the tokens that use expert e
        h = x[rows] @ Am[e].T                           # (n_e, r)  h = A'_e x
        y[rows] += c[rows, None] * (h @ Bm[e].T)        # (n_e, O)  u = B'_e h
    return y


def backward(dy, x, A, B, G, scale, in_mask=None, out_mask=None, listed=None):
    """(dx, dA, dB, dG) for dy (N, O), §8.3; dx is the kernel part only (no W0ᵀ dy).

    dG is computed for the entries in `listed` (N, E) bool (default: all), the others are 0.
    """
    N, E = G.shape
    s = np.broadcast_to(np.asarray(scale, dtype=x.dtype), (E,))
    Am, Bm = masked_factors(A, B, in_mask, out_mask)
    dx, dA, dB, dG = np.zeros_like(x), np.zeros_like(A), np.zeros_like(B), np.zeros_like(G)
    for e in range(E):
        # dG[n,e] = s_e ⟨g, h⟩ with g = B'_eᵀ dy_n: ⟨dy, B'h⟩ moved into rank space, O(r) per entry
        want = np.arange(N) if listed is None else np.flatnonzero(listed[:, e])
        h = x[want] @ Am[e].T                           # (n_w, r)
        g = dy[want] @ Bm[e]                            # (n_w, r)
        dG[want, e] = s[e] * np.sum(g * h, axis=1)

        c = G[:, e] * s[e]
        rows = np.flatnonzero(c)                        # only active entries reach x, A, B
        h = x[rows] @ Am[e].T                           # (n_e, r)
        cg = c[rows, None] * (dy[rows] @ Bm[e])         # (n_e, r)  c · g
        dx[rows] += cg @ Am[e]                          # y depends on x through c·B'A'x
        dA[e] = cg.T @ x[rows]                          # the same product, differentiated in A'
        dB[e] = dy[rows].T @ (c[rows, None] * h)        # y is linear in B' with coefficient c·h
    if in_mask is not None:
        dA *= in_mask[:, None, :]                       # A' = A ⊙ m_in, so dA = dA' ⊙ m_in
    if out_mask is not None:
        dB *= out_mask[:, :, None]                      # B' = m_out ⊙ B, so dB = dB' ⊙ m_out
    return dx, dA, dB, dG
