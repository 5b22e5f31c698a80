"""An independent plain-PyTorch GPT-2, the oracle for tinyslim's GPT (a helper module, not a test file).

Written from the GPT-2 architecture, not from tinyslim's code: token + learned position embeddings,
pre-LN blocks (x + attn(ln_1(x)), x + mlp(ln_2(x))) with a fused c_attn C → 3C, causal softmax
attention per head, c_proj C → C, an MLP C → 4C → C with tanh-GELU, a final ln_f, and an LM head
tied to wte. Module names are Hugging Face GPT-2's, and every Linear is torch.nn.Linear (weight
stored (out, in), as in tinyslim), so a tinyslim ``state_dict()`` loads by name with no transposes.
LayerNorms always have a bias (as GPT-2's and tinyslim's); ``bias`` switches the Linear biases.

Shape legend: B batch, T time, C channels, H heads, hd = C / H, V vocabulary.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as TF

__test__ = False  # not a test module


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x):  # x (B, T, C)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        att = torch.softmax(att.masked_fill(future, float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd, bias):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        return self.c_proj(TF.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = MLP(n_embd, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, bias=True):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head, bias) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd, eps=1e-5),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2
        self.double()

    @classmethod
    def like(cls, config) -> "TorchGPT":
        """The same architecture as a tinyslim GPTConfig."""
        return cls(config.vocab_size, config.block_size, config.n_layer, config.n_head, config.n_embd, config.bias)

    def forward(self, idx, targets=None, loss_mask=None):  # idx (B, T) int64
        B, T = idx.shape
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(T))
        for block in tr.h:
            x = block(x)
        logits = self.lm_head(tr.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        losses = TF.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1), reduction="none")
        if loss_mask is None:
            return logits, losses.mean()
        w = (loss_mask.reshape(-1) != 0).to(losses.dtype)
        return logits, (losses * w).sum() / w.sum()


def load_tinyslim_state(model: TorchGPT, state: dict) -> TorchGPT:
    """Copy a tinyslim state_dict into the torch model by name; every torch parameter must be covered.

    The tied lm_head.weight is the same tensor as transformer.wte.weight, so it needs no entry of its own.
    """
    params = dict(model.named_parameters())  # torch, too, lists a tied parameter once
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(f"tinyslim state and torch GPT differ: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in params.items():
            value = torch.from_numpy(np.asarray(state[name], dtype=np.float64))
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{name}: tinyslim has shape {tuple(value.shape)}, torch {tuple(p.shape)}")
            p.copy_(value)
    return model
