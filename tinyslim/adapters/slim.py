"""SLIM — Soft LoRA and Identity Mixture (Han et al., arXiv 2410.07739), docs/methods.md §2.

Shape legend: N tokens, D in, O out, r rank, E = E_L + E_I experts, K top-K, C_n clusters.

Each adapted linear is a mixture of E_L LoRA experts (𝓛, indices 0..E_L−1) and E_I identity experts
(𝓘, indices E_L..E−1), whose delta is zero. Per token x:

    1. logits          ℓ = W_r x + b_r                                     (N, E)
    2. nearest cluster k* = argmin_k ‖x − μ_k‖₂                              x detached
    3. OOD score       d(x) = max_c |x_c − μ_{k*,c}| / σ_{k*,c} − 1          no gradient
    4. yielding        ℓ̃_e = ℓ_e + γ·d(x) for e ∈ 𝓘,  ℓ̃_e = ℓ_e for e ∈ 𝓛
    5. top-K           S = TopK(ℓ̃, K);  w_e = exp(ℓ̃_e) / Σ_{j∈S} exp(ℓ̃_j) on S, else 0
    6. output          y = W0 x + b0 + c · Σ_{e∈S∩𝓛} w_e · s · m^out_e ⊙ (B_e A_e (m^in_e ⊙ x))

Step 6 is one kernel call in the top-K form: the K picks per token with identity picks turned into
empty slots (−1), so identity experts take gate mass in the softmax but never reach the kernel, and a
token routed only to identity experts gets the base output bit for bit. The masks are the kernel's
in_mask / out_mask; c is folded into the kernel's scale.

Dynamic merging (§2.3): per expert, per layer, once per training step (the `mask` stream, for each
layer in model order: m^out (E_L, O) then m^in (E_L, D)),

    m^out_e[o] ~ Bernoulli(1 − p_r),  m^in_e[j] ~ Bernoulli(1 − p_c),  p_r = p_c = 1 − √(1 − p)
    training c = 1;  evaluation ("expected") no masks and c = 1 − p;  ("sampled") fresh masks, c = 1
    mask_rescale: training c = 1/(1 − p), evaluation c = 1

Sliding clusters (§2.4), per layer, on the detached real (non-pad) tokens of the training batches,
never at evaluation:

    seeding (first training batch, before its forward; the `cluster` stream):
        μ ← N_c distinct tokens of the batch,  σ_k ← per-channel std of the batch, floored at σ_min
    after each step (with the tokens and assignments k* cached by that step's forward):
        μ_k  ← (1−m)·μ_k + m·mean(X_k)
        σ²_k ← (1−m)·σ²_k + m·mean((X_k − μ_k)²)        using the updated μ_k;  σ_k = max(√σ²_k, σ_min)
    empty clusters are left unchanged. Before seeding (σ = 0) d is 0: no yielding.

Losses (§2.5):

    L = CE + λ_L1 · Σ_layers Σ_{e∈𝓛} ( ‖A_e‖₁/(r·D) + ‖B_e‖₁/(O·r) )  (+ λ_bal · L_bal)
    L_bal = E_L · Σ_{e∈𝓛} f_e · P_e    f_e: fraction of (token, slot) picks of e,  P_e: mean softmax(ℓ̃)_e

Variants (config values): yield_mode="multiplicative" (top-K from ℓ, then w_e ← w_e·exp(−γ·max(d, 0))
on 𝓛, not renormalised); logit_norm="layernorm" (ℓ normalised before yielding); router="residual_mlp"
(x + GELU(x W1ᵀ + b1) W2ᵀ, W2 = 0 at init, then the linear gate); cluster_init="random" (Gaussian
centres around the first batch's mean); eval_masks="sampled" (the `eval_mask` stream, so evaluation
never shifts the training masks); mask_split="rows" / "columns" (p on one side only: p_r = p or p_c = p);
mask_mode="update" (the same masks drop each step's change to the factors, not the forward delta: the
forward pass and evaluation are unmasked with c = 1, and after the optimizer step a dropped column of A_e
or row of B_e gets its value before the step back).

The MixLoRA-style baseline (moe_lora.py) is this file with E_I = 0, p = 0, λ_L1 = 0. Ablations as
config overrides: ``ABLATIONS`` below (the §7.3 ladder and the three "SLIM without X" rows).

    from tinyslim.adapters import make_method
    slim = make_method("slim", r=4, target_modules=["mlp.c_fc", "mlp.c_proj"], pad_token_id=0)
    # scenario A: run_continual(slim, tasks, config, base_model)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import functional as F
from ..autograd import Function, Tensor
from ..lowrank import mixture_lowrank
from ..nn import Linear, Parameter
from .base import AdaptedLinear, Method, Streams, token_context
from .lora import lora_scale

__all__ = ["SlimConfig", "SlimLinear", "SLIM", "ABLATIONS", "make_slim_ablation", "l1_penalty", "abs_sum",
           "drop_probabilities"]


@dataclass
class SlimConfig:
    """SLIM (docs/methods.md §2.8)."""

    n_lora_experts: int = 4  # E_L
    n_identity_experts: int = 2  # E_I
    top_k: int = 2  # K; softmax renormalised over the top-K
    r: int = 4  # rank of every LoRA expert
    lora_alpha: float = 8  # s = α/r = 2
    use_rslora: bool = False  # s = α/√r
    target_modules: list | str = field(default_factory=lambda: ["mlp.c_fc", "mlp.c_proj"])
    router: str = "linear"  # or "residual_mlp"
    router_hidden: int = 16  # hidden width of the residual-MLP router
    router_init_std: float = 0.02  # W_r ~ N(0, std²), b_r = 0
    yield_mode: str = "additive"  # or "multiplicative"
    gamma: float = 1.0  # γ
    logit_norm: str = "none"  # or "layernorm" (ℓ normalised before adding γd)
    n_clusters: int = 4  # N_c
    cluster_momentum: float = 0.05  # m
    sigma_floor: float = 1e-3  # σ_min
    cluster_init: str = "first_batch"  # or "random"
    drop_p: float = 0.3  # p; p_r = p_c = 1 − √(1 − p)
    mask_mode: str = "forward"  # "forward": masks on the delta in training (§2.3); "update": on each step's change
    mask_split: str = "both"  # which side p drops: "both" (p_r = p_c above), "rows" (p_r = p, p_c = 0), "columns"
    mask_rescale: bool = False  # DARE's 1/(1 − p) in training, c = 1 at evaluation
    eval_masks: str = "expected"  # or "sampled"
    l1_coef: float = 1e-3  # λ_L1
    balance_coef: float = 0.0  # λ_bal (0.01 when on)
    pad_token_id: int | None = None  # input positions holding it are left out of the cluster statistics and L_bal

    def __post_init__(self):
        name = type(self).__name__
        choices = dict(router=("linear", "residual_mlp"), yield_mode=("additive", "multiplicative"),
                       logit_norm=("none", "layernorm"), cluster_init=("first_batch", "random"),
                       eval_masks=("expected", "sampled"), mask_split=("both", "rows", "columns"),
                       mask_mode=("forward", "update"))
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{name}.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("n_lora_experts", "top_k", "r", "n_clusters", "router_hidden"):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}.{key} must be a positive integer, got {value!r}")
        if not isinstance(self.n_identity_experts, (int, np.integer)) or self.n_identity_experts < 0:
            raise ValueError(f"{name}.n_identity_experts must be an integer >= 0, got {self.n_identity_experts!r}")
        E = self.n_lora_experts + self.n_identity_experts
        if self.top_k > E:
            raise ValueError(f"{name}.top_k = {self.top_k} exceeds the {E} experts (E_L {self.n_lora_experts} + "
                             f"E_I {self.n_identity_experts})")
        if not 0.0 <= self.drop_p < 1.0:
            raise ValueError(f"{name}.drop_p must lie in [0, 1), got {self.drop_p}")
        if not 0.0 <= self.cluster_momentum <= 1.0 or not self.sigma_floor > 0:
            raise ValueError(f"{name} needs 0 <= cluster_momentum <= 1 and sigma_floor > 0, got "
                             f"{self.cluster_momentum}, {self.sigma_floor}")
        if not self.lora_alpha > 0 or self.l1_coef < 0 or self.balance_coef < 0:
            raise ValueError(f"{name} needs lora_alpha > 0, l1_coef >= 0, balance_coef >= 0")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.lora_alpha, self.use_rslora)

    def make_layer(self, base_layer: Linear, streams: Streams) -> "SlimLinear":
        return SlimLinear(base_layer, self, streams)


def drop_probabilities(p: float, split: str = "both") -> tuple:
    """(p_r, p_c): an entry of ΔW survives with probability (1 − p_r)(1 − p_c) = 1 − p. "both":
    p_r = p_c = 1 − √(1 − p); "rows": output rows of B only (p_r = p, p_c = 0); "columns": input columns
    of A only (p_r = 0, p_c = p)."""
    if split == "rows":
        return p, 0.0
    if split == "columns":
        return 0.0, p
    q = 1.0 - math.sqrt(1.0 - p)
    return q, q


class SlimLinear(AdaptedLinear):
    """A frozen Linear plus a routed mixture of LoRA and identity experts (docs/methods.md §2.2)."""

    adapter_names = ("lora_A", "lora_B", "router_weight", "router_bias", "cluster_mu", "cluster_sigma")
    trainable_names = ("lora_A", "lora_B", "router_weight", "router_bias")

    def __init__(self, base_layer: Linear, config: SlimConfig, streams: Streams):
        super().__init__(base_layer)
        D, O, dtype = self.in_features, self.out_features, base_layer.weight.dtype
        cfg = self.config = config
        E_L, E_I, r = cfg.n_lora_experts, cfg.n_identity_experts, cfg.r
        self.E_L, self.E_I, self.E, self.scale = E_L, E_I, E_L + E_I, float(cfg.scale)
        # LoRA experts as in §1.2 (the `init` stream, as plain LoRA: E_L = 1 draws LoRA's A)
        bound = 1.0 / math.sqrt(D)
        self.lora_A = Parameter(streams["init"].uniform(-bound, bound, (E_L, r, D)).astype(dtype))  # (E_L, r, D)
        self.lora_B = Parameter(np.zeros((E_L, O, r), dtype=dtype))  # (E_L, O, r)
        # router rows: LoRA experts from `router`, identity experts from `identity_router`, so adding identity
        # experts changes nothing else (the ablation ladder differs in the intended component only)
        W = [streams["router"].normal(0.0, cfg.router_init_std, (E_L, D))]
        if E_I:
            W.append(streams["identity_router"].normal(0.0, cfg.router_init_std, (E_I, D)))
        self.router_weight = Parameter(np.concatenate(W).astype(dtype))  # W_r (E, D)
        self.router_bias = Parameter(np.zeros(self.E, dtype=dtype))  # b_r (E,)
        if cfg.router == "residual_mlp":
            H = cfg.router_hidden
            self.router_fc_weight = Parameter(streams["router_mlp"].normal(0.0, cfg.router_init_std, (H, D))
                                              .astype(dtype))  # W1 (H, D)
            self.router_fc_bias = Parameter(np.zeros(H, dtype=dtype))  # b1 (H,)
            self.router_proj_weight = Parameter(np.zeros((D, H), dtype=dtype))  # W2 (D, H): identity map at init
            names = ("router_fc_weight", "router_fc_bias", "router_proj_weight")
            self.adapter_names = self.adapter_names + names
            self.trainable_names = self.trainable_names + names
        # cluster statistics: buffers, never trained (σ = 0 until seeded on the first training batch)
        self.cluster_mu = Parameter(np.zeros((cfg.n_clusters, D), dtype=dtype), requires_grad=False)  # μ (C_n, D)
        self.cluster_sigma = Parameter(np.zeros((cfg.n_clusters, D), dtype=dtype), requires_grad=False)  # σ
        self.streams = streams  # `mask`, `eval_mask` and `cluster` are drawn from lazily
        self.in_mask = self.out_mask = None  # m^in (E_L, D), m^out (E_L, O) of the current step (None: all ones)
        self.token_mask = None  # (B, T) real tokens, set by the Method around a forward pass
        self.logit_bias = None  # test hook: a constant (E,) added to ℓ̃ just before top-K (e.g. +1e30 on 𝓘)
        self.balance_loss = None  # L_bal of this layer's last training forward (when balance_coef > 0)
        self.last_d = self.last_identity_mass = None  # diagnostics of the last forward, (N,) each
        self._cache = None  # (real tokens X (n, D), their nearest clusters k* (n,)) for update_clusters

    # ---- 1. the router ----------------------------------------------------------------------------
    def router_logits(self, x: Tensor) -> Tensor:  # x (N, D) -> ℓ (N, E)
        if self.config.router == "residual_mlp":
            x = x + F.linear(F.gelu(F.linear(x, self.router_fc_weight, self.router_fc_bias)), self.router_proj_weight)
        return F.linear(x, self.router_weight, self.router_bias)

    # ---- 2.–3. the sliding clusters and the OOD score ------------------------------------------------
    @property
    def seeded(self) -> bool:
        return bool(np.any(self.cluster_sigma.data > 0))

    def ood_score(self, X: np.ndarray) -> tuple:
        """(k* (N,), d (N,)): the nearest centre and d(x) = max_c |x_c − μ_{k*,c}| / σ_{k*,c} − 1 (0 unseeded)."""
        N = X.shape[0]
        if not self.seeded:
            return np.zeros(N, dtype=np.int64), np.zeros(N, dtype=X.dtype)
        diff = X[:, None, :] - self.cluster_mu.data[None]  # (N, C_n, D)
        k_star = np.argmin(np.einsum("nkd,nkd->nk", diff, diff), axis=1)  # ties: the lower index
        rows = np.arange(N)
        d = (np.abs(diff[rows, k_star]) / self.cluster_sigma.data[k_star]).max(axis=1) - 1.0
        return k_star, d.astype(X.dtype)

    def seed_clusters(self, X: np.ndarray) -> None:
        """μ ← N_c distinct tokens of X (the `cluster` stream; "random": Gaussian around X's mean);
        σ_k ← the per-channel std of X, floored at σ_min."""
        n, (C_n, D) = X.shape[0], self.cluster_mu.shape
        if n == 0:
            return
        rng = self.streams["cluster"]
        std = np.maximum(X.std(axis=0), self.config.sigma_floor)
        if self.config.cluster_init == "first_batch":
            self.cluster_mu.data[...] = X[rng.choice(n, size=C_n, replace=n < C_n)]
        else:
            self.cluster_mu.data[...] = rng.normal(X.mean(axis=0), std, (C_n, D))
        self.cluster_sigma.data[...] = std

    def update_clusters(self) -> None:
        """The EMA step of §2.4 with the tokens cached by the last training forward (then dropped)."""
        cache, self._cache = self._cache, None
        m = self.config.cluster_momentum
        if cache is None or m == 0:
            return
        X, k_star = cache
        mu, sigma = self.cluster_mu.data, self.cluster_sigma.data
        for k in range(mu.shape[0]):
            X_k = X[k_star == k]
            if len(X_k) == 0:
                continue  # empty clusters are left unchanged
            mu[k] = (1 - m) * mu[k] + m * X_k.mean(axis=0)
            var = (1 - m) * sigma[k] ** 2 + m * ((X_k - mu[k]) ** 2).mean(axis=0)
            sigma[k] = np.maximum(np.sqrt(var), self.config.sigma_floor)

    # ---- 4.–5. yielding and top-K ---------------------------------------------------------------------
    def route(self, logits: Tensor, d: np.ndarray) -> tuple:
        """(w (N, K) Tensor, idx (N, K), ℓ̃ (N, E)): the top-K experts and their renormalised weights."""
        cfg, E_L = self.config, self.E_L
        if cfg.logit_norm == "layernorm":
            logits = F.layer_norm(logits)
        if cfg.yield_mode == "additive":
            if self.E_I and cfg.gamma:  # ℓ̃_e = ℓ_e + γ·d(x) on the identity experts
                shift = np.zeros(logits.shape, dtype=logits.dtype)
                shift[:, E_L:] = (cfg.gamma * d)[:, None]
                logits = logits + shift
            w, idx = F.topk_gating(self._hooked(logits), cfg.top_k)
        else:  # multiplicative: top-K of ℓ, then w_e ← w_e·exp(−γ·max(d, 0)) on the LoRA picks
            w, idx = F.topk_gating(self._hooked(logits), cfg.top_k)
            if cfg.gamma:
                damp = np.exp(-cfg.gamma * np.maximum(d, 0)).astype(w.dtype)  # (N,)
                w = w * np.where(idx < E_L, damp[:, None], np.ones_like(damp)[:, None])
        return w, idx, logits

    def _hooked(self, logits):
        return logits if self.logit_bias is None else logits + np.asarray(self.logit_bias, dtype=logits.dtype)

    # ---- 6. the masked mixture ----------------------------------------------------------------------
    def draw_masks(self) -> None:
        """Fresh m^out (E_L, O) then m^in (E_L, D) from the `mask` stream (none at p = 0): once per step."""
        self.out_mask, self.in_mask = self._draw(self.streams["mask"]) if self.config.drop_p else (None, None)

    def _draw(self, rng):
        p_r, p_c = drop_probabilities(self.config.drop_p, self.config.mask_split)
        dtype = self.lora_A.dtype
        out_mask = (rng.random((self.E_L, self.out_features)) >= p_r).astype(dtype)  # keep with prob. 1 − p_r
        in_mask = (rng.random((self.E_L, self.in_features)) >= p_c).astype(dtype)
        return out_mask, in_mask

    def delta_masks(self) -> tuple:
        """(in_mask, out_mask, c) for this forward (training, or evaluation with eval_masks)."""
        cfg, p = self.config, self.config.drop_p
        if p == 0 or cfg.mask_mode == "update":  # "update": the forward pass is never masked, c = 1
            return None, None, 1.0
        if self.training:
            if self.in_mask is None:  # not drawn yet (the Method draws once per step; direct use draws here)
                self.draw_masks()
            return self.in_mask, self.out_mask, (1.0 / (1.0 - p) if cfg.mask_rescale else 1.0)
        if cfg.eval_masks == "expected":  # E[masked delta] = (1 − p)·delta
            return None, None, (1.0 if cfg.mask_rescale else 1.0 - p)
        out_mask, in_mask = self._draw(self.streams["eval_mask"])
        return in_mask, out_mask, (1.0 / (1.0 - p) if cfg.mask_rescale else 1.0)

    def adapter_delta(self, x: Tensor) -> Tensor:  # x (N, D) -> Δ (N, O)
        X = x.data  # detached
        real = self._real_tokens(X.shape[0])
        if self.training and not self.seeded:
            self.seed_clusters(X[real])  # on the very first training batch, before its forward pass
        logits = self.router_logits(x)  # 1. ℓ (N, E)
        k_star, d = self.ood_score(X)  # 2.–3.
        w, idx, yielded = self.route(logits, d)  # 4.–5.
        lora_slot = np.where(idx < self.E_L, idx, -1).astype(np.int32)  # identity picks: empty slots
        in_mask, out_mask, c = self.delta_masks()
        delta = mixture_lowrank(x, self.lora_A, self.lora_B, (lora_slot, w), scale=self.scale * c,
                                in_mask=in_mask, out_mask=out_mask)  # 6.
        self.last_d = d
        self.last_identity_mass = np.where(idx >= self.E_L, w.data, 0).sum(axis=1)  # Σ_{e∈S∩𝓘} w_e
        if self.training:
            self._cache = (X[real].copy(), k_star[real])
            if self.config.balance_coef:
                self.balance_loss = self._balance(yielded, idx, real)
        return delta

    def _balance(self, logits, idx, real):
        """L_bal = E_L · Σ_{e∈𝓛} f_e · P_e over the real tokens (f from the picks: a constant)."""
        E_L = self.E_L
        n = max(int(real.sum()), 1)
        f = np.bincount(idx[real].reshape(-1), minlength=self.E)[:E_L] / (n * idx.shape[1])  # (E_L,)
        P = (F.softmax(logits, axis=-1) * real[:, None].astype(logits.dtype)).sum(axis=0) / logits.dtype.type(n)
        return (P[:E_L] * f.astype(logits.dtype)).sum() * E_L

    def _real_tokens(self, N: int) -> np.ndarray:
        if self.token_mask is None:
            return np.ones(N, dtype=bool)
        real = np.asarray(self.token_mask, dtype=bool).reshape(-1)
        if real.shape != (N,):
            raise ValueError(f"token_mask holds {real.size} tokens but the layer got {N}")
        return real

    # ---- the Method's per-step hooks (the torch layer has the same methods) -----------------------------
    def l1_terms(self) -> tuple:
        """(‖A‖₁/(r·D), ‖B‖₁/(O·r)) over this layer's E_L experts: its two terms of L_L1."""
        _, r, D = self.lora_A.shape
        O = self.lora_B.shape[1]
        return abs_sum(self.lora_A) / (r * D), abs_sum(self.lora_B) / (O * r)

    def factors_snapshot(self) -> tuple:
        """(A, B) copied before an optimizer step (mask_mode "update")."""
        return self.lora_A.data.copy(), self.lora_B.data.copy()

    def undo_masked_changes(self, before: tuple) -> None:
        """mask_mode "update": a dropped column of A_e (m^in_e = 0) or row of B_e (m^out_e = 0) gets its
        value of `before` (the factors_snapshot taken before the step) back."""
        A0, B0 = before
        keep_in, keep_out = self.in_mask[:, None, :] > 0, self.out_mask[:, :, None] > 0
        self.lora_A.data[...] = np.where(keep_in, self.lora_A.data, A0)
        self.lora_B.data[...] = np.where(keep_out, self.lora_B.data, B0)

    def delta_weight(self):
        raise NotImplementedError("SLIM cannot be merged into W0: its routing depends on the input")

    def extra_repr(self):
        cfg = self.config
        return (f"{super().extra_repr()}, E_L={self.E_L}, E_I={self.E_I}, K={cfg.top_k}, r={cfg.r}, "
                f"scale={self.scale:g}, p={cfg.drop_p:g}")


# ---- the L1 penalty ---------------------------------------------------------------------------------

class AbsSum(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return np.abs(a).sum()

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return (g * np.sign(a),)  # d|a|/da = sign(a), with sign(0) = 0 (the subgradient torch uses)


def abs_sum(a) -> Tensor:
    """‖a‖₁ = Σ|a| as a Tensor; its gradient is sign(a) (0 at 0)."""
    return AbsSum.apply(a)


def l1_penalty(layers) -> Tensor:
    """L_L1 = Σ_layers Σ_{e∈𝓛} ( ‖A_e‖₁/(r·D) + ‖B_e‖₁/(O·r) ): the mean absolute entry of every factor."""
    total = 0.0
    for layer in layers:
        a, b = layer.l1_terms()  # (the layer's engine: NumPy here, torch in tinyslim.torch)
        total = total + a + b
    return total


# ---- the Method -----------------------------------------------------------------------------------

class SLIM(Method):
    """SLIM on the runner's contract: masks drawn per step, clusters updated after every optimizer step."""

    name = "slim"
    config_class = SlimConfig

    def real_tokens(self, x) -> np.ndarray:
        pad = self.config.pad_token_id
        return np.ones(np.shape(x), dtype=bool) if pad is None else np.asarray(x) != pad

    def loss(self, x, y, mask, rng=None):
        self._check_attached()
        cfg, layers = self.config, self.layers()
        for layer in layers:
            layer.draw_masks()  # 1. this step's masks (the `mask` stream)
        if cfg.mask_mode == "update" and cfg.drop_p:  # the factors before this step, to drop the masked changes
            self._before_step = [layer.factors_snapshot() for layer in layers]
        with token_context(layers, token_mask=self.real_tokens(x)):
            _, loss = self.model(x, y, loss_mask=mask, rng=rng)  # 2. (seeds the clusters on the first batch)
        if cfg.l1_coef:
            loss = loss + cfg.l1_coef * l1_penalty(layers)
        if cfg.balance_coef:
            loss = loss + cfg.balance_coef * sum(layer.balance_loss for layer in layers)
        return loss

    def after_step(self, step: int, optimizer) -> None:
        before, self._before_step = getattr(self, "_before_step", None), None
        for k, layer in enumerate(self.layers()):
            if before is not None:  # mask_mode "update": a masked column of A_e / row of B_e keeps its old value
                layer.undo_masked_changes(before[k])
            layer.update_clusters()  # 5. with the inputs cached by this step's forward

    def state_dict(self) -> tuple[dict, dict]:
        """The adapter arrays already hold every piece of SLIM's state: experts, router, and the cluster
        statistics μ, σ (σ > 0 is the seeding flag); the `mask`, `cluster`, `eval_mask` streams go with the
        Method's streams. The per-step masks are redrawn by every loss(), the clusters' token cache is
        emptied by every after_step, so neither needs saving between steps. meta records the seeding flags."""
        arrays, meta = super().state_dict()
        meta["slim"] = {"seeded": [layer.seeded for layer in self.layers()]}
        return arrays, meta

    def load_state_dict(self, arrays: dict, meta: dict) -> None:
        super().load_state_dict(arrays, meta)
        for layer in self.layers():
            layer._cache = None
            layer.in_mask = layer.out_mask = None
        seeded = [layer.seeded for layer in self.layers()]
        if "slim" in meta and meta["slim"]["seeded"] != seeded:
            raise ValueError(f"{self.name}: the cluster statistics loaded give seeding flags {seeded}, the state "
                             f"recorded {meta['slim']['seeded']}")

    def routing_stats(self, x) -> dict:
        """{layer name: {"d": d(x) (n,), "identity_mass": (n,)}} over the real tokens of x, in evaluation
        mode: the §2.4 diagnostic (histograms of d, identity mass on downstream vs general inputs)."""
        real = self.real_tokens(x).reshape(-1)
        with self.evaluating():
            self.model(x)
        return {name: {"d": layer.last_d[real], "identity_mass": layer.last_identity_mass[real]}
                for name, layer in zip(self.adapted, self.layers())}


# ---- ablations (docs/methods.md §7.3) -------------------------------------------------------------------

ABLATIONS = {
    # the ladder, from the MixLoRA-style baseline up to full SLIM
    "moe_lora": dict(n_identity_experts=0, drop_p=0.0, l1_coef=0.0),
    "+identity": dict(gamma=0.0, drop_p=0.0, l1_coef=0.0),
    "+yielding": dict(drop_p=0.0, l1_coef=0.0),
    "+merging": dict(l1_coef=0.0),
    "slim": dict(),
    # full SLIM without one component (scenario A's ablation rows)
    "slim-no-identity": dict(n_identity_experts=0),
    "slim-no-yielding": dict(gamma=0.0),
    "slim-no-masks": dict(drop_p=0.0),
    # docs/methods.md §2.8's defaults whatever overrides are given to the other rows (scenario A runs SLIM with
    # toy-tuned γ, L1 and p, and shows this row beside it)
    "slim-spec": dict(gamma=1.0, l1_coef=1e-3, drop_p=0.3),
}


def make_slim_ablation(row: str, **overrides) -> SLIM:
    """A SLIM Method with the config of ablation `row` (its ``name`` is the row, for result tables). The
    overrides set the rest of the config; the row's own fields win, so every row keeps its ablation when
    a tuned base config is passed to all of them."""
    if row not in ABLATIONS:
        raise ValueError(f"unknown SLIM ablation {row!r}; choose one of {sorted(ABLATIONS)}")
    method = SLIM(**{**overrides, **ABLATIONS[row]})
    method.name = row
    return method
