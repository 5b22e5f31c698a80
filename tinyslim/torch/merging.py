"""Composing E frozen, separately trained LoRAs on the torch engine: NLA, the unnormalised sum, and the
frozen LoRA pool they share with MoLE (mole.py); the twins of tinyslim.adapters.merging, same configs.

Shape legend: N tokens, D in, O out, r rank (the largest source rank), E = number of source LoRAs.

    u_i = s_i · B_i A_i x                       (frozen branch outputs, i = 1..E)
    NLA:  Δ = (1/E) Σ_i u_i   (W = W0 + (1/E) Σ_i s_i B_i A_i)      sum:  Δ = Σ_i u_i

The sources are LoRA adapter state dicts of NumPy or torch LoRA methods (NumPy arrays, the same keys
on both engines: ``sources_from_methods`` reads either); sources of smaller rank are zero-padded to r.
Both methods merge into W0 (``merge``); nothing trains.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import adapters
from .layers import AdaptedLinear
from .method import TorchMethod

__all__ = ["LoraPoolLinear", "MergedLoraLinear", "NLA", "LoraSum"]


class LoraPoolLinear(AdaptedLinear):
    """A frozen Linear / Conv1D plus E frozen LoRAs, stacked: lora_A (E, r, D), lora_B (E, O, r)."""

    adapter_names = ("lora_A", "lora_B")
    trainable_names = ()

    def __init__(self, base_layer, n_sources: int, r: int, scales):
        super().__init__(base_layer)
        D, O = self.in_features, self.out_features
        self.n_sources, self.r = n_sources, r
        self.register_buffer("scales", self.tensor(np.asarray(scales, dtype=np.float64)), persistent=False)  # (E,)
        self.lora_A = self.new_parameter(np.zeros((n_sources, r, D)), requires_grad=False)  # (E, r, D)
        self.lora_B = self.new_parameter(np.zeros((n_sources, O, r)), requires_grad=False)  # (E, O, r)

    @torch.no_grad()
    def set_sources(self, pairs) -> None:
        """Copy [(A_i (r_i, D), B_i (O, r_i))] (NumPy or torch) in, zero-padding every rank to r."""
        if len(pairs) != self.n_sources:
            raise ValueError(f"expected {self.n_sources} (A, B) pairs, got {len(pairs)}")
        self.lora_A.zero_()
        self.lora_B.zero_()
        for i, (A, B) in enumerate(pairs):
            A, B = self.tensor(A), self.tensor(B)
            if A.shape[1] != self.in_features or B.shape[0] != self.out_features or A.shape[0] > self.r:
                raise ValueError(f"source {i}: A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a "
                                 f"({self.out_features}, {self.in_features}) layer of rank ≤ {self.r}")
            self.lora_A[i, :A.shape[0]] = A
            self.lora_B[i, :, :A.shape[0]] = B

    def source_outputs(self, x: torch.Tensor) -> torch.Tensor:  # x (N, D) -> u (E, N, O)
        """u[i] = s_i · (x A_iᵀ) B_iᵀ: every token through every source (BA is never formed)."""
        h = torch.einsum("nd,erd->enr", x, self.lora_A)  # (E, N, r)
        return torch.einsum("enr,eor->eno", h, self.lora_B) * self.scales[:, None, None]

    def source_deltas(self) -> torch.Tensor:  # (E, O, D): s_i B_i A_i
        return self.scales[:, None, None] * torch.matmul(self.lora_B, self.lora_A)

    def extra_repr(self):
        return f"{super().extra_repr()}, n_sources={self.n_sources}, r={self.r}"


class MergedLoraLinear(LoraPoolLinear):
    """Δ = Σ_i w_i u_i with constant weights w (1/E: NLA; 1: the sum); mergeable."""

    def __init__(self, base_layer, n_sources: int, r: int, scales, weights):
        super().__init__(base_layer, n_sources, r, scales)
        self.register_buffer("weights", self.tensor(np.asarray(weights, dtype=np.float64)), persistent=False)  # (E,)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:  # x (N, D) -> Δ (N, O)
        return torch.einsum("e,eno->no", self.weights, self.source_outputs(x))

    def delta_weight(self) -> torch.Tensor:  # ΔW = Σ_i w_i s_i B_i A_i (O, D)
        return torch.einsum("e,eod->od", self.weights, self.source_deltas())


class NLA(adapters.NLA, TorchMethod):
    """Normalised linear arithmetic on torch: the average of the source deltas (nothing trains)."""

    def make_layer(self, base_layer, streams):  # the config's sources and constant weights w
        s = self.config.sources
        return MergedLoraLinear(base_layer, s.E, s.r_max, s.scales, self.config.gate_weights())


class LoraSum(adapters.LoraSum, TorchMethod):
    """The unnormalised sum of the source deltas on torch (nothing trains)."""

    make_layer = NLA.make_layer  # combine="sum" gives w = 1 (LoraSumConfig)
