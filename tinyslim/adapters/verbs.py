"""The adapted linear layer and the PEFT-style verbs every method shares.

Shape legend: N tokens, D in features, O out features, r rank, B batch, T time.

The four verbs (loralib / PEFT):

    inject(model, config, seed)          wrap every targeted Linear as config.make_layer(linear, streams)
    mark_only_adapters_trainable(model)  only the adapters' trainable factors get gradients
    adapter_state_dict(model)            {"transformer.h.0.attn.c_attn.lora_A": A, ...}
    merge(model) / unmerge(model)        W0 ← W0 ± ΔW in every adapted layer (docs/methods.md §1.4)

An adapted layer keeps the frozen Linear as its child ``base_layer`` (as PEFT does), so the base
weight of ``transformer.h.0.attn.c_attn`` is named ``transformer.h.0.attn.c_attn.base_layer.weight``
while the adapter is attached; ``merge_and_unload`` gives the plain names back.
"""
from __future__ import annotations

import contextlib
import re

import numpy as np

from ..autograd import Tensor, is_grad_enabled
from ..nn import GPT, Linear, Module
from .streams import Streams

__all__ = ["AdaptedLinear", "adapted_layers", "linear_names", "matches_target", "inject",
           "mark_only_adapters_trainable", "adapter_state_dict", "checked_adapter_targets", "load_adapter_state_dict",
           "refuse_tied_merge", "merge", "unmerge", "merge_and_unload", "AdapterSwitch", "disable_adapters", "enable_adapters",
           "trainable_parameter_counts", "print_trainable_parameters", "token_context"]


# ---- the adapted linear layer --------------------------------------------------------------------

class AdaptedLinear(Module):
    """y = base_layer(x) + adapter(x): a frozen Linear plus a method's low-rank path.

    A subclass defines ``adapter_delta(x2d) -> Tensor (N, O)`` (the low-rank output, through the
    kernel op) and ``delta_weight() -> (O, D)`` (the same map as a dense matrix, for merging), and
    names its arrays: ``adapter_names`` (in the adapter state dict) and ``trainable_names`` (trained).
    """

    adapter_names: tuple = ()
    trainable_names: tuple = ()

    def __init__(self, base_layer: Linear):
        if not isinstance(base_layer, Linear):
            raise TypeError(f"an adapter wraps a tinyslim Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.merged = False  # ΔW has been added into base_layer.weight: the forward skips the low-rank path
        self.disabled = False  # the base alone (disable_adapters)

    # ---- subclass hooks ------------------------------------------------------------------------
    def adapter_delta(self, x: Tensor) -> Tensor:  # x (N, D) -> Δ (N, O)
        raise NotImplementedError

    def delta_weight(self) -> np.ndarray:  # ΔW (O, D), in the base weight's dtype
        raise NotImplementedError

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x):  # x (..., D) -> (..., O)
        y = self.base_layer(x)
        if self.merged:
            if self.training and is_grad_enabled():
                raise RuntimeError("training while merged: the adapter's factors are not in the forward pass and would "
                                   "get no gradient. Call unmerge(model) first (or evaluate under model.eval()).")
            return y
        if self.disabled:
            return y
        x = x if isinstance(x, Tensor) else Tensor(x)
        lead = x.shape[:-1]
        delta = self.adapter_delta(x.reshape(-1, self.in_features))  # (N, O)
        return y + delta.reshape(*lead, self.out_features)

    # ---- merge / unmerge (docs/methods.md §1.4) -----------------------------------------------------
    def merge(self):
        """W0 ← W0 + ΔW; the forward then skips the low-rank path."""
        if self.merged:
            raise RuntimeError("merge: this layer is already merged; merging twice would add ΔW twice (unmerge first)")
        W = self.base_layer.weight
        W.data += self.delta_weight().astype(W.dtype, copy=False)
        self.merged = True

    def unmerge(self):
        """W0 ← W0 − ΔW (restores W0 up to rounding)."""
        if not self.merged:
            raise RuntimeError("unmerge: this layer is not merged")
        W = self.base_layer.weight
        W.data -= self.delta_weight().astype(W.dtype, copy=False)
        self.merged = False

    def adapter_tensors(self) -> dict:
        return {name: getattr(self, name) for name in self.adapter_names}

    def extra_repr(self):
        state = " merged" if self.merged else (" disabled" if self.disabled else "")
        return f"in_features={self.in_features}, out_features={self.out_features}{state}"


def adapted_layers(model: Module) -> list:
    """(name, AdaptedLinear) pairs in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedLinear)]


# ---- injection -----------------------------------------------------------------------------------

def linear_names(model: Module) -> list:
    return [name for name, m in model.named_modules() if isinstance(m, Linear) and not name.endswith("base_layer")]


def matches_target(name: str, target_modules) -> bool:
    """PEFT's rule: a string is a regular expression matched against the full name (or "all-linear");
    a list matches a name equal to an entry or ending in "." + entry."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return name != "lm_head"
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject(model: Module, config, seed=0) -> list:
    """Replace every Linear that ``config.target_modules`` selects by ``config.make_layer(linear, streams)``.

    ``seed`` is the run seed (an int) or a ``Streams``; the layers draw from its named streams.
    Returns the adapted module names. Raises ValueError when nothing matches (listing the Linear names
    that exist) or when the model already carries adapters.
    """
    streams = seed if isinstance(seed, Streams) else Streams(seed)
    existing = adapted_layers(model)
    if existing:
        raise ValueError(f"the model already has adapters at {[n for n, _ in existing][:4]}…; tinyslim attaches one "
                         "method per model (merge_and_unload(model) first, or start from a fresh base)")
    target_modules = config.target_modules
    if not isinstance(target_modules, str) and (not isinstance(target_modules, (list, tuple)) or not target_modules
                                                 or not all(isinstance(t, str) for t in target_modules)):
        raise TypeError(f"target_modules must be a non-empty list of names, a regex string or 'all-linear', "
                        f"got {target_modules!r}")
    linears = linear_names(model)
    names = [name for name in linears if matches_target(name, target_modules)]
    if not names:
        hint = (" (a string is a regular expression matched against the full name, as in PEFT; pass a list such as "
                "['attn.c_attn'] to match by suffix)" if isinstance(target_modules, str) else "")
        raise ValueError(f"target_modules={target_modules!r} matches no Linear of the model{hint}. "
                         f"The Linear layers are: {linears}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, config.make_layer(getattr(parent, child), streams))
    return names


def mark_only_adapters_trainable(model: Module) -> Module:
    """Freeze everything, then let the adapters' trainable factors (e.g. lora_A, lora_B) train."""
    model.freeze()
    for _, layer in adapted_layers(model):
        for name in layer.trainable_names:
            getattr(layer, name).requires_grad = True
    return model


# ---- adapter state dict --------------------------------------------------------------------------

def adapter_state_dict(model: Module) -> dict:
    """{"<module>.<array>": copy} for every adapter array, e.g. "transformer.h.0.attn.c_attn.lora_A"."""
    return {f"{name}.{key}": t.data.copy() for name, layer in adapted_layers(model)
            for key, t in layer.adapter_tensors().items()}


def checked_adapter_targets(layers, state: dict) -> dict:
    """{"<module>.<array>": (layer, tensor)} of the adapted `layers` ((name, layer) pairs), after checking
    that `state` has exactly these keys, each of the tensor's shape, and no layer is merged. Both
    engines' load_adapter_state_dict copy only once every entry has passed."""
    own = {f"{name}.{key}": (layer, t) for name, layer in layers for key, t in layer.adapter_tensors().items()}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"load_adapter_state_dict: missing keys {missing[:6]}{'…' if len(missing) > 6 else ''}, "
                       f"unexpected keys {unexpected[:6]}{'…' if len(unexpected) > 6 else ''} (was the state saved "
                       "from another method, target_modules or model?)")
    for key, (layer, t) in own.items():
        shape, want = tuple(np.shape(state[key])), tuple(t.shape)
        if shape != want:
            raise ValueError(f"load_adapter_state_dict: {key} has shape {shape} in the state but {want} in "
                             "the model (another r or model size?)")
        if layer.merged:
            raise RuntimeError(f"load_adapter_state_dict: {key.rpartition('.')[0]} is merged; unmerge(model) first")
    return own


def load_adapter_state_dict(model: Module, state: dict) -> None:
    """Copy adapter arrays into the model in place (optimizers keep their references)."""
    own = checked_adapter_targets(adapted_layers(model), state)
    for key, (_, t) in own.items():
        np.copyto(t.data, np.asarray(state[key]), casting="same_kind")


# ---- merge / unmerge / unload --------------------------------------------------------------------

def refuse_tied_merge(model: Module, layers=None) -> None:
    """Merging writes ΔW into W0; when W0 is tied to another parameter (GPT's lm_head is transformer.wte's
    weight) that would silently change the other one too, so it is refused."""
    holders: dict = {}
    for _, module in model.named_modules():
        for value in vars(module).values():
            if isinstance(value, Tensor):
                holders[id(value)] = holders.get(id(value), 0) + 1
    tied = [name for name, layer in (adapted_layers(model) if layers is None else layers)
            if holders.get(id(layer.base_layer.weight), 0) > 1]
    if tied:
        raise RuntimeError(f"cannot merge {tied}: the wrapped weight is tied to another parameter (lm_head shares "
                           "transformer.wte.weight), so W0 + ΔW would change that one too. Keep this adapter "
                           "unmerged, or target other modules")


def merge(model: Module) -> Module:
    """Merge every adapted layer: W0 ← W0 + ΔW."""
    refuse_tied_merge(model)
    for _, layer in adapted_layers(model):
        layer.merge()
    return model


def unmerge(model: Module) -> Module:
    """Undo ``merge``: W0 ← W0 − ΔW (exact only up to rounding)."""
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: GPT) -> GPT:
    """Merge every adapter and put the plain Linears back (in place, as PEFT): a dense GPT with the
    original parameter names whose Linears hold W0 + ΔW. Returns the same model object."""
    refuse_tied_merge(model, [(n, layer) for n, layer in adapted_layers(model) if not layer.merged])
    for name, layer in adapted_layers(model):
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    return model


class AdapterSwitch:
    """Sets every adapted layer's ``disabled`` flag; as a context manager, restores the old flags on exit."""

    def __init__(self, model: Module, disabled: bool, layers: list | None = None):
        # `layers`: the adapted layers when the caller finds them itself (the torch path's modules)
        self.layers = [layer for _, layer in adapted_layers(model)] if layers is None else list(layers)
        if disabled and any(layer.merged for layer in self.layers):
            raise RuntimeError("disable_adapters: the model is merged (ΔW is inside W0); unmerge(model) first")
        self.previous = [layer.disabled for layer in self.layers]
        for layer in self.layers:
            layer.disabled = disabled

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for layer, flag in zip(self.layers, self.previous):
            layer.disabled = flag
        return False


def disable_adapters(model: Module) -> AdapterSwitch:
    """The base model alone. A plain call switches the adapters off; ``with disable_adapters(model):``
    switches them off inside the block only."""
    return AdapterSwitch(model, True)


def enable_adapters(model: Module) -> AdapterSwitch:
    """Switch the adapters back on (also usable as a context manager)."""
    return AdapterSwitch(model, False)


def trainable_parameter_counts(model: Module) -> tuple:
    """(trainable, all) parameter counts; a tied parameter counts once."""
    return model.num_parameters(trainable_only=True), model.num_parameters()


def print_trainable_parameters(model: Module) -> str:
    """Print (and return) PEFT's line: "trainable params: X || all params: Y || trainable%: Z"."""
    trainable, total = trainable_parameter_counts(model)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    print(line)
    return line


@contextlib.contextmanager
def token_context(layers, **values):
    """Set attributes on every layer for the forward passes inside the block, then put None back.

    Per-batch facts an adapted layer cannot see in its (N, D) input, e.g. ``token_mask`` (B, T), the
    real (non-pad) tokens, for statistics and balance losses that must leave padding out (docs/methods.md §0)."""
    for layer in layers:
        for key, value in values.items():
            setattr(layer, key, value)
    try:
        yield
    finally:
        for layer in layers:
            for key in values:
                setattr(layer, key, None)
