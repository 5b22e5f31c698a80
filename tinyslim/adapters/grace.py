"""GRACE-like codebook — lifelong editing by key lookup at one layer (Hartvigsen et al., arXiv 2211.11031),
the optional baseline of docs/methods.md §7.5.

Shape legend: B sequences, T time, D in, O out of the codebook's layer, n stored keys.

One Linear of the frozen model (default: ELDER's routing layer, the input of ``h.{L−2}.mlp.c_fc``) gets a
codebook: per stored key j a key k_j ∈ ℝ^D, a value v_j ∈ ℝ^O, a radius ε_j and the edit's target τ_j.

    q        = x_p, the layer's input at the key position p of the row (the last prompt token); a constant
    j*(q)    = argmin_j ‖q − k_j‖₂                       ties go to the newest key (a re-edit overrides)
    y_t      = v_{j*}         if t = p and ‖q − k_{j*}‖₂ ≤ ε_{j*}
             = W0 x_t + b0    otherwise                  every other position, every row out of range: the base

Editing one (prompt, target τ) row, whose q is taken before any update:

    j        = the nearest key with τ_j = τ and ‖q − k_j‖₂ ≤ ε, if there is one: its value trains on
             = else a new key: k_j = q, ε_j = ε, τ_j = τ, v_j = the layer's current output at p
    reset Adam;  n_iter steps of L_edit (CE over the target tokens) with the row's y_p = v_j
    ∂L/∂v_j  = Σ_{rows b on key j} ∂L/∂y_{b, p_b}        the only gradient: earlier values stay put

The replacement is one autograd op (``replace_at``); rows with no key in range skip it, so they are the
base layer's output bit for bit. The keys, values and radii live in the layer (``adapter_state_dict``
saves them, as ELDER's code table; a radius of 0 marks an empty slot of the fixed capacity
``max_edits``); the targets are labels, kept by the method (``state_dict``'s meta).

Left out of GRACE proper (the spec's simple version; GRACE wraps one Linear too, e.g. GPT2-XL's
h.35.mlp.c_fc): GRACE compares a new query with the nearest key only — beyond ε_j + ε it adds a key; a
same-target key within reach has its radius widened to cover the query; a key of another target within
reach makes both radii shrink to half their distance. Here a same-target key within ε is reused with no
radius change, and a conflicting edit just adds its own key (the nearest key decides, ties to the newest).
GRACE's own defaults also differ: lr 1.0 and 100 steps, values started at random ("cold"), and the value
written over every prompt token before the key ("replace_prompt"); here the scenario's 30 steps at 1e-2,
the current output ("warm") and the key token only ("replace_last").

    from tinyslim.adapters import Grace
    grace = Grace(epsilon=1.0)
    grace.attach(base_copy, seed=0)
    for x, y, mask in edit_stream:          # one (prompt, target) per edit: mask marks the target tokens
        grace.edit(x, y, mask)              # add (or reuse) a key, reset Adam, n_iter steps on its value
    out = grace.route(x, key_pos)           # key_pos (B,): each row's last prompt token; rows out of range = base
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np

from ..autograd import Function, Tensor
from ..nn import Linear, Parameter
from .base import AdaptedLinear, Streams
from .elder import KEY_POS, key_positions
from .ft_lora import LR_SCHEDULES, EditingMethod, subject_batch, last_block_targets

__all__ = ["GraceConfig", "GraceLinear", "Grace", "ReplaceAt", "replace_at"]


@dataclass
class GraceConfig:
    """GRACE-like codebook (docs/methods.md §7.5). The per-edit budget is ELDER's (30 Adam steps at 1e-2);
    what scenario C measured with it: docs/experiments.md, "Calibration notes"."""

    layer: str | None = None  # the Linear whose input gives q and whose output is replaced; None: ELDER's routing layer
    epsilon: float = 1.0  # ε: the radius of a new key, in L2 units of q
    key_pos: str = "last_prompt"  # or "last", "subject_last", "subject_alone" (the subject read alone), as ELDER
    n_iter: int = 30  # optimisation steps per edit
    lr: float = 1e-2  # Adam, reset per edit
    lr_schedule: str = "constant"  # or "step" (×0.5 every 20 iterations)
    max_edits: int = 1024  # capacity of the codebook
    pad_token_id: int | None = None  # for key_pos="last" and rows without targets: the last non-pad token

    def __post_init__(self):
        for key, allowed in dict(key_pos=KEY_POS, lr_schedule=LR_SCHEDULES).items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"GraceConfig.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("n_iter", "max_edits"):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GraceConfig.{key} must be a positive integer, got {value!r}")
        if not (isinstance(self.epsilon, (int, float, np.number)) and np.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"GraceConfig.epsilon must be a finite number > 0 (a radius in L2 units of q), "
                             f"got {self.epsilon!r}")
        if not self.lr > 0:
            raise ValueError(f"GraceConfig.lr must be > 0, got {self.lr!r}")
        if self.layer is not None and not isinstance(self.layer, str):
            raise ValueError(f"GraceConfig.layer must be a Linear's full name such as 'transformer.h.2.mlp.c_fc' "
                             f"(or None), got {self.layer!r}")

    @property
    def target_modules(self) -> list | None:
        """What inject() wraps: the one codebook layer (None until attach resolves the default)."""
        return None if self.layer is None else [self.layer]

    def make_layer(self, base_layer: Linear, streams: Streams) -> "GraceLinear":
        return GraceLinear(base_layer, self)


# ---- the replacement op ------------------------------------------------------------------------------

class ReplaceAt(Function):
    """out = y except out[b, pos_b] = values[slot_b] on the rows b with slot_b ≥ 0 (see replace_at)."""

    @staticmethod
    def forward(ctx, y, values, *, rows, pos, slot):  # y (B, T, O), values (n, O); rows, pos, slot (R,)
        ctx.index, ctx.slot, ctx.n = (rows, pos), slot, values.shape[0]
        out = y.copy()  # every entry not replaced is y's, bit for bit
        out[rows, pos] = values[slot]
        return out

    @staticmethod
    def backward(ctx, g):
        dy = None
        if ctx.needs_input_grad[0]:
            dy = g.copy()
            dy[ctx.index] = 0  # a replaced entry no longer depends on y
        dv = np.zeros((ctx.n, g.shape[-1]), dtype=g.dtype)
        np.add.at(dv, ctx.slot, g[ctx.index])  # a value receives the gradient of every entry it filled
        return dy, dv


def replace_at(y, values, pos, slot) -> Tensor:
    """y (B, T, O) with y[b, pos[b]] replaced by values[slot[b]] where slot[b] ≥ 0 (−1: the row keeps y).
    Gradients reach values (and y, outside the replaced entries); pos and slot are constants."""
    y = y if isinstance(y, Tensor) else Tensor(y)
    values = values if isinstance(values, Tensor) else Tensor(values)
    pos, slot = np.asarray(pos), np.asarray(slot)
    B, T, O = y.shape
    if pos.shape != (B,) or slot.shape != (B,) or values.ndim != 2 or values.shape[1] != O:
        raise ValueError(f"replace_at: y is (B, T, O) = {y.shape}, so pos and slot must be ({B},) and values (n, {O}); "
                         f"got pos {pos.shape}, slot {slot.shape}, values {values.shape}")
    rows = np.flatnonzero(slot >= 0)
    if rows.size and (pos[rows].min() < 0 or pos[rows].max() >= T or slot.max() >= values.shape[0]):
        raise IndexError(f"replace_at: positions {pos[rows].tolist()} must lie in [0, {T}) and slots "
                         f"{slot[rows].tolist()} in [0, {values.shape[0]})")
    return ReplaceAt.apply(y, values, rows=rows, pos=pos[rows], slot=slot[rows])


# ---- the codebook layer --------------------------------------------------------------------------------

class GraceLinear(AdaptedLinear):
    """A frozen Linear whose output at each row's key position is replaced by the value of the nearest
    stored key, when that key's radius reaches the row's query q (the layer's input there)."""

    adapter_names = ("keys", "values", "radii")
    trainable_names = ("values",)

    def __init__(self, base_layer: Linear, config: GraceConfig):
        super().__init__(base_layer)
        D, O, dtype, n = self.in_features, self.out_features, base_layer.weight.dtype, config.max_edits
        self.keys = Parameter(np.zeros((n, D), dtype=dtype), requires_grad=False)  # k_j (n, D)
        self.values = Parameter(np.zeros((n, O), dtype=dtype))  # v_j (n, O): only the slots being edited get a gradient
        self.radii = Parameter(np.zeros(n, dtype=dtype), requires_grad=False)  # ε_j (n,); 0 = an empty slot
        self.key_pos = None  # (B,) the key token of every row for the next forward passes (None: the last token)
        self.edit_slots = None  # while editing: the method's fn(q (B, D), y_p (B, O)) -> the slot each row trains
        self.q = self.slot = None  # the last forward's queries (B, D) and slots (B,), −1 = no key in range
        self.given = None  # (B, D) queries given by the caller (subject_alone); a NaN row: read at key_pos
        self.probe = False  # subject_queries: record q, change nothing

    # the method reads and writes the codebook through these two (the torch layer's copy to and from NumPy)
    def array(self, name: str) -> np.ndarray:
        return getattr(self, name).data

    def write(self, name: str, index, value) -> None:
        getattr(self, name).data[index] = value

    @property
    def n_keys(self) -> int:
        return int(np.count_nonzero(self.array("radii")))  # slots fill in order, so they are the first n

    def nearest(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(j* (B,), ‖q − k_{j*}‖₂ (B,)) over the stored keys, ties to the newest; (−1, inf) if none."""
        n = self.n_keys
        if n == 0:
            return np.full(len(q), -1), np.full(len(q), np.inf)
        diff = np.asarray(q, dtype=np.float64)[:, None, :] - self.array("keys")[None, :n]  # (B, n, D)
        dist = np.sqrt((diff * diff).sum(-1))  # differences, not |q|² + |k|² − 2q·k, which cancels near 0
        j = n - 1 - np.argmin(dist[:, ::-1], axis=1)  # argmin takes the first: scan from the newest
        return j, dist[np.arange(len(q)), j]

    def lookup(self, q: np.ndarray) -> np.ndarray:
        """(B,) the key each query uses: j* where ‖q − k_{j*}‖ ≤ ε_{j*}, else −1 (the base output)."""
        j, dist = self.nearest(q)
        return np.where((j >= 0) & (dist <= self.array("radii")[j]), j, -1)

    def forward(self, x):  # x (B, T, D) -> (B, T, O)
        y = self.base_layer(x)
        if self.disabled:
            return y
        pos = self.route_rows(x.data if isinstance(x, Tensor) else np.asarray(x), lambda rows, p: y.data[rows, p])
        if pos is None:
            return y  # a probe, or no key in range: the base layer itself
        return replace_at(y, self.values, pos, self.slot)

    def route_rows(self, data: np.ndarray, output_at):
        """Set q (B, D) and slot (B,) from the layer's input `data` (B, T, D); output_at(rows, pos) gives the base
        output there (a new key's value). Returns the key positions (B,), or None when nothing is replaced."""
        if data.ndim != 3:
            raise ValueError(f"the codebook layer expects (B, T, D) inputs, got shape {data.shape}")
        B, T, _ = data.shape
        pos = np.full(B, T - 1) if self.key_pos is None else np.asarray(self.key_pos)
        if pos.shape != (B,) or pos.min() < 0 or pos.max() >= T:
            raise ValueError(f"key positions {pos.tolist()} do not fit a batch of {B} rows of length {T}")
        self.q = data[np.arange(B), pos].copy()  # (B, D), detached
        if self.probe:
            return None
        if self.given is not None:
            if len(self.given) != B:
                raise ValueError(f"{len(self.given)} given queries for a batch of {B} rows")
            rows = ~np.isnan(self.given[:, 0])
            self.q[rows] = self.given[rows]
        if self.edit_slots is not None:
            self.slot = self.edit_slots(self.q, output_at(np.arange(B), pos))
        else:
            self.slot = self.lookup(self.q)
        return None if (self.slot < 0).all() else pos

    def delta_weight(self):
        raise NotImplementedError("a GRACE codebook cannot be merged into W0: the replacement depends on the input")

    def extra_repr(self):
        return f"{super().extra_repr()}, keys={self.n_keys}/{len(self.radii.data)}"


# ---- the editing method --------------------------------------------------------------------------------

class Grace(EditingMethod):
    """GRACE-like codebook at one layer: a key, a value and a radius per edit; the base model elsewhere."""

    name = "grace"
    config_class = GraceConfig

    def attach(self, model, seed: int) -> None:
        """Resolve the layer (default: ELDER's routing layer, the first of its adapted layers), then inject."""
        if self.config.layer is None:
            self.config = dataclasses.replace(self.config, layer=last_block_targets(model)[0])
        linears = self._linear_names(model)
        if self.config.layer not in linears:
            raise ValueError(f"GraceConfig.layer {self.config.layer!r} is not a Linear of the model; give a full name, "
                             f"one of {linears}")
        super().attach(model, seed)
        self.key_targets = {}  # slot → τ (the target token ids); labels, so the method's, not the layer's
        self._slots = {}  # this edit's rows: (q bytes, τ) → slot, fixed at the row's first forward

    @property
    def layer(self) -> GraceLinear:
        return self.layers()[0]

    @property
    def n_keys(self) -> int:
        return self.layer.n_keys

    # ---- training ------------------------------------------------------------------------------------
    def before_task(self, task_id: int, steps: int, optimizer) -> None:
        super().before_task(task_id, steps, optimizer)  # reset Adam
        self._slots = {}

    def loss(self, x, y, mask, rng=None):
        """L_edit with every row's output at its key position replaced by the value of its edit slot."""
        self._check_attached()
        cfg, layer = self.config, self.layer
        targets = [tuple(int(t) for t in row[m != 0]) for row, m in zip(np.asarray(y), np.asarray(mask))]
        key_pos, given = getattr(self, "edit_key_pos", None), getattr(self, "edit_queries", None)
        if cfg.key_pos == "subject_alone" and given is None:
            raise ValueError('key_pos="subject_alone" needs the subject\'s query: pass '
                             'queries=grace.subject_queries(subject_ids) to edit()')
        layer.key_pos = key_positions(x, mask, cfg.key_pos, cfg.pad_token_id) if key_pos is None else key_pos
        layer.edit_slots, layer.given = (lambda q, y_p: self.slots_for(q, y_p, targets)), given
        try:
            _, loss = self.model(x, y, loss_mask=mask, rng=rng)
        finally:
            layer.edit_slots = layer.key_pos = layer.given = None
        return loss

    def slots_for(self, q: np.ndarray, y_p: np.ndarray, targets: list) -> np.ndarray:
        """(B,) the slot every row trains: a same-target key within ε, else a new key (stored at once)."""
        slots = np.empty(len(q), dtype=np.int64)
        for b, (row, target) in enumerate(zip(q, targets)):
            key = (row.tobytes(), target)
            if key not in self._slots:
                self._slots[key] = self._reuse_or_add(row, target, y_p[b])
            slots[b] = self._slots[key]
        return slots

    def _reuse_or_add(self, q: np.ndarray, target: tuple, y_p: np.ndarray) -> int:
        layer, eps = self.layer, self.config.epsilon
        n = layer.n_keys
        same = [j for j in range(n) if self.key_targets.get(j) == target]
        if same:
            dist = np.sqrt(((np.asarray(q, dtype=np.float64) - layer.array("keys")[same]) ** 2).sum(-1))
            i = len(same) - 1 - int(np.argmin(dist[::-1]))  # the nearest, ties to the newest
            if dist[i] <= eps:
                return same[i]  # no new key: this value trains on
        capacity = len(layer.array("radii"))
        if n >= capacity:
            raise RuntimeError(f"the codebook is full ({capacity} keys); raise GraceConfig.max_edits")
        current = layer.lookup(q[None])[0]
        layer.write("values", n, layer.array("values")[current] if current >= 0 else y_p)  # the current output
        layer.write("keys", n, q)
        layer.write("radii", n, eps)
        self.key_targets[n] = target
        return n

    # ---- evaluation -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def keys(self, key_pos, queries=None):
        """Take q from the tokens at key_pos (B,) in the forward passes inside the block (None: the last token),
        or from given queries (B, D) (subject_queries; a NaN row is read at key_pos)."""
        layer = self.layer
        previous = layer.key_pos, layer.given
        layer.key_pos = None if key_pos is None else np.asarray(key_pos)
        layer.given = None if queries is None else np.asarray(queries)
        try:
            yield self.model
        finally:
            layer.key_pos, layer.given = previous

    def subject_queries(self, subjects: list) -> np.ndarray:
        """Queries (B, D) of key_pos="subject_alone": the layer's input at each subject's last token with the
        subject alone as the context (as ELDER's). subjects: B token-id sequences."""
        self._check_attached()
        ids, lengths = subject_batch(subjects)
        layer = self.layer
        layer.probe = True
        try:
            with self.evaluating(), self.keys(lengths - 1):
                self.model(ids)
            return layer.q.copy()
        finally:
            layer.probe = False

    def route(self, x, key_pos=None, queries=None) -> dict:
        """One evaluation forward of x (B, T): {"logits", "hit" (B,) bool, "slot" (B,), "distance" (B,)}:
        the key each row used (−1: none, the base model) and the distance to its nearest key."""
        with self.evaluating(), self.keys(key_pos, queries):
            logits, _ = self.model(x)
        layer = self.layer
        _, dist = layer.nearest(layer.q)
        return {"logits": self._numpy(logits), "hit": layer.slot >= 0, "slot": layer.slot.copy(), "distance": dist}

    # ---- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict]:
        """The layer's keys, values and radii (adapter arrays) plus the keys' targets in the meta."""
        arrays, meta = super().state_dict()
        meta["key_targets"] = {str(j): list(t) for j, t in sorted(self.key_targets.items())}
        return arrays, meta

    def load_state_dict(self, arrays: dict, meta: dict) -> None:
        super().load_state_dict(arrays, meta)
        self.key_targets = {int(j): tuple(int(t) for t in ts) for j, ts in meta.get("key_targets", {}).items()}
