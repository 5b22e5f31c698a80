"""MixLoRA-style MoE-LoRA (Li et al., arXiv 2404.15159), SLIM's baseline and ablation base, docs/methods.md §7.3.

Shape legend: N tokens, D in, O out, r rank, E experts, K top-K.

E LoRA experts under a linear router, top-K = 2 with the softmax renormalised over the top-K, per token:

    ℓ = W_r x + b_r      S = TopK(ℓ, K)      w_e = exp(ℓ_e) / Σ_{j∈S} exp(ℓ_j) on S
    y = W0 x + b0 + Σ_{e∈S} w_e · s · B_e A_e x

No identity experts, no yielding, no masks, no L1 (balance_coef stays 0, as for SLIM, so that the
only differences from SLIM are SLIM's components). It *is* SLIM (slim.py) with
``n_identity_experts=0, drop_p=0, l1_coef=0`` (and γ = 0, which changes nothing without identity
experts): the same layer, the same random draws, so SLIM under those settings is this baseline bit
for bit (docs/methods.md §2.10 invariant 4).

    from tinyslim.adapters import make_method
    moe = make_method("moe_lora", n_lora_experts=4, top_k=2, r=4)
"""
from __future__ import annotations

from dataclasses import dataclass

from .slim import SLIM, SlimConfig

__all__ = ["MoeLoraConfig", "MoELoRA"]


@dataclass
class MoeLoraConfig(SlimConfig):
    """SlimConfig with SLIM's own components switched off."""

    n_identity_experts: int = 0
    gamma: float = 0.0
    drop_p: float = 0.0
    l1_coef: float = 0.0


class MoELoRA(SLIM):
    """Top-K MoE over LoRA experts: SLIM without identity experts, yielding, dynamic merging and L1."""

    name = "moe_lora"
    config_class = MoeLoraConfig
