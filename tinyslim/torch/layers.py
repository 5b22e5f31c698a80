"""The adapted linear layer of the torch path: a frozen ``nn.Linear`` or GPT-2 ``Conv1D`` plus a method's
low-rank path, the twin of tinyslim.adapters.verbs.AdaptedLinear.

Shape legend: N tokens, D in features, O out features.

    y = base_layer(x) + adapter_delta(x.reshape(N, D)).reshape(..., O)

Orientation: ``nn.Linear`` stores W (O, D); transformers' ``Conv1D`` stores W (D, O) and computes
x W + b. Every adapter here keeps PEFT's orientation whatever the base (lora_A (r, D), lora_B (O, r)),
and ``delta_weight()`` is (O, D); merging adds ΔW to a Linear and ΔWᵀ to a Conv1D (PEFT's
``fan_in_fan_out``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["AdaptedLinear", "is_conv1d", "base_weight", "linear_features"]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (transformers.pytorch_utils.Conv1D): weight (in, out), attribute ``nf`` = out.
    Recognised by its shape contract, so tinyslim needs no transformers import to wrap it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(module.weight, torch.Tensor)


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer tinyslim can wrap, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        D, O = module.weight.shape
        return int(D), int(O)
    return None


def base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen weight as (O, D) whatever the layout (a view; no copy)."""
    return module.weight.T if is_conv1d(module) else module.weight


class AdaptedLinear(nn.Module):
    """y = base_layer(x) + adapter(x). A subclass defines ``adapter_delta(x (N, D)) -> (N, O)`` and
    ``delta_weight() -> (O, D)`` and names its tensors: ``adapter_names`` (in the adapter state dict)
    and ``trainable_names`` (what the optimizer trains)."""

    adapter_names: tuple = ()
    trainable_names: tuple = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        features = linear_features(base_layer)
        if features is None:
            raise TypeError(f"an adapter wraps an nn.Linear or a GPT-2 Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = features
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.merged = False  # ΔW is inside the base weight: the forward skips the low-rank path
        self.disabled = False  # the base alone (disable_adapters)

    # ---- helpers for subclasses -----------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.base_layer.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.base_layer.weight.device

    def tensor(self, array) -> torch.Tensor:
        """A NumPy array (a draw from a named stream) as a tensor of the base weight's dtype and device."""
        return torch.as_tensor(np.asarray(array), dtype=self.dtype, device=self.device)

    def new_parameter(self, array, requires_grad: bool = True) -> nn.Parameter:
        return nn.Parameter(self.tensor(array).clone(), requires_grad=requires_grad)

    # ---- subclass hooks ------------------------------------------------------------------------
    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:  # x (N, D) -> Δ (N, O)
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # ΔW (O, D)
        raise NotImplementedError

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., D) -> (..., O)
        y = self.base_layer(x)
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError("training while merged: the adapter's factors are not in the forward pass and "
                                   "would get no gradient. Call unmerge(model) first (or evaluate under eval()).")
            return y
        if self.disabled:
            return y
        lead = x.shape[:-1]
        delta = self.adapter_delta(x.reshape(-1, self.in_features))  # (N, O)
        return y + delta.reshape(*lead, self.out_features).to(y.dtype)

    # ---- merge / unmerge -----------------------------------------------------------------------
    @torch.no_grad()
    def merge(self):
        """W0 ← W0 + ΔW (ΔWᵀ for a Conv1D); the forward then skips the low-rank path."""
        if self.merged:
            raise RuntimeError("merge: this layer is already merged; merging twice would add ΔW twice (unmerge first)")
        base_weight(self.base_layer).add_(self.delta_weight().to(self.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W0 ← W0 − ΔW (restores W0 up to rounding)."""
        if not self.merged:
            raise RuntimeError("unmerge: this layer is not merged")
        base_weight(self.base_layer).sub_(self.delta_weight().to(self.dtype))
        self.merged = False

    def adapter_tensors(self) -> dict:
        return {name: getattr(self, name) for name in self.adapter_names}

    def extra_repr(self):
        state = " merged" if self.merged else (" disabled" if self.disabled else "")
        return f"in_features={self.in_features}, out_features={self.out_features}{state}"
