"""The GRACE-like codebook on the torch engine (Hartvigsen et al., arXiv 2211.11031), the twin of
tinyslim.adapters.grace: the same GraceConfig, keys, reuse rule and edit loop; only the layer is torch's.

Shape legend: B sequences, T time, D in, O out of the codebook's layer, n stored keys.

    q        = x_p, the layer's input at the key position p of the row (detached, NumPy)
    j*(q)    = argmin_j ‖q − k_j‖₂, ties to the newest          keys (n, D), radii (n,): buffers
    y_t      = v_{j*} if t = p and ‖q − k_{j*}‖₂ ≤ ε_{j*}, else W0 x_t + b0      values (n, O): the parameter
    ∂L/∂v_j  = Σ_{rows b on key j} ∂L/∂y_{b, p_b}

The replacement is ``y.index_put((rows, p), values[slot])`` (autograd: the gradient of values[slot]
accumulates over the rows that share a slot, as the NumPy ReplaceAt's np.add.at). The choice of q, slot and
key is the NumPy layer's code (``route_rows``, ``nearest``, ``lookup``, run on the NumPy copies of the
arrays), so both engines pick the same keys.
"""
from __future__ import annotations

import numpy as np

from .. import adapters
from .elder import ArrayAccess, long_index
from .ft_lora import EditingEngine, as_numpy
from .layers import AdaptedLinear
from .method import TorchMethod

__all__ = ["GraceLinear", "Grace"]


class GraceLinear(ArrayAccess, AdaptedLinear):
    """A frozen Linear / Conv1D whose output at each row's key position is replaced by the value of the
    nearest stored key, when that key's radius reaches the row's query q."""

    adapter_names = ("keys", "values", "radii")
    trainable_names = ("values",)
    # the NumPy layer's array-level code, shared as is: it reads the codebook through array()
    n_keys, nearest, lookup = adapters.GraceLinear.n_keys, adapters.GraceLinear.nearest, adapters.GraceLinear.lookup
    route_rows = adapters.GraceLinear.route_rows

    def __init__(self, base_layer, config):
        super().__init__(base_layer)
        D, O, n = self.in_features, self.out_features, config.max_edits
        self.register_buffer("keys", self.tensor(np.zeros((n, D))).clone())  # k_j (n, D)
        self.values = self.new_parameter(np.zeros((n, O)))  # v_j (n, O)
        self.register_buffer("radii", self.tensor(np.zeros(n)).clone())  # ε_j (n,); 0 = an empty slot
        self.key_pos = None  # (B,) the key token of every row for the next forward passes (None: the last token)
        self.edit_slots = None  # while editing: the method's fn(q (B, D), y_p (B, O)) -> the slot each row trains
        self.q = self.slot = None  # the last forward's queries (B, D) and slots (B,), −1 = no key in range
        self.given = None  # (B, D) queries given by the caller (subject_alone); a NaN row: read at key_pos
        self.probe = False  # subject_queries: record q, change nothing

    def forward(self, x):  # x (B, T, D) -> (B, T, O)
        y = self.base_layer(x)
        if self.disabled:
            return y
        pos = self.route_rows(as_numpy(x), lambda rows, p: as_numpy(y[rows, p]))
        if pos is None:
            return y  # a probe, or no key in range: the base layer itself
        rows = np.flatnonzero(self.slot >= 0)
        index = (long_index(rows, y.device), long_index(pos[rows], y.device))
        return y.index_put(index, self.values[long_index(self.slot[rows], y.device)])  # y[b, p_b] = v_{slot_b}

    def delta_weight(self):
        raise NotImplementedError("a GRACE codebook cannot be merged into W0: the replacement depends on the input")

    def extra_repr(self):
        return f"{super().extra_repr()}, keys={self.n_keys}/{len(self.radii)}"


class Grace(EditingEngine, adapters.Grace, TorchMethod):
    """GRACE-like codebook on torch: the NumPy method's keys, reuse rule and edit loop over a torch layer."""

    def make_layer(self, base_layer, streams):
        return GraceLinear(base_layer, self.config)
