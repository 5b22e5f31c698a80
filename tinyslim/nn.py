"""Modules and the tiny GPT-2, top to bottom: Module → Linear → Embedding → LayerNorm →
CausalSelfAttention → MLP → Block → GPTConfig → GPT (the order of nanoGPT's model.py).

Parameter names follow Hugging Face GPT-2 (``transformer.wte``, ``transformer.h.0.attn.c_attn``,
``lm_head`` …) so that weights and adapters convert to and from HF / PEFT by name. Inside
tinyslim every weight is stored (out, in) like ``torch.nn.Linear``; GPT-2's Conv1D (in, out)
layout is a transpose at export time.

Shape legend: B batch, T time, C channels (n_embd), H heads, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from . import functional as F
from .autograd import Tensor, no_grad

__all__ = ["Parameter", "Module", "ModuleList", "Linear", "Embedding", "LayerNorm", "CausalSelfAttention",
           "MLP", "Block", "GPTConfig", "GPT"]


class Parameter(Tensor):
    """A Tensor that a Module owns and that trains by default."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)


class Module:
    """Base class: finds its parameters and sub-modules by walking its attributes (in order)."""

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    # ---- traversal -----------------------------------------------------------------------------
    def _children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self._children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [m for _, m in self.named_modules()]

    def named_parameters(self, prefix: str = "", trainable_only: bool = False):
        """(name, Parameter) pairs; a parameter shared by two modules (tied weights) appears once."""
        seen = set()
        for mod_name, module in self.named_modules(prefix):
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    if trainable_only and not value.requires_grad:
                        continue
                    yield (f"{mod_name}.{name}" if mod_name else name), value

    def parameters(self, trainable_only: bool = False):
        return [p for _, p in self.named_parameters(trainable_only=trainable_only)]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return int(sum(p.size for p in self.parameters(trainable_only=trainable_only)))

    def get_submodule(self, path: str) -> "Module":
        module = self
        for part in path.split(".") if path else []:
            child = getattr(module, part, None)
            if not isinstance(child, Module):
                raise KeyError(f"no sub-module {part!r} in {path!r} (on {type(module).__name__})")
            module = child
        return module

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """name → a copy of the array (copies, so that later training cannot change a saved state)."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True):
        """Copy arrays into the existing parameters (in place, so optimizers keep their references)."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: state does not match {type(self).__name__}: "
                           f"missing keys {missing[:8]}{'…' if len(missing) > 8 else ''}, "
                           f"unexpected keys {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}")
        for name, p in own.items():
            if name not in state:
                continue
            value = np.asarray(state[name])
            if value.shape != p.shape:
                raise ValueError(f"load_state_dict: {name} has shape {value.shape} in the state but {p.shape} in the "
                                 "model (was the checkpoint made for another config?)")
            if value.dtype != p.dtype:
                raise TypeError(f"load_state_dict: {name} is {value.dtype} in the state but {p.dtype} in the model")
            np.copyto(p.data, value)
        return missing, unexpected

    # ---- modes ---------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def freeze(self):
        """No gradients for any parameter of this module (adapters unfreeze their own)."""
        for p in self.parameters():
            p.requires_grad = False
            p.grad = None
        return self

    def unfreeze(self):
        for p in self.parameters():
            p.requires_grad = True
        return self

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, dtype):
        """Cast every parameter to dtype (e.g. np.float64 for exact gradient checks), in place."""
        dtype = np.dtype(dtype)
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._children():
            lines.append(f"  ({name}): " + repr(child).replace("\n", "\n  "))
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


class ModuleList(Module):
    """An indexable list of modules named "0", "1", … (as torch.nn.ModuleList)."""

    def __init__(self, modules):
        for i, m in enumerate(modules):
            setattr(self, str(i), m)
        self._len = len(modules)

    def __len__(self):
        return self._len

    def __getitem__(self, i):
        if not -self._len <= i < self._len:
            raise IndexError(f"ModuleList index {i} out of range for length {self._len}")
        return getattr(self, str(i % self._len))

    def __setitem__(self, i, module):
        setattr(self, str(i % self._len), module)

    def __iter__(self):
        return (self[i] for i in range(self._len))


# ---- layers ------------------------------------------------------------------------------------

class Linear(Module):
    """y = x Wᵀ + b, weight (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng=None, std: float = 0.02,
                 dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng(0)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(rng.normal(0.0, std, (out_features, in_features)).astype(dtype))
        self.bias = Parameter(np.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, rng=None, std: float = 0.02, dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng(0)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(rng.normal(0.0, std, (num_embeddings, embedding_dim)).astype(dtype))

    def forward(self, idx):
        return F.embedding(idx, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    def __init__(self, n: int, eps: float = 1e-5, dtype=np.float32):
        self.eps = eps
        self.weight = Parameter(np.ones(n, dtype=dtype))
        self.bias = Parameter(np.zeros(n, dtype=dtype))

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class CausalSelfAttention(Module):
    """c_attn: C → 3C (q, k, v fused, as GPT-2); causal softmax attention per head; c_proj: C → C."""

    def __init__(self, config: "GPTConfig", rng):
        C, dtype = config.n_embd, config.np_dtype
        self.n_head = config.n_head
        self.c_attn = Linear(C, 3 * C, bias=config.bias, rng=rng, dtype=dtype)
        # GPT-2 scales the residual projections by 1/√(2·n_layer) at init
        self.c_proj = Linear(C, C, bias=config.bias, rng=rng, std=0.02 / math.sqrt(2 * config.n_layer), dtype=dtype)
        self.dropout = config.dropout

    def forward(self, x, rng=None):  # x (B, T, C)
        y = F.causal_self_attention(self.c_attn(x), self.n_head)  # (B, T, C)
        return F.dropout(self.c_proj(y), self.dropout, rng, self.training)


class MLP(Module):
    """c_fc: C → 4C, tanh-GELU, c_proj: 4C → C."""

    def __init__(self, config: "GPTConfig", rng):
        C, dtype = config.n_embd, config.np_dtype
        self.c_fc = Linear(C, 4 * C, bias=config.bias, rng=rng, dtype=dtype)
        self.c_proj = Linear(4 * C, C, bias=config.bias, rng=rng, std=0.02 / math.sqrt(2 * config.n_layer), dtype=dtype)
        self.dropout = config.dropout

    def forward(self, x, rng=None):
        return F.dropout(self.c_proj(F.gelu(self.c_fc(x))), self.dropout, rng, self.training)


class Block(Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: "GPTConfig", rng):
        self.ln_1 = LayerNorm(config.n_embd, dtype=config.np_dtype)
        self.attn = CausalSelfAttention(config, rng)
        self.ln_2 = LayerNorm(config.n_embd, dtype=config.np_dtype)
        self.mlp = MLP(config, rng)

    def forward(self, x, rng=None):
        x = x + self.attn(self.ln_1(x), rng)
        return x + self.mlp(self.ln_2(x), rng)


# ---- the model ---------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    """GPT-2 architecture hyper-parameters. The defaults are the tiny CPU preset (~0.8M parameters)
    that pretrains on Python's documentation text on two cores in minutes."""

    vocab_size: int = 97  # the character vocabulary of tinyslim.data.CharTokenizer
    block_size: int = 128  # longest context (learned positions)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads; n_embd must divide by it
    n_embd: int = 128  # channels C of the residual stream
    dropout: float = 0.0  # on attention/MLP outputs and embeddings, training only
    bias: bool = True  # biases in Linear layers (GPT-2 has them)
    dtype: str = "float32"  # "float64" for exact gradient checks

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd = {self.n_embd} must be divisible by n_head = {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must lie in [0, 1), got {self.dropout}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"GPTConfig.dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @property
    def np_dtype(self):
        return np.dtype(self.dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    def diff(self, other: "GPTConfig") -> dict:
        """Fields whose values differ: name → (self's, other's)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


class _Transformer(Module):
    def __init__(self, config: GPTConfig, rng):
        dtype = config.np_dtype
        self.wte = Embedding(config.vocab_size, config.n_embd, rng=rng, dtype=dtype)
        self.wpe = Embedding(config.block_size, config.n_embd, rng=rng, std=0.01, dtype=dtype)
        self.h = ModuleList([Block(config, rng) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, dtype=dtype)


class GPT(Module):
    """The GPT-2 architecture: token + learned position embeddings, pre-LN blocks, final LayerNorm,
    and an LM head tied to the token embedding."""

    def __init__(self, config: GPTConfig, seed: int = 0):
        self.config = config
        rng = np.random.default_rng(seed)
        self.transformer = _Transformer(config, rng)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False, rng=rng, dtype=config.np_dtype)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (GPT-2)

    def _check_idx(self, idx, any_length: bool = False):
        idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
        if idx.ndim == 1:
            idx = idx[None, :]
        if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"GPT expects token ids as an integer array (B, T), got {idx.dtype} {idx.shape}")
        if idx.shape[0] < 1:
            raise ValueError(f"GPT got a batch of 0 sequences (token ids of shape {idx.shape}); pass at least one row")
        T = idx.shape[1]
        if T < 1 or (T > self.config.block_size and not any_length):
            raise ValueError(f"sequence length {T} is outside [1, block_size = {self.config.block_size}]")
        if idx.min() < 0 or idx.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, vocab_size = {self.config.vocab_size}), "
                             f"got range [{idx.min()}, {idx.max()}]")
        return idx

    def forward(self, idx, targets=None, loss_mask=None, rng=None, return_hidden: bool = False):
        """idx (B, T) int → logits (B, T, V), and the mean cross-entropy against targets when given.

        loss_mask (B, T): positions with 0 are left out of the loss. rng: dropout randomness.
        return_hidden: also return the residual stream after every block (a list of (B, T, C)).
        """
        idx = self._check_idx(idx)
        B, T = idx.shape
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(np.arange(T))  # (B, T, C)
        x = F.dropout(x, self.config.dropout, rng, self.training)
        hidden = []
        for block in tr.h:
            x = block(x, rng)
            hidden.append(x)
        logits = self.lm_head(tr.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            targets = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
            if targets.shape != (B, T):
                raise ValueError(f"targets must have the shape of idx {(B, T)}, got {targets.shape}")
            loss = F.cross_entropy(logits, targets, mask=loss_mask)
        if return_hidden:
            return logits, loss, hidden
        return logits, loss

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 greedy: bool = False, rng=None, stop_token: int | None = None) -> np.ndarray:
        """Extend idx (B, T) by max_new_tokens tokens, cropping the context to block_size."""
        idx = self._check_idx(idx, any_length=True).copy()  # a longer prompt is cropped like the running context
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if temperature <= 0 and not greedy:
            raise ValueError(f"temperature must be > 0 (or pass greedy=True), got {temperature}")
        rng = rng if rng is not None else np.random.default_rng(0)
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                for _ in range(max_new_tokens):
                    logits, _ = self(idx[:, -self.config.block_size:])
                    last = logits.data[:, -1, :].astype(np.float64)  # (B, V)
                    if greedy:
                        nxt = last.argmax(axis=-1)
                    else:
                        last = last / temperature
                        if top_k is not None:
                            kth = np.sort(last, axis=-1)[:, -min(top_k, last.shape[-1])][:, None]
                            last = np.where(last < kth, -np.inf, last)
                        p = np.exp(last - last.max(axis=-1, keepdims=True))
                        p /= p.sum(axis=-1, keepdims=True)
                        nxt = np.array([rng.choice(len(row), p=row) for row in p])
                    idx = np.concatenate([idx, nxt[:, None].astype(idx.dtype)], axis=1)
                    if stop_token is not None and np.all(nxt == stop_token):
                        break
        finally:
            self.train(was_training)
        return idx
