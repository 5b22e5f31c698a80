"""Plain LoRA on the torch engine, and the continual-learning baselines built on it (Seq-LoRA, ER):
the twins of tinyslim.adapters.lora and tinyslim.adapters.baselines, with the same configs.

Shape legend: N tokens, D in, O out, r rank.

    Δ = s · (x̃ Aᵀ) Bᵀ        A (r, D) = lora_A, B (O, r) = lora_B, x̃ = dropout(x) in training
    init: A ~ U(±1/√D) from the `init` stream, B = 0 (the NumPy layer's draws, in its order)

The low-rank product is two torch matmuls; BA is never formed in the forward.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import adapters
from .functional import stream_dropout
from .layers import AdaptedLinear
from .method import TorchMethod

__all__ = ["LoraLinear", "SeqLoRA", "ER"]


class LoraLinear(AdaptedLinear):
    """A frozen Linear / Conv1D plus s·B A."""

    adapter_names = ("lora_A", "lora_B")
    trainable_names = ("lora_A", "lora_B")

    def __init__(self, base_layer, r: int, scale: float, dropout: float, streams, init_lora_weights: bool = True):
        super().__init__(base_layer)
        D, O = self.in_features, self.out_features
        self.r, self.scale, self.dropout = r, float(scale), float(dropout)
        self.dropout_rng = streams["dropout"] if dropout > 0 else None  # untouched when p = 0
        self.lora_A = self.new_parameter(np.zeros((r, D)))  # (r, D)
        self.lora_B = self.new_parameter(np.zeros((O, r)))  # (O, r)
        self.reset_parameters(streams["init"])
        if not init_lora_weights:  # a non-zero B: the adapter is not a no-op (tests of the forward)
            with torch.no_grad():
                self.lora_B.copy_(self.tensor(streams["init"].uniform(-1.0 / math.sqrt(r), 1.0 / math.sqrt(r), (O, r))))

    @classmethod
    def from_config(cls, config, base_layer, streams) -> "LoraLinear":
        return cls(base_layer, config.r, config.scale, config.lora_dropout, streams,
                   init_lora_weights=config.init_lora_weights)

    @torch.no_grad()
    def reset_parameters(self, rng: np.random.Generator, rank: int | None = None):
        """A[:rank] ~ U(±1/√D) from `rng`, the other rows 0, B = 0 (in place; the NumPy layer's draw)."""
        rank = self.r if rank is None else rank
        if not 1 <= rank <= self.r:
            raise ValueError(f"reset_parameters: rank must lie in [1, r = {self.r}], got {rank}")
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A.zero_()
        self.lora_A[:rank] = self.tensor(rng.uniform(-bound, bound, (rank, self.in_features)))
        self.lora_B.zero_()

    def factors(self) -> tuple:
        """(A, B) of the active adapter (I-LoRA switches between fast and slow copies here)."""
        return self.lora_A, self.lora_B

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:  # x (N, D) -> Δ (N, O)
        A, B = self.factors()
        x = stream_dropout(x, self.dropout, self.dropout_rng, self.training)  # x̃
        return self.scale * ((x @ A.T) @ B.T)

    def delta_weight(self) -> torch.Tensor:  # ΔW = s · B A (O, D)
        A, B = self.factors()
        return self.scale * (B @ A)

    def extra_repr(self):
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}, dropout={self.dropout:g}"


class SeqLoRA(adapters.SeqLoRA, TorchMethod):
    """Sequential LoRA on torch: CE on the current task only."""

    def make_layer(self, base_layer, streams):
        return LoraLinear.from_config(self.config, base_layer, streams)


class ER(adapters.ER, TorchMethod):
    """Experience replay with LoRA on torch (the NumPy class's buffer and loss, unchanged)."""

    def make_layer(self, base_layer, streams):
        return LoraLinear.from_config(self.config, base_layer, streams)
