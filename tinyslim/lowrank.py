"""The low-rank mixture op as an autograd Function (docs/methods.md §8), dispatching to a kernel backend.

Shape legend: N tokens, D in, O out, r rank, E experts, k top-k.
    x (N, D)   A (E, r, D)   B (E, O, r)   Δ (N, O)
    gates: dense G (N, E) Tensor | top-k (idx (N, k) int array, w (N, k) Tensor) | index idx (N,) int array

    Δ_n = Σ_e g[n,e] · s_e · B'_e A'_e x_n        A'_e = A_e ⊙ m_in_e,  B'_e = m_out_e ⊙ B_e

The adapted linear layer adds its frozen part outside: Y = X W0ᵀ + b0 + Δ. Gradients reach x, A, B
and the gate weights (G or w); the expert indices, `scale` and the masks are constants.
"""
from __future__ import annotations

import numpy as np

from . import kernels
from .autograd import Function, Tensor
from .kernels.gates import DenseGates, IndexGates, TopKGates, as_gates
from .kernels.problem import zero_index

__all__ = ["MixtureLowRank", "mixture_lowrank", "lowrank"]


class MixtureLowRank(Function):
    """forward(x, A, B[, gate_w]) with the gate form and constants as keywords; see mixture_lowrank."""

    @staticmethod
    def forward(ctx, x, A, B, gate_w=None, *, form, idx=None, scale=1.0, in_mask=None, out_mask=None,
                backend=None):
        gates = DenseGates(gate_w) if form == "dense" else (TopKGates(idx, gate_w) if form == "topk" else IndexGates(idx))
        ctx.gates = gates
        ctx.args = dict(scale=scale, in_mask=in_mask, out_mask=out_mask, backend=backend)
        ctx.save_for_backward(x, A, B)
        return kernels.forward(x, A, B, gates, **ctx.args)

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad) + (False,) * (4 - len(ctx.needs_input_grad))
        # every piece is linear in the others given the rest (Δ = Σ c · B'A'x), so each gradient is the
        # upstream gradient pulled back through one factor; the kernel does all four in one pass:
        #   dx = Σ c·A'ᵀB'ᵀdy,  dA = (Σ c·B'ᵀdy xᵀ) ⊙ m_in,  dB = (Σ c·dy (A'x)ᵀ) ⊙ m_out,  dg = s⟨B'ᵀdy, A'x⟩
        dx, dA, dB, dg = kernels.backward(grad_out, x, A, B, ctx.gates, needs=needs, **ctx.args)
        grads = (dx, dA, dB, dg)
        return grads[:len(ctx.needs_input_grad)]


def _data(t):
    return t.data if isinstance(t, Tensor) else t


def mixture_lowrank(x, A, B, gates, scale=1.0, in_mask=None, out_mask=None, *, backend=None) -> Tensor:
    """Δ (N, O) = Σ_e g[n,e] · s_e · B'_e A'_e x_n as a Tensor that back-propagates into x, A, B, gates.

    gates: a dense G (N, E) Tensor; a pair (idx (N, k) int array, w (N, k) Tensor) for top-k (idx −1 =
    empty slot); or an (N,) int array of per-token adapter indices (−1 = base only). `scale` is a
    number or an (E,) array; the masks are (E, D) and (E, O) arrays or None. Rows whose gates are all
    zero (or whose index is −1) are exactly 0. Inputs are made C-contiguous (copied if needed).
    """
    g = as_gates(gates if not isinstance(gates, Tensor) else DenseGates(gates))
    consts = dict(scale=_data(scale), in_mask=_data(in_mask), out_mask=_data(out_mask), backend=backend)
    if isinstance(g, DenseGates):
        return MixtureLowRank.apply(x, A, B, g.G, form="dense", **consts)
    if isinstance(g, TopKGates):
        return MixtureLowRank.apply(x, A, B, g.w, form="topk", idx=np.asarray(_data(g.idx)), **consts)
    return MixtureLowRank.apply(x, A, B, form="index", idx=np.asarray(_data(g.idx)), **consts)


def lowrank(x, A, B, scale=1.0, *, backend=None) -> Tensor:
    """Δ (N, O) = s · (x Aᵀ) Bᵀ: one adapter, A (r, D) and B (O, r), on every token (plain LoRA).

    The mixture above with E = 1 and every token on adapter 0, so the fast kernels serve it too."""
    every_token = zero_index(x.shape[0])  # read-only zeros: trusted without a range check
    return mixture_lowrank(x, A.reshape(1, *A.shape), B.reshape(1, *B.shape), every_token, scale, backend=backend)
