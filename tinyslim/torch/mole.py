"""MoLE — Mixture of LoRA Experts on the torch engine, the twin of tinyslim.adapters.mole (same MoleConfig).

Shape legend: N tokens, D in, O out, r rank, E = number of frozen source LoRAs, B batch, T time.

E frozen LoRAs per adapted linear; a gate e ((E·O)×E) and ρ = log τ are the only trainable tensors:

    u_i = s_i · B_i A_i x                          (N, O) each                (frozen branch outputs)
    U   = LayerNorm([u_1; …; u_E])                 (N, E·O)                   (no affine, eps 1e-5)
    U   ← P U   with P (N, N) the pool: "token" I, "sequence" the mean over the sequence's real tokens
          (one gate per sequence), "prefix" the running mean over the real tokens s ≤ t (causal)
    G   = softmax(eᵀ U / exp(ρ))                   (N, E)
    G'_i = G_i·1[i∈S] / Σ_{j∈S} G_j                (the inference mask S; G' = G without one)
    y   = W0 x + b0 + Σ_i G'_i u_i

    L   = CE + balance_coef · L_bal,   L_bal = −Σ_i log q_i,  q_i = mean of G_i over every gate and real token

The u_i are computed once per layer (torch einsums) and feed both the gate and the weighted sum; the
NumPy layer makes two kernel passes instead, the same maths. Every hook of the method (the per-block
gate of ``gate_granularity="layer"``, the padding mask, masking, gate_means) is the NumPy class's.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as TF

from .. import adapters
from ..adapters.mole import check_subset
from .merging import LoraPoolLinear
from .method import TorchMethod

__all__ = ["MoleLinear", "Mole", "balance_loss"]


class MoleLinear(LoraPoolLinear):
    """E frozen LoRAs mixed by a learned softmax gate over their own (normalised) outputs."""

    adapter_names = ("lora_A", "lora_B", "gate_e", "log_tau")
    trainable_names = ("gate_e", "log_tau")

    def __init__(self, base_layer, n_sources: int, r: int, scales, config, streams):
        super().__init__(base_layer, n_sources, r, scales)
        E, O = n_sources, self.out_features
        self.pool = config.gate_pool
        self.gate_e = self.new_parameter(streams["init"].normal(0.0, config.gate_init_std, (E * O, E)))  # e
        self.log_tau = self.new_parameter(np.full(1, np.log(config.tau_init)))  # ρ
        self._gate_owner = ()  # (owner,) in the "layer" variant (a tuple: not registered as a child module)
        self.keep = None if config.mask is None else np.asarray(check_subset(config.mask, E))  # masking subset S
        self.token_mask = None  # (B, T) 0/1: real tokens (set by the Method around a forward pass)
        self.current_gate = None  # G (N, E) of the last forward, before masking
        self._lead = None

    def share_gate_of(self, owner: "MoleLinear") -> None:
        """The "layer" variant: drop this layer's own gate and use `owner`'s (same tokens, same block)."""
        self._gate_owner = (owner,)
        self.gate_e = self.log_tau = None
        self.adapter_names = ("lora_A", "lora_B")
        self.trainable_names = ()

    @property
    def owns_gate(self) -> bool:
        return not self._gate_owner

    @property
    def gate_source(self) -> "MoleLinear":
        return self._gate_owner[0] if self._gate_owner else self

    def forward(self, x):  # x (B, T, D): remember (B, T) for sequence pooling
        self._lead = tuple(x.shape[:-1])
        return super().forward(x)

    # ---- 1. the branch outputs u_i -------------------------------------------------------------------
    def branch_outputs(self, x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """U = [u_1; …; u_E] per token (N, E·O), from x (N, D) or from u (E, N, O) already computed."""
        u = self.source_outputs(x) if u is None else u  # (E, N, O)
        return u.transpose(0, 1).reshape(u.shape[1], -1)

    # ---- 2. the gate G = softmax(eᵀ LayerNorm(U) / τ) ------------------------------------------------
    def gate(self, x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:  # -> G (N, E)
        U = self.branch_outputs(x, u)
        U = TF.layer_norm(U, U.shape[-1:], eps=1e-5)  # (N, E·O), no affine
        seq_of_token = None
        if self.pool in ("sequence", "prefix"):
            U, seq_of_token = self._pool_sequences(U)  # (B, E·O), or (N, E·O) for "prefix"
        eps = U @ self.gate_e  # ε (N, E) or (B, E)
        G = torch.softmax(eps / torch.exp(self.log_tau), dim=-1)  # τ = exp(ρ) > 0
        return G if seq_of_token is None else G[seq_of_token]  # one gate per sequence, broadcast to its tokens

    def _pool_sequences(self, U: torch.Tensor):
        N = U.shape[0]
        B, T = (self._lead if self._lead is not None and len(self._lead) == 2 else (1, N))
        real = np.ones((B, T)) if self.token_mask is None else np.asarray(self.token_mask, dtype=np.float64)
        if real.shape != (B, T):
            raise ValueError(f"token_mask has shape {real.shape} but the batch is {(B, T)}")
        if self.pool == "prefix":  # token t: the mean over the real tokens s ≤ t (what generation sees)
            seen = np.tril(np.ones((T, T)))[None] * real[:, None, :]  # (B, T, T): [s ≤ t]·real[s]
            weights = self.tensor(seen / np.maximum(seen.sum(axis=2, keepdims=True), 1))
            return torch.matmul(weights, U.reshape(B, T, -1)).reshape(N, -1), None  # (N, E·O)
        weights = self.tensor(real / np.maximum(real.sum(axis=1, keepdims=True), 1))  # mean over real tokens
        pooled = torch.matmul(weights[:, None, :], U.reshape(B, T, -1)).reshape(B, -1)  # (B, E·O)
        return pooled, torch.arange(B, device=U.device).repeat_interleave(T)

    # ---- 3. masking and the weighted sum -------------------------------------------------------------
    def masked(self, G: torch.Tensor) -> torch.Tensor:
        """G'_i = G_i·1[i∈S] / Σ_{j∈S} G_j (no-op without a mask)."""
        if self.keep is None:
            return G
        m = torch.zeros(self.n_sources, dtype=G.dtype, device=G.device)
        m[torch.as_tensor(self.keep, device=G.device)] = 1
        Gm = G * m
        return Gm / Gm.sum(dim=1, keepdim=True)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:  # x (N, D) -> Δ (N, O)
        u = self.source_outputs(x)  # (E, N, O)
        if self.owns_gate:
            self.current_gate = self.gate(x, u)
            G = self.current_gate
        else:
            G = self.gate_source.current_gate
            if G is None or G.shape[0] != x.shape[0]:
                raise RuntimeError("the block's gate was not computed for this batch: in the 'layer' variant the "
                                   "block's first adapted linear must run before the others")
        return torch.einsum("ne,eno->no", self.masked(G), u)  # Σ_i G'_i u_i

    def gate_array(self) -> np.ndarray:  # G (N, E) of the last forward, before masking, as NumPy
        return self.current_gate.detach().cpu().numpy()

    def delta_weight(self):
        raise NotImplementedError("MoLE cannot be merged into W0: its gates depend on the input")

    def extra_repr(self):
        share = "" if self.owns_gate else ", gate shared with the block's first adapted linear"
        return f"{super().extra_repr()}, pool={self.pool}{share}"


def balance_loss(gates, real=None) -> torch.Tensor:
    """L_bal = −Σ_i log q_i, q_i = mean of G_i over every gate in `gates` (tensors (N, E)) and every real
    token (`real` (N,) 0/1, None = all)."""
    N = gates[0].shape[0]
    real = np.ones(N) if real is None else np.asarray(real).reshape(-1)
    w = torch.as_tensor(real, dtype=gates[0].dtype, device=gates[0].device)[:, None]  # (N, 1)
    M = len(gates) * max(float(real.sum()), 1.0)  # (gate, token) pairs
    q = sum((G * w).sum(dim=0) for G in gates) / M  # (E,)
    return -torch.log(q).sum()


class Mole(adapters.Mole, TorchMethod):
    """MoLE on torch: train only the gates (e, ρ) of every adapted layer on the composition data."""

    balance_loss = staticmethod(balance_loss)

    def make_layer(self, base_layer, streams):
        s = self.config.sources
        return MoleLinear(base_layer, s.E, s.r_max, s.scales, self.config, streams)
