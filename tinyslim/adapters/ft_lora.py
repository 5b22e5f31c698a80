"""FT-LoRA — sequential fine-tuning edits with one LoRA (ELDER's baseline, docs/methods.md §7.5) — and the
per-edit training loop it shares with ELDER (docs/methods.md §5.5).

Shape legend: B edits edited together (1 in the spec's stream), T time.

The loop, one call of ``edit(x, y, mask)`` per edit (x, y, mask (B, T) as the runner's batches: the
mask marks the target tokens, so L_edit is the CE over the targets with the prompt masked):

    before_task:  reset Adam (moments and step count)
    repeat n_iter times, i = 0..n_iter−1:
        lr_i = lr  ("constant")   or   lr · 0.5^⌊i/20⌋  ("step")
        L = L_edit (+ the method's terms: ELDER's guided loss);  backward;  Adam step;  after_step
    after_task:   the method stores what it keeps of the edit (ELDER: the allocation code)

FT-LoRA is a single LoRA (lora.py) on ELDER's adapted layers (``mlp.c_fc`` of the last two blocks) at
rank E·r = 32 with s = 1 (parameter parity with ELDER's pool of E = 8 rank-4 experts; the variant
r = 4 is ``r=4, lora_alpha=4``). The loss is L_edit only; no routing, no deferral, nothing is replayed.

    from tinyslim.adapters import FTLoRA
    ft = FTLoRA()
    ft.attach(base_copy, seed=0)
    for x, y, mask in edit_stream:          # one (prompt, target) per edit, in order
        ft.edit(x, y, mask)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..optim import Adam
from ..nn import Linear
from .base import AdaptedLinear, Method
from .lora import LoraConfig

__all__ = ["FTLoraConfig", "EditingMethod", "FTLoRA", "last_block_targets", "subject_batch"]

LR_SCHEDULES = ("constant", "step")


def last_block_targets(model, n_blocks: int = 2, module: str = "mlp.c_fc") -> list:
    """["transformer.h.{L−2}.mlp.c_fc", "transformer.h.{L−1}.mlp.c_fc"]: `module` of the last n blocks."""
    L = model.config.n_layer
    return [f"transformer.h.{i}.{module}" for i in range(max(L - n_blocks, 0), L)]


class EditingMethod(Method):
    """The sequential editing loop (docs/methods.md §5.5) on the Method contract. A config with
    target_modules=None adapts ``mlp.c_fc`` of the last two blocks (resolved at attach)."""

    def attach(self, model, seed: int) -> None:
        if self.config.target_modules is None:
            self.config = dataclasses.replace(self.config, target_modules=last_block_targets(model))
        super().attach(model, seed)
        self.after_attach(model)
        self.optimizer = self._edit_optimizer(self.param_groups(), self.config.lr)  # edit()'s own, reset per edit
        self.edits_done = 0
        self.edit_key_pos = None  # edit()'s key positions while it runs
        self.edit_queries = None  # and the keys it was given (key_pos="subject_alone")

    def after_attach(self, model) -> None:
        """Set-up that needs the injected layers (ELDER's routers), before the optimizer is made."""

    # ---- the engine: NumPy here; tinyslim.torch.ft_lora.EditingEngine overrides these ----------------------
    def _edit_optimizer(self, params, lr: float):
        """edit()'s Adam (before_task resets it with reset_state())."""
        return Adam(params, lr=lr)

    def _linear_names(self, model) -> list:
        """The model's linear layers, adapted ones included, by name in model order."""
        return [n for n, m in model.named_modules()
                if isinstance(m, (Linear, AdaptedLinear)) and not n.endswith("base_layer")]

    def _submodule(self, model, name: str):
        return model.get_submodule(name)

    def _numpy(self, t) -> np.ndarray:
        """An output of the model (logits) as a NumPy array."""
        return t.data

    def param_groups(self) -> list:
        """What edit()'s Adam trains; a group may carry "lr_scale" (its lr = lr_at(i) · lr_scale)."""
        return self.trainable_parameters()

    def lr_at(self, iteration: int) -> float:
        cfg = self.config
        return cfg.lr * (0.5 ** (iteration // 20) if cfg.lr_schedule == "step" else 1.0)

    def edit(self, x, y, mask, rng=None, key_pos=None, queries=None) -> list:
        """One edit (B rows = B facts edited together): reset Adam, n_iter steps, store. Returns the losses.
        key_pos (B,): each row's key token for the methods that route from one (ELDER, GRACE; needed with
        key_pos="subject_last", see ``subject_positions``); None: the config's key_pos rule. queries (B, d):
        the keys those methods route from with key_pos="subject_alone" (their ``subject_queries``)."""
        self._check_attached()
        cfg, opt = self.config, self.optimizer
        self.edit_key_pos = None if key_pos is None else np.asarray(key_pos)
        self.edit_queries = None if queries is None else np.asarray(queries)
        self.before_task(self.edits_done, cfg.n_iter, opt)  # resets Adam
        losses = []
        try:
            for i in range(cfg.n_iter):
                for group in opt.param_groups:
                    group["lr"] = self.lr_at(i) * group.get("lr_scale", 1.0)
                loss = self.loss(x, y, mask, rng)
                opt.zero_grad()
                loss.backward()
                opt.step()
                self.after_step(i, opt)
                losses.append(loss.item())
            self.after_task(self.edits_done)
        finally:
            self.edit_key_pos = self.edit_queries = None
        self.edits_done += 1
        return losses


def subject_batch(subjects: list) -> tuple[np.ndarray, np.ndarray]:
    """Token-id subjects as one right-padded batch (B, max length) and their lengths (B,): the input of the
    routing methods' ``subject_queries`` (a causal model ignores the right padding)."""
    lengths = np.array([len(s) for s in subjects])
    if len(subjects) == 0 or lengths.min() < 1:
        raise ValueError("subject_queries needs at least one non-empty subject")
    ids = np.zeros((len(subjects), lengths.max()), dtype=np.int64)
    for row, s in zip(ids, subjects):
        row[:len(s)] = s
    return ids, lengths


@dataclass
class FTLoraConfig(LoraConfig):
    """FT-LoRA (docs/methods.md §7.5): ELDER's editing budget on one LoRA."""

    r: int = 32  # E·r: parameter parity with ELDER's pool (variant: 4)
    lora_alpha: float = 32  # s = 1, as ELDER's experts
    target_modules: list | str | None = None  # None: mlp.c_fc of the last 2 blocks
    lr: float = 1e-2  # Adam, reset per edit
    n_iter: int = 30  # optimisation steps per edit
    lr_schedule: str = "constant"  # or "step" (×0.5 every 20 iterations)

    def __post_init__(self):
        super().__post_init__()
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"FTLoraConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.n_iter < 1:
            raise ValueError(f"FTLoraConfig.n_iter must be >= 1, got {self.n_iter}")


class FTLoRA(EditingMethod):
    """Sequential editing with one LoRA: L_edit only, Adam reset per edit."""

    name = "ft_lora"
    config_class = FTLoraConfig
