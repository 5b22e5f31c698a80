"""I-LoRA — interpolation-based LoRA (Ren et al., arXiv 2402.18865), docs/methods.md §3.

Shape legend: N tokens, D in, O out, r rank, b replay batch, T time, C = d_model, L = n_layer.

One LoRA per adapted layer, held twice: fast θ_f = {A_f, B_f} (trained) and slow θ_s = {A_s, B_s}
(a buffer, never in the optimizer), with an ``active`` switch:

    y_f = W0 x + b0 + s · B_f A_f x          y_s = W0 x + b0 + s · B_s A_s x

Loss (X_rep from the reservoir of replay.py; h^l = the residual stream after block l, (b, T, C)):

    task 0:    L = CE(X_cur; θ_f)
    task ≥ 1:  L = ½ · [ CE(X_cur; θ_f) + CE(X_rep; θ_f) ] + γ · L_cons
    L_cons = (1/C_n) Σ_l Σ_{n ∈ replay tokens} ‖h_f^l[n] − h_s^l[n]‖²,    C_n = n_layers_used · N_rep · C
    variant "one_sided":  the same sum over relu(h_s − h_f)²

"Replay tokens" are the real positions of the replayed rows: padding added by the buffer, and input
positions holding ``pad_token_id`` when it is set (the task suite's PAD), are left out of the sum and
of N_rep (docs/methods.md §0: every mean excludes padded positions).

The slow pass runs under no_grad, so ∂L/∂h_f^l = γ · 2(h_f^l − h_s^l)/C_n enters the fast pass at the
output of block l (autograd injects it: the h_f^l are nodes of the fast graph). The slow pass sees
the same dropout masks as the fast replay pass (the generators are rewound after it), so slow = fast
gives L_cons = 0 exactly and the slow pass shifts no random stream.

After every optimizer step, factor-wise (never on BA), with a global step counter t = 0, 1, 2, …:

    a_t = min(1 − 1/(t+1), λ)         (a_t = λ without warm-up)
    A_s ← a_t·A_s + (1 − a_t)·A_f
    B_s ← a_t·B_s + (1 − a_t)·B_f

Evaluation: the slow learner by default, the fast one too (``learners()``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from .. import functional as F
from ..nn import Linear, Parameter
from .base import Streams
from .baselines import ER, ERConfig
from .lora import LoraLinear

__all__ = ["ILoraConfig", "FastSlowSwitch", "ILoraLinear", "ILoRA", "consistency_loss"]

LEARNERS = ("fast", "slow")


@dataclass
class ILoraConfig(ERConfig):
    """I-LoRA (docs/methods.md §3.8): ER's LoRA and buffer plus the slow learner and the consistency loss."""

    target_modules: list | str = field(default_factory=lambda: ["attn.c_attn", "attn.c_proj"])
    ema_lambda: float = 0.99  # λ; variants 0.25 (the authors' code), 0.999
    ema_warmup: bool = True  # a_t = min(1 − 1/(t+1), λ); False: a_t = λ
    ema_counter: str = "global"  # t runs over all tasks; "per_task" restarts it at every task
    consistency: str = "symmetric"  # ‖h_f − h_s‖²; "one_sided": relu(h_s − h_f)²
    consistency_layers: str = "all_blocks"  # or "last_block"
    gamma: float = 1.0  # γ, the weight of L_cons
    reset_slow_at_task_end: bool = False  # True: copy fast → slow after every task
    slow_mode: str = "interpolate"  # "frozen_base": never update slow (B_s = 0, so slow = base)
    eval_learner: str = "slow"  # the reported learner; the other is evaluated too
    pad_token_id: int | None = None  # replayed input positions holding this id are padding, left out of L_cons

    def __post_init__(self):
        super().__post_init__()
        choices = dict(ema_counter=("global", "per_task"), consistency=("symmetric", "one_sided"),
                       consistency_layers=("all_blocks", "last_block"), slow_mode=("interpolate", "frozen_base"),
                       eval_learner=LEARNERS)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ILoraConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.ema_lambda <= 1.0:
            raise ValueError(f"ILoraConfig.ema_lambda must lie in [0, 1], got {self.ema_lambda}")
        if self.gamma < 0:
            raise ValueError(f"ILoraConfig.gamma must be >= 0, got {self.gamma}")

    def make_layer(self, base_layer: Linear, streams: Streams) -> "ILoraLinear":
        return ILoraLinear(base_layer, self.r, self.scale, self.lora_dropout, streams,
                           init_lora_weights=self.init_lora_weights)


class FastSlowSwitch:
    """The ``active`` switch between the fast and the slow copy of the factors (engine-free: the NumPy layer
    below and tinyslim.torch's ILoraLinear share it)."""

    _active = "fast"

    @property
    def active(self) -> str:
        """The copy the forward pass (and merge) uses: "fast" or "slow"."""
        return self._active

    @active.setter
    def active(self, learner: str):
        if learner not in LEARNERS:
            raise ValueError(f"active must be one of {LEARNERS}, got {learner!r}")
        if self.merged and learner != self._active:
            raise RuntimeError(f"the {self._active} copy is merged into W0; unmerge before switching to {learner}")
        self._active = learner

    def factors(self) -> tuple:
        if self.active == "slow":
            return self.lora_A_slow, self.lora_B_slow
        return self.lora_A, self.lora_B


class ILoraLinear(FastSlowSwitch, LoraLinear):
    """LoRA with a fast (trained) and a slow (buffer) copy of its factors and an ``active`` switch."""

    adapter_names = ("lora_A", "lora_B", "lora_A_slow", "lora_B_slow")
    trainable_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: Linear, r: int, scale: float, dropout: float, streams: Streams,
                 init_lora_weights: bool = True):
        super().__init__(base_layer, r, scale, dropout, streams, init_lora_weights)
        # slow := copy(fast); Parameters that never train (no gradient, never in the optimizer)
        self.lora_A_slow = Parameter(self.lora_A.data.copy(), requires_grad=False)  # (r, D)
        self.lora_B_slow = Parameter(self.lora_B.data.copy(), requires_grad=False)  # (O, r)
        self._active = "fast"

    def interpolate(self, a: float) -> None:
        """A_s ← a·A_s + (1 − a)·A_f and B_s ← a·B_s + (1 − a)·B_f, factor-wise, in place."""
        for slow, fast in ((self.lora_A_slow, self.lora_A), (self.lora_B_slow, self.lora_B)):
            np.copyto(slow.data, a * slow.data + (1.0 - a) * fast.data)

    def copy_fast_to_slow(self) -> None:
        np.copyto(self.lora_A_slow.data, self.lora_A.data)
        np.copyto(self.lora_B_slow.data, self.lora_B.data)


def consistency_loss(h_fast: list, h_slow: list, valid: np.ndarray, one_sided: bool = False):
    """L_cons = (1/C_n) Σ_l Σ_n ‖h_f^l[n] − h_s^l[n]‖² over the valid tokens, C_n = L_used · N_rep · C.

    h_fast: Tensors (b, T, C) of the fast pass (in its graph); h_slow: arrays of the slow pass.
    one_sided: the sum of relu(h_s − h_f)² instead (only fast activations below the slow ones count).
    """
    dtype = h_fast[0].dtype
    keep = np.asarray(valid, dtype=dtype)[:, :, None]  # (b, T, 1)
    C_n = len(h_fast) * max(keep.sum(), 1) * h_fast[0].shape[-1]  # (no valid token: the sum is 0 anyway)
    total = 0.0
    for h_f, h_s in zip(h_fast, h_slow):
        d = F.relu(h_s - h_f) if one_sided else h_f - h_s  # (b, T, C)
        total = total + (d * d * keep).sum()
    return total / dtype.type(C_n)


@contextlib.contextmanager
def _rewound(*generators):
    """Run the body, then put each generator back into the state it had before (None entries skipped)."""
    gens = [g for g in generators if g is not None]
    states = [g.bit_generator.state for g in gens]
    try:
        yield
    finally:
        for g, state in zip(gens, states):
            g.bit_generator.state = state


class ILoRA(ER):
    """I-LoRA: ER on the fast learner + hidden-state consistency towards a slowly interpolated copy."""

    name = "ilora"
    config_class = ILoraConfig

    def attach(self, model, seed: int) -> None:
        super().attach(model, seed)  # freeze, inject ILoraLinear (slow := copy(fast)), buffer empty
        self.t = 0  # the interpolation step counter

    # ---- the active learner --------------------------------------------------------------------
    def learners(self) -> list:
        first = self.config.eval_learner
        return [first] + [name for name in ("slow", "fast") if name != first]

    def _set_learner(self, learner: str) -> str:
        if learner not in LEARNERS:
            raise ValueError(f"ilora has the learners {list(LEARNERS)}, got {learner!r}")
        layers = self.layers()
        previous = layers[0].active
        for layer in layers:
            layer.active = learner
        return previous

    @contextlib.contextmanager
    def learner(self, name: str):
        """Make `name` ("fast" or "slow") active inside the block (training mode unchanged)."""
        previous = self._set_learner(name)
        try:
            yield self.model
        finally:
            self._set_learner(previous)

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict]:
        """ER's state (fast and slow factors are adapter arrays, the buffer) plus the step counter t and the
        active learner."""
        arrays, meta = super().state_dict()
        meta["ilora"] = {"t": int(self.t), "active": self.layers()[0].active}
        return arrays, meta

    def load_state_dict(self, arrays: dict, meta: dict) -> None:
        super().load_state_dict(arrays, meta)
        self.t = int(meta["ilora"]["t"])
        self._set_learner(meta["ilora"]["active"])

    # ---- training ------------------------------------------------------------------------------
    def before_task(self, task_id: int, steps: int, optimizer) -> None:
        super().before_task(task_id, steps, optimizer)  # Adam reset
        if self.config.ema_counter == "per_task":
            self.t = 0

    def loss(self, x, y, mask, rng=None):
        self._check_attached()
        cfg = self.config
        rep = self.replay_batch(x, y, mask)  # None on task 0 (its rows are still offered)
        _, ce_cur = self.model(x, y, loss_mask=mask, rng=rng)  # CE(X_cur; θ_f)
        if rep is None:
            return ce_cur
        dropout_rng = self.streams["dropout"] if cfg.lora_dropout > 0 else None
        with self._rewound(rng, dropout_rng), self._no_grad(), self.learner("slow"):
            _, _, h_s = self.model(rep.x, rng=rng, return_hidden=True)  # slow pass: no graph, same masks
        _, ce_rep, h_f = self.model(rep.x, rep.y, loss_mask=rep.mask, rng=rng, return_hidden=True)
        if cfg.consistency_layers == "last_block":
            h_f, h_s = h_f[-1:], h_s[-1:]
        valid = rep.valid if cfg.pad_token_id is None else rep.valid * (rep.x != cfg.pad_token_id)
        l_cons = self._consistency_loss(h_f, h_s, valid, one_sided=cfg.consistency == "one_sided")
        return 0.5 * (ce_cur + ce_rep) + cfg.gamma * l_cons

    # ---- the engine: NumPy here; tinyslim.torch.ILoRA overrides these two -------------------------------
    def _rewound(self, *generators):
        """Rewind these generators (and the engine's own, if it draws any) after the slow pass."""
        return _rewound(*generators)

    def _consistency_loss(self, h_fast: list, h_slow: list, valid, one_sided: bool):
        return consistency_loss(h_fast, [h.data for h in h_slow], valid, one_sided=one_sided)

    def after_step(self, step: int, optimizer) -> None:
        cfg = self.config
        if cfg.slow_mode == "interpolate":
            a_t = min(1.0 - 1.0 / (self.t + 1), cfg.ema_lambda) if cfg.ema_warmup else cfg.ema_lambda
            for layer in self.layers():
                layer.interpolate(a_t)
        self.t += 1

    def after_task(self, task_id: int) -> None:
        if self.config.reset_slow_at_task_end and self.config.slow_mode == "interpolate":
            for layer in self.layers():
                layer.copy_fast_to_slow()
