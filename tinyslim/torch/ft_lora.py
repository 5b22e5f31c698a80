"""FT-LoRA on the torch engine, and the engine of the per-edit loop it shares with ELDER and GRACE: the
twins of tinyslim.adapters.ft_lora (same FTLoraConfig, same ``edit(x, y, mask)``).

Shape legend: B edits edited together, T time.

The loop itself is the NumPy one (EditingMethod.edit), unchanged:

    before_task: reset Adam;  n_iter times: lr_i (constant or ×0.5 every 20);  L;  backward;  Adam step
    after_task:  the method stores what it keeps of the edit

What differs on torch is only the engine, four hooks of EditingMethod (``EditingEngine`` below): edit()'s
optimizer is tinyslim.torch.optim.Adam, torch.optim.Adam with the NumPy Adam's hyper-parameters (β = (0.9,
0.999), ε = 1e-8, no weight decay; the same update m̂/(√v̂ + ε) to rounding) and its reset_state(); the
model's linear layers are named through a CausalLM wrapper; logits come back as NumPy arrays.

Bases: ``class FTLoRA(EditingEngine, adapters.FTLoRA, TorchMethod)``. EditingEngine goes first because the
hooks it replaces are EditingMethod's own (they sit above TorchMethod in the method order).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import adapters
from .layers import AdaptedLinear, linear_features
from .lora import LoraLinear
from .method import TorchMethod
from .optim import Adam
from .verbs import inner_model

__all__ = ["EditingEngine", "FTLoRA", "as_numpy"]


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A detached NumPy copy (a view on the CPU); half precisions widen to float32, which NumPy can hold."""
    t = t.detach()
    return (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).cpu().numpy()


class EditingEngine:
    """EditingMethod's engine hooks on torch (a mixin placed before the NumPy class in the bases)."""

    def _edit_optimizer(self, params, lr: float) -> Adam:
        return Adam(params, lr=lr)  # the NumPy edit loop's Adam(params, lr): the same default betas and eps

    def _linear_names(self, model) -> list:
        """The Linear / Conv1D layers, adapted ones included, by their names in the HF model, in model order."""
        return [name for name, m in inner_model(model).named_modules()
                if (linear_features(m) is not None or isinstance(m, AdaptedLinear)) and not name.endswith("base_layer")]

    def _submodule(self, model, name: str):
        return inner_model(model).get_submodule(name)

    def _numpy(self, t: torch.Tensor) -> np.ndarray:
        return as_numpy(t)


class FTLoRA(EditingEngine, adapters.FTLoRA, TorchMethod):
    """Sequential editing with one LoRA on torch: L_edit only, Adam reset per edit."""

    def make_layer(self, base_layer, streams):
        return LoraLinear.from_config(self.config, base_layer, streams)
