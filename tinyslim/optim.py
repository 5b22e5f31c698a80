"""Optimizers (SGD, Adam/AdamW), learning-rate schedules and gradient clipping.

AdamW follows ``torch.optim.AdamW`` operation for operation (decoupled weight decay, bias
correction as in torch), so that a test can check the two step for step. Updates happen in place
on ``Parameter.data`` so that modules and optimizers share the same arrays.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["Optimizer", "SGD", "AdamW", "Adam", "clip_grad_norm_", "cosine_schedule", "linear_schedule",
           "LRScheduler"]


class Optimizer:
    """Holds parameter groups: a list of dicts {"params": [...], **hyper-parameters}."""

    def __init__(self, params, defaults: dict):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list (are all parameters frozen?)")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        for group in groups:
            group = {**defaults, **group, "params": list(group["params"])}
            for p in group["params"]:
                if not getattr(p, "requires_grad", False):
                    raise ValueError("optimizer got a parameter that does not require grad (frozen); "
                                     "pass model.parameters(trainable_only=True)")
            self.param_groups.append(group)
        self.state: dict[int, dict] = {}  # id(param) → per-parameter state
        self.step_count = 0

    @property
    def params(self):
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float):
        for g in self.param_groups:
            g["lr"] = value

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def reset_state(self):
        """Forget moments and step counts (used at task boundaries: carried state wrecks plasticity)."""
        self.state = {}
        self.step_count = 0

    def state_dict(self) -> dict:
        """Flat arrays keyed "<param index>.<name>" plus "step", for checkpoints."""
        out = {"step": np.asarray(self.step_count, dtype=np.int64)}
        for i, p in enumerate(self.params):
            for name, value in self.state.get(id(p), {}).items():
                out[f"{i}.{name}"] = np.asarray(value).copy()
        return out

    def load_state_dict(self, state: dict):
        params = self.params
        self.state = {}
        self.step_count = int(state["step"])
        for key, value in state.items():
            if key == "step":
                continue
            i, name = key.split(".", 1)
            i = int(i)
            if i >= len(params):
                raise ValueError(f"optimizer state has an entry for parameter {i} but there are {len(params)}")
            value = np.array(value)
            moment = name in ("exp_avg", "exp_avg_sq", "momentum")
            if moment and value.shape != params[i].shape:
                raise ValueError(f"optimizer state {key} has shape {value.shape}, parameter is {params[i].shape}")
            # moments stay arrays even for a 0-d parameter: AdamW updates them in place
            self.state.setdefault(id(params[i]), {})[name] = value if (value.ndim or moment) else value.item()

    def step(self):
        raise NotImplementedError

    def _check_finite(self):
        """A NaN or inf gradient would poison every later step (Adam's moments keep it): refuse before any
        parameter changes."""
        for i, p in enumerate(self.params):
            if p.grad is not None and not np.all(np.isfinite(p.grad)):
                raise FloatingPointError(
                    f"{type(self).__name__}.step: parameter {i} (shape {p.shape}) has a NaN or inf gradient; no "
                    "parameter was changed. Check the inputs and the loss for NaN/inf, or lower the learning rate")


class SGD(Optimizer):
    """p ← p − lr·(g + wd·p), with optional momentum (torch's convention: buf ← μ·buf + g)."""

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def step(self):
        self._check_finite()
        self.step_count += 1
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad + wd * p.data if wd else p.grad
                if mu:
                    state = self.state.setdefault(id(p), {})
                    buf = state.get("momentum")
                    state["momentum"] = buf = g.copy() if buf is None else buf * mu + g
                    g = buf
                p.data -= lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamW: invalid hyper-parameters lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def step(self):
        self._check_finite()
        self.step_count += 1
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                state = self.state.setdefault(id(p), {})
                if "exp_avg" not in state:
                    state.update(step=0, exp_avg=np.zeros_like(p.data), exp_avg_sq=np.zeros_like(p.data))
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if wd:
                    p.data *= 1 - lr * wd  # decoupled decay: shrink the weight, not the gradient
                m += (1 - b1) * (g - m)  # m ← β1·m + (1−β1)·g  (torch's lerp form)
                v *= b2
                v += (1 - b2) * g * g  # v ← β2·v + (1−β2)·g²
                bias1 = 1 - b1 ** t
                denom = np.sqrt(v) / math.sqrt(1 - b2 ** t)
                denom += eps
                p.data -= (lr / bias1) * (m / denom)


def Adam(params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8) -> AdamW:
    """Adam without weight decay (the default optimizer of the adapter methods)."""
    return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)


def clip_grad_norm_(params, max_norm: float) -> float:
    """Scale all gradients so that their global L2 norm is at most max_norm; returns the norm before."""
    params = list(params)  # a generator would be used up by the first pass
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad = p.grad * np.asarray(coef, dtype=p.grad.dtype)
    return total


def cosine_schedule(step: int, total_steps: int, lr_max: float, warmup_steps: int = 0,
                    lr_min: float = 0.0) -> float:
    """Linear warm-up to lr_max, then a half cosine down to lr_min at total_steps."""
    if step < warmup_steps:
        return lr_max * (step + 1) / warmup_steps
    if step >= total_steps:
        return lr_min
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * progress))


def linear_schedule(step: int, total_steps: int, lr_max: float, warmup_steps: int = 0,
                    lr_min: float = 0.0) -> float:
    """Linear warm-up to lr_max, then a straight line down to lr_min at total_steps."""
    if step < warmup_steps:
        return lr_max * (step + 1) / warmup_steps
    if step >= total_steps:
        return lr_min
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr_max + (lr_min - lr_max) * progress


class LRScheduler:
    """Sets optimizer.lr from a schedule function at every .step()."""

    SCHEDULES = {"cosine": cosine_schedule, "linear": linear_schedule,
                 "constant": lambda step, total_steps, lr_max, warmup_steps=0, lr_min=0.0: lr_max}

    def __init__(self, optimizer: Optimizer, kind: str, total_steps: int, warmup_steps: int = 0,
                 lr_min: float = 0.0):
        if kind not in self.SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {sorted(self.SCHEDULES)}")
        self.optimizer, self.fn = optimizer, self.SCHEDULES[kind]
        self.lr_max, self.total, self.warmup, self.lr_min = optimizer.lr, total_steps, warmup_steps, lr_min
        self.last_step = 0
        self.optimizer.lr = self.fn(0, total_steps, self.lr_max, warmup_steps, lr_min)

    def step(self):
        self.last_step += 1
        self.optimizer.lr = self.fn(self.last_step, self.total, self.lr_max, self.warmup, self.lr_min)
