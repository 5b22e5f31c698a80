"""SLIM and the MixLoRA-style MoE-LoRA on the torch engine: the twins of tinyslim.adapters.slim and
tinyslim.adapters.moe_lora, with the same configs (SlimConfig, MoeLoraConfig) and the same hooks.

Shape legend: N tokens, D in, O out, r rank, E = E_L + E_I experts (E_L LoRA, E_I identity), K top-K,
C_n clusters.

The NumPy file explains the method (docs/methods.md §2); this one writes the same formulas with torch
ops, numbered as there:

    1. ℓ = W_r x + b_r                                   router_logits  (residual MLP: x + GELU(x W1ᵀ + b1) W2ᵀ first)
    2. k* = argmin_k ‖x − μ_k‖₂                           ood_score      (x detached; ties to the lower k)
    3. d(x) = max_c |x_c − μ_{k*,c}| / σ_{k*,c} − 1       ood_score      (0 before seeding)
    4. ℓ̃_e = ℓ_e + γ·d(x) on 𝓘                            route          (multiplicative: w_e·exp(−γ·max(d, 0)) on 𝓛)
    5. S = TopK(ℓ̃, K), w = softmax over S                 topk_gating    (F.topk_gating: stable argsort, ties low)
    6. Δ = c · Σ_{e∈S∩𝓛} w_e · s · m^out_e ⊙ (B_e A_e (m^in_e ⊙ x))        mixture

Step 6 is the NumPy kernel call ``mixture_lowrank(x, A, B, (slot, w), scale=s·c, in_mask, out_mask)``
written as a dense-gate sum: the K weights are scattered into G (N, E), whose identity columns are
dropped (an identity expert takes gate mass and adds nothing), the masks are folded into the factors
(A'_e = A_e ⊙ m^in_e, B'_e = m^out_e ⊙ B_e, the kernel's definition), and

    Δ = ((x A'ᵀ) ⊙ s·c·G) B'ᵀ      as two einsums with inner width E_L·r: (N, D)→(N, E_L, r)→(N, O)

A token whose picks are all identity experts has a zero row of G, so its Δ is exactly 0 (the base
output bit for bit, as the kernel's empty slots give).

The training hooks are the NumPy ones step by step, on torch tensors: the masks m^out (E_L, O) then
m^in (E_L, D) per layer from the `mask` stream (tensors here); clusters seeded from the `cluster`
stream on the first training batch, the EMA update of μ and σ after every step (after_step), L_L1
(``l1_terms``), the Switch balance loss, mask_mode "update" (``factors_snapshot`` /
``undo_masked_changes``). The Method is NumPy's (``class SLIM(adapters.SLIM, TorchMethod)``): loss,
after_step, state_dict and routing_stats run unchanged over these layers. The NumPy layer's
engine-free schedule (``draw_masks``, ``delta_masks``) is reused as the very same functions.

    from tinyslim.torch import from_gpt, make_method
    slim = make_method("slim", r=4, target_modules=["mlp.c_fc", "mlp.c_proj"], pad_token_id=0)
    slim.attach(from_gpt(gpt), seed=0)
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as TF

from .. import adapters
from ..adapters import slim as numpy_slim
from ..adapters.slim import SlimConfig, drop_probabilities
from .layers import AdaptedLinear
from .method import TorchMethod

__all__ = ["SlimLinear", "SLIM", "MoELoRA", "make_slim_ablation", "topk_gating"]


def topk_gating(logits: torch.Tensor, k: int) -> tuple:
    """(w (N, k), idx (N, k) int64): the k largest logits per row (ties to the lower index, as NumPy's
    stable argsort in tinyslim.functional.topk_gating) and the softmax over them; gradients reach the
    picked logits only."""
    idx = torch.argsort(-logits.detach(), dim=1, stable=True)[:, :k]
    return torch.softmax(logits.gather(1, idx), dim=1), idx


class SlimLinear(AdaptedLinear):
    """A frozen Linear / Conv1D plus a routed mixture of LoRA and identity experts (the NumPy SlimLinear)."""

    adapter_names = ("lora_A", "lora_B", "router_weight", "router_bias", "cluster_mu", "cluster_sigma")
    trainable_names = ("lora_A", "lora_B", "router_weight", "router_bias")

    def __init__(self, base_layer, config: SlimConfig, streams):
        super().__init__(base_layer)
        D, O = self.in_features, self.out_features
        cfg = self.config = config
        E_L, E_I, r = cfg.n_lora_experts, cfg.n_identity_experts, cfg.r
        self.E_L, self.E_I, self.E, self.scale = E_L, E_I, E_L + E_I, float(cfg.scale)
        # the NumPy layer's draws, in its order: `init`, `router`, `identity_router`, `router_mlp`
        bound = 1.0 / math.sqrt(D)
        self.lora_A = self.new_parameter(streams["init"].uniform(-bound, bound, (E_L, r, D)))  # (E_L, r, D)
        self.lora_B = self.new_parameter(np.zeros((E_L, O, r)))  # (E_L, O, r)
        W = [streams["router"].normal(0.0, cfg.router_init_std, (E_L, D))]
        if E_I:
            W.append(streams["identity_router"].normal(0.0, cfg.router_init_std, (E_I, D)))
        self.router_weight = self.new_parameter(np.concatenate(W))  # W_r (E, D)
        self.router_bias = self.new_parameter(np.zeros(self.E))  # b_r (E,)
        if cfg.router == "residual_mlp":
            H = cfg.router_hidden
            self.router_fc_weight = self.new_parameter(streams["router_mlp"].normal(0.0, cfg.router_init_std, (H, D)))
            self.router_fc_bias = self.new_parameter(np.zeros(H))  # b1 (H,)
            self.router_proj_weight = self.new_parameter(np.zeros((D, H)))  # W2 (D, H): identity map at init
            names = ("router_fc_weight", "router_fc_bias", "router_proj_weight")
            self.adapter_names = self.adapter_names + names
            self.trainable_names = self.trainable_names + names
        # cluster statistics: buffers (saved, moved with the model, never trained); σ = 0 until seeded
        self.register_buffer("cluster_mu", self.tensor(np.zeros((cfg.n_clusters, D))).clone())  # μ (C_n, D)
        self.register_buffer("cluster_sigma", self.tensor(np.zeros((cfg.n_clusters, D))).clone())  # σ (C_n, D)
        self.streams = streams  # `mask`, `eval_mask` and `cluster` are drawn from lazily
        self.in_mask = self.out_mask = None  # m^in (E_L, D), m^out (E_L, O) tensors of this step (None: all ones)
        self.token_mask = None  # (B, T) real tokens, set by the Method around a forward pass
        self.logit_bias = None  # test hook: a constant (E,) added to ℓ̃ just before top-K
        self.balance_loss = None  # L_bal of this layer's last training forward (when balance_coef > 0)
        self._last = None  # (d (N,), identity mass (N,)) of the last forward, detached
        self._cache = None  # (real tokens X (n, D), their nearest clusters k* (n,)) for update_clusters

    # ---- 1. the router ----------------------------------------------------------------------------
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:  # x (N, D) -> ℓ (N, E)
        if self.config.router == "residual_mlp":  # F.gelu is GPT-2's tanh GELU
            x = x + TF.linear(TF.gelu(TF.linear(x, self.router_fc_weight, self.router_fc_bias), approximate="tanh"),
                              self.router_proj_weight)
        return TF.linear(x, self.router_weight, self.router_bias)

    # ---- 2.–3. the sliding clusters and the OOD score ------------------------------------------------
    @property
    def seeded(self) -> bool:
        return bool((self.cluster_sigma > 0).any())

    @torch.no_grad()
    def ood_score(self, X: torch.Tensor) -> tuple:
        """(k* (N,), d (N,)): the nearest centre and d(x) = max_c |x_c − μ_{k*,c}| / σ_{k*,c} − 1 (0 unseeded)."""
        N = X.shape[0]
        if not self.seeded:
            return torch.zeros(N, dtype=torch.long, device=X.device), torch.zeros(N, dtype=X.dtype, device=X.device)
        dist = torch.stack([((X - mu_k) ** 2).sum(dim=1) for mu_k in self.cluster_mu], dim=1)  # ‖x − μ_k‖² (N, C_n)
        k_star = dist.argmin(dim=1)  # ties: the lower index (torch's argmin returns the first minimum)
        d = ((X - self.cluster_mu[k_star]).abs() / self.cluster_sigma[k_star]).amax(dim=1) - 1.0
        return k_star, d

    @torch.no_grad()
    def seed_clusters(self, X: torch.Tensor) -> None:
        """μ ← N_c distinct tokens of X (the `cluster` stream; "random": Gaussian around X's mean);
        σ_k ← the per-channel std of X, floored at σ_min."""
        n, (C_n, D) = X.shape[0], self.cluster_mu.shape
        if n == 0:
            return
        rng = self.streams["cluster"]
        std = X.std(dim=0, correction=0).clamp(min=self.config.sigma_floor)  # NumPy's X.std(axis=0): ddof 0
        if self.config.cluster_init == "first_batch":
            pick = rng.choice(n, size=C_n, replace=n < C_n)
            self.cluster_mu.copy_(X[torch.as_tensor(pick, device=X.device)])
        else:
            mean = X.mean(dim=0).cpu().numpy()
            self.cluster_mu.copy_(self.tensor(rng.normal(mean, std.cpu().numpy(), (C_n, D))))
        self.cluster_sigma.copy_(std.expand(C_n, D))  # every σ_k the batch's std

    @torch.no_grad()
    def update_clusters(self) -> None:
        """The EMA step of §2.4 with the tokens cached by the last training forward (then dropped):
        μ_k ← (1−m)·μ_k + m·mean(X_k),  σ²_k ← (1−m)·σ²_k + m·mean((X_k − μ_k)²) with the new μ_k."""
        cache, self._cache = self._cache, None
        m = self.config.cluster_momentum
        if cache is None or m == 0:
            return
        X, k_star = cache
        mu, sigma = self.cluster_mu, self.cluster_sigma
        for k in range(mu.shape[0]):
            X_k = X[k_star == k]
            if len(X_k) == 0:
                continue  # empty clusters are left unchanged
            mu[k] = (1 - m) * mu[k] + m * X_k.mean(dim=0)
            var = (1 - m) * sigma[k] ** 2 + m * ((X_k - mu[k]) ** 2).mean(dim=0)
            sigma[k] = var.sqrt().clamp(min=self.config.sigma_floor)

    # ---- 4.–5. yielding and top-K ---------------------------------------------------------------------
    def route(self, logits: torch.Tensor, d: torch.Tensor) -> tuple:
        """(w (N, K), idx (N, K), ℓ̃ (N, E)): the top-K experts and their renormalised weights."""
        cfg, E_L = self.config, self.E_L
        if cfg.logit_norm == "layernorm":  # F.layer_norm without weight or bias, eps 1e-5
            logits = TF.layer_norm(logits, logits.shape[-1:], eps=1e-5)
        if cfg.yield_mode == "additive":
            if self.E_I and cfg.gamma:  # ℓ̃_e = ℓ_e + γ·d(x) on the identity experts (a constant shift)
                shift = torch.zeros_like(logits)
                shift[:, E_L:] = (cfg.gamma * d)[:, None]
                logits = logits + shift
            w, idx = topk_gating(self._hooked(logits), cfg.top_k)
        else:  # multiplicative: top-K of ℓ, then w_e ← w_e·exp(−γ·max(d, 0)) on the LoRA picks
            w, idx = topk_gating(self._hooked(logits), cfg.top_k)
            if cfg.gamma:
                damp = torch.exp(-cfg.gamma * d.clamp(min=0))  # (N,)
                w = w * torch.where(idx < E_L, damp[:, None], torch.ones_like(damp)[:, None])
        return w, idx, logits

    def _hooked(self, logits):
        return logits if self.logit_bias is None else logits + self.tensor(self.logit_bias)

    # ---- 6. the masked mixture ----------------------------------------------------------------------
    # the NumPy layer's schedule is engine-free: the same functions (once per step; None at p = 0; the
    # training / "expected" / "sampled" / "update" cases and the c of each)
    draw_masks = numpy_slim.SlimLinear.draw_masks
    delta_masks = numpy_slim.SlimLinear.delta_masks

    def _draw(self, rng):
        """(m^out (E_L, O), m^in (E_L, D)) from `rng`, the NumPy layer's draws (keep with prob. 1 − p_r, 1 − p_c)."""
        p_r, p_c = drop_probabilities(self.config.drop_p, self.config.mask_split)
        out_mask = self.tensor(rng.random((self.E_L, self.out_features)) >= p_r)
        in_mask = self.tensor(rng.random((self.E_L, self.in_features)) >= p_c)
        return out_mask, in_mask

    def mixture(self, x: torch.Tensor, G: torch.Tensor, in_mask, out_mask, scale: float) -> torch.Tensor:
        """Δ_n = Σ_e G[n,e] · scale · B'_e A'_e x_n over the E_L LoRA experts (mixture_lowrank's dense form)."""
        A, B = self.lora_A, self.lora_B
        if in_mask is not None:
            A = A * in_mask[:, None, :]  # A'_e = A_e ⊙ m^in_e (column j of A_e sees x_j)  (E_L, r, D)
        if out_mask is not None:
            B = out_mask[:, :, None] * B  # B'_e = m^out_e ⊙ B_e  (E_L, O, r)
        h = torch.einsum("nd,erd->ner", x, A)  # A'_e x_n  (N, E_L, r)
        h = h * (scale * G)[:, :, None]  # g[n,e] · s · c
        return torch.einsum("ner,eor->no", h, B)  # Σ_e B'_e (…)  (N, O)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:  # x (N, D) -> Δ (N, O)
        X = x.detach()
        real = self._real_tokens(X.shape[0])
        if self.training and not self.seeded:
            self.seed_clusters(X[real])  # on the very first training batch, before its forward pass
        logits = self.router_logits(x)  # 1. ℓ (N, E)
        k_star, d = self.ood_score(X)  # 2.–3.
        w, idx, yielded = self.route(logits, d)  # 4.–5.
        G = torch.zeros_like(yielded).scatter(1, idx, w)[:, :self.E_L]  # (N, E_L): identity picks add nothing
        in_mask, out_mask, c = self.delta_masks()
        delta = self.mixture(x, G, in_mask, out_mask, self.scale * c)  # 6.
        self._last = (d, torch.where(idx >= self.E_L, w.detach(), 0).sum(dim=1))  # d, Σ_{e∈S∩𝓘} w_e
        if self.training:
            self._cache = (X[real].clone(), k_star[real])
            if self.config.balance_coef:
                self.balance_loss = self._balance(yielded, idx, real)
        return delta

    def _balance(self, logits, idx, real):
        """L_bal = E_L · Σ_{e∈𝓛} f_e · P_e over the real tokens (f from the picks: a constant)."""
        E_L = self.E_L
        n = max(int(real.sum()), 1)
        counts = torch.bincount(idx[real].reshape(-1), minlength=self.E)[:E_L]
        f = (counts.to(torch.float64) / (n * idx.shape[1])).to(logits.dtype)  # (E_L,), in float64 as NumPy's
        P = (torch.softmax(logits, dim=-1) * real[:, None].to(logits.dtype)).sum(dim=0) / n
        return (P[:E_L] * f).sum() * E_L

    def _real_tokens(self, N: int) -> torch.Tensor:
        if self.token_mask is None:
            return torch.ones(N, dtype=torch.bool, device=self.device)
        m = self.token_mask
        real = (m if isinstance(m, torch.Tensor) else torch.as_tensor(np.asarray(m, dtype=bool)))
        real = real.to(device=self.device, dtype=torch.bool).reshape(-1)
        if real.shape != (N,):
            raise ValueError(f"token_mask holds {real.numel()} tokens but the layer got {N}")
        return real

    # diagnostics of the last forward as NumPy arrays (routing_stats indexes them with a NumPy mask)
    @property
    def last_d(self):
        return None if self._last is None else self._last[0].cpu().numpy()

    @property
    def last_identity_mass(self):
        return None if self._last is None else self._last[1].cpu().numpy()

    # ---- the Method's per-step hooks (NumPy's SLIM.loss / after_step call these) --------------------------
    def l1_terms(self) -> tuple:
        """(‖A‖₁/(r·D), ‖B‖₁/(O·r)); torch's |·| has the NumPy abs_sum's subgradient sign(0) = 0."""
        _, r, D = self.lora_A.shape
        O = self.lora_B.shape[1]
        return self.lora_A.abs().sum() / (r * D), self.lora_B.abs().sum() / (O * r)

    @torch.no_grad()
    def factors_snapshot(self) -> tuple:
        return self.lora_A.detach().clone(), self.lora_B.detach().clone()

    @torch.no_grad()
    def undo_masked_changes(self, before: tuple) -> None:
        """A dropped column of A_e / row of B_e gets its value before the step back (mask_mode "update")."""
        A0, B0 = before
        self.lora_A.copy_(torch.where(self.in_mask[:, None, :] > 0, self.lora_A, A0))
        self.lora_B.copy_(torch.where(self.out_mask[:, :, None] > 0, self.lora_B, B0))

    def delta_weight(self):
        raise NotImplementedError("SLIM cannot be merged into W0: its routing depends on the input")

    def extra_repr(self):
        cfg = self.config
        return (f"{super().extra_repr()}, E_L={self.E_L}, E_I={self.E_I}, K={cfg.top_k}, r={cfg.r}, "
                f"scale={self.scale:g}, p={cfg.drop_p:g}")


class SLIM(adapters.SLIM, TorchMethod):
    """SLIM on torch: NumPy's masks per step, clusters after every step, L1 and L_bal, over torch layers."""

    def make_layer(self, base_layer, streams):
        return SlimLinear(base_layer, self.config, streams)


class MoELoRA(adapters.MoELoRA, SLIM):
    """MoE-LoRA on torch: SLIM's torch layer under MoeLoraConfig (no identity experts, masks or L1)."""


def make_slim_ablation(row: str, **overrides) -> SLIM:
    """The torch SLIM of ablation `row` (tinyslim.adapters.make_slim_ablation's config and name)."""
    reference = numpy_slim.make_slim_ablation(row, **overrides)  # checks the row, merges the overrides
    method = SLIM(reference.config)
    method.name = reference.name
    return method
