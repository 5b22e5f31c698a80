"""The PEFT-style verbs on a torch model, the twins of tinyslim.adapters.verbs (same names, same keys):

    inject(model, make_layer, target_modules, seed)   wrap every targeted Linear / Conv1D
    mark_only_adapters_trainable(model)               only the adapters' trainable tensors get gradients
    adapter_state_dict(model)                         {"transformer.h.0.attn.c_attn.lora_A": ndarray, ...}
    merge(model) / unmerge(model)                     W0 ← W0 ± ΔW in every adapted layer

Module names are the model's own (``named_modules``); a ``CausalLM`` wrapper is looked through, so
the keys of a wrapped GPT-2 are the NumPy GPT's keys. Target matching is PEFT's rule
(tinyslim.adapters.verbs.matches_target): a list matches by suffix, a string is a regex.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..adapters.streams import Streams
from ..adapters.verbs import AdapterSwitch, checked_adapter_targets, matches_target
from .layers import AdaptedLinear, linear_features

__all__ = ["inner_model", "adapted_layers", "linear_names", "inject", "mark_only_adapters_trainable",
           "adapter_state_dict", "load_adapter_state_dict", "merge", "unmerge", "merge_and_unload",
           "disable_adapters", "enable_adapters", "trainable_parameter_counts", "print_trainable_parameters"]


def inner_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a CausalLM wrapper (the model itself otherwise)."""
    return getattr(model, "hf_model", model)


def adapted_layers(model: nn.Module) -> list:
    """(name, AdaptedLinear) pairs in model order."""
    return [(name, m) for name, m in inner_model(model).named_modules() if isinstance(m, AdaptedLinear)]


def linear_names(model: nn.Module) -> list:
    """Names of the layers tinyslim can wrap (nn.Linear, GPT-2 Conv1D), base layers of adapters left out."""
    return [name for name, m in inner_model(model).named_modules()
            if linear_features(m) is not None and not name.endswith("base_layer")]


def inject(model: nn.Module, make_layer, target_modules, seed=0) -> list:
    """Replace every layer that ``target_modules`` selects by ``make_layer(layer, streams)``.

    ``seed`` is the run seed (an int) or a ``Streams``; layers draw from its named streams in model
    order, as the NumPy inject does. Returns the adapted module names."""
    streams = seed if isinstance(seed, Streams) else Streams(seed)
    inner = inner_model(model)
    existing = adapted_layers(inner)
    if existing:
        raise ValueError(f"the model already has adapters at {[n for n, _ in existing][:4]}…; tinyslim attaches one "
                         "method per model (merge_and_unload(model) first, or start from a fresh model)")
    if not isinstance(target_modules, str) and (not isinstance(target_modules, (list, tuple)) or not target_modules
                                                 or not all(isinstance(t, str) for t in target_modules)):
        raise TypeError(f"target_modules must be a non-empty list of names, a regex string or 'all-linear', "
                        f"got {target_modules!r}")
    linears = linear_names(inner)
    names = [name for name in linears if matches_target(name, target_modules)]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matches no Linear or Conv1D of the model "
                         f"(a list matches by suffix, a string is a regular expression). The layers are: {linears}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = inner.get_submodule(parent_name)
        setattr(parent, child, make_layer(getattr(parent, child), streams))
    return names


def mark_only_adapters_trainable(model: nn.Module) -> nn.Module:
    """Freeze everything, then let the adapters' trainable tensors train."""
    model.requires_grad_(False)
    for _, layer in adapted_layers(model):
        for name in layer.trainable_names:
            getattr(layer, name).requires_grad_(True)
    return model


def adapter_state_dict(model: nn.Module) -> dict:
    """{"<module>.<tensor>": float NumPy copy} for every adapter tensor (the NumPy path's keys)."""
    return {f"{name}.{key}": t.detach().cpu().numpy().copy() for name, layer in adapted_layers(model)
            for key, t in layer.adapter_tensors().items()}


def load_adapter_state_dict(model: nn.Module, state: dict) -> None:
    """Copy adapter arrays (NumPy or torch) into the model in place (optimizers keep their references)."""
    own = checked_adapter_targets(adapted_layers(model), state)
    with torch.no_grad():
        for key, (_, t) in own.items():
            value = state[key]
            t.copy_(value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value)))


def _refuse_tied_merge(model: nn.Module, layers) -> None:
    """Merging writes ΔW into W0; a W0 shared with another module (a tied head) would change too."""
    owners: dict = {}
    for _, module in inner_model(model).named_modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    tied = [name for name, layer in layers if owners.get(id(layer.base_layer.weight), 0) > 1]
    if tied:
        raise RuntimeError(f"cannot merge {tied}: the wrapped weight is tied to another module's, so W0 + ΔW would "
                           "change that one too. Keep this adapter unmerged, or target other modules")


def merge(model: nn.Module) -> nn.Module:
    """Merge every adapted layer: W0 ← W0 + ΔW."""
    layers = adapted_layers(model)
    _refuse_tied_merge(model, layers)
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge``: W0 ← W0 − ΔW (exact only up to rounding)."""
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain layers back (in place, as PEFT); returns the same model."""
    layers = adapted_layers(model)
    _refuse_tied_merge(model, [(n, layer) for n, layer in layers if not layer.merged])
    inner = inner_model(model)
    for name, layer in layers:
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent_name), child, layer.base_layer)
    return model


def disable_adapters(model: nn.Module) -> AdapterSwitch:
    """The base model alone; also a context manager (``with disable_adapters(model):``)."""
    return AdapterSwitch(inner_model(model), True, layers=[layer for _, layer in adapted_layers(model)])


def enable_adapters(model: nn.Module) -> AdapterSwitch:
    """Switch the adapters back on (also usable as a context manager)."""
    return AdapterSwitch(inner_model(model), False, layers=[layer for _, layer in adapted_layers(model)])


def trainable_parameter_counts(model: nn.Module) -> tuple:
    """(trainable, all) parameter counts (torch lists a tied parameter once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> str:
    """Print (and return) PEFT's line: "trainable params: X || all params: Y || trainable%: Z"."""
    trainable, total = trainable_parameter_counts(model)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    print(line)
    return line
