"""COLA — Chain of LoRA on the torch engine: the twin of tinyslim.adapters.chain (Xia, Qin, Hazan;
arXiv 2401.04151), same config.

Shape legend: D in, O out, r_j rank of link j, T total optimizer steps of the task.

The NumPy class keeps the whole chain (knots, link ranks and scales, the lr schedule, the optimizer
reset at a knot, the checkpoint state); this file gives it the torch layer and the engine's three
writes to the base weight W (O, D) (``base_weight``: a Linear's weight, a Conv1D's transposed view):

    link j:      y = W x + b0 + s_j · B_j A_j x̃          (torch LoraLinear at r_max = r_1, zero-padded below)
    tie a knot:  W ← W + s_j B_j A_j  (in place, no_grad); then A ~ U(±1/√D) from `reinit`, B = 0

COLA drives the runner's optimizer through ``optimizer.lr`` (read and set before every step) and
``optimizer.reset_state()`` (at a task start and at a knot): tinyslim.torch.optim.Adam's interface.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import adapters
from .layers import base_weight
from .lora import LoraLinear
from .method import TorchMethod

__all__ = ["COLA"]


class COLA(adapters.COLA, TorchMethod):
    """Chain of LoRA on torch: tune a link, tie the knot (merge it into W), start a fresh link."""

    def make_layer(self, base_layer, streams):
        cfg = self.config  # factors at r_max = r_1; smaller later links are zero-padded
        return LoraLinear(base_layer, cfg.link_ranks()[0], cfg.link_scales()[0], cfg.lora_dropout, streams,
                          init_lora_weights=cfg.init_lora_weights)

    def merged_weights(self) -> dict:
        """W_final = W + s_j B_j A_j per adapted layer, (O, D) NumPy arrays."""
        with torch.no_grad():
            return {name: (base_weight(layer.base_layer) + layer.delta_weight()).cpu().numpy()
                    for name, layer in zip(self.adapted, self.layers())}

    # ---- the engine ------------------------------------------------------------------------------
    def _weight(self, layer) -> np.ndarray:
        return base_weight(layer.base_layer).detach().cpu().numpy().copy()  # (O, D)

    @torch.no_grad()
    def _set_weight(self, layer, W) -> None:
        base_weight(layer.base_layer).copy_(torch.as_tensor(np.asarray(W)))

    @torch.no_grad()
    def _tie(self, layer) -> None:
        base_weight(layer.base_layer).add_(layer.delta_weight().to(layer.dtype))
