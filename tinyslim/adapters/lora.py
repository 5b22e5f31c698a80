"""Plain LoRA (Hu et al., arXiv 2106.09685), docs/methods.md §1.

Shape legend: N tokens, D in features, O out features, r rank.

    forward      y = W0 x + b0 + s · B (A x̃)        x̃ = dropout(x) in training, x̃ = x otherwise
    batched      H = X̃ Aᵀ (N×r)     Y = X W0ᵀ + b0 + s · H Bᵀ (N×O)     — BA is never formed here
    init         A ~ U(−1/√D, +1/√D) (the `init` stream), B = 0      A (r, D) = lora_A, B (O, r) = lora_B
    scale        s = α/r,  or α/√r with use_rslora (rsLoRA)
    backward     dH = s·dY B,  dB = s·dYᵀ H,  dA = dHᵀ X̃,  dX = dY W0 + (dH A) ⊙ keep/(1−p)
    merge        W0 ← W0 + s·B A;   unmerge: W0 ← W0 − s·B A

The low-rank path is the batched line, ``lowrank(X̃, A, B, s)``; underneath it is the shared mixture
kernel with E = 1 expert, so the backward above is the kernel's (docs/methods.md §8.3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import functional as F
from ..autograd import Tensor
from ..lowrank import lowrank
from ..nn import Linear, Parameter
from .base import AdaptedLinear, Streams

__all__ = ["LoraConfig", "LoraLinear", "lora_scale"]


def lora_scale(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """s = α/r, or α/√r with rsLoRA (equal at r = 1)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass
class LoraConfig:
    """Plain LoRA (docs/methods.md §1.5). Field names follow PEFT's LoraConfig."""

    r: int = 8  # rank
    lora_alpha: float = 16  # s = α/r = 2
    lora_dropout: float = 0.0  # on x before A, training only (the `dropout` stream)
    target_modules: list | str = field(default_factory=lambda: ["attn.c_attn"])  # suffixes, regex or "all-linear"
    use_rslora: bool = False  # s = α/√r
    init_lora_weights: bool = True  # Kaiming-uniform A, zero B (False: B random too, for tests only)

    def __post_init__(self):
        if not isinstance(self.r, (int, np.integer)) or self.r < 1:
            raise ValueError(f"{type(self).__name__}.r must be a positive integer, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"{type(self).__name__}.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"{type(self).__name__}.lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.lora_alpha, self.use_rslora)

    def make_layer(self, base_layer: Linear, streams: Streams) -> "LoraLinear":
        return LoraLinear(base_layer, self.r, self.scale, self.lora_dropout, streams,
                          init_lora_weights=self.init_lora_weights)


class LoraLinear(AdaptedLinear):
    """A frozen Linear plus s·B A (docs/methods.md §1.1–1.4)."""

    adapter_names = ("lora_A", "lora_B")
    trainable_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: Linear, r: int, scale: float, dropout: float, streams: Streams,
                 init_lora_weights: bool = True):
        super().__init__(base_layer)
        D, O, dtype = self.in_features, self.out_features, base_layer.weight.dtype
        self.r, self.scale, self.dropout = r, float(scale), float(dropout)
        self.dropout_rng = streams["dropout"] if dropout > 0 else None  # untouched when p = 0
        self.lora_A = Parameter(np.zeros((r, D), dtype=dtype))  # (r, D)
        self.lora_B = Parameter(np.zeros((O, r), dtype=dtype))  # (O, r)
        self.reset_parameters(streams["init"])
        if not init_lora_weights:  # a non-zero B: the adapter is not a no-op (tests of the forward)
            self.lora_B.data[...] = streams["init"].uniform(-1.0 / math.sqrt(r), 1.0 / math.sqrt(r), (O, r))

    def reset_parameters(self, rng: np.random.Generator, rank: int | None = None):
        """A[:rank] ~ U(±1/√D) from `rng`, the other rows of A 0, B = 0 (in place). rank < r zero-pads
        (COLA's step-down links): padded rows get exactly zero gradient, so they stay 0."""
        rank = self.r if rank is None else rank
        if not 1 <= rank <= self.r:
            raise ValueError(f"reset_parameters: rank must lie in [1, r = {self.r}], got {rank}")
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A.data[...] = 0
        self.lora_A.data[:rank] = rng.uniform(-bound, bound, (rank, self.in_features))
        self.lora_B.data[...] = 0

    def factors(self) -> tuple:
        """(A, B) of the active adapter (I-LoRA switches between fast and slow copies here)."""
        return self.lora_A, self.lora_B

    def adapter_delta(self, x: Tensor) -> Tensor:  # x (N, D) -> Δ (N, O)
        A, B = self.factors()
        x = F.dropout(x, self.dropout, self.dropout_rng, self.training)  # x̃
        return lowrank(x, A, B, self.scale)  # s · (X̃ Aᵀ) Bᵀ

    def delta_weight(self) -> np.ndarray:  # ΔW = s · B A (O, D)
        A, B = self.factors()
        return (self.scale * (B.data @ A.data)).astype(self.base_layer.weight.dtype, copy=False)

    def extra_repr(self):
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}, dropout={self.dropout:g}"
