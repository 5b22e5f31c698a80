"""The continual-learning baselines of I-LoRA (docs/methods.md §7.1, §7.2), as Methods.

Seq-LoRA (method name "lora"): one LoRA (§1) trained on the tasks in order, CE only,
    L = CE(X_cur)                                    Adam state reset at every task start
ER: Seq-LoRA plus the reservoir buffer of §3.5 (replay.py),
    task 0:   L = CE(X_cur)                          (its examples are still offered)
    task ≥ 1: L = ½ · [ CE(X_cur) + CE(X_rep) ]      X_rep = min(b, |buf|) buffered examples

Reduction invariants (tested): I-LoRA with γ = 0 is ER bit for bit; with γ = 0 and no buffer
(buffer_size = 0) it is Seq-LoRA. Plain LoRA at COLA's budget is COLA with chain_len = 1 (chain.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import Method
from .lora import LoraConfig
from .replay import REPLAY_ORDERS, Reservoir, replay_step

__all__ = ["SeqLoraConfig", "SeqLoRA", "ERConfig", "ER"]


@dataclass
class SeqLoraConfig(LoraConfig):
    """Seq-LoRA: the LoRA of I-LoRA's fast learner (docs/methods.md §3.8), trained task after task."""

    target_modules: list | str = field(default_factory=lambda: ["attn.c_attn", "attn.c_proj"])


class SeqLoRA(Method):
    """Sequential LoRA fine-tuning: CE on the current task only."""

    name = "lora"
    config_class = SeqLoraConfig  # (before_task: Method's, which resets Adam at every task start)


@dataclass
class ERConfig(SeqLoraConfig):
    """ER: Seq-LoRA plus reservoir replay (docs/methods.md §3.5, §7.2)."""

    buffer_size: int = 200  # M examples; 0 = no buffer (then ER is Seq-LoRA)
    replay_batch_size: int | None = None  # None = the current batch size b
    replay_order: str = "sample_then_offer"  # or "offer_then_sample"

    def __post_init__(self):
        super().__post_init__()
        if self.buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0, got {self.buffer_size}")
        if self.replay_batch_size is not None and self.replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be >= 1 or None, got {self.replay_batch_size}")
        if self.replay_order not in REPLAY_ORDERS:
            raise ValueError(f"replay_order must be one of {REPLAY_ORDERS}, got {self.replay_order!r}")


class ER(SeqLoRA):
    """Experience replay with LoRA: ½·[CE(X_cur) + CE(X_rep)] from the second task on."""

    name = "er"
    config_class = ERConfig

    def attach(self, model, seed: int) -> None:
        super().attach(model, seed)
        cfg = self.config
        self.buffer = Reservoir(cfg.buffer_size, self.streams["reservoir"]) if cfg.buffer_size else None

    def state_dict(self) -> tuple[dict, dict]:
        """The adapters and streams (Method) plus the reservoir's examples and counter."""
        arrays, meta = super().state_dict()
        if self.buffer is not None:
            buf_arrays, meta["reservoir"] = self.buffer.state_dict()
            arrays.update({f"reservoir.{k}": v for k, v in buf_arrays.items()})
        return arrays, meta

    def load_state_dict(self, arrays: dict, meta: dict) -> None:
        if (self.buffer is None) != ("reservoir" not in meta):
            raise ValueError(f"{self.name}: the state {'has' if 'reservoir' in meta else 'has no'} replay buffer, "
                             f"this method {'has none' if self.buffer is None else 'has one'} (buffer_size differs)")
        if self.buffer is not None:
            self.buffer.load_state_dict({k[len("reservoir."):]: v for k, v in arrays.items()
                                         if k.startswith("reservoir.")}, meta["reservoir"])
        super().load_state_dict(arrays, meta)

    def replay_batch(self, x, y, mask):
        """Offer the current rows to the buffer and, from task 1 on, draw X_rep (None on task 0)."""
        cfg = self.config
        return replay_step(self.buffer, x, y, mask, replay=self.task_id >= 1, batch_size=cfg.replay_batch_size,
                           order=cfg.replay_order)

    def loss(self, x, y, mask, rng=None):
        self._check_attached()
        rep = self.replay_batch(x, y, mask)
        _, ce_cur = self.model(x, y, loss_mask=mask, rng=rng)
        if rep is None:
            return ce_cur
        _, ce_rep = self.model(rep.x, rep.y, loss_mask=rep.mask, rng=rng)
        return 0.5 * (ce_cur + ce_rep)
