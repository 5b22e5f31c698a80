"""Independent plain-PyTorch versions of the adapter methods' maths (a helper module, not a test file).

Written from methods.md §1, §3, §6 and §7, not from tinyslim's code: a LoRA linear that forms
s·(x Aᵀ) Bᵀ with torch matmuls, a GPT forward that returns the residual stream after every block,
the I-LoRA / ER / Seq-LoRA loss and training loop (torch.optim.Adam, a fresh optimizer per task,
factor-wise interpolation of the slow copy), Algorithm R, and the COLA training loop (one set of
exact-rank factors per link, a fresh optimizer at each knot, the linear learning-rate decay).
Everything is float64. The only things shared with tinyslim are the random numbers, which the
tests hand over (initial factors, the reservoir and dropout generators, the re-initialisation draws).

Shape legend: B batch, T time, C channels, D in, O out, r rank.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as TF

from torch_gpt import TorchGPT, load_tinyslim_state

__test__ = False  # not a test module


class TorchLoraLinear(nn.Module):
    """y = base(x) + s·B (A x̃), with an optional slow copy (A_s, B_s) and an `active` switch."""

    def __init__(self, base: nn.Linear, A, B, scale: float, dropout: float = 0.0, dropout_rng=None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.A = nn.Parameter(torch.tensor(np.asarray(A, dtype=np.float64)))  # (r, D)
        self.B = nn.Parameter(torch.tensor(np.asarray(B, dtype=np.float64)))  # (O, r)
        self.A_slow = self.A.detach().clone()
        self.B_slow = self.B.detach().clone()
        self.scale, self.dropout, self.dropout_rng = scale, dropout, dropout_rng
        self.active = "fast"

    def forward(self, x):  # x (B, T, D)
        A, B = (self.A, self.B) if self.active == "fast" else (self.A_slow, self.B_slow)
        xt = x
        if self.training and self.dropout > 0:
            # inverted dropout on the adapter input: the mask is drawn over the flattened (N, D) tokens
            flat = x.reshape(-1, x.shape[-1])
            keep = (self.dropout_rng.random(tuple(flat.shape)) >= self.dropout) / (1.0 - self.dropout)
            xt = (flat * torch.from_numpy(keep)).reshape(x.shape)
        return self.base(x) + self.scale * ((xt @ A.T) @ B.T)


def twin_gpt(config, base_state: dict) -> TorchGPT:
    """A TorchGPT holding a tinyslim base state (plain names, taken before any adapter is attached)."""
    return load_tinyslim_state(TorchGPT.like(config), base_state)


def add_lora(model: TorchGPT, adapters: dict, scale, dropout: float = 0.0, dropout_rng=None) -> dict:
    """Replace the Linears named in `adapters` ({name: (A, B)}) by TorchLoraLinear; returns {name: module}.
    `scale` is one number or {name: number}."""
    model.requires_grad_(False)
    out = {}
    for name, (A, B) in adapters.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        s = scale[name] if isinstance(scale, dict) else scale
        layer = TorchLoraLinear(getattr(parent, child), A, B, s, dropout, dropout_rng)
        setattr(parent, child, layer)
        out[name] = layer
    return out


def forward_hidden(model: TorchGPT, idx):
    """logits (B, T, V) and the residual stream after every block [(B, T, C)] (before ln_f)."""
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    tr = model.transformer
    x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1]))
    hidden = []
    for block in tr.h:
        x = block(x)
        hidden.append(x)
    return model.lm_head(tr.ln_f(x)), hidden


def masked_ce(logits, targets, mask):
    """Mean token cross-entropy over the positions with mask ≠ 0."""
    V = logits.shape[-1]
    losses = TF.cross_entropy(logits.reshape(-1, V), torch.as_tensor(np.asarray(targets).reshape(-1), dtype=torch.long),
                              reduction="none")
    w = torch.as_tensor((np.asarray(mask).reshape(-1) != 0).astype(np.float64))
    return (losses * w).sum() / w.sum()


# ---- Algorithm R -------------------------------------------------------------------------------

class TwinReservoir:
    """Reservoir sampling (Algorithm R, methods.md §3.5) on (x, y, mask) rows of equal length."""

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.M, self.rng, self.buf, self.n = capacity, rng, [], 0

    def add(self, example):
        self.n += 1
        if len(self.buf) < self.M:
            self.buf.append(example)
            return
        j = self.rng.integers(0, self.n)
        if j < self.M:
            self.buf[j] = example

    def draw(self, b):
        """min(b, |buf|) rows uniformly without replacement, stacked: (x, y, mask)."""
        chosen = self.rng.choice(len(self.buf), size=min(b, len(self.buf)), replace=False)
        return tuple(np.stack([self.buf[i][k] for i in chosen]) for k in range(3))


# ---- I-LoRA, ER, Seq-LoRA ----------------------------------------------------------------------

def ilora_loss(model, layers: dict, cur, rep, gamma: float, one_sided: bool, last_block: bool, rngs=(), pad_id=None):
    """§3.3: CE_cur alone without a replay batch, else ½(CE_cur + CE_rep) + γ·L_cons, summed over the replay
    tokens whose input is not `pad_id`.

    The slow pass (no gradient) draws the same dropout masks as the fast replay pass: the generators in
    `rngs` are put back to their state before it."""
    x, y, m = cur
    logits, _ = forward_hidden(model, x)
    ce_cur = masked_ce(logits, y, m)
    if rep is None:
        return ce_cur
    xr, yr, mr = rep
    states = [g.bit_generator.state for g in rngs]
    for layer in layers.values():
        layer.active = "slow"
    with torch.no_grad():
        _, h_slow = forward_hidden(model, xr)
    for layer in layers.values():
        layer.active = "fast"
    for g, s in zip(rngs, states):
        g.bit_generator.state = s
    logits_r, h_fast = forward_hidden(model, xr)
    ce_rep = masked_ce(logits_r, yr, mr)
    if last_block:
        h_fast, h_slow = h_fast[-1:], h_slow[-1:]
    real = torch.as_tensor(xr != pad_id if pad_id is not None else np.ones(xr.shape, bool))  # (b, T)
    C = len(h_fast) * max(int(real.sum()), 1) * h_fast[0].shape[-1]
    if one_sided:
        cons = sum((torch.relu(hs - hf) ** 2)[real].sum() for hf, hs in zip(h_fast, h_slow)) / C
    else:
        cons = sum(((hf - hs) ** 2)[real].sum() for hf, hs in zip(h_fast, h_slow)) / C
    return 0.5 * (ce_cur + ce_rep) + gamma * cons


def run_ilora(model, layers: dict, tasks, *, lr, gamma, ema_lambda, ema_warmup, per_task_counter, one_sided,
              last_block, buffer: TwinReservoir | None, replay_batch_size, sample_first: bool, slow_update: bool,
              reset_slow_at_task_end: bool, rngs=(), pad_id=None):
    """Train on tasks = [[(x, y, mask), ...], ...] in order (§3.6); returns the loss of every step and,
    per step, {name: (A, B, A_slow, B_slow)} as NumPy arrays after the slow update.

    Seq-LoRA is buffer=None, gamma=0; ER is gamma=0 with a buffer; I-LoRA the rest."""
    losses, snapshots = [], []
    params = [p for layer in layers.values() for p in (layer.A, layer.B)]
    t = 0
    for k, batches in enumerate(tasks):
        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)  # a fresh Adam state per task
        if per_task_counter:
            t = 0
        for x, y, m in batches:
            rep = None
            b = len(x) if replay_batch_size is None else replay_batch_size
            if buffer is not None and not sample_first:
                for row in zip(x, y, m):
                    buffer.add(row)
            if buffer is not None and k >= 1 and buffer.buf:
                rep = buffer.draw(b)
            if buffer is not None and sample_first:
                for row in zip(x, y, m):
                    buffer.add(row)
            loss = ilora_loss(model, layers, (x, y, m), rep, gamma, one_sided, last_block, rngs, pad_id)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if slow_update:
                a = min(1.0 - 1.0 / (t + 1), ema_lambda) if ema_warmup else ema_lambda
                with torch.no_grad():
                    for layer in layers.values():
                        layer.A_slow.copy_(a * layer.A_slow + (1 - a) * layer.A)
                        layer.B_slow.copy_(a * layer.B_slow + (1 - a) * layer.B)
            t += 1
            snapshots.append({n: tuple(v.detach().numpy().copy() for v in (l.A, l.B, l.A_slow, l.B_slow))
                              for n, l in layers.items()})
        if reset_slow_at_task_end and slow_update:
            with torch.no_grad():
                for layer in layers.values():
                    layer.A_slow.copy_(layer.A)
                    layer.B_slow.copy_(layer.B)
    return losses, snapshots


# ---- COLA ----------------------------------------------------------------------------------------

def run_cola(model, layers: dict, batches, *, T, knots, ranks, scales, lr0, restart: bool, reinit_rng,
             reset_at_knot: bool = True):
    """§6.4 on one task: link j trains (A_j, B_j) of rank r_j; at a knot W += s_j B_j A_j, a fresh link
    (A ~ U(±1/√D) drawn layer after layer from `reinit_rng`, B = 0) and a fresh Adam. Returns the
    learning rates used. Without reset_at_knot the rank must stay constant (the factors are rewritten
    in place so that Adam's state carries over)."""
    bounds = [0] + list(knots) + [T]
    j = 0

    def lr_at(t):
        if not restart:
            return lr0 * (1 - t / T)
        return lr0 * (1 - (t - bounds[j]) / (bounds[j + 1] - bounds[j]))

    def new_opt():
        return torch.optim.Adam([p for layer in layers.values() for p in (layer.A, layer.B)], lr=lr0,
                                betas=(0.9, 0.999), eps=1e-8)

    opt = new_opt()
    lrs = []
    for t, (x, y, m) in enumerate(batches[:T]):
        if t in knots:
            with torch.no_grad():
                for layer in layers.values():
                    layer.base.weight += layer.scale * (layer.B @ layer.A)  # tie the knot
            j += 1
            for layer in layers.values():
                D, O = layer.base.in_features, layer.base.out_features
                A = reinit_rng.uniform(-1 / math.sqrt(D), 1 / math.sqrt(D), (ranks[j], D))
                if reset_at_knot:
                    layer.A = nn.Parameter(torch.tensor(A))
                    layer.B = nn.Parameter(torch.zeros(O, ranks[j], dtype=torch.float64))
                else:
                    with torch.no_grad():
                        layer.A.copy_(torch.tensor(A))
                        layer.B.zero_()
                layer.scale = scales[j]
            if reset_at_knot:
                opt = new_opt()
        lr = lr_at(t)
        for g in opt.param_groups:
            g["lr"] = lr
        lrs.append(lr)
        logits, _ = forward_hidden(model, x)
        loss = masked_ce(logits, y, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lrs
