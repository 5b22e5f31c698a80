"""MoLE — Mixture of LoRA Experts (Wu, Huang, Wei; arXiv 2404.13628), docs/methods.md §4.

Shape legend: N tokens, D in, O out, r rank, E = number of frozen source LoRAs (the paper's N),
B batch, T time.

E frozen LoRAs (A_i, B_i, s_i) per adapted linear; a learned gate e ((E·O)×E) and ρ = log τ are the
only trainable parameters. Per token (the default gate):

    u_i = s_i · B_i A_i x                          ∈ ℝ^O, i = 1..E       (frozen branch outputs)
    U   = LayerNorm([u_1; u_2; …; u_E])            ∈ ℝ^{E·O}             (no affine, eps 1e-5)
    ε   = eᵀ U                                     ∈ ℝ^E
    G   = softmax(ε / τ),   τ = exp(ρ) > 0         ∈ ℝ^E  (dense, sums to 1)
    y   = W0 x + b0 + Σ_i G_i · u_i

Two passes through the kernel: the u_i are materialised first (the index form on E stacked copies of
X, copy i using LoRA i), then the gate, then the weighted sum (the dense form with G). Gradients reach
e and ρ, and x through both the weighted sum and the gate path (U depends on x).

Variants: ``gate_granularity="layer"``: one gate per transformer block, computed from the u_i of the
block's first adapted linear (forward order) and applied per token to every adapted linear of the
block; ``gate_pool="sequence"``: U is mean-pooled over each sequence's (non-pad) tokens, one gate per
sequence, broadcast to its tokens.

Losses (the balance loss averages over every gate, every non-pad token, the whole batch):

    q_i   = mean of G_i over all gates (layers) and tokens          L_bal = −Σ_i log q_i  (≥ E·log E)
    L     = CE + balance_coef · L_bal                               balance_coef = 0.5

Inference masking of a subset S (no retraining): G'_i = G_i·1[i∈S] / Σ_{j∈S} G_j. With S = {j},
G'_j = 1.0 exactly and the layer is plain LoRA j. MoLE cannot be merged (the gates depend on x).

    from tinyslim.adapters import Mole
    mole = Mole.from_methods(trained_lora_methods)     # or Mole(lora_sources=[states…], lora_scales=2.0)
    mole.attach(base_copy, seed=0)                     # then the runner's contract: loss / Adam / after_step
    with mole.masked([0, 2]), mole.evaluating():       # LoRA 1 switched off at inference
        logits, _ = mole.model(x)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from ..autograd import Tensor
from ..lowrank import mixture_lowrank
from ..nn import Linear, Parameter
from .base import Streams, token_context
from .merging import FrozenPoolMethod, LoraPoolConfig, LoraPoolLinear, sources_from_methods

__all__ = ["MoleConfig", "MoleLinear", "Mole", "balance_loss"]


@dataclass
class MoleConfig(LoraPoolConfig):
    """MoLE (docs/methods.md §4.6); lora_sources / lora_scales as in LoraPoolConfig."""

    gate_granularity: str = "token"  # a gate per adapted linear; "layer": one per block
    gate_pool: str = "token"  # "sequence": mean-pool U over the sequence, one gate per sequence
    gate_init_std: float = 0.01  # e ~ N(0, std²), from the `init` stream
    tau_init: float = 1.0  # ρ = log τ starts at log tau_init
    balance_coef: float = 0.5  # weight of L_bal
    mask: list | None = None  # subset of source indices kept at inference (None: all)
    pad_token_id: int | None = None  # input positions holding it are left out of L_bal and of sequence pooling

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("gate_granularity", ("token", "layer")), ("gate_pool", ("token", "sequence", "prefix"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MoleConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.tau_init > 0 or self.gate_init_std < 0 or self.balance_coef < 0:
            raise ValueError(f"MoleConfig needs tau_init > 0, gate_init_std >= 0, balance_coef >= 0; got "
                             f"{self.tau_init}, {self.gate_init_std}, {self.balance_coef}")
        if self.mask is not None:
            check_subset(self.mask, self.sources.E)

    def make_layer(self, base_layer: Linear, streams: Streams) -> "MoleLinear":
        s = self.sources
        return MoleLinear(base_layer, s.E, s.r_max, s.scales, self, streams)


def check_subset(subset, E: int) -> list:
    subset = sorted(int(i) for i in subset)
    if not subset or len(set(subset)) != len(subset) or subset[0] < 0 or subset[-1] >= E:
        raise ValueError(f"a mask is a non-empty subset of distinct source indices in [0, {E}), got {subset}")
    return subset


class MoleLinear(LoraPoolLinear):
    """E frozen LoRAs mixed by a learned softmax gate over their own (normalised) outputs."""

    adapter_names = ("lora_A", "lora_B", "gate_e", "log_tau")
    trainable_names = ("gate_e", "log_tau")

    def __init__(self, base_layer: Linear, n_sources: int, r: int, scales, config: MoleConfig, streams: Streams):
        super().__init__(base_layer, n_sources, r, scales)
        E, O, dtype = n_sources, self.out_features, base_layer.weight.dtype
        self.pool = config.gate_pool
        self.gate_e = Parameter(streams["init"].normal(0.0, config.gate_init_std, (E * O, E)).astype(dtype))  # e
        self.log_tau = Parameter(np.full(1, np.log(config.tau_init), dtype=dtype))  # ρ
        self._gate_owner = ()  # (owner,) in the "layer" variant: the block's first adapted linear (a tuple, so
        # that the owner is not taken for a child module)
        self.keep = None if config.mask is None else np.asarray(check_subset(config.mask, E))  # masking subset S
        self.token_mask = None  # (B, T) 0/1: real tokens (set by the Method around a forward pass)
        self.current_gate = None  # G (N, E) of the last forward, before masking (Tensor)
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
        """The layer whose gate this one uses: itself, or the block's first adapted linear."""
        return self._gate_owner[0] if self._gate_owner else self

    def forward(self, x):  # x (B, T, D): remember (B, T) for sequence pooling
        self._lead = x.shape[:-1]
        return super().forward(x)

    # ---- 1. the branch outputs u_i -----------------------------------------------------------------
    def branch_outputs(self, x: Tensor) -> Tensor:  # x (N, D) -> U = [u_1; …; u_E] per token (N, E·O)
        E, N, O = self.n_sources, x.shape[0], self.out_features
        stacked = F.concat([x] * E, axis=0)  # (E·N, D): copy i goes through LoRA i
        lora_of_row = np.repeat(np.arange(E, dtype=np.int32), N)  # (E·N,)
        u = mixture_lowrank(stacked, self.lora_A, self.lora_B, lora_of_row, scale=self.scales)  # (E·N, O)
        return u.reshape(E, N, O).transpose(1, 0, 2).reshape(N, E * O)

    # ---- 2. the gate G = softmax(eᵀ LayerNorm(U) / τ) ----------------------------------------------
    def gate(self, x: Tensor) -> Tensor:  # x (N, D) -> G (N, E)
        U = F.layer_norm(self.branch_outputs(x), eps=1e-5)  # (N, E·O), no affine
        seq_of_token = None
        if self.pool in ("sequence", "prefix"):
            U, seq_of_token = self._pool_sequences(U)  # (B, E·O), or (N, E·O) for "prefix"
        eps = U @ self.gate_e  # ε (N, E) or (B, E)
        tau = F.exp(self.log_tau)  # τ = exp(ρ) > 0
        G = F.softmax(eps / tau, axis=-1)
        return G if seq_of_token is None else G[seq_of_token]  # one gate per sequence, broadcast to its tokens

    def _pool_sequences(self, U: Tensor):
        N = U.shape[0]
        B, T = (self._lead if self._lead is not None and len(self._lead) == 2 else (1, N))
        real = np.ones((B, T)) if self.token_mask is None else np.asarray(self.token_mask, dtype=np.float64)
        if real.shape != (B, T):
            raise ValueError(f"token_mask has shape {real.shape} but the batch is {(B, T)}")
        if self.pool == "prefix":  # token t: the mean over the real tokens s ≤ t (what generation sees)
            seen = np.tril(np.ones((T, T)))[None] * real[:, None, :]  # (B, T, T): [s ≤ t]·real[s]
            weights = (seen / np.maximum(seen.sum(axis=2, keepdims=True), 1)).astype(U.dtype)
            return F.matmul(weights, U.reshape(B, T, -1)).reshape(N, -1), None  # (N, E·O)
        weights = (real / np.maximum(real.sum(axis=1, keepdims=True), 1)).astype(U.dtype)  # mean over real tokens
        pooled = F.matmul(weights[:, None, :], U.reshape(B, T, -1)).reshape(B, -1)  # (B, E·O)
        return pooled, np.repeat(np.arange(B), T)

    # ---- 3. masking and the weighted sum -------------------------------------------------------------
    def masked(self, G: Tensor) -> Tensor:
        """G'_i = G_i·1[i∈S] / Σ_{j∈S} G_j (no-op without a mask)."""
        if self.keep is None:
            return G
        m = np.zeros(self.n_sources, dtype=G.dtype)
        m[self.keep] = 1
        Gm = G * m
        return Gm / Gm.sum(axis=1, keepdims=True)

    def adapter_delta(self, x: Tensor) -> Tensor:  # x (N, D) -> Δ (N, O)
        if self.owns_gate:
            self.current_gate = self.gate(x)
            G = self.current_gate
        else:
            G = self.gate_source.current_gate
            if G is None or G.shape[0] != x.shape[0]:
                raise RuntimeError("the block's gate was not computed for this batch: in the 'layer' variant the "
                                   "block's first adapted linear must run before the others")
        return mixture_lowrank(x, self.lora_A, self.lora_B, self.masked(G), scale=self.scales)  # Σ_i G'_i u_i

    def gate_array(self) -> np.ndarray:  # G (N, E) of the last forward, before masking, as NumPy
        return self.current_gate.data

    def delta_weight(self):
        raise NotImplementedError("MoLE cannot be merged into W0: its gates depend on the input")

    def extra_repr(self):
        share = "" if self.owns_gate else ", gate shared with the block's first adapted linear"
        return f"{super().extra_repr()}, pool={self.pool}{share}"


def balance_loss(gates, real=None):
    """L_bal = −Σ_i log q_i, q_i = mean of G_i over every gate in `gates` (Tensors (N, E)) and every real
    token (`real` (N,) 0/1, None = all)."""
    N = gates[0].shape[0]
    real = np.ones(N) if real is None else np.asarray(real).reshape(-1)
    w = real.astype(gates[0].dtype)[:, None]  # (N, 1)
    M = len(gates) * max(float(real.sum()), 1.0)  # (gate, token) pairs
    q = sum((G * w).sum(axis=0) for G in gates) / gates[0].dtype.type(M)  # (E,)
    return -F.log(q).sum()


class Mole(FrozenPoolMethod):
    """MoLE: train only the gates (e, ρ) of every adapted layer on the composition data."""

    name = "mole"
    config_class = MoleConfig
    balance_loss = staticmethod(balance_loss)  # L_bal of the engine's gates (tinyslim.torch.Mole: torch's)

    @classmethod
    def from_methods(cls, lora_methods, **overrides) -> "Mole":
        """MoLE over the LoRAs of trained plain-LoRA Methods (their adapter states and scales)."""
        states, scales = sources_from_methods(lora_methods)
        return cls(lora_sources=states, lora_scales=scales, **overrides)

    def attach(self, model, seed: int) -> None:
        super().attach(model, seed)  # inject, freeze, copy the sources in
        if self.config.gate_granularity == "layer":
            owners = {}
            for name, layer in zip(self.adapted, self.layers()):  # model order = forward order within a block
                block = name.rsplit(".", 2)[0] if ".h." in name else name  # "transformer.h.3"
                if block in owners:
                    layer.share_gate_of(owners[block])
                else:
                    owners[block] = layer

    def gate_layers(self) -> list:
        return [layer for layer in self.layers() if layer.owns_gate]

    def loss(self, x, y, mask, rng=None):
        self._check_attached()
        cfg = self.config
        real = np.ones(np.shape(x), dtype=bool) if cfg.pad_token_id is None else np.asarray(x) != cfg.pad_token_id
        with token_context(self.layers(), token_mask=real):
            _, ce = self.model(x, y, loss_mask=mask, rng=rng)
        if not cfg.balance_coef:
            return ce
        return ce + cfg.balance_coef * self.balance_loss([l.current_gate for l in self.gate_layers()], real)

    # ---- inference masking and diagnostics -----------------------------------------------------------
    def set_mask(self, subset) -> None:
        """Keep only the sources in `subset` (None: all) in every layer, renormalising the gates."""
        keep = None if subset is None else np.asarray(check_subset(subset, self.config.sources.E))
        for layer in self.layers():
            layer.keep = keep

    @contextlib.contextmanager
    def masked(self, subset):
        """Inference with only `subset` of the sources (Mode 2 of docs/methods.md §4.5) inside the block."""
        previous = self.layers()[0].keep
        self.set_mask(subset)
        try:
            yield self.model
        finally:
            self.set_mask(None if previous is None else previous.tolist())

    def gate_means(self, x) -> dict:
        """{layer name: mean G (E,) over the real tokens of x}, unmasked, in evaluation mode (heatmaps)."""
        cfg = self.config
        real = np.ones(np.shape(x), dtype=bool) if cfg.pad_token_id is None else np.asarray(x) != cfg.pad_token_id
        with self.evaluating(), token_context(self.layers(), token_mask=real):
            self.model(x)
        w = real.reshape(-1)
        return {name: layer.gate_array()[w].mean(axis=0) for name, layer in zip(self.adapted, self.layers())
                if layer.owns_gate}
