"""The torch engine's optimizer and gradient clipping, behind tinyslim.optim's interface.

The scenario runners and the methods' hooks talk to an optimizer through a few names: ``reset_state()``
at a task boundary, ``lr`` (read and set every step by the schedule; COLA sets it too), ``step()``,
``zero_grad()``, ``step_count``, and ``state_dict()`` / ``load_state_dict()`` for a run checkpoint.
``Adam`` here is ``torch.optim.Adam`` (so the update is torch's own, and it works anywhere a torch
optimizer does) with those names added. tinyslim.optim.AdamW follows torch's update operation for
operation, so the two engines take the same step:

    m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²          (per parameter; t = its step count)
    p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε)

``state_dict()`` is the NumPy optimizer's flat form — ``{"step": t_total, "<i>.step", "<i>.exp_avg",
"<i>.exp_avg_sq"}`` as NumPy arrays, i the index of the parameter in the optimizer's order — so a run
checkpoint stores the same keys on both engines; ``load_state_dict`` takes that form or torch's own
(``torch_state_dict()``).

``clip_grad_norm_`` is tinyslim.optim's: the global L2 norm ‖g‖ = √Σ‖g_p‖², the gradients scaled by
max_norm / (‖g‖ + 10⁻⁶) only when that factor is below 1, the norm before clipping returned as a float.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

__all__ = ["Adam", "clip_grad_norm_"]


class Adam(torch.optim.Adam):
    """torch.optim.Adam (no weight decay) with tinyslim.optim's interface: ``lr``, ``reset_state()``,
    ``step_count`` and the flat ``state_dict()``. A NaN or inf gradient is refused before any parameter
    changes, as the NumPy optimizer does."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list (are all parameters frozen?)")
        for p in (q for g in params for q in (g["params"] if isinstance(g, dict) else [g])):
            if not p.requires_grad:
                raise ValueError("optimizer got a parameter that does not require grad (frozen); pass "
                                 "method.trainable_parameters()")
        # foreach=False: the per-parameter loop, the same order of operations on CPU and GPU
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0, foreach=False)
        self.step_count = 0

    @property
    def params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float):
        for g in self.param_groups:
            g["lr"] = value

    def reset_state(self) -> None:
        """Forget moments and step counts (the runners do it at every task boundary)."""
        self.state = defaultdict(dict)
        self.step_count = 0

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            bad = next(i for i, p in enumerate(self.params) if p.grad is not None and not torch.isfinite(p.grad).all())
            raise FloatingPointError(f"Adam.step: parameter {bad} (shape {tuple(self.params[bad].shape)}) has a NaN "
                                     "or inf gradient; no parameter was changed. Check the inputs and the loss for "
                                     "NaN/inf, or lower the learning rate")
        self.step_count += 1
        return super().step(closure)

    # ---- checkpoints: the NumPy optimizer's flat arrays ---------------------------------------------
    def torch_state_dict(self) -> dict:
        """torch's own state dict (torch.optim.Optimizer.state_dict)."""
        return super().state_dict()

    def state_dict(self) -> dict:
        """{"step": step_count, "<i>.step": t, "<i>.exp_avg": m, "<i>.exp_avg_sq": v} as NumPy arrays."""
        out = {"step": np.asarray(self.step_count, dtype=np.int64)}
        for i, p in enumerate(self.params):
            for name, value in self.state.get(p, {}).items():
                if name == "step":
                    out[f"{i}.step"] = np.asarray(int(round(float(value))), dtype=np.int64)
                else:
                    out[f"{i}.{name}"] = value.detach().cpu().numpy().copy()
        return out

    def load_state_dict(self, state: dict) -> None:
        """The flat form of state_dict() (either engine's), or torch's own state dict."""
        if "state" in state and "param_groups" in state:
            super().load_state_dict(state)
            return
        params = self.params
        self.state = defaultdict(dict)
        self.step_count = int(np.asarray(state["step"]))
        for key, value in state.items():
            if key == "step":
                continue
            i, name = key.split(".", 1)
            i = int(i)
            if i >= len(params):
                raise ValueError(f"optimizer state has an entry for parameter {i} but there are {len(params)}")
            p = params[i]
            value = np.asarray(value)
            if name == "step":  # torch keeps the count as a float tensor of the default dtype
                self.state[p]["step"] = torch.tensor(float(value))
                continue
            if value.shape != tuple(p.shape):
                raise ValueError(f"optimizer state {key} has shape {value.shape}, parameter is {tuple(p.shape)}")
            self.state[p][name] = torch.as_tensor(value.copy(), dtype=p.dtype, device=p.device)


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> float:
    """Scale all gradients so that their global L2 norm is at most max_norm; returns the norm before
    (tinyslim.optim.clip_grad_norm_'s rule, on tensors)."""
    params = list(params)  # a generator would be used up by the first pass
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = math.sqrt(float(sum((g.double() * g.double()).sum() for g in grads)))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total
