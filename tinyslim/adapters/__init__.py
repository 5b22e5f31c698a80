"""Adapter methods on the tiny GPT: plain LoRA, Chain of LoRA, I-LoRA, SLIM, MoLE, ELDER and their
baselines, each behind the ``Method`` contract of base.py (attach → before_task → loss → after_step
→ after_task → evaluating).

    from tinyslim.adapters import make_method
    method = make_method("ilora", gamma=0.5)     # METHODS: "lora" (Seq-LoRA), "er", "ilora", "cola", "slim",
                                                 # "moe_lora" (scenario A: make_method(name) is enough)

Methods that need more than a config to exist are registered apart: COMPOSITION_METHODS ("mole",
"nla", "lora_sum": built from trained source LoRAs) and EDIT_METHODS ("elder", "ft_lora", "grace": trained
edit by edit with ``method.edit(x, y, mask)``).
"""
from .base import (AdaptedLinear, Method, Streams, adapted_layers, adapter_state_dict, disable_adapters,
                   enable_adapters, inject, load_adapter_state_dict, mark_only_adapters_trainable, merge,
                   merge_and_unload, print_trainable_parameters, stream, unmerge)
from .baselines import ER, ERConfig, SeqLoRA, SeqLoraConfig
from .chain import COLA, ColaConfig
from .elder import Elder, ElderConfig, ElderLinear, key_positions
from .ft_lora import EditingMethod, FTLoRA, FTLoraConfig
from .grace import Grace, GraceConfig, GraceLinear
from .ilora import ILoRA, ILoraConfig, ILoraLinear
from .lora import LoraConfig, LoraLinear, lora_scale
from .merging import NLA, CompositionConfig, LoraPoolLinear, LoraSum, MergedLoraLinear, sources_from_methods
from .moe_lora import MoELoRA, MoeLoraConfig
from .mole import Mole, MoleConfig, MoleLinear
from .replay import ReplayBatch, Reservoir
from .slim import ABLATIONS as SLIM_ABLATIONS
from .slim import SLIM, SlimConfig, SlimLinear, make_slim_ablation

METHODS = {cls.name: cls for cls in (SeqLoRA, ER, ILoRA, COLA, SLIM, MoELoRA)}
COMPOSITION_METHODS = {cls.name: cls for cls in (Mole, NLA, LoraSum)}
EDIT_METHODS = {cls.name: cls for cls in (Elder, FTLoRA, Grace)}


def make_method(name: str, **overrides) -> Method:
    """A fresh Method by registry name, with config fields overridden by keyword."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid names are {sorted(METHODS)}")
    return METHODS[name](**overrides)


__all__ = ["METHODS", "make_method", "Method", "AdaptedLinear", "Streams", "stream", "adapted_layers", "inject",
           "mark_only_adapters_trainable", "adapter_state_dict", "load_adapter_state_dict", "merge", "unmerge",
           "merge_and_unload", "disable_adapters", "enable_adapters", "print_trainable_parameters",
           "LoraConfig", "LoraLinear", "lora_scale", "SeqLoraConfig", "SeqLoRA", "ERConfig", "ER",
           "ILoraConfig", "ILoraLinear", "ILoRA", "ColaConfig", "COLA", "Reservoir", "ReplayBatch",
           "SlimConfig", "SlimLinear", "SLIM", "SLIM_ABLATIONS", "make_slim_ablation", "MoeLoraConfig", "MoELoRA",
           "COMPOSITION_METHODS", "MoleConfig", "MoleLinear", "Mole", "CompositionConfig", "LoraPoolLinear",
           "MergedLoraLinear", "NLA", "LoraSum", "sources_from_methods",
           "EDIT_METHODS", "ElderConfig", "ElderLinear", "Elder", "key_positions", "FTLoraConfig", "FTLoRA", "EditingMethod",
           "GraceConfig", "GraceLinear", "Grace"]
