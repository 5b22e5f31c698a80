"""Adapter methods on the tiny GPT: plain LoRA, Chain of LoRA, I-LoRA and the continual-learning
baselines, each behind the ``Method`` contract of base.py (attach → before_task → loss → after_step
→ after_task → evaluating).

    from tinyslim.adapters import make_method
    method = make_method("ilora", gamma=0.5)     # "lora" (Seq-LoRA), "er", "ilora", "cola"
"""
from .base import (AdaptedLinear, Method, Streams, adapted_layers, adapter_state_dict, disable_adapters,
                   enable_adapters, inject, load_adapter_state_dict, mark_only_adapters_trainable, merge,
                   merge_and_unload, print_trainable_parameters, stream, unmerge)
from .baselines import ER, ERConfig, SeqLoRA, SeqLoraConfig
from .chain import COLA, ColaConfig
from .ilora import ILoRA, ILoraConfig, ILoraLinear
from .lora import LoraConfig, LoraLinear, lora_scale
from .replay import ReplayBatch, Reservoir

METHODS = {cls.name: cls for cls in (SeqLoRA, ER, ILoRA, COLA)}


def make_method(name: str, **overrides) -> Method:
    """A fresh Method by registry name, with config fields overridden by keyword."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid names are {sorted(METHODS)}")
    return METHODS[name](**overrides)


__all__ = ["METHODS", "make_method", "Method", "AdaptedLinear", "Streams", "stream", "adapted_layers", "inject",
           "mark_only_adapters_trainable", "adapter_state_dict", "load_adapter_state_dict", "merge", "unmerge",
           "merge_and_unload", "disable_adapters", "enable_adapters", "print_trainable_parameters",
           "LoraConfig", "LoraLinear", "lora_scale", "SeqLoraConfig", "SeqLoRA", "ERConfig", "ER",
           "ILoraConfig", "ILoraLinear", "ILoRA", "ColaConfig", "COLA", "Reservoir", "ReplayBatch"]
