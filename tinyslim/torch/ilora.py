"""I-LoRA on the torch engine: the twin of tinyslim.adapters.ilora (Ren et al., arXiv 2402.18865), same config.

Shape legend: N tokens, D in, O out, r rank, b replay batch, T time, C = d_model, L = n_layer.

Every hook is the NumPy class's (the replay buffer, the loss, the interpolation, the learners, the
checkpoint state with the slow copy); this file gives the engine its three pieces:

    the layer      y = W0 x + b0 + s · B A x̃,  (A, B) = (A_f, B_f) or (A_s, B_s) by the ``active`` switch
                   (FastSlowSwitch, shared with the NumPy layer); A_s, B_s are tensors without gradient
    interpolate    A_s ← a·A_s + (1 − a)·A_f,  B_s ← a·B_s + (1 − a)·B_f   (in place, factor-wise, no_grad)
    L_cons         (1/C_n) Σ_l Σ_{n valid} ‖h_f^l[n] − h_s^l[n]‖²,  C_n = L_used · N_rep · C
                   (one-sided: relu(h_s − h_f)² instead), h^l from ``model(x, return_hidden=True)``

The slow pass runs under torch.no_grad with the NumPy generators (the runner's rng, the `dropout`
stream) rewound after it, and torch's own generator forked, so that a model with dropout of its own
also gives the slow pass the fast replay pass's masks: slow = fast gives L_cons = 0 exactly.
"""
from __future__ import annotations

import contextlib

import torch

from .. import adapters
from ..adapters.ilora import FastSlowSwitch
from .lora import LoraLinear
from .method import TorchMethod

__all__ = ["ILoraLinear", "ILoRA", "consistency_loss"]


class ILoraLinear(FastSlowSwitch, LoraLinear):
    """LoRA with a fast (trained) and a slow (never trained) copy of its factors and an ``active`` switch."""

    adapter_names = ("lora_A", "lora_B", "lora_A_slow", "lora_B_slow")
    trainable_names = ("lora_A", "lora_B")

    def __init__(self, base_layer, r: int, scale: float, dropout: float, streams, init_lora_weights: bool = True):
        super().__init__(base_layer, r, scale, dropout, streams, init_lora_weights)
        # slow := copy(fast): Parameters that never train (no gradient, never in the optimizer)
        self.lora_A_slow = torch.nn.Parameter(self.lora_A.detach().clone(), requires_grad=False)  # (r, D)
        self.lora_B_slow = torch.nn.Parameter(self.lora_B.detach().clone(), requires_grad=False)  # (O, r)
        self._active = "fast"

    @classmethod
    def from_config(cls, config, base_layer, streams) -> "ILoraLinear":
        return cls(base_layer, config.r, config.scale, config.lora_dropout, streams,
                   init_lora_weights=config.init_lora_weights)

    @torch.no_grad()
    def interpolate(self, a: float) -> None:
        """A_s ← a·A_s + (1 − a)·A_f and B_s ← a·B_s + (1 − a)·B_f, factor-wise, in place (the NumPy
        layer's expression, so both engines round alike)."""
        for slow, fast in ((self.lora_A_slow, self.lora_A), (self.lora_B_slow, self.lora_B)):
            slow.copy_(a * slow + (1.0 - a) * fast)

    @torch.no_grad()
    def copy_fast_to_slow(self) -> None:
        self.lora_A_slow.copy_(self.lora_A)
        self.lora_B_slow.copy_(self.lora_B)

    def extra_repr(self):
        return f"{super().extra_repr()}, active={self.active}"


def consistency_loss(h_fast: list, h_slow: list, valid, one_sided: bool = False) -> torch.Tensor:
    """L_cons = (1/C_n) Σ_l Σ_n ‖h_f^l[n] − h_s^l[n]‖² over the valid tokens, C_n = L_used · N_rep · C.

    h_fast: tensors (b, T, C) of the fast pass (in its graph); h_slow: the slow pass's (no graph);
    valid (b, T) 0/1 (NumPy or torch). one_sided: relu(h_s − h_f)² instead."""
    h0 = h_fast[0]
    keep = torch.as_tensor(valid, device=h0.device).to(h0.dtype)[:, :, None]  # (b, T, 1)
    C_n = len(h_fast) * max(float(keep.sum()), 1.0) * h0.shape[-1]  # (no valid token: the sum is 0 anyway)
    total = 0.0
    for h_f, h_s in zip(h_fast, h_slow):
        d = torch.relu(h_s - h_f) if one_sided else h_f - h_s  # (b, T, C)
        total = total + (d * d * keep).sum()
    return total / C_n


class ILoRA(adapters.ILoRA, TorchMethod):
    """I-LoRA on torch: ER on the fast learner + hidden-state consistency towards the interpolated slow copy."""

    def make_layer(self, base_layer, streams):
        return ILoraLinear.from_config(self.config, base_layer, streams)

    @contextlib.contextmanager
    def _rewound(self, *generators):
        with super()._rewound(*generators), torch.random.fork_rng(devices=self._cuda_devices()):
            yield

    def _cuda_devices(self) -> list:
        device = self.model.device
        return [device] if device.type == "cuda" else []

    def _consistency_loss(self, h_fast, h_slow, valid, one_sided: bool):
        return consistency_loss(h_fast, h_slow, valid, one_sided=one_sided)
