"""ELDER on the torch engine (Li et al., arXiv 2408.11869), the twin of tinyslim.adapters.elder: the same
ElderConfig (and ELDER_PAPER), the same routing state, codes, deferral and edit loop; only the layers are
torch's.

Shape legend: B sequences, T time, N = B·T tokens, D in, O out, r rank, E experts, k top-k, d_q query width.

    q        the routing layer's input at the key token (detached, NumPy; normalised as the config says)
    p        = softmax(W_g q + b_g)                    (B, E)   W_g = router_weight (E, d_q), b_g = router_bias (E,)
    S        = TopK(W_g q + b_g, k);  g = p on S       (B, k)   raw probabilities (or renormalised)
    G        = scatter(g on S) · z                     (B, E)   dense gate: 0 off S and on deferred rows (z = 0)
    Δ        = s · ((x A_catᵀ) ⊙ G_tok) B_cat          (N, O)   A_cat (E·r, D), B_cat (E·r, O): the experts stacked;
                                                                G_tok (N, E·r): each token's sequence gate, r times
    L_g      = −(1/B) Σ_b Σ_{j∈T_b} log p_{b,j}         the guided loss, while editing

The dense gate form is the top-k mixture with the other experts' gates 0 (the NumPy kernel's top-k form adds
the same terms in another order); a deferred row (z = 0) has G = 0, so its Δ is exactly 0 and the layer's
output the base's bit for bit. What the method does with the arrays (presets, codes, Hamming deferral, the
query mean) is the NumPy method's code, reading and writing the layers through ``array`` / ``write`` and
choosing experts through ``select``. Random draws (A, the routers, hashed presets) come from the same named
NumPy streams in the same order, so one seed gives the same ELDER on both engines. The dense form costs the
two matmuls of one rank-E·r LoRA (E·r = 32 at the defaults: FT-LoRA's rank).

    from tinyslim.torch import from_gpt, make_method
    elder = make_method("elder")                     # ElderConfig's fields; make_method("elder", **ELDER_PAPER)
    elder.attach(from_gpt(gpt), seed=0)              # or a CausalLM / transformers GPT-2 model
    elder.fit_query_mean(text)                       # query_norm="centred": μ from unlabelled text (B, T)
    q = elder.subject_queries(subject_ids)           # key_pos="subject_alone"
    elder.edit(x, y, mask, key_pos=subject_positions(prompts, subjects), queries=q)
    out = elder.route(x, key_pos, q)                 # {"logits" (NumPy), "z", "min_hamming"}
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as TF

from .. import adapters
from ..adapters.elder import top_k
from .ft_lora import EditingEngine, as_numpy
from .layers import AdaptedLinear, base_weight
from .method import TorchMethod

__all__ = ["ArrayAccess", "ElderLinear", "QueryTap", "Elder", "long_index"]


def long_index(a, device) -> torch.Tensor:
    """NumPy indices (experts, rows, slots: decided on the NumPy side) as a torch index tensor."""
    return torch.as_tensor(np.asarray(a), dtype=torch.long, device=device)


class ArrayAccess:
    """The NumPy methods' view of a torch layer's arrays: ``array(name)`` a NumPy copy (a view on the CPU),
    ``write(name, index, value)`` an in-place write without gradient."""

    def array(self, name: str) -> np.ndarray:
        return as_numpy(getattr(self, name))

    @torch.no_grad()
    def write(self, name: str, index, value) -> None:
        getattr(self, name)[index] = self.tensor(value)


class ElderLinear(ArrayAccess, AdaptedLinear):
    """A frozen Linear / Conv1D plus a per-sequence top-k mixture of E LoRAs, routed from the shared query q."""

    adapter_names = ("lora_A", "lora_B", "router_weight", "router_bias", "edit_codes", "query_mean")
    trainable_names = ("lora_A", "lora_B", "router_weight", "router_bias")

    def __init__(self, base_layer, config, streams):
        super().__init__(base_layer)
        D, O, E, r = self.in_features, self.out_features, config.n_experts, config.r
        self.config, self.E, self.scale = config, E, float(config.scale)
        bound = 1.0 / math.sqrt(D)
        self.lora_A = self.new_parameter(streams["init"].uniform(-bound, bound, (E, r, D)))  # (E, r, D)
        self.lora_B = self.new_parameter(np.zeros((E, O, r)))  # (E, O, r)
        self.router_weight = self.new_parameter(np.zeros((E, D)))  # placeholders until init_router
        self.router_bias = self.new_parameter(np.zeros(E)) if config.gate_bias else None
        self.register_buffer("edit_codes", self.tensor(np.zeros((config.max_edits, E))).clone())  # k-hot rows
        self.register_buffer("query_mean", self.tensor(np.zeros((1, D))).clone())  # μ (P, d_q)
        if not config.gate_bias:
            self.adapter_names = tuple(n for n in self.adapter_names if n != "router_bias")
            self.trainable_names = tuple(n for n in self.trainable_names if n != "router_bias")
        self.routing = None  # the method's ElderRouting, shared by the model's layers
        self.is_routing_layer = False
        self.guide_loss = None  # L_g of the last editing forward

    def init_router(self, d_q: int, rng: np.random.Generator, n_pos: int = 1) -> None:
        """W_g, b_g ~ U(±1/√d_q) (the `router` stream, the NumPy layer's draws); μ (n_pos, d_q) = 0."""
        bound = 1.0 / math.sqrt(d_q)
        self.query_mean = self.tensor(np.zeros((n_pos, d_q))).clone()
        self.router_weight = self.new_parameter(rng.uniform(-bound, bound, (self.E, d_q)))
        if self.config.gate_bias:
            self.router_bias = self.new_parameter(rng.uniform(-bound, bound, self.E))

    def router_logits(self, q) -> torch.Tensor:  # q (B, d_q) -> W_g q + b_g (B, E)
        q = q if isinstance(q, torch.Tensor) else self.tensor(q)
        return TF.linear(q, self.router_weight, self.router_bias)

    def select(self, q) -> np.ndarray:  # q (B, d_q) -> S (B, k) ints: TopK(W_g q + b_g, k), no gradient
        with torch.no_grad():
            return top_k(as_numpy(self.router_logits(q)), self.config.top_k)

    def forward(self, x):  # x (B, T, D)
        if self.is_routing_layer:
            self.routing.capture(as_numpy(x))
        return super().forward(x)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:  # x (N, D) -> Δ (N, O)
        cfg, ctx = self.config, self.routing
        q, z = ctx.q, ctx.z  # (B, d_q), (B,) NumPy
        B, (N, D) = q.shape[0], x.shape
        if N % B:
            raise RuntimeError(f"the routing query is for {B} sequences but this layer got {N} tokens: "
                               "the routing layer must run before every adapted layer in the same forward")
        if not z.any():
            return x.new_zeros(N, self.out_features)  # every row deferred: the base
        logits = self.router_logits(q)  # (B, E)
        p = torch.softmax(logits, dim=-1)  # p^l
        hard = ctx.editing and cfg.routing == "hard"
        S = long_index(ctx.preset[self] if hard else top_k(as_numpy(logits), cfg.top_k), x.device)  # S^l
        g = p.gather(1, S)  # raw probabilities on S
        if cfg.renormalize_gates:
            g = g / g.sum(dim=1, keepdim=True)
        if ctx.editing and cfg.guide_coef:
            T_l = long_index(ctx.preset[self], x.device)  # the preset allocation (B, k)
            self.guide_loss = -torch.log_softmax(logits, dim=-1).gather(1, T_l).sum() / float(B)
        G = torch.zeros_like(p).scatter(1, S, g) * self.tensor(z)[:, None]  # (B, E): 0 off S and on z = 0 rows
        E, r = self.E, self.config.r
        gate = G.repeat_interleave(N // B, dim=0).repeat_interleave(r, dim=1)  # (N, E·r): a sequence's gate per token
        H = (x @ self.lora_A.reshape(E * r, D).T) * gate  # (N, E·r)
        return self.scale * (H @ self.lora_B.transpose(1, 2).reshape(E * r, self.out_features))

    def delta_weight(self):
        raise NotImplementedError("ELDER cannot be merged into W0: its routing and deferral depend on the input")

    def extra_repr(self):
        return f"{super().extra_repr()}, E={self.E}, k={self.config.top_k}, r={self.config.r}, scale={self.scale:g}"


class QueryTap(AdaptedLinear):
    """The routing layer when it is not adapted itself: records its input for q and adds nothing."""

    def forward(self, x):  # x (B, T, D)
        self.routing.capture(as_numpy(x))
        return self.base_layer(x)

    def delta_weight(self) -> torch.Tensor:
        return torch.zeros_like(base_weight(self.base_layer))


class Elder(EditingEngine, adapters.Elder, TorchMethod):
    """ELDER on torch: the NumPy method's routing, codes, deferral and edit loop over torch layers."""

    layer_class, query_tap_class = ElderLinear, QueryTap

    def make_layer(self, base_layer, streams):
        return ElderLinear(base_layer, self.config, streams)
