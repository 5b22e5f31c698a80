"""ELDER — lifelong editing with a mixture of LoRAs (Li et al., arXiv 2408.11869), docs/methods.md §5.

Shape legend: B sequences, T time, N = B·T tokens, D in, O out, r rank, E experts per layer, k top-k,
L_a adapted layers, d_q query width.

A fixed pool of E LoRAs per adapted layer, shared by all edits, mixed per *sequence*:

    q        the hidden state entering the routing layer at the key token (detached; the routing layer is
             not after the first adapted layer, so q depends on the base model only), as the routers see it:
             raw (query_norm "none", the paper), or q ← √d_q·(q − μ_t)/‖q − μ_t‖ ("centred"; μ_t the base's
             mean input of that layer at the key's position t over unlabelled text, fit_query_mean;
             "scaled": the same with μ = 0)
    key      "last_prompt" (the paper: the token before the answer), "last", or, for a character-level
             model, the edited subject's last character: "subject_last" (in the prompt) or "subject_alone"
             (the subject read alone, ROME's context-free subject key: every template of a fact gets the
             same q). Why: docs/elder_routing.md (a last prompt character sees its template, not the entity)
    p^l      = softmax(W_g^l q + b_g^l)                                ∈ ℝ^E   per sequence
    S^l      = TopK(p^l, k);   g^l_e = p^l_e on S^l, else 0            raw probabilities, Σ_e g^l_e < 1
    y_t      = W0 x_t + b0 + z · Σ_{e∈S^l} g^l_e · s · B_e^l A_e^l x_t for every token t of the sequence

The gate is broadcast to the sequence's tokens and the mixture is one kernel call in the top-k form;
a sequence with z = 0 gets empty slots (−1), so its rows skip the branch and equal the base bit for bit.
Router gradient (autograd, through the gather and the softmax): dp_e = z·Σ_t dG[t, e] on S^l; no
gradient reaches q.

Losses while editing (T_b^l: the preset allocation, a k-subset per edit and layer):

    L_edit = CE over the target tokens          L_g^l = −(1/B) Σ_b Σ_{j∈T_b^l} log p^l_{b,j}
    L      = L_edit + λ_g · Σ_l L_g^l           λ_g = 1
    preset "init":   T^l = TopK(p^l(q_edit), k) at the edit's first iteration, then frozen
    preset "hashed": a fixed pseudo-random k-subset per (edit, layer) from the `hash` stream
    routing "soft":  the router's own top-k routes; "hard": routing is forced to T while editing

Deferral (evaluation; z = 1 while an edit trains):

    c(q) = concat_l khot( TopK(W_g^l q + b_g^l, k) )        ∈ {0,1}^{L_a·E}, k ones per layer block
    z(x) = 1[ min_t Hamming(c(q(x)), c_t) < θ ]             z = 0 when no edit is stored;  θ = k·L_a/2
    after an edit's last step: c_t = c(q_t) with the current routers, appended, never refreshed

Top-k is taken on the router logits (the same order as on p, without rounding ties), ties to the lower
index. The code table lives in the layers (``edit_codes``, one k-hot row per stored edit, a fixed
capacity ``max_edits``), so ``adapter_state_dict`` saves it with the experts.

    from tinyslim.adapters import Elder
    elder = Elder(**ELDER_PAPER)           # the paper's routing; the defaults need the subject (below)
    elder.attach(base_copy, seed=0)
    for x, y, mask in edit_stream:          # one (prompt, target) per edit: mask marks the target tokens
        elder.edit(x, y, mask)              # reset Adam, n_iter steps of L, store the edit's code
    with elder.evaluating(), elder.keys(key_pos):   # key_pos (B,): each row's last prompt token
        logits, _ = elder.model(x)                  # deferred rows are the base model exactly

The subject keys need the subject (an edit request names it, as ROME's and EasyEdit's do):
``edit(x, y, mask, key_pos=subject_positions(prompts, subjects), queries=elder.subject_queries(ids))``
(queries only for "subject_alone"), and the same key_pos / queries in ``keys`` and ``route``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from ..autograd import Tensor, no_grad
from ..lowrank import mixture_lowrank
from ..nn import Linear, Parameter
from .base import AdaptedLinear, Streams
from .ft_lora import LR_SCHEDULES, EditingMethod, subject_batch

__all__ = ["ElderConfig", "ElderLinear", "QueryTap", "ElderRouting", "Elder", "key_positions", "subject_positions",
           "ELDER_PAPER"]

KEY_POS = ("last_prompt", "last", "subject_last", "subject_alone")
# the paper's routing (arXiv 2408.11869) as ElderConfig overrides: the query at the last prompt token as the
# model gives it, routers trained by the per-edit Adam, a pool of 8 rank-4 experts; on the character-level base
# every code collapses to one (docs/elder_routing.md). Scenario C runs it as the row "elder_paper".
ELDER_PAPER = dict(key_pos="last_prompt", query_norm="none", router_lr_scale=1.0, n_experts=8, top_k=2, r=4,
                   lora_alpha=4)
QUERY_NORMS = ("none", "scaled", "centred")


@dataclass
class ElderConfig:
    """ELDER (docs/methods.md §5.7). The defaults adapt the paper's routing to a character-level model (the
    subject key, a centred query, frozen routers, 32 rank-1 experts; docs/methods.md §5.7a and
    docs/elder_routing.md measure why); ``ELDER_PAPER`` holds the paper's values of those fields."""

    n_experts: int = 32  # E per adapted layer (the paper's row, ELDER_PAPER: 8 rank-4 experts)
    top_k: int = 2  # k
    r: int = 1  # E·r = 32: FT-LoRA's rank, and 8 rank-4 experts' parameter count
    lora_alpha: float = 1  # s = α/r = 1
    target_modules: list | str | None = None  # None: mlp.c_fc of the last 2 blocks (L_a = 2)
    routing_layer: str | None = None  # a Linear whose input gives q; None: the first adapted layer
    key_pos: str = "subject_alone"  # the subject's last token read with the subject alone; or "subject_last" (that
    #                                 token in the prompt), "last_prompt" (the paper's), "last" (the last real token)
    query_norm: str = "centred"  # (q − μ_t)·√d_q/‖q − μ_t‖, μ: fit_query_mean; or "scaled" (μ = 0), "none" (the paper's)
    gate_bias: bool = True
    renormalize_gates: bool = False  # True: g renormalised over the top-k
    guide_coef: float = 1.0  # λ_g
    preset: str = "init"  # or "hashed"
    routing: str = "soft"  # or "hard" (forced to the preset while editing)
    n_iter: int = 30  # optimisation steps per edit
    lr: float = 1e-2  # Adam, reset per edit
    router_lr_scale: float = 0.0  # the routers' lr = lr · router_lr_scale (0: frozen at their init; the paper's: 1)
    lr_schedule: str = "constant"  # or "step" (×0.5 every 20 iterations)
    theta: float | None = None  # deferral threshold; None: k·L_a/2
    deferral: bool = True  # False: z ≡ 1 (never deferred; the reduction to FT-LoRA)
    max_edits: int = 1024  # capacity of the code table
    pad_token_id: int | None = None  # for key_pos="last" and rows without targets: the last non-pad token

    def __post_init__(self):
        choices = dict(key_pos=KEY_POS, query_norm=QUERY_NORMS, preset=("init", "hashed"), routing=("soft", "hard"),
                       lr_schedule=LR_SCHEDULES)
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"ElderConfig.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("n_experts", "top_k", "r", "n_iter", "max_edits"):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ElderConfig.{key} must be a positive integer, got {value!r}")
        if self.top_k > self.n_experts:
            raise ValueError(f"ElderConfig.top_k = {self.top_k} exceeds n_experts = {self.n_experts}")
        if not self.router_lr_scale >= 0:
            raise ValueError(f"ElderConfig.router_lr_scale must be >= 0, got {self.router_lr_scale}")
        if self.theta is not None and not self.theta > 0:
            raise ValueError(f"ElderConfig.theta must be > 0 (or None for k·L_a/2), got {self.theta}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r

    def make_layer(self, base_layer: Linear, streams: Streams) -> "ElderLinear":
        return ElderLinear(base_layer, self, streams)


class ElderLinear(AdaptedLinear):
    """A frozen Linear plus a per-sequence top-k mixture of E LoRAs, routed from the shared query q."""

    adapter_names = ("lora_A", "lora_B", "router_weight", "router_bias", "edit_codes", "query_mean")
    trainable_names = ("lora_A", "lora_B", "router_weight", "router_bias")

    def __init__(self, base_layer: Linear, config: ElderConfig, streams: Streams):
        super().__init__(base_layer)
        D, O, dtype = self.in_features, self.out_features, base_layer.weight.dtype
        E, r = config.n_experts, config.r
        self.config, self.E, self.scale = config, E, float(config.scale)
        bound = 1.0 / math.sqrt(D)
        self.lora_A = Parameter(streams["init"].uniform(-bound, bound, (E, r, D)).astype(dtype))  # (E, r, D)
        self.lora_B = Parameter(np.zeros((E, O, r), dtype=dtype))  # (E, O, r)
        # W_g (E, d_q), b_g (E,): placeholders until init_router (at attach, once the routing layer's d_q is known)
        self.router_weight = Parameter(np.zeros((E, D), dtype=dtype))
        self.router_bias = Parameter(np.zeros(E, dtype=dtype)) if config.gate_bias else None
        self.edit_codes = Parameter(np.zeros((config.max_edits, E), dtype=dtype), requires_grad=False)  # k-hot rows
        self.query_mean = Parameter(np.zeros((1, D), dtype=dtype), requires_grad=False)  # μ (P, d_q): init_router
        if not config.gate_bias:
            self.adapter_names = tuple(n for n in self.adapter_names if n != "router_bias")
            self.trainable_names = tuple(n for n in self.trainable_names if n != "router_bias")
        self.routing = None  # the ElderRouting shared by the model's layers
        self.is_routing_layer = False
        self.guide_loss = None  # L_g of the last editing forward

    def init_router(self, d_q: int, rng: np.random.Generator, n_pos: int = 1) -> None:
        """W_g, b_g ~ U(±1/√d_q), like a torch Linear (the `router` stream, layer after layer); μ (n_pos, d_q) = 0
        (query_norm="centred": one mean per position, set by Elder.fit_query_mean)."""
        bound, dtype = 1.0 / math.sqrt(d_q), self.lora_A.dtype
        self.query_mean = Parameter(np.zeros((n_pos, d_q), dtype=dtype), requires_grad=False)
        self.router_weight = Parameter(rng.uniform(-bound, bound, (self.E, d_q)).astype(dtype))
        if self.config.gate_bias:
            self.router_bias = Parameter(rng.uniform(-bound, bound, self.E).astype(dtype))

    def router_logits(self, q) -> Tensor:  # q (B, d_q), a constant -> W_g q + b_g (B, E)
        return F.linear(q, self.router_weight, self.router_bias)

    def select(self, q: np.ndarray) -> np.ndarray:  # q (B, d_q) -> S (B, k) ints: TopK(W_g q + b_g, k), no gradient
        with no_grad():
            return top_k(self.router_logits(q).data, self.config.top_k)

    # the method reads and writes the layer's arrays through these two (the torch layer's copy to and from NumPy)
    def array(self, name: str) -> np.ndarray:
        return getattr(self, name).data

    def write(self, name: str, index, value) -> None:
        getattr(self, name).data[index] = value

    def forward(self, x):  # x (B, T, D)
        if self.is_routing_layer:
            self.routing.capture(x)
        return super().forward(x)

    def adapter_delta(self, x: Tensor) -> Tensor:  # x (N, D), N = B·T -> Δ (N, O)
        cfg, ctx = self.config, self.routing
        q, z = ctx.q, ctx.z  # (B, d_q), (B,)
        B = q.shape[0]
        if x.shape[0] % B:
            raise RuntimeError(f"the routing query is for {B} sequences but this layer got {x.shape[0]} tokens: "
                               "the routing layer must run before every adapted layer in the same forward")
        T = x.shape[0] // B
        logits = self.router_logits(q)  # (B, E)
        p = F.softmax(logits, axis=-1)  # p^l
        if ctx.editing and cfg.routing == "hard":
            S = ctx.preset[self]  # routing forced to the preset allocation T^l
        else:
            S = top_k(logits.data, cfg.top_k)  # S^l (B, k)
        g = F.gather(p, S, axis=1)  # raw probabilities on S (B, k)
        if cfg.renormalize_gates:
            g = g / g.sum(axis=1, keepdims=True)
        if ctx.editing and cfg.guide_coef:
            self.guide_loss = -F.gather(F.log_softmax(logits, axis=-1), ctx.preset[self], axis=1).sum() / float(B)
        seq = np.repeat(np.arange(B), T)  # the sequence of every token
        idx = np.where(z[seq, None], S[seq], -1).astype(np.int32)  # z = 0: empty slots, the branch is skipped
        return mixture_lowrank(x, self.lora_A, self.lora_B, (idx, g[seq]), scale=self.scale)

    def delta_weight(self):
        raise NotImplementedError("ELDER cannot be merged into W0: its routing and deferral depend on the input")

    def extra_repr(self):
        return f"{super().extra_repr()}, E={self.E}, k={self.config.top_k}, r={self.config.r}, scale={self.scale:g}"


class QueryTap(AdaptedLinear):
    """The routing layer when it is not adapted itself: records its input for q and adds nothing."""

    def forward(self, x):  # x (B, T, D)
        self.routing.capture(x)
        return self.base_layer(x)

    def delta_weight(self) -> np.ndarray:
        return np.zeros_like(self.base_layer.weight.data)


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries per row, ties to the lower index: (B, k) int."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def subject_positions(prompts: list, subjects: list) -> np.ndarray:
    """(B,) the key_pos="subject_last" token of every prompt: the last character of the last occurrence of
    its subject (the edited entity, named by the edit request as in ROME's or EasyEdit's requests); a row
    whose subject is None (text without a subject) keys on its last character."""
    if len(prompts) != len(subjects):
        raise ValueError(f"{len(prompts)} prompts but {len(subjects)} subjects")
    out = []
    for prompt, subject in zip(prompts, subjects):
        if subject is None:
            out.append(len(prompt) - 1)
            continue
        i = prompt.rfind(subject) if subject else -1
        if i < 0:
            raise ValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
        out.append(i + len(subject) - 1)
    return np.array(out, dtype=np.int64)


def key_positions(x, mask=None, mode: str = "last_prompt", pad_token_id=None) -> np.ndarray:
    """(B,) the key token of every row: "last_prompt" = the position predicting the first target token
    (the first mask ≠ 0); "last" (or a row without targets) = the last real token. "subject_last" cannot
    be read from the tokens: give the positions (``subject_positions``)."""
    if mode in ("subject_last", "subject_alone"):
        raise ValueError(f'key_pos="{mode}" needs the subject\'s position: pass key_pos='
                         'subject_positions(prompts, subjects) to edit() and keys()')
    x = np.asarray(x)
    B, T = x.shape
    last = np.full(B, T - 1) if pad_token_id is None else \
        np.where((x != pad_token_id).any(axis=1), T - 1 - np.argmax((x != pad_token_id)[:, ::-1], axis=1), 0)
    if mode == "last" or mask is None:
        return last
    has_target = np.asarray(mask).reshape(B, T) != 0
    return np.where(has_target.any(axis=1), np.argmax(has_target, axis=1), last)


class ElderRouting:
    """What the adapted layers share during one forward pass: the query q (B, d_q), the deferral flags
    z (B,), and, while editing, the preset allocations {layer: (B, k)}."""

    def __init__(self, method: "Elder"):
        self.method = method
        self.key_pos = None  # (B,) key positions for the next forward passes (None: the last token)
        self.collect = None  # fit_query_mean: a list collecting the routing layer's inputs
        self.given = None  # (B, d_q) raw queries given by the caller (subject_alone); a NaN row: read at key_pos
        self.probe = False  # subject_queries: read the raw queries, route nothing
        self.editing = False
        self.q = self.z = None
        self.preset = {}

    def capture(self, x) -> None:  # x (B, T, d_q): the routing layer's input
        data = x.data if isinstance(x, Tensor) else np.asarray(x)
        if data.ndim != 3:
            raise ValueError(f"the routing layer expects (B, T, D) inputs, got shape {data.shape}")
        B, T, _ = data.shape
        m = self.method
        if self.collect is not None:  # fit_query_mean: record every token, route nothing
            self.collect.append(data.reshape(B * T, -1).astype(np.float64))
            self.q, self.z = data[:, -1].copy(), np.zeros(B, dtype=bool)
            return
        pos = np.full(B, T - 1) if self.key_pos is None else np.asarray(self.key_pos)
        if pos.shape != (B,) or pos.min() < 0 or pos.max() >= T:
            raise ValueError(f"key positions {pos.tolist()} do not fit a batch of {B} rows of length {T}")
        self.q = m.normalise(data[np.arange(B), pos], pos)  # detached
        if self.probe:
            self.z = np.zeros(B, dtype=bool)
            return
        if self.given is not None:
            if len(self.given) != B:
                raise ValueError(f"{len(self.given)} given queries for a batch of {B} rows")
            rows = ~np.isnan(self.given[:, 0])
            self.q[rows] = self.given[rows]
        if self.editing:
            self.z = np.ones(B, dtype=bool)  # z = 1 while an edit trains
            self.preset = m.presets_for(self.q)
        elif not m.config.deferral:
            self.z = np.ones(B, dtype=bool)
        else:
            self.z = m.min_hamming(self.q) < m.theta


class Elder(EditingMethod):
    """ELDER: a fixed pool of routed LoRAs per layer, the guided loss, and deferral by code distance."""

    name = "elder"
    config_class = ElderConfig
    layer_class, query_tap_class = ElderLinear, QueryTap  # the engine's (tinyslim.torch has its own)

    def after_attach(self, model) -> None:
        """The routing layer (a QueryTap when it is not adapted), the routers, the shared routing state."""
        layers, model = self.layers(), self.model
        routing_name = self.config.routing_layer or self.adapted[0]
        linears = self._linear_names(model)  # model order = forward order in a GPT block
        if routing_name not in linears:
            raise ValueError(f"routing_layer {routing_name!r} is not a Linear of the model; the Linears are {linears}")
        if linears.index(routing_name) > linears.index(self.adapted[0]):
            raise ValueError(f"routing_layer {routing_name!r} comes after the first adapted layer {self.adapted[0]!r}; "
                             "q must depend on the base model only")
        self.routing = ElderRouting(self)
        if routing_name in self.adapted:
            router_layer = self._submodule(model, routing_name)
            router_layer.is_routing_layer = True
        else:
            parent, _, child = routing_name.rpartition(".")
            router_layer = self.query_tap_class(getattr(self._submodule(model, parent), child))
            router_layer.routing = self.routing
            setattr(self._submodule(model, parent), child, router_layer)
        d_q = router_layer.in_features
        for layer in layers:
            layer.init_router(d_q, self.streams["router"], model.config.block_size)
            layer.routing = self.routing
        self._edit_queries = {}  # the queries trained on since before_task: bytes → q (d_q,)
        self._presets = {}  # bytes → [T^l (k,) for every layer]
        self.last_presets = None

    def layers(self) -> list:
        return [layer for layer in super().layers() if isinstance(layer, self.layer_class)]

    def param_groups(self) -> list:
        """Experts at lr, routers at lr · router_lr_scale (the spec's Adam on all of them when it is 1)."""
        layers, scale = self.layers(), self.config.router_lr_scale
        if scale == 1:
            return self.trainable_parameters()
        routers = [p for layer in layers for p in (layer.router_weight, layer.router_bias) if p is not None]
        experts = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
        return [{"params": experts}, {"params": routers, "lr_scale": float(scale)}]

    @property
    def theta(self) -> float:
        cfg = self.config
        return cfg.theta if cfg.theta is not None else cfg.top_k * len(self.layers()) / 2

    # ---- training ------------------------------------------------------------------------------------
    def before_task(self, task_id: int, steps: int, optimizer) -> None:
        super().before_task(task_id, steps, optimizer)  # reset Adam
        self._edit_queries, self._presets = {}, {}

    def loss(self, x, y, mask, rng=None):
        self._check_attached()
        cfg = self.config
        key_pos, given = getattr(self, "edit_key_pos", None), getattr(self, "edit_queries", None)
        if cfg.key_pos == "subject_alone" and given is None:
            raise ValueError('key_pos="subject_alone" needs the subject\'s query: pass '
                             'queries=elder.subject_queries(subject_ids) to edit()')
        self.routing.key_pos = key_positions(x, mask, cfg.key_pos, cfg.pad_token_id) if key_pos is None else key_pos
        self.routing.editing, self.routing.given = True, given
        try:
            _, loss = self.model(x, y, loss_mask=mask, rng=rng)  # L_edit (z = 1)
        finally:
            self.routing.editing, self.routing.key_pos, self.routing.given = False, None, None
        if cfg.guide_coef:
            loss = loss + cfg.guide_coef * sum(layer.guide_loss for layer in self.layers())
        return loss

    def presets_for(self, q: np.ndarray) -> dict:
        """{layer: T^l (B, k)} for the rows of q, fixed at each query's first iteration of the current edit."""
        cfg, layers = self.config, self.layers()
        for row in q:
            key = row.tobytes()
            if key in self._presets:
                continue
            self._edit_queries[key] = row.copy()
            if cfg.preset == "init":  # TopK(p^l(q_edit), k) with the routers as they are before this edit's updates
                self._presets[key] = [layer.select(row[None])[0] for layer in layers]
            else:  # "hashed": a fixed pseudo-random k-subset per (edit id, layer)
                rng = self.streams["hash"]
                self._presets[key] = [np.sort(rng.choice(cfg.n_experts, cfg.top_k, replace=False)) for _ in layers]
        return {layer: np.stack([self._presets[row.tobytes()][l] for row in q]) for l, layer in enumerate(layers)}

    def after_task(self, task_id: int) -> None:
        """Store c(q_t) of every distinct query trained on in this edit, with the routers as they are now."""
        if self._edit_queries:
            self.store_codes(np.stack(list(self._edit_queries.values())))
        self.last_presets = next(iter(self._presets.values()), None)  # [T^l (k,)] of this edit's first row
        self._edit_queries, self._presets = {}, {}

    # ---- the query ------------------------------------------------------------------------------------
    def normalise(self, q: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """q (B, d_q), read at positions pos (B,), as the routers see it: raw ("none"), or rescaled to norm √d_q
        ("scaled"), after subtracting μ_pos, the base's mean query at that position over unlabelled text
        ("centred"; see fit_query_mean)."""
        mode = self.config.query_norm
        q = np.array(q, copy=True)
        if mode == "none":
            return q
        if mode == "centred":
            mu = self.layers()[0].array("query_mean")
            if not mu.any():
                raise RuntimeError('query_norm="centred" needs μ: call fit_query_mean(x) on unlabelled text first')
            q = q - mu[np.minimum(np.asarray(pos), len(mu) - 1)]
        norm = np.sqrt((q.astype(np.float64) ** 2).sum(axis=1, keepdims=True))
        return (q * (math.sqrt(q.shape[1]) / np.maximum(norm, 1e-12))).astype(q.dtype)

    def fit_query_mean(self, x) -> np.ndarray:
        """μ_t = the mean of the routing layer's input at position t over the rows of x (B, T): unlabelled text
        run through the base model (q depends on the base only; a position's state carries an offset shared by
        every text, largest at the first positions). Positions ≥ T get the mean over positions T/2…T−1.
        Stored in every layer. Returns μ (P, d_q), P = the model's block_size."""
        self._check_attached()
        x = np.asarray(x)
        P = len(self.layers()[0].array("query_mean"))
        if x.ndim != 2 or x.shape[1] > P:
            raise ValueError(f"fit_query_mean needs token ids (B, T) with T <= block_size {P}, got shape {x.shape}")
        self.routing.collect = []
        try:
            with self.evaluating():
                self.model(x)
            states = self.routing.collect[0].reshape(x.shape[0], x.shape[1], -1)  # (B, T, d_q)
        finally:
            self.routing.collect = None
        T = x.shape[1]
        mu = np.empty((P, states.shape[-1]))
        mu[:T] = states.mean(axis=0)
        mu[T:] = states[:, T // 2:].mean(axis=(0, 1))
        for layer in self.layers():
            layer.write("query_mean", slice(None), mu)
        return mu.astype(self.layers()[0].array("query_mean").dtype)

    # ---- codes and deferral ----------------------------------------------------------------------------
    def codes(self, q: np.ndarray) -> list:
        """c(q) per adapted layer: [(B, E) k-hot of TopK(W_g^l q + b_g^l, k)]."""
        out = []
        for layer in self.layers():
            S = layer.select(q)
            c = np.zeros((len(q), layer.E), dtype=layer.array("edit_codes").dtype)
            np.put_along_axis(c, S, 1, axis=1)
            out.append(c)
        return out

    @property
    def n_edits(self) -> int:
        """Number of stored codes (rows of the code table in use)."""
        return int(np.count_nonzero(self.layers()[0].array("edit_codes").any(axis=1)))

    def store_codes(self, q: np.ndarray) -> None:
        n, layers = self.n_edits, self.layers()
        if n + len(q) > self.config.max_edits:
            raise RuntimeError(f"the code table is full ({self.config.max_edits} edits); raise ElderConfig.max_edits")
        for layer, c in zip(layers, self.codes(q)):
            layer.write("edit_codes", slice(n, n + len(q)), c)

    def min_hamming(self, q: np.ndarray) -> np.ndarray:
        """(B,) min_t Hamming(c(q), c_t) over the stored codes (inf when none is stored)."""
        n = self.n_edits
        if n == 0:
            return np.full(len(q), np.inf)
        dist = 0.0
        for layer, c in zip(self.layers(), self.codes(q)):
            table = layer.array("edit_codes")[:n]  # (n, E)
            dist = dist + c.sum(axis=1)[:, None] + table.sum(axis=1)[None, :] - 2 * c @ table.T  # |c − c_t|₁
        return np.rint(dist).min(axis=1)

    # ---- evaluation -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def keys(self, key_pos, queries=None):
        """Route the forward passes inside the block from the tokens at key_pos (B,) (None: the last token), or
        from given queries (B, d_q) as the routers see them (subject_queries; a NaN row is read at key_pos)."""
        r = self.routing
        previous = r.key_pos, r.given
        r.key_pos = None if key_pos is None else np.asarray(key_pos)
        r.given = None if queries is None else np.asarray(queries)
        try:
            yield self.model
        finally:
            r.key_pos, r.given = previous

    def subject_queries(self, subjects: list) -> np.ndarray:
        """Queries (B, d_q) of key_pos="subject_alone", as the routers see them: the routing layer's input at
        each subject's last token with the subject alone as the context (ROME's context-free subject key, without the random
        prefixes ROME averages over). subjects: B token-id sequences (a causal model ignores the right padding)."""
        self._check_attached()
        ids, lengths = subject_batch(subjects)
        self.routing.probe = True
        try:
            with self.evaluating(), self.keys(lengths - 1):
                self.model(ids)
            return self.routing.q.copy()
        finally:
            self.routing.probe = False

    def route(self, x, key_pos=None, queries=None) -> dict:
        """One evaluation forward of x (B, T): {"logits", "z" (B,), "min_hamming" (B,)}."""
        with self.evaluating(), self.keys(key_pos, queries):
            logits, _ = self.model(x)
            q = self.routing.q
        return {"logits": self._numpy(logits), "z": self.routing.z.copy(), "min_hamming": self.min_hamming(q)}
