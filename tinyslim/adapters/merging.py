"""Composing N frozen, separately trained LoRAs without training: NLA and the unnormalised sum (MoLE's
baselines, docs/methods.md §7.4), and the frozen LoRA pool they share with MoLE (mole.py).

Shape legend: N tokens, D in, O out, r rank, E = number of source LoRAs (the paper's N).

    NLA:  W = W0 + (1/E) Σ_i s_i B_i A_i        sum:  W = W0 + Σ_i s_i B_i A_i

Unmerged, both are one kernel call with a constant dense gate, G[n, i] = w_i (1/E for NLA, 1 for the
sum): Δ = mixture_lowrank(x, A, B, G, s). Both can also be merged into W0 (``merge``). NLA equals
MoLE with a zero gate matrix e (uniform softmax gates).

Sources are LoRA adapter state dicts, ``adapter_state_dict(model)`` of a plain-LoRA model: keys
``"<module>.lora_A"`` (r_i, D) and ``"<module>.lora_B"`` (O, r_i), with a scale s_i = α_i/r_i per
source. Every source must adapt the same modules. Sources of different ranks are zero-padded to the
largest rank (padded rows of A and columns of B are zero and frozen, so they add nothing).

    from tinyslim.adapters import NLA, adapter_state_dict
    sources = [adapter_state_dict(m.model) for m in trained_lora_methods]
    nla = NLA(lora_sources=sources, lora_scales=2.0)
    nla.attach(base_copy, seed=0)           # nothing trains; evaluate with nla.evaluating()
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..autograd import Tensor
from ..lowrank import mixture_lowrank
from ..nn import Linear, Parameter
from .base import AdaptedLinear, Method, Streams

__all__ = ["LoraSources", "LoraPoolLinear", "MergedLoraLinear", "LoraPoolConfig", "NLA", "LoraSum",
           "sources_from_methods", "FrozenPoolMethod"]


# ---- the source LoRAs --------------------------------------------------------------------------------

class LoraSources:
    """E LoRA adapter state dicts as {module: [(A_i (r_i, D), B_i (O, r_i)) for i]} plus the scales s_i."""

    def __init__(self, states, scales):
        if not isinstance(states, (list, tuple)) or len(states) < 1:
            raise ValueError(f"lora_sources must be a non-empty list of LoRA adapter state dicts "
                             f"(adapter_state_dict(model) of plain-LoRA models), got {type(states).__name__}")
        per_source = [self._split(i, s) for i, s in enumerate(states)]
        modules = list(per_source[0])
        for i, mods in enumerate(per_source[1:], start=1):
            if sorted(mods) != sorted(modules):
                raise ValueError(f"lora source {i} adapts {sorted(mods)} but source 0 adapts {sorted(modules)}; "
                                 "every source LoRA must share target_modules")
        self.E = len(states)
        self.modules = modules  # in the first source's order
        self.factors = {m: [p[m] for p in per_source] for m in modules}
        self.r_max = max(A.shape[0] for pairs in self.factors.values() for A, _ in pairs)
        scales = np.broadcast_to(np.asarray(scales, dtype=np.float64), (self.E,)) if np.ndim(scales) == 0 \
            else np.asarray(scales, dtype=np.float64)
        if scales.shape != (self.E,) or not np.all(scales > 0):
            raise ValueError(f"lora_scales must be one positive number or {self.E} of them (s_i = α_i/r_i), "
                             f"got {np.asarray(scales).tolist()}")
        self.scales = scales.copy()  # (E,)
        for m, pairs in self.factors.items():
            shapes = {(A.shape[1], B.shape[0]) for A, B in pairs}
            if len(shapes) != 1:
                raise ValueError(f"{m}: the sources disagree on (in, out) features: {sorted(shapes)}")

    @staticmethod
    def _split(i, state) -> dict:
        if not isinstance(state, dict):
            raise TypeError(f"lora source {i} must be a dict (adapter_state_dict of a LoRA model), "
                            f"got {type(state).__name__}")
        A_keys = sorted(k for k in state if k.endswith(".lora_A"))
        if not A_keys:
            raise ValueError(f"lora source {i} has no '<module>.lora_A' entries; keys: {sorted(state)[:4]}…")
        out = {}
        for key in A_keys:
            module = key[:-len(".lora_A")]
            if module + ".lora_B" not in state:
                raise ValueError(f"lora source {i} has {key} but no {module}.lora_B")
            A, B = np.asarray(state[key]), np.asarray(state[module + ".lora_B"])
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise ValueError(f"lora source {i}, {module}: lora_A {A.shape} and lora_B {B.shape} are not "
                                 "(r, D) and (O, r)")
            out[module] = (A, B)
        return out

    def describe(self) -> dict:
        return {"n_sources": self.E, "modules": list(self.modules), "r_max": int(self.r_max),
                "scales": self.scales.tolist()}


def sources_from_methods(methods) -> tuple[list, list]:
    """(states, scales) of trained plain-LoRA Methods (e.g. make_method("lora") after training), on either
    engine: the adapter arrays are NumPy with the same keys on both (``Method._adapter_arrays``)."""
    states = [{k: v for k, v in m._adapter_arrays().items() if k.endswith((".lora_A", ".lora_B"))}
              for m in methods]
    return states, [float(m.config.scale) for m in methods]


# ---- the frozen pool layer -----------------------------------------------------------------------------

class LoraPoolLinear(AdaptedLinear):
    """A frozen Linear plus E frozen LoRAs, stacked for the kernel: lora_A (E, r, D), lora_B (E, O, r)."""

    adapter_names = ("lora_A", "lora_B")
    trainable_names = ()

    def __init__(self, base_layer: Linear, n_sources: int, r: int, scales):
        super().__init__(base_layer)
        D, O, dtype = self.in_features, self.out_features, base_layer.weight.dtype
        self.n_sources, self.r = n_sources, r
        self.scales = np.asarray(scales, dtype=dtype)  # (E,) s_i
        self.lora_A = Parameter(np.zeros((n_sources, r, D), dtype=dtype), requires_grad=False)  # (E, r, D)
        self.lora_B = Parameter(np.zeros((n_sources, O, r), dtype=dtype), requires_grad=False)  # (E, O, r)

    def set_sources(self, pairs) -> None:
        """Copy [(A_i (r_i, D), B_i (O, r_i))] in, zero-padding every rank to r."""
        if len(pairs) != self.n_sources:
            raise ValueError(f"expected {self.n_sources} (A, B) pairs, got {len(pairs)}")
        self.lora_A.data[...] = 0
        self.lora_B.data[...] = 0
        for i, (A, B) in enumerate(pairs):
            if A.shape[1] != self.in_features or B.shape[0] != self.out_features or A.shape[0] > self.r:
                raise ValueError(f"source {i}: A {A.shape}, B {B.shape} do not fit a ({self.out_features}, "
                                 f"{self.in_features}) layer of rank ≤ {self.r}")
            self.lora_A.data[i, :A.shape[0]] = A
            self.lora_B.data[i, :, :A.shape[0]] = B

    def source_deltas(self) -> np.ndarray:  # (E, O, D): s_i B_i A_i
        return self.scales[:, None, None] * np.matmul(self.lora_B.data, self.lora_A.data)

    def extra_repr(self):
        return f"{super().extra_repr()}, n_sources={self.n_sources}, r={self.r}"


class MergedLoraLinear(LoraPoolLinear):
    """Δ = Σ_i w_i s_i B_i A_i x with constant weights w (1/E: NLA; 1: the sum); mergeable."""

    def __init__(self, base_layer: Linear, n_sources: int, r: int, scales, weights):
        super().__init__(base_layer, n_sources, r, scales)
        self.weights = np.asarray(weights, dtype=self.lora_A.dtype)  # (E,)

    def adapter_delta(self, x: Tensor) -> Tensor:  # x (N, D) -> Δ (N, O)
        G = np.broadcast_to(self.weights, (x.shape[0], self.n_sources))  # constant dense gate (N, E)
        return mixture_lowrank(x, self.lora_A, self.lora_B, G, scale=self.scales)

    def delta_weight(self) -> np.ndarray:  # ΔW = Σ_i w_i s_i B_i A_i (O, D)
        return np.einsum("e,eod->od", self.weights, self.source_deltas()).astype(self.base_layer.weight.dtype)


# ---- the Methods ----------------------------------------------------------------------------------------

@dataclass
class LoraPoolConfig:
    """NLA / sum of frozen LoRAs (docs/methods.md §7.4). `weights` overrides `combine` (a LoRAHub-style vector)."""

    lora_sources: list = field(default_factory=list, repr=False)  # E adapter state dicts of plain-LoRA models
    lora_scales: float | list = 2.0  # s_i = α_i/r_i: one number or one per source
    combine: str = "mean"  # "mean" (NLA, w_i = 1/E) or "sum" (w_i = 1)
    weights: list | None = None  # explicit w (E,), e.g. from a gradient-free search

    def __post_init__(self):
        if self.combine not in ("mean", "sum"):
            raise ValueError(f"combine must be 'mean' (NLA) or 'sum', got {self.combine!r}")
        self.sources = LoraSources(self.lora_sources, self.lora_scales)
        if self.weights is not None and np.shape(self.weights) != (self.sources.E,):
            raise ValueError(f"weights must have one entry per source ({self.sources.E}), got {self.weights!r}")

    @property
    def target_modules(self) -> list:
        return list(self.sources.modules)  # full names: PEFT matching takes an exact name too

    def gate_weights(self) -> np.ndarray:
        E = self.sources.E
        if self.weights is not None:
            return np.asarray(self.weights, dtype=np.float64)
        return np.full(E, 1.0 / E) if self.combine == "mean" else np.ones(E)

    def make_layer(self, base_layer: Linear, streams: Streams) -> MergedLoraLinear:
        s = self.sources
        return MergedLoraLinear(base_layer, s.E, s.r_max, s.scales, self.gate_weights())


class FrozenPoolMethod(Method):
    """Attach = inject pool layers, then copy each module's source factors in."""

    def attach(self, model, seed: int) -> None:
        super().attach(model, seed)
        sources = self.config.sources
        for name, layer in zip(self.adapted, self.layers()):
            layer.set_sources(sources.factors[name])

    def describe(self) -> dict:  # the sources are arrays: summarise them instead of printing them
        config = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)
                  if f.name != "lora_sources"}
        out = {"name": self.name, "config": {**config, "lora_sources": self.config.sources.describe()}}
        if self.model is not None:
            out["adapted_modules"] = list(self.adapted)
            out["trainable_parameters"] = int(sum(int(np.prod(p.shape)) for p in self.trainable_parameters()))
        return out


class NLA(FrozenPoolMethod):
    """Normalised linear arithmetic: the average of the source deltas (nothing trains)."""

    name = "nla"
    config_class = LoraPoolConfig


@dataclass
class LoraSumConfig(LoraPoolConfig):
    combine: str = "sum"


class LoraSum(FrozenPoolMethod):
    """The unnormalised sum of the source deltas (nothing trains)."""

    name = "lora_sum"
    config_class = LoraSumConfig
