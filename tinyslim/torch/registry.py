"""Every method of the torch engine by its NumPy name: ``make_method("er", buffer_size=100)``."""
from __future__ import annotations

from .chain import COLA
from .elder import Elder
from .ft_lora import FTLoRA
from .grace import Grace
from .ilora import ILoRA
from .lora import ER, SeqLoRA
from .merging import NLA, LoraSum
from .mole import Mole
from .slim import SLIM, MoELoRA

__all__ = ["METHODS", "make_method"]

# one line per method file; the names are the NumPy registry's (tinyslim.adapters.REGISTRY)
METHODS = {cls.name: cls for cls in (SeqLoRA, ER, ILoRA, COLA, SLIM, MoELoRA, Mole, NLA, LoraSum, Elder, FTLoRA, Grace)}


def make_method(name: str, **overrides):
    """A fresh torch Method by registry name, config fields overridden by keyword (the NumPy fields)."""
    if name not in METHODS:
        raise ValueError(f"unknown torch method {name!r}; the torch engine has {sorted(METHODS)}")
    return METHODS[name](**overrides)
