"""The parts of the scenario runners' torch engine (tinyslim.experiments.engine.get_engine("torch") makes
the Engine from ``PARTS``; this layer sits below the runners and does not import them).

The run's model is the NumPy base GPT as a real transformers GPT2LMHeadModel (``from_gpt``: same weights,
same dtype, the NumPy GPT's layer names) behind ``CausalLM``; the methods are tinyslim.torch's (the NumPy
methods with the engine swapped); the optimizer is torch.optim.Adam behind tinyslim.optim's interface.
A base that already is a torch model (a CausalLM or any transformers causal LM) is copied as it is.
"""
from __future__ import annotations

import copy

from torch import nn

from .lm import CausalLM, from_gpt
from .optim import Adam, clip_grad_norm_
from .. import adapters
from .registry import METHODS, make_method
from .slim import make_slim_ablation

__all__ = ["PARTS", "torch_model"]


def torch_model(base) -> CausalLM:
    """A new CausalLM with `base`'s weights: from_gpt of a NumPy GPT, a deep copy of a torch model."""
    if isinstance(base, nn.Module):
        model = copy.deepcopy(base)
        return model if isinstance(model, CausalLM) else CausalLM(model)
    return from_gpt(base)


PARTS = dict(model=torch_model, view=torch_model, make_method=make_method, optimizer_class=Adam,
             clip_grad_norm_=clip_grad_norm_, make_ablation=make_slim_ablation, ablations=adapters.SLIM_ABLATIONS,
             methods={name: cls for name, cls in METHODS.items() if name in adapters.METHODS})  # scenario A's
