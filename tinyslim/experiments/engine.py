"""The engine a scenario runs on: what the runner needs that depends on NumPy or torch, in one object.

The runner knows no method by name, and no engine either: it asks the engine for

    engine.model(base)            the model a run trains: a copy of the NumPy GPT (numpy) or the same
                                  weights as a transformers GPT2LMHeadModel behind tinyslim.torch.CausalLM
                                  (torch, ``from_gpt``); the base itself is never touched
    engine.view(base)             the base as this engine's model, for measuring it (numpy: the base itself)
    engine.methods                scenario A's method classes by name; engine.make_method(name, **fields)
    engine.ablations              SLIM's ablation rows by name; engine.make_ablation(row, **fields)
    engine.optimizer_class        Adam: tinyslim.optim's, or torch.optim.Adam behind the same interface
    engine.clip_grad_norm_        the global-norm clip with tinyslim.optim's rule
    engine.param_count(p)         the number of entries of a trainable parameter

``get_engine("numpy" | "torch")``; the torch engine (its parts: tinyslim/torch/engine.py) is imported only
when asked for, so that tinyslim runs without torch installed. Both engines share the config dataclasses, the
named random streams and the hooks of every method, so that one seed gives the same run on both up to
floating-point rounding (tests/test_torch_engine.py compares the two in float64).
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..optim import Adam, clip_grad_norm_

__all__ = ["Engine", "NUMPY", "ENGINES", "get_engine"]


@dataclass(frozen=True)
class Engine:
    """What a scenario runner needs of an engine (see the module docstring)."""

    name: str
    model: Callable  # base GPT -> a new model of this engine, with the base's weights
    view: Callable  # base GPT -> the base as this engine's model (may be the base itself)
    methods: dict  # scenario A's method name -> class
    make_method: Callable  # (name, **fields) -> a fresh method (of any scenario)
    optimizer_class: Callable  # (params, lr=...) -> optimizer with reset_state(), lr, state_dict()
    clip_grad_norm_: Callable  # (params, max_norm) -> the norm before clipping
    ablations: dict  # SLIM's ablation rows: name -> what the row removes
    make_ablation: Callable  # (row, **fields) -> a fresh SLIM of that row

    @staticmethod
    def param_count(p) -> int:
        return int(np.prod(p.shape))

    def __repr__(self):
        return f"Engine({self.name!r})"


def _numpy_engine() -> Engine:
    from ..adapters import METHODS, SLIM_ABLATIONS, make_method, make_slim_ablation

    return Engine(name="numpy", model=copy.deepcopy, view=lambda base: base, methods=METHODS,
                  make_method=make_method, optimizer_class=Adam, clip_grad_norm_=clip_grad_norm_,
                  ablations=SLIM_ABLATIONS, make_ablation=make_slim_ablation)


@functools.cache
def _torch_engine() -> Engine:
    try:
        from ..torch.engine import PARTS
    except ImportError as err:
        raise ValueError(f"the torch engine needs PyTorch and transformers ({err}); install them with "
                         "pip install -e '.[torch]'") from None
    return Engine(name="torch", **PARTS)


NUMPY = _numpy_engine()
ENGINES = ("numpy", "torch")


def get_engine(engine: str | Engine | None = None) -> Engine:
    """The engine by name ("numpy", "torch"); an Engine is returned as is, None is the NumPy engine."""
    if engine is None:
        return NUMPY
    if isinstance(engine, Engine):
        return engine
    if engine == "numpy":
        return NUMPY
    if engine == "torch":
        return _torch_engine()
    raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
