"""The reservoir replay buffer shared by ER and I-LoRA (docs/methods.md §3.5, §7.2).

Shape legend: B batch, T time, b replay batch size.

Algorithm R with capacity M: every training example of every task is offered once,

    n_seen += 1
    if len(buf) < M: buf.append(ex)
    else: j = rng.integers(0, n_seen); if j < M: buf[j] = ex

so after n offers each example sits in the buffer with probability M/n. A replay batch is
min(b, |buf|) examples drawn uniformly without replacement. Both draws use the `reservoir` stream.
An example is one row (x, y, mask) of a training batch. Rows of different lengths are right-padded
when sampled (token 0, mask 0) and ``valid`` marks the real positions: the model is causal, so the
padding changes no earlier position, and the consistency loss leaves it out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Reservoir", "ReplayBatch", "replay_step", "REPLAY_ORDERS"]

REPLAY_ORDERS = ("sample_then_offer", "offer_then_sample")


@dataclass
class ReplayBatch:
    x: np.ndarray  # (b, T) int token ids
    y: np.ndarray  # (b, T) int targets
    mask: np.ndarray  # (b, T) answer positions (the cross-entropy's loss mask)
    valid: np.ndarray  # (b, T) 1 = a real position, 0 = padding added by the buffer


class Reservoir:
    """Algorithm R over examples (x row, y row, mask row)."""

    def __init__(self, capacity: int, rng: np.random.Generator):
        if capacity < 1:
            raise ValueError(f"Reservoir capacity must be >= 1, got {capacity}")
        self.capacity, self.rng = int(capacity), rng
        self.items: list = []
        self.n_seen = 0

    def __len__(self):
        return len(self.items)

    def offer(self, example) -> None:
        self.n_seen += 1
        if len(self.items) < self.capacity:
            self.items.append(example)
        else:
            j = self.rng.integers(0, self.n_seen)
            if j < self.capacity:
                self.items[j] = example

    def offer_batch(self, x, y, mask) -> None:
        """Offer every row of a batch, first row first (copies: the caller may reuse its arrays)."""
        x, y, mask = np.asarray(x), np.asarray(y), np.asarray(mask)
        for i in range(len(x)):
            self.offer((x[i].copy(), y[i].copy(), mask[i].copy()))

    def state_dict(self) -> tuple[dict, dict]:
        """(arrays "<i>.x" / "<i>.y" / "<i>.mask" per buffered example, meta {n_seen, size, capacity}).
        The `reservoir` stream's state is saved with the method's streams."""
        arrays = {f"{i}.{key}": value for i, item in enumerate(self.items)
                  for key, value in zip(("x", "y", "mask"), item)}
        return arrays, {"n_seen": int(self.n_seen), "size": len(self.items), "capacity": self.capacity}

    def load_state_dict(self, arrays: dict, meta: dict) -> None:
        if int(meta["capacity"]) != self.capacity:
            raise ValueError(f"Reservoir: the state holds a buffer of capacity {meta['capacity']}, this one has "
                             f"{self.capacity}")
        n = int(meta["size"])
        try:
            items = [tuple(np.array(arrays[f"{i}.{key}"]) for key in ("x", "y", "mask")) for i in range(n)]
        except KeyError as err:
            raise ValueError(f"Reservoir: the state lacks the buffered array {err}") from None
        self.items, self.n_seen = items, int(meta["n_seen"])

    def sample(self, b: int) -> ReplayBatch:
        """min(b, |buf|) examples, uniformly without replacement, padded to the longest."""
        if not self.items:
            raise RuntimeError("Reservoir.sample: the buffer is empty")
        picks = self.rng.choice(len(self.items), size=min(b, len(self.items)), replace=False)
        rows = [self.items[i] for i in picks]
        T = max(len(r[0]) for r in rows)
        x = np.zeros((len(rows), T), dtype=rows[0][0].dtype)
        y = np.zeros((len(rows), T), dtype=rows[0][1].dtype)
        mask = np.zeros((len(rows), T), dtype=rows[0][2].dtype)
        valid = np.zeros((len(rows), T))
        for i, (xr, yr, mr) in enumerate(rows):
            n = len(xr)
            x[i, :n], y[i, :n], mask[i, :n], valid[i, :n] = xr, yr, mr, 1.0
        return ReplayBatch(x, y, mask, valid)


def replay_step(buffer: Reservoir | None, x, y, mask, replay: bool, batch_size: int | None,
                order: str = "sample_then_offer") -> ReplayBatch | None:
    """One training step's use of the buffer: offer the current batch, and (when `replay` and the
    buffer is non-empty) draw a replay batch of `batch_size` (None = the current batch size), in the
    given order. Returns the replay batch or None. With no buffer (capacity 0) nothing happens."""
    if order not in REPLAY_ORDERS:
        raise ValueError(f"replay_order must be one of {REPLAY_ORDERS}, got {order!r}")
    if buffer is None:
        return None
    b = len(x) if batch_size is None else batch_size
    rep = None
    if order == "offer_then_sample":
        buffer.offer_batch(x, y, mask)
    if replay and len(buffer):
        rep = buffer.sample(b)
    if order == "sample_then_offer":
        buffer.offer_batch(x, y, mask)
    return rep
