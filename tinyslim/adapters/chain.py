"""COLA — Chain of LoRA (Xia, Qin, Hazan; arXiv 2401.04151), docs/methods.md §6.

Shape legend: D in, O out, r_j rank of link j, T total optimizer steps of the task.

A chain of m LoRA links learned one after another over a fixed budget of T steps:

    during link j:   y = W^(j) x + b0 + s_j · B_j A_j x,      W^(j) = W0 + Σ_{i<j} s_i B_i A_i
    after training:  W_final = W0 + Σ_j s_j B_j A_j          rank(W_final − W0) ≤ Σ_j r_j

    knots = {⌊j·T/m⌋ : j = 1..m−1}  (or an explicit list)
    at step t ∈ knots (before the step):
        W ← W + s_j B_j A_j                        tie the knot, every adapted layer
        j ← j+1;  A_j ~ U(±1/√D) from the `reinit` stream;  B_j = 0   (rank r_j)
        reset the optimizer state
    lr_t = lr0 · (1 − t/T)                         one global linear decay ("restart": per link)

Link 1 is plain LoRA (lora.py, the `init` stream), so chain_len = 1 is plain LoRA at the same
budget and schedule, bit for bit, and never touches `reinit`. Rank step-down (``ranks=[4, 2]``)
keeps the factors at r_max = max(ranks) and zero-pads a smaller link (padded rows of A and columns of
B get exactly zero gradient, so they stay 0); s_j = s_1 (α_j = s·r_j), or α/r_j with
``alpha_mode="fixed"``. COLA owns the learning rate: it sets ``optimizer.lr`` before every step, from
lr0 = ``config.lr`` (None: the optimizer's lr when the first task starts).

COLA is a single-task method; on a task sequence every task runs its own chain over its own steps,
and the previous task's last link is tied in first.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .base import Method
from .lora import LoraConfig, LoraLinear, lora_scale

__all__ = ["ColaConfig", "COLA"]


@dataclass
class ColaConfig(LoraConfig):
    """COLA (docs/methods.md §6.6). `lr` is lr0 of the linear decay; None takes the optimizer's learning rate
    at the first before_task (the runner's, 1e-3 in docs/methods.md)."""

    r: int = 4  # rank of every link (r_1 when `ranks` is given)
    lora_alpha: float = 8  # s = α/r = 2, as the paper's 8/16
    target_modules: list | str = field(default_factory=lambda: ["attn.c_attn"])
    chain_len: int = 3  # m; 1 = plain LoRA
    total_steps: int | None = None  # T; None = the `steps` given to before_task
    knots: list | None = None  # explicit knot steps (m − 1 of them, increasing, in (0, T)); None = evenly spaced
    ranks: list | None = None  # step-down variant, e.g. [4, 2]: r_j per link (then `r` is unused)
    alpha_mode: str = "constant_scale"  # s_j = s_1; "fixed": α constant, s_j = α/r_j
    lr_schedule: str = "global"  # lr_t = lr0·(1 − t/T); "restart": from lr0 to 0 within each link
    reset_optimizer_at_knot: bool = True  # False only as an ablation
    lr: float | None = None  # lr0; None = the runner's lr (the optimizer's lr at the first before_task)

    def __post_init__(self):
        super().__post_init__()
        if self.chain_len < 1:
            raise ValueError(f"ColaConfig.chain_len must be >= 1, got {self.chain_len}")
        if self.ranks is not None:
            self.ranks = [int(r) for r in self.ranks]
            if len(self.ranks) != self.chain_len or min(self.ranks) < 1 or self.ranks[0] != max(self.ranks):
                raise ValueError(f"ColaConfig.ranks must hold chain_len = {self.chain_len} positive ranks, the "
                                 f"first the largest (rank step-down), got {self.ranks}")
        if self.ranks is not None and len(set(self.ranks)) > 1 and not self.reset_optimizer_at_knot:
            raise ValueError("ColaConfig: rank step-down needs reset_optimizer_at_knot=True (a smaller link is "
                             "zero-padded, and Adam moments carried over from the larger link would move the padding)")
        if self.knots is not None:
            self.knots = [int(k) for k in self.knots]
            if len(self.knots) != self.chain_len - 1 or any(b <= a for a, b in zip(self.knots, self.knots[1:])):
                raise ValueError(f"ColaConfig.knots must be chain_len − 1 = {self.chain_len - 1} increasing steps, "
                                 f"got {self.knots}")
        if self.alpha_mode not in ("constant_scale", "fixed"):
            raise ValueError(f"ColaConfig.alpha_mode must be 'constant_scale' or 'fixed', got {self.alpha_mode!r}")
        if self.lr_schedule not in ("global", "restart"):
            raise ValueError(f"ColaConfig.lr_schedule must be 'global' or 'restart', got {self.lr_schedule!r}")

    def link_ranks(self) -> list:
        return list(self.ranks) if self.ranks is not None else [self.r] * self.chain_len

    def link_scales(self) -> list:
        """s_j per link."""
        ranks = self.link_ranks()
        if self.alpha_mode == "fixed":
            return [lora_scale(r, self.lora_alpha, self.use_rslora) for r in ranks]
        return [lora_scale(ranks[0], self.lora_alpha, self.use_rslora)] * len(ranks)

    def make_layer(self, base_layer, streams) -> LoraLinear:
        ranks = self.link_ranks()  # factors at r_max = r_1; smaller later links are zero-padded
        return LoraLinear(base_layer, ranks[0], self.link_scales()[0], self.lora_dropout, streams,
                          init_lora_weights=self.init_lora_weights)

    def knot_steps(self, T: int) -> list:
        """knots = {⌊j·T/m⌋ : j = 1..m−1}, or the explicit list; each must lie in (0, T)."""
        m = self.chain_len
        knots = list(self.knots) if self.knots is not None else [(j * T) // m for j in range(1, m)]
        if any(not 0 < k < T for k in knots) or len(set(knots)) != len(knots):
            raise ValueError(f"COLA: knots {knots} must be distinct steps in (0, T = {T}); use fewer links or more "
                             "steps")
        return knots


class COLA(Method):
    """Chain of LoRA: tune a link, tie the knot (merge it into W), start a fresh link."""

    name = "cola"
    config_class = ColaConfig

    def attach(self, model, seed: int) -> None:
        super().attach(model, seed)  # link 1 = plain LoRA: A from `init`, B = 0
        self.W0 = {name: self._weight(layer) for name, layer in zip(self.adapted, self.layers())}
        self.ranks, self.scales = self.config.link_ranks(), self.config.link_scales()
        self.j = 0  # the current link (0-based)
        self.t = 0  # the step within the task
        self.T, self.knots, self.history = None, [], []  # history: (task, step, link) of every knot tied
        self.lr0 = self.config.lr

    # ---- the schedule --------------------------------------------------------------------------
    def lr_at(self, t: int) -> float:
        """lr_t = lr0·(1 − t/T), or with "restart" the same line within the current link (0 past the end)."""
        lr0 = self.lr0
        if self.config.lr_schedule == "global":
            return lr0 * max(0.0, 1.0 - t / self.T)
        bounds = [0] + self.knots + [self.T]
        start, end = bounds[self.j], bounds[self.j + 1]
        return lr0 * max(0.0, 1.0 - (t - start) / (end - start))

    def tie_knot(self, next_link: int) -> None:
        """W ← W + s_j B_j A_j in every adapted layer, then start link `next_link`: A from `reinit` at its
        rank, B = 0, its scale. (The optimizer reset is the caller's: after_step.)"""
        rng = self.streams["reinit"]
        self.history.append((self.task_id, self.t, self.j))
        for layer in self.layers():
            self._tie(layer)  # W ← W + s_j B_j A_j, with the scale of the link that ends
            layer.scale = self.scales[next_link]
            layer.reset_parameters(rng, self.ranks[next_link])
        self.j = next_link

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict]:
        """The current link's factors and streams (Method), the adapted layers' base weights with the knots
        tied so far ("base.<module>") and the original W0 ("W0.<module>"), each layer's scale, and the
        schedule: link j, step t, budget T, knots, lr0 and the history of tied knots."""
        arrays, meta = super().state_dict()
        for name, layer in zip(self.adapted, self.layers()):
            arrays[f"base.{name}"] = self._weight(layer)
            arrays[f"W0.{name}"] = self.W0[name].copy()
        meta["cola"] = {"j": int(self.j), "t": int(self.t), "T": None if self.T is None else int(self.T),
                        "knots": [int(k) for k in self.knots], "history": [list(map(int, h)) for h in self.history],
                        "lr0": self.lr0, "scales": [float(layer.scale) for layer in self.layers()]}
        return arrays, meta

    def load_state_dict(self, arrays: dict, meta: dict) -> None:
        layers = self.layers()
        missing = [f"{kind}.{name}" for name in self.adapted for kind in ("base", "W0")
                   if f"{kind}.{name}" not in arrays]
        if missing or "cola" not in meta or len(meta["cola"]["scales"]) != len(layers):
            raise ValueError(f"cola: the state lacks {missing or 'the chain schedule'} (saved from another method "
                             "or other target_modules?)")
        for name, layer in zip(self.adapted, layers):
            if arrays[f"base.{name}"].shape != (layer.out_features, layer.in_features):
                raise ValueError(f"cola: base.{name} has shape {arrays[f'base.{name}'].shape}, the layer "
                                 f"{(layer.out_features, layer.in_features)}")
        super().load_state_dict(arrays, meta)
        state = meta["cola"]
        for name, layer, scale in zip(self.adapted, layers, state["scales"]):
            self._set_weight(layer, arrays[f"base.{name}"])
            self.W0[name] = np.array(arrays[f"W0.{name}"])
            layer.scale = scale
        self.j, self.t, self.T = int(state["j"]), int(state["t"]), state["T"]
        self.knots, self.lr0 = list(state["knots"]), state["lr0"]
        self.history = [tuple(h) for h in state["history"]]

    # ---- the hooks -----------------------------------------------------------------------------
    def before_task(self, task_id: int, steps: int, optimizer) -> None:
        self._check_attached()
        if self.T is not None:  # an earlier task built a chain: tie its last link in, start a new chain
            self.tie_knot(next_link=0)
        self.task_id = task_id
        self.j, self.t = 0, 0
        self.T = self.config.total_steps if self.config.total_steps is not None else steps
        self.knots = self.config.knot_steps(self.T)
        if self.lr0 is None:
            self.lr0 = optimizer.lr
        optimizer.reset_state()
        optimizer.lr = self.lr_at(0)

    def after_step(self, step: int, optimizer) -> None:
        self.t += 1
        if self.t in self.knots:
            self.tie_knot(self.j + 1)
            if self.config.reset_optimizer_at_knot:
                optimizer.reset_state()
        optimizer.lr = self.lr_at(self.t)

    def merged_weights(self) -> dict:
        """W_final = W + s_j B_j A_j per adapted layer (the dense weights the chain has built so far)."""
        return {name: layer.base_layer.weight.data + layer.delta_weight()
                for name, layer in zip(self.adapted, self.layers())}

    # ---- the engine: NumPy here; tinyslim.torch.COLA overrides these (and merged_weights) ---------------
    def _weight(self, layer) -> np.ndarray:
        """A copy of the layer's base weight W, (O, D)."""
        return layer.base_layer.weight.data.copy()

    def _set_weight(self, layer, W: np.ndarray) -> None:
        np.copyto(layer.base_layer.weight.data, W)

    def _tie(self, layer) -> None:
        """W ← W + ΔW in place (ΔW = s_j B_j A_j of the current link)."""
        layer.base_layer.weight.data += layer.delta_weight()
