"""The ``Method`` contract on the torch engine.

A torch method is the NumPy method with the engine swapped: ``class ER(adapters.ER, TorchMethod)``
keeps every hook of the NumPy class (the replay buffer, the loss, the learners) and takes from
TorchMethod the few things that touch the engine — injecting torch layers, gradients off for
evaluation, the adapter arrays of a checkpoint. Python's method order puts TorchMethod right before
``adapters.Method``, so a NumPy class's ``super().attach(...)`` lands here.

A method's hooks call ``self.model(x, y, loss_mask=mask, rng=rng)``; on this engine the model is a
``CausalLM`` (lm.py), which answers that call for any Hugging Face causal LM (``attach`` wraps a bare
HF model in one). Each subclass says how to build its layer: ``make_layer(base_layer, streams)``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters.method import Method
from .lm import CausalLM
from .verbs import adapted_layers, adapter_state_dict, inject, load_adapter_state_dict, mark_only_adapters_trainable

__all__ = ["TorchMethod"]


class TorchMethod(Method):
    """Method on torch: attach(model, seed) takes a CausalLM (or a transformers causal LM, wrapped)."""

    def make_layer(self, base_layer: nn.Module, streams):
        """The torch twin of ``config.make_layer``: this method's AdaptedLinear around `base_layer`."""
        raise NotImplementedError(f"{type(self).__name__} defines no make_layer")

    def attach(self, model: nn.Module, seed: int) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.name} (torch) attaches to a torch model (a CausalLM or a transformers causal "
                            f"LM), got {type(model).__name__}; the NumPy GPT takes tinyslim.adapters' methods")
        super().attach(model if isinstance(model, CausalLM) else CausalLM(model), seed)

    def trainable_parameters(self) -> list:
        self._check_attached()
        return [p for p in self.model.parameters() if p.requires_grad]

    # ---- the engine ------------------------------------------------------------------------------
    def _inject(self, model) -> list:
        model.requires_grad_(False)
        names = inject(model, self.make_layer, self.config.target_modules, self.streams)
        mark_only_adapters_trainable(model)
        return names

    def _adapted_layers(self) -> list:
        return adapted_layers(self.model)

    def _no_grad(self):
        return torch.no_grad()

    def _adapter_arrays(self) -> dict:
        return adapter_state_dict(self.model)

    def _load_adapter_arrays(self, arrays: dict) -> None:
        load_adapter_state_dict(self.model, arrays)
