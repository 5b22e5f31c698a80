"""The few operations whose randomness the torch path takes from the named NumPy streams, so that one
seed gives the same run on both engines."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["stream_dropout"]


def stream_dropout(x: torch.Tensor, p: float, rng: np.random.Generator | None, training: bool) -> torch.Tensor:
    """Inverted dropout whose keep-mask is drawn from a NumPy Generator (tinyslim.functional.dropout's
    draw: rng.random(x.shape) >= p), then scaled by 1/(1−p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must lie in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout: pass rng= (a numpy Generator) so that runs are reproducible")
    keep = torch.as_tensor(rng.random(tuple(x.shape)) >= p, device=x.device).to(x.dtype) / (1.0 - p)
    return x * keep
