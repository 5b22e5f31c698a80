"""LoRA adapters of the torch engine in PEFT's layout, both ways (tinyslim.hf's PEFT code, on torch modules):

    save_peft_adapter(method_or_model, "out/adapter")   adapter_config.json + adapter_model.safetensors
    load_peft_adapter(model, "out/adapter")             inject PEFT's LoRA into a torch model and load it

The files are the NumPy path's (tinyslim.hf.save_peft_adapter): keys ``base_model.model.<module>.lora_A.weight``
(r, in) and ``.lora_B.weight`` (out, r) whatever the base layer, so that ``PeftModel.from_pretrained(hf_model,
dir)`` rebuilds the same model: y = W0 x + b0 + (α/r) · B A x. ``fan_in_fan_out`` is true when the adapted
layers are GPT-2 Conv1Ds (W stored (in, out)); PEFT checks it per layer anyway. Module names are the Hugging
Face model's own (a CausalLM wrapper is looked through), which are PeftModel's after its prefix.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..adapters.method import Method
from ..hf import (PEFT_PREFIX, check_lora_layers, lora_adapter_config, method_lora_alpha, read_peft_adapter,
                  refuse_tied_knots, write_peft_adapter)
from .layers import linear_features
from .lora import LoraLinear
from .verbs import (adapted_layers, inject, inner_model, linear_names, load_adapter_state_dict,
                    mark_only_adapters_trainable)

__all__ = ["peft_adapter_config", "save_peft_adapter", "load_peft_adapter"]


def _lora_layers(model: nn.Module) -> list:
    return check_lora_layers(adapted_layers(model), LoraLinear)


def peft_adapter_config(model: nn.Module, lora_alpha: float | None = None, use_rslora: bool = False,
                        base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json for the model's LoRA layers (without lora_alpha: s·r, so PEFT's scale is s)."""
    layers = _lora_layers(model)
    candidates = [n for n, _ in adapted_layers(model)] + linear_names(model)
    order = {n: i for i, (n, _) in enumerate(inner_model(model).named_modules())}
    return lora_adapter_config(layers, sorted(set(candidates), key=order.__getitem__), lora_alpha, use_rslora,
                               base_model_name_or_path, fan_in_fan_out=any(layer.fan_in_fan_out for _, layer in layers))


def _peft_tensors(model: nn.Module) -> dict:
    out = {}
    for name, layer in _lora_layers(model):
        A, B = layer.factors()  # the active learner's copy (I-LoRA)
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().cpu().numpy().copy()  # (r, D)
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().cpu().numpy().copy()  # (O, r)
    return out


def save_peft_adapter(method_or_model, directory, base_model_name_or_path: str | None = None,
                      learner: str | None = None) -> Path:
    """Write a torch model's (or Method's reported learner's) LoRA as PEFT's adapter_config.json +
    adapter_model.safetensors. A Method gives its config's lora_alpha / use_rslora; a COLA chain that has
    tied knots is refused (its base weights moved)."""
    if isinstance(method_or_model, Method):
        method = method_or_model
        refuse_tied_knots(method)
        with method.evaluating(learner) as model:
            alpha, rslora = method_lora_alpha(method.config, _lora_layers(model)[0][1])
            config = peft_adapter_config(model, alpha, rslora, base_model_name_or_path)
            tensors = _peft_tensors(model)
    else:
        if not isinstance(method_or_model, nn.Module):
            raise TypeError(f"save_peft_adapter takes a torch model or a tinyslim.torch Method, got "
                            f"{type(method_or_model).__name__}; a NumPy GPT exports with tinyslim.hf.save_peft_adapter")
        config = peft_adapter_config(method_or_model, None, False, base_model_name_or_path)
        tensors = _peft_tensors(method_or_model)
    return write_peft_adapter(directory, tensors, config)


def load_peft_adapter(model: nn.Module, directory, seed: int = 0):
    """Inject PEFT's LoRA (adapter_config.json) into a plain torch model (a CausalLM or a transformers model)
    and load adapter_model.safetensors; only the adapters train afterwards. Returns the LoraConfig. Every key
    and shape is checked before anything is injected, so a failed load leaves the model as it was."""
    inner = inner_model(model)
    features = {name: linear_features(inner.get_submodule(name)) for name in linear_names(model)}
    config, state = read_peft_adapter(directory, features)
    inject(model, lambda base, streams: LoraLinear.from_config(config, base, streams), config.target_modules, seed)
    mark_only_adapters_trainable(model)
    load_adapter_state_dict(model, state)
    return config
