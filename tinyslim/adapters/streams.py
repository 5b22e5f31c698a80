"""Named RNG streams (docs/methods.md §0): every random purpose (``init``, ``dropout``, ``reservoir``,
``reinit`` …) has its own ``numpy.random.Generator``, derived from (seed, stream name) only. Switching a
feature on therefore never shifts another stream — "m = 1 equals LoRA" and "γ = 0 equals ER" rely on it.
"""
from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["stream", "Streams", "check_seed"]


def _name_key(name: str) -> int:
    # a stable 64-bit number for the name (Python's hash() is salted per process, so it will not do)
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def check_seed(seed) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"the run seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def stream(seed: int, name: str) -> np.random.Generator:
    """The Generator of one purpose: a function of (seed, name) only, never of other streams."""
    return np.random.default_rng([check_seed(seed), _name_key(name)])


class Streams:
    """One Generator per stream name, created on first use: ``streams["init"]``, ``streams["reinit"]`` …"""

    def __init__(self, seed: int):
        self.seed = check_seed(seed)
        self._generators: dict[str, np.random.Generator] = {}

    def __getitem__(self, name: str) -> np.random.Generator:
        if name not in self._generators:
            self._generators[name] = stream(self.seed, name)
        return self._generators[name]

    def used(self) -> list[str]:
        """Names of the streams that have been asked for (a test can check that one stayed untouched)."""
        return sorted(self._generators)

    def state_dict(self) -> dict:
        """{name: bit_generator.state} of every stream created so far (JSON-serialisable: a checkpoint's meta)."""
        return {name: g.bit_generator.state for name, g in sorted(self._generators.items())}

    def load_state_dict(self, state: dict) -> None:
        """Put every named stream into the saved state, in place (layers that hold a stream keep it)."""
        for name, value in state.items():
            self[name].bit_generator.state = value
