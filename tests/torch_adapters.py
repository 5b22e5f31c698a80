"""Independent plain-PyTorch versions of the adapter methods' maths (a helper module, not a test file).

Written from docs/methods.md §1, §3, §6 and §7, not from tinyslim's code: a LoRA linear that forms
s·(x Aᵀ) Bᵀ with torch matmuls, a GPT forward that returns the residual stream after every block,
the I-LoRA / ER / Seq-LoRA loss and training loop (torch.optim.Adam, a fresh optimizer per task,
factor-wise interpolation of the slow copy), Algorithm R, and the COLA training loop (one set of
exact-rank factors per link, a fresh optimizer at each knot, the linear learning-rate decay); and, from
§2, §4, §5 and §7.3–7.5, SLIM (a dense-gate mixture after torch.topk, brute-force nearest clusters, the
EMA statistics, masks, L1 and the Switch balance loss), MoLE / NLA / sum (torch.cat, layer_norm and
softmax over the explicit branch outputs) and ELDER (per-sequence gates, a per-row loop over the picked
experts, the edit loop with a fresh Adam per edit, codes and Hamming deferral); and, from §7.5, the
GRACE-like codebook (a list of keys, radii, targets and one torch Parameter per value, a per-row splice
of the chosen value at the key position, the key / reuse rule and a fresh Adam on the edit's values).
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
    """Reservoir sampling (Algorithm R, docs/methods.md §3.5) on (x, y, mask) rows of equal length."""

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


# ---- shared by the mixtures ----------------------------------------------------------------------

def replace_linears(model, make) -> dict:
    """Replace the Linears named by make's keys: make = {name: fn(base nn.Linear) -> module}; {name: module}."""
    model.requires_grad_(False)
    out = {}
    for name, fn in make.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = fn(getattr(parent, child))
        setattr(parent, child, layer)
        out[name] = layer
    return out


def _param(a):
    return nn.Parameter(torch.tensor(np.asarray(a, dtype=np.float64)))


def adam_loop(params, steps, lr, step_fn, lr_at=None):
    """A fresh torch Adam (β 0.9/0.999, ε 1e-8, no decay) over params; step_fn(i) -> loss; returns the losses."""
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    losses = []
    for i in range(steps):
        if lr_at is not None:
            for g in opt.param_groups:
                g["lr"] = lr_at(i)
        loss = step_fn(i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---- SLIM (§2) -----------------------------------------------------------------------------------

class TorchSlimLinear(nn.Module):
    """base(x) + c·Σ_{e∈S∩𝓛} w_e s m_out ⊙ B_e A_e (m_in ⊙ x), routed by top-K over ℓ (+ γd on identity experts).

    `cfg` is a dict: E_L, E_I, K, s, gamma, yield_mode, logit_norm, p, rescale, eval_masks, momentum, floor,
    cluster_init, mlp (bool). Random numbers come from the generators handed over: `mask_rng` (per step:
    m_out (E_L, O) then m_in (E_L, D), keep where U ≥ p_r), `cluster_rng` (seeding), `eval_rng` ("sampled")."""

    def __init__(self, base, params: dict, cfg: dict, mask_rng=None, cluster_rng=None, eval_rng=None):
        super().__init__()
        self.base, self.cfg = base, cfg
        for p in base.parameters():
            p.requires_grad_(False)
        self.A, self.B = _param(params["lora_A"]), _param(params["lora_B"])  # (E_L, r, D), (E_L, O, r)
        self.W, self.b = _param(params["router_weight"]), _param(params["router_bias"])  # (E, D), (E,)
        if cfg["mlp"]:
            self.W1, self.b1 = _param(params["router_fc_weight"]), _param(params["router_fc_bias"])
            self.W2 = _param(params["router_proj_weight"])
        self.mu = np.array(params["cluster_mu"], dtype=np.float64)
        self.sigma = np.array(params["cluster_sigma"], dtype=np.float64)
        self.mask_rng, self.cluster_rng, self.eval_rng = mask_rng, cluster_rng, eval_rng
        self.m_in = self.m_out = None
        self.token_mask = None
        self.logit_bias = None
        self.cache = None
        self.bal = None

    def draw_masks(self, rng=None):
        p = self.cfg["p"]
        if p == 0:
            self.m_in = self.m_out = None
            return
        q = 1 - math.sqrt(1 - p)
        rng = rng or self.mask_rng
        E_L, O, D = self.B.shape[0], self.B.shape[1], self.A.shape[2]
        self.m_out = torch.tensor((rng.random((E_L, O)) >= q).astype(np.float64))
        self.m_in = torch.tensor((rng.random((E_L, D)) >= q).astype(np.float64))

    def forward(self, x):  # x (B, T, D)
        cfg = self.cfg
        lead = x.shape[:-1]
        X = x.reshape(-1, x.shape[-1])
        N = X.shape[0]
        real = np.ones(N, bool) if self.token_mask is None else np.asarray(self.token_mask, bool).reshape(-1)
        Xn = X.detach().numpy()
        if self.training and not np.any(self.sigma > 0):  # seed on the first training batch
            R = Xn[real]
            n, C = len(R), self.mu.shape[0]
            std = np.maximum(R.std(axis=0), cfg["floor"])
            if cfg["cluster_init"] == "first_batch":
                self.mu = R[self.cluster_rng.choice(n, size=C, replace=n < C)].copy()
            else:
                self.mu = self.cluster_rng.normal(R.mean(axis=0), std, self.mu.shape)
            self.sigma = np.broadcast_to(std, self.mu.shape).copy()
        h = X
        if cfg["mlp"]:
            h = X + TF.gelu(X @ self.W1.T + self.b1, approximate="tanh") @ self.W2.T
        logits = h @ self.W.T + self.b  # (N, E)
        if cfg["logit_norm"] == "layernorm":
            logits = TF.layer_norm(logits, (logits.shape[1],), eps=1e-5)
        # OOD score: brute-force nearest centre, then the largest standardised deviation
        if np.any(self.sigma > 0):
            dist = np.array([[np.sum((xn - m) ** 2) for m in self.mu] for xn in Xn])
            k_star = dist.argmin(axis=1)
            d = np.array([np.max(np.abs(Xn[n] - self.mu[k]) / self.sigma[k]) - 1 for n, k in enumerate(k_star)])
        else:
            k_star, d = np.zeros(N, int), np.zeros(N)
        E_L = self.A.shape[0]
        E = logits.shape[1]
        is_id = torch.tensor([0.0] * E_L + [1.0] * (E - E_L))
        if cfg["yield_mode"] == "additive":
            logits = logits + cfg["gamma"] * torch.tensor(d)[:, None] * is_id[None, :]
        sel_logits = logits if self.logit_bias is None else logits + torch.tensor(self.logit_bias)
        vals, idx = torch.topk(sel_logits, cfg["K"], dim=1)
        w = torch.softmax(vals, dim=1)  # (N, K)
        if cfg["yield_mode"] == "multiplicative":
            damp = torch.tensor(np.exp(-cfg["gamma"] * np.maximum(d, 0)))
            w = w * torch.where(idx < E_L, damp[:, None], torch.ones(()))
        G = torch.zeros(N, E, dtype=torch.float64).scatter(1, idx, w)  # dense gates (N, E)
        p = cfg["p"]
        if self.training:
            if p and self.m_in is None:
                self.draw_masks()
            m_in, m_out = self.m_in, self.m_out
            c = 1 / (1 - p) if (p and cfg["rescale"]) else 1.0
        elif p and cfg["eval_masks"] == "sampled":
            self.draw_masks(self.eval_rng)
            m_in, m_out = self.m_in, self.m_out
            c = 1 / (1 - p) if cfg["rescale"] else 1.0
        else:
            m_in = m_out = None
            c = 1.0 if (cfg["rescale"] or not p) else 1 - p
        delta = 0
        for e in range(E_L):
            xe = X if m_in is None else X * m_in[e]
            ue = (xe @ self.A[e].T) @ self.B[e].T
            if m_out is not None:
                ue = ue * m_out[e]
            delta = delta + G[:, e:e + 1] * cfg["s"] * c * ue
        if self.training:
            self.cache = (Xn[real], k_star[real])
            n = max(real.sum(), 1)
            f = torch.tensor(np.bincount(idx.numpy()[real].reshape(-1), minlength=E)[:E_L] / (n * cfg["K"]))
            P = torch.softmax(logits, dim=1)[torch.tensor(real)].sum(0) / n
            self.bal = E_L * (f * P[:E_L]).sum()
        return self.base(x) + delta.reshape(*lead, -1)

    def update_clusters(self):
        cache, self.cache = self.cache, None
        m = self.cfg["momentum"]
        if cache is None or m == 0:
            return
        X, k_star = cache
        for k in range(len(self.mu)):
            Xk = X[k_star == k]
            if len(Xk):
                self.mu[k] = (1 - m) * self.mu[k] + m * Xk.mean(0)
                var = (1 - m) * self.sigma[k] ** 2 + m * ((Xk - self.mu[k]) ** 2).mean(0)
                self.sigma[k] = np.maximum(np.sqrt(var), self.cfg["floor"])

    def l1(self):
        _, r, D = self.A.shape
        return self.A.abs().sum() / (r * D) + self.B.abs().sum() / (self.B.shape[1] * r)

    def trainables(self):
        return [p for p in self.parameters() if p.requires_grad]


def slim_loss(model, layers: dict, x, y, mask, l1_coef, balance_coef, pad_id=None, draw=True):
    """§2.5 on one batch: draw every layer's masks (model order), forward, CE + λ_L1·L1 + λ_bal·Σ L_bal."""
    real = np.ones(np.shape(x), bool) if pad_id is None else np.asarray(x) != pad_id
    for layer in layers.values():
        if draw:
            layer.draw_masks()
        layer.token_mask = real
    logits, _ = forward_hidden(model, x)
    loss = masked_ce(logits, y, mask)
    if l1_coef:
        loss = loss + l1_coef * sum(layer.l1() for layer in layers.values())
    if balance_coef:
        loss = loss + balance_coef * sum(layer.bal for layer in layers.values())
    return loss


def run_slim(model, layers: dict, tasks, *, lr, l1_coef, balance_coef, pad_id=None):
    """§2.6 over tasks = [[(x, y, mask), ...], ...]: a fresh Adam per task; after every step the clusters move."""
    params = [p for layer in layers.values() for p in layer.trainables()]
    losses = []
    for batches in tasks:
        def step(i, batches=batches):
            x, y, m = batches[i]
            return slim_loss(model, layers, x, y, m, l1_coef, balance_coef, pad_id)

        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
        for i in range(len(batches)):
            loss = step(i)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            for layer in layers.values():
                layer.update_clusters()
    return losses


# ---- MoLE (§4) and NLA / sum (§7.4) ----------------------------------------------------------------

class TorchMoleLinear(nn.Module):
    """base(x) + Σ_i G'_i u_i with u_i = s_i B_i A_i x and G = softmax(eᵀ LN([u_1; …]) / exp(ρ)).

    sources: [(A_i, B_i)] (ranks may differ), scales s_i. e / rho None: a constant gate `weights` (NLA, sum).
    share: a dict shared by the adapted linears of one block in the "layer" variant (the first writes G).
    pool="sequence": LN(U) is averaged over each sequence's real tokens (`token_mask`); pool="prefix": at token
    t, over the real tokens s <= t."""

    def __init__(self, base, sources, scales, e=None, rho=None, weights=None, pool="token", share=None,
                 owner=True, keep=None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.As = [torch.tensor(np.asarray(A, np.float64)) for A, _ in sources]
        self.Bs = [torch.tensor(np.asarray(B, np.float64)) for _, B in sources]
        self.s = list(scales)
        self.e = None if e is None else _param(e)
        self.rho = None if rho is None else _param(np.reshape(rho, (1,)))
        self.weights, self.pool, self.share, self.owner, self.keep = weights, pool, share, owner, keep
        self.token_mask = None
        self.G = None

    def forward(self, x):  # x (B, T, D)
        Bsz, T, _ = x.shape
        X = x.reshape(-1, x.shape[-1])
        u = [s * (X @ A.T) @ B.T for A, B, s in zip(self.As, self.Bs, self.s)]  # E × (N, O)
        E = len(u)
        if self.weights is not None:
            G = torch.tensor(np.asarray(self.weights, np.float64)).expand(X.shape[0], E)
        elif self.owner:
            U = torch.cat(u, dim=1)  # (N, E·O)
            U = TF.layer_norm(U, (U.shape[1],), eps=1e-5)
            if self.pool == "sequence":
                real = torch.ones(Bsz, T, dtype=torch.float64) if self.token_mask is None else \
                    torch.tensor(np.asarray(self.token_mask, np.float64))
                w = real / real.sum(1, keepdim=True).clamp(min=1)
                U = torch.einsum("bt,btc->bc", w, U.reshape(Bsz, T, -1))
            elif self.pool == "prefix":  # token t: the mean over the real tokens s <= t
                real = torch.ones(Bsz, T, dtype=torch.float64) if self.token_mask is None else \
                    torch.tensor(np.asarray(self.token_mask, np.float64))
                seen = torch.tril(torch.ones(T, T, dtype=torch.float64))[None] * real[:, None, :]
                w = seen / seen.sum(2, keepdim=True).clamp(min=1)
                U = torch.einsum("bts,bsc->btc", w, U.reshape(Bsz, T, -1)).reshape(Bsz * T, -1)
            G = torch.softmax((U @ self.e) / torch.exp(self.rho), dim=1)
            if self.pool == "sequence":
                G = G.repeat_interleave(T, dim=0)
            self.G = G
            if self.share is not None:
                self.share["G"] = G
        else:
            G = self.share["G"]
        if self.keep is not None:
            m = torch.zeros(E, dtype=torch.float64)
            m[list(self.keep)] = 1
            G = G * m
            G = G / G.sum(1, keepdim=True)
        delta = sum(G[:, i:i + 1] * u[i] for i in range(E))
        return self.base(x) + delta.reshape(Bsz, T, -1)


def mole_balance(gates, real):
    """−Σ_i log q_i, q = the mean gate over every gate and every real token."""
    w = torch.tensor(np.asarray(real, np.float64).reshape(-1))[:, None]
    q = sum((G * w).sum(0) for G in gates) / (len(gates) * w.sum())
    return -torch.log(q).sum()


# ---- ELDER (§5) and FT-LoRA (§7.5) -----------------------------------------------------------------

class TorchElderLinear(nn.Module):
    """base(x) + z·Σ_{e∈S} g_e s B_e A_e x per sequence, g = raw softmax(W_g q + b_g) on the top-k S.

    `ctx` (a dict shared by the model's layers) holds q (B, d_q) and z (B,) and, while editing, the preset
    {layer name: (B, k)}, "editing", "hard". The routing layer writes q from its input at ctx["key_pos"]."""

    def __init__(self, base, name, params, k, scale, ctx, renormalize=False, routing_layer=False):
        super().__init__()
        self.base, self.name, self.k, self.s, self.ctx = base, name, k, scale, ctx
        for p in base.parameters():
            p.requires_grad_(False)
        self.A, self.B = _param(params["lora_A"]), _param(params["lora_B"])
        self.W = _param(params["router_weight"])
        self.b = _param(params["router_bias"]) if "router_bias" in params else None
        self.renormalize, self.routing_layer = renormalize, routing_layer
        self.guide = None

    def logits(self, q):
        out = q @ self.W.T
        return out if self.b is None else out + self.b

    def forward(self, x):  # x (B, T, D)
        ctx = self.ctx
        Bsz, T, _ = x.shape
        if self.routing_layer:
            capture_query(ctx, x)
        q, z = ctx["q"], ctx["z"]
        lg = self.logits(q)
        p = torch.softmax(lg, dim=1)  # (B, E)
        if ctx["editing"] and ctx["hard"]:
            S = torch.as_tensor(ctx["preset"][self.name])
        else:
            S = torch.topk(lg.detach(), self.k, dim=1).indices
        g = torch.gather(p, 1, S)
        if self.renormalize:
            g = g / g.sum(1, keepdim=True)
        if ctx["editing"]:
            T_pre = torch.as_tensor(ctx["preset"][self.name])
            self.guide = -torch.gather(torch.log_softmax(lg, dim=1), 1, T_pre).sum() / Bsz
        out = []
        for b in range(Bsz):
            yb = torch.zeros(T, self.B.shape[1], dtype=torch.float64)
            if z[b]:
                for j in range(S.shape[1]):
                    e = int(S[b, j])
                    yb = yb + g[b, j] * self.s * (x[b] @ self.A[e].T) @ self.B[e].T
            out.append(yb)
        return self.base(x) + torch.stack(out)


class TorchQueryTap(nn.Module):
    def __init__(self, base, ctx):
        super().__init__()
        self.base, self.ctx = base, ctx

    def forward(self, x):
        capture_query(self.ctx, x)
        return self.base(x)


def capture_query(ctx, x):
    """q = x at the key positions (detached); z = 1 while editing, else Hamming deferral on the stored codes."""
    Bsz, T, _ = x.shape
    pos = ctx.get("key_pos")
    pos = np.full(Bsz, T - 1) if pos is None else np.asarray(pos)
    ctx["q"] = x.detach()[torch.arange(Bsz), torch.as_tensor(pos)]
    if ctx["editing"] or not ctx["deferral"]:
        ctx["z"] = np.ones(Bsz, bool)
        return
    if not ctx["table"]:
        ctx["z"] = np.zeros(Bsz, bool)
        return
    codes = elder_codes(ctx["layers"], ctx["q"], ctx["k"])  # (B, L_a·E)
    table = np.stack(ctx["table"])  # (n, L_a·E)
    ham = np.abs(codes[:, None, :] - table[None, :, :]).sum(-1).min(1)
    ctx["z"] = ham < ctx["theta"]


def elder_codes(layers, q, k):
    """concat over layers of the k-hot top-k of the router logits: (B, L_a·E)."""
    blocks = []
    with torch.no_grad():
        for layer in layers:
            S = torch.topk(layer.logits(q), k, dim=1).indices.numpy()
            c = np.zeros((q.shape[0], layer.W.shape[0]))
            for b in range(q.shape[0]):
                c[b, S[b]] = 1
            blocks.append(c)
    return np.concatenate(blocks, axis=1)


def run_elder(model, layers: list, ctx, edits, *, n_iter, lr, guide_coef, preset, key_pos_fn, step_schedule=False,
              hash_rng=None):
    """§5.5: for each edit (x, y, mask): the preset from the routers before the edit ("init") or from
    `hash_rng` ("hashed": per layer, a sorted k-subset), a fresh Adam, n_iter steps of CE + λ_g Σ L_g,
    then store c(q). Returns the losses of every step."""
    params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    losses = []
    for x, y, mask in edits:
        ctx["key_pos"] = key_pos_fn(x, mask)
        ctx["editing"] = True
        with torch.no_grad():  # the query only (a base-model quantity)
            capture_query(ctx, _routing_input(model, ctx, x))
        q = ctx["q"]
        if preset == "init":
            with torch.no_grad():
                ctx["preset"] = {l.name: torch.topk(l.logits(q), l.k, dim=1).indices.numpy() for l in layers}
        else:  # edit by edit (row by row), layer by layer
            draws = [[np.sort(hash_rng.choice(l.W.shape[0], l.k, replace=False)) for l in layers] for _ in range(len(q))]
            ctx["preset"] = {l.name: np.stack([row[i] for row in draws]) for i, l in enumerate(layers)}

        def step(i, x=x, y=y, mask=mask):
            logits, _ = forward_hidden(model, x)
            loss = masked_ce(logits, y, mask)
            if guide_coef:
                loss = loss + guide_coef * sum(l.guide for l in layers)
            return loss

        losses += adam_loop(params, n_iter, lr, step, (lambda i: lr * 0.5 ** (i // 20)) if step_schedule else None)
        ctx["editing"] = False
        for row in elder_codes(layers, q, ctx["k"]):
            ctx["table"].append(row)
        ctx["key_pos"] = None
    return losses


def _routing_input(model, ctx, x):
    """The routing layer's input for token ids x: run the model with a hook that stops at it."""
    holder = {}
    target = ctx["routing_module"]

    def hook(module, inputs):
        holder["x"] = inputs[0]
        raise _Stop

    handle = target.register_forward_pre_hook(hook)
    try:
        forward_hidden(model, x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return holder["x"]


class _Stop(Exception):
    pass


# ---- GRACE-like codebook (§7.5) ------------------------------------------------------------------------

class TorchGraceLinear(nn.Module):
    """base(x), except at each row's key position p: the value of the nearest key (L2 on q = x_p, ties to the
    newest) when q lies within that key's radius. `ctx` holds "keys" [(D,)], "values" [Parameter (O,)],
    "radii", "targets", "key_pos" (B,) or None, and while editing "train_slots" (B,) (the slots to use)."""

    def __init__(self, base, ctx):
        super().__init__()
        self.base, self.ctx = base, ctx
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x):  # x (B, T, D)
        ctx = self.ctx
        y = self.base(x)
        Bsz, T, _ = x.shape
        pos = np.full(Bsz, T - 1) if ctx.get("key_pos") is None else np.asarray(ctx["key_pos"])
        q = x.detach()[torch.arange(Bsz), torch.as_tensor(pos)]
        slots = ctx["train_slots"] if ctx.get("train_slots") is not None else [grace_lookup(ctx, row) for row in q]
        ctx["q"], ctx["slots"] = q, list(slots)
        rows = []
        for b in range(Bsz):
            if slots[b] < 0:
                rows.append(y[b])
            else:  # splice the value in at p
                p = int(pos[b])
                rows.append(torch.cat([y[b, :p], ctx["values"][slots[b]][None], y[b, p + 1:]]))
        return torch.stack(rows)


def grace_nearest(ctx, q, among=None):
    """(j, distance) of the nearest key to q among the slots `among` (default all), ties to the newest; (−1, inf)."""
    best, best_d = -1, math.inf
    for j in reversed(range(len(ctx["keys"])) if among is None else sorted(among, reverse=True)):
        d = float(torch.linalg.norm(q - ctx["keys"][j]))
        if d < best_d:
            best, best_d = j, d
    return best, best_d


def grace_lookup(ctx, q):
    j, d = grace_nearest(ctx, q)
    return j if j >= 0 and d <= ctx["radii"][j] else -1


def run_grace(model, ctx, edits, *, n_iter, lr, eps, key_pos_fn):
    """§7.5: per edit, per row: a same-target key within eps is reused, else a new key (k = q, radius eps,
    value = the layer's current output at p); then a fresh Adam over the edit's values for n_iter steps of
    the target CE. Returns the losses of every step."""
    layer = ctx["routing_module"]
    losses = []
    for x, y, mask in edits:
        ctx["key_pos"] = pos = key_pos_fn(x, mask)
        with torch.no_grad():
            inp = _routing_input(model, ctx, x)
            q = inp[torch.arange(len(pos)), torch.as_tensor(pos)]
            y_p = layer.base(q)  # the base layer's output at p
        slots, seen = [], {}
        for b in range(len(pos)):
            target = tuple(int(t) for t in np.asarray(y)[b][np.asarray(mask)[b] != 0])
            key = (q[b].numpy().tobytes(), target)
            if key not in seen:
                same = [j for j, t in enumerate(ctx["targets"]) if t == target]
                j, d = grace_nearest(ctx, q[b], same) if same else (-1, math.inf)
                if j < 0 or d > eps:
                    current = grace_lookup(ctx, q[b])
                    start = ctx["values"][current].detach().clone() if current >= 0 else y_p[b].clone()
                    ctx["keys"].append(q[b].clone())
                    ctx["values"].append(nn.Parameter(start))
                    ctx["radii"].append(eps)
                    ctx["targets"].append(target)
                    j = len(ctx["keys"]) - 1
                seen[key] = j
            slots.append(seen[key])
        ctx["train_slots"] = slots
        params = [ctx["values"][j] for j in sorted(set(slots))]
        losses += adam_loop(params, n_iter, lr, lambda i, x=x, y=y, mask=mask:
                            masked_ce(forward_hidden(model, x)[0], y, mask))
        ctx["train_slots"] = ctx["key_pos"] = None
    return losses
