"""Adapter methods on the tiny GPT: plain LoRA, Chain of LoRA, I-LoRA, SLIM, MoLE, ELDER and their
baselines, each behind the ``Method`` contract of base.py (attach → before_task → loss → after_step
→ after_task → evaluating).

    from tinyslim.adapters import make_method
    method = make_method("ilora", gamma=0.5)     # METHODS: "lora" (Seq-LoRA), "er", "ilora", "cola", "slim",
                                                 # "moe_lora" (scenario A: make_method(name) is enough)

make_method knows every method (REGISTRY, by scenario). Scenario B's COMPOSITION_METHODS ("mole", "nla",
"lora_sum") are built from trained source LoRAs (``lora_sources=``, ``lora_scales=``); scenario C's
EDIT_METHODS ("elder", "ft_lora", "grace") are trained edit by edit with ``method.edit(x, y, mask)``.
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
from .merging import NLA, LoraPoolConfig, LoraPoolLinear, LoraSum, MergedLoraLinear, sources_from_methods
from .moe_lora import MoELoRA, MoeLoraConfig
from .mole import Mole, MoleConfig, MoleLinear
from .replay import ReplayBatch, Reservoir
from .slim import ABLATIONS as SLIM_ABLATIONS
from .slim import SLIM, SlimConfig, SlimLinear, make_slim_ablation

METHODS = {cls.name: cls for cls in (SeqLoRA, ER, ILoRA, COLA, SLIM, MoELoRA)}
COMPOSITION_METHODS = {cls.name: cls for cls in (Mole, NLA, LoraSum)}
EDIT_METHODS = {cls.name: cls for cls in (Elder, FTLoRA, Grace)}
# the one registry: every method, and the scenario (`python -m tinyslim run <scenario>`) that uses it
REGISTRY = {"continual (scenario A)": METHODS,
            "composition (scenario B; built from trained source LoRAs: lora_sources=…)": COMPOSITION_METHODS,
            "editing (scenario C; trained edit by edit with method.edit)": EDIT_METHODS}


def make_method(name: str, **overrides) -> Method:
    """A fresh Method of any scenario by registry name, with config fields overridden by keyword."""
    for registry in REGISTRY.values():
        if name in registry:
            return registry[name](**overrides)
    raise ValueError(f"unknown method {name!r}; valid names are "
                     + "; ".join(f"{sorted(registry)} in {scenario}" for scenario, registry in REGISTRY.items()))


__all__ = ["METHODS", "REGISTRY", "make_method", "Method", "AdaptedLinear", "Streams", "stream", "adapted_layers", "inject",
           "mark_only_adapters_trainable", "adapter_state_dict", "load_adapter_state_dict", "merge", "unmerge",
           "merge_and_unload", "disable_adapters", "enable_adapters", "print_trainable_parameters",
           "LoraConfig", "LoraLinear", "lora_scale", "SeqLoraConfig", "SeqLoRA", "ERConfig", "ER",
           "ILoraConfig", "ILoraLinear", "ILoRA", "ColaConfig", "COLA", "Reservoir", "ReplayBatch",
           "SlimConfig", "SlimLinear", "SLIM", "SLIM_ABLATIONS", "make_slim_ablation", "MoeLoraConfig", "MoELoRA",
           "COMPOSITION_METHODS", "MoleConfig", "MoleLinear", "Mole", "LoraPoolConfig", "LoraPoolLinear",
           "MergedLoraLinear", "NLA", "LoraSum", "sources_from_methods",
           "EDIT_METHODS", "ElderConfig", "ElderLinear", "Elder", "key_positions", "FTLoraConfig", "FTLoRA", "EditingMethod",
           "GraceConfig", "GraceLinear", "Grace"]
