"""A Hugging Face causal LM behind the NumPy GPT's calling convention, so that the methods and the
scenario runners drive either engine with the same calls.

Shape legend: B batch, T time, V vocabulary, C channels.

    lm = CausalLM(hf_model)                      any transformers causal LM (GPT2LMHeadModel, LlamaForCausalLM …)
    logits, loss = lm(x, y, loss_mask=mask)      x, y (B, T) int (NumPy or torch); loss = masked mean CE
    logits, loss, hidden = lm(x, return_hidden=True)   hidden: the residual stream after every block
    out = lm.generate(x, 5, greedy=True)         (B, T + 5) NumPy ints, as GPT.generate
    lm = from_gpt(gpt)                           the tiny GPT as a real GPT2LMHeadModel (same weights)

``lm.config`` answers the NumPy GPTConfig's names (block_size, n_layer, n_embd, vocab_size) for the
model's own config; ``lm.hf_config`` is the model's. ``rng`` is accepted and ignored: the model's own
dropout draws from torch's generator (the adapters' dropout draws from the named NumPy streams).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as TF

__all__ = ["CausalLM", "from_gpt", "masked_cross_entropy"]


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask=None) -> torch.Tensor:
    """Mean token cross-entropy over the positions whose mask is non-zero (all when mask is None),
    as tinyslim.functional.cross_entropy."""
    V = logits.shape[-1]
    losses = TF.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none")
    if mask is None:
        return losses.mean()
    weights = (mask.reshape(-1) != 0).to(losses.dtype)
    if not bool(weights.any()):
        raise ValueError("cross_entropy: every position is masked; the mean over no tokens is undefined")
    return (losses * weights).sum() / weights.sum()


def _blocks(hf_model: nn.Module, n_layer: int) -> nn.ModuleList:
    """The decoder blocks: the first ModuleList with one entry per layer (GPT-2's transformer.h,
    Llama's model.layers …)."""
    for module in hf_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layer:
            return module
    raise ValueError(f"found no list of {n_layer} decoder blocks in {type(hf_model).__name__}")


class CausalLM(nn.Module):
    """Wraps a transformers causal LM; forward(idx, targets, loss_mask, rng, return_hidden) as GPT's."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model
        cfg = hf_model.config
        get = lambda *names: next(getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None)  # noqa: E731
        self.hf_config = cfg
        self.config = SimpleNamespace(block_size=int(get("n_positions", "max_position_embeddings")),
                                      n_layer=int(get("n_layer", "num_hidden_layers")),
                                      n_embd=int(get("n_embd", "hidden_size")), vocab_size=int(cfg.vocab_size))
        self.blocks = _blocks(hf_model, self.config.n_layer)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def _ids(self, a, any_length: bool = False) -> torch.Tensor:
        t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"token ids must be integers, got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"token ids must have shape (B, T), got {tuple(t.shape)}")
        if t.shape[1] > self.config.block_size and not any_length:
            raise ValueError(f"sequence length {t.shape[1]} exceeds the model's block size {self.config.block_size}")
        return t.to(device=self.device, dtype=torch.long)

    def forward(self, idx, targets=None, loss_mask=None, rng=None, return_hidden: bool = False):
        idx = self._ids(idx)
        hidden, hooks = [], []
        if return_hidden:  # the residual stream leaving every block, before any final norm
            hooks = [b.register_forward_hook(lambda _m, _i, out: hidden.append(out[0] if isinstance(out, tuple)
                                                                                else out)) for b in self.blocks]
        try:
            logits = self.hf_model(input_ids=idx).logits  # (B, T, V)
        finally:
            for h in hooks:
                h.remove()
        loss = None
        if targets is not None:
            targets = self._ids(targets)
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
            mask = None if loss_mask is None else torch.as_tensor(np.asarray(loss_mask), device=self.device)
            loss = masked_cross_entropy(logits, targets, mask)
        if return_hidden:
            return logits, loss, hidden
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, greedy: bool = True, **_ignored) -> np.ndarray:
        """Greedy continuation (the runners' evaluation), cropping the context to block_size; NumPy out."""
        if not greedy:
            raise ValueError("CausalLM.generate decodes greedily only (greedy=True); sample with the HF model's "
                             "own generate()")
        out = torch.as_tensor(idx.cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx))
        out = self._ids(out, any_length=True)  # a longer prompt is cropped like the running context
        was_training = self.training
        self.eval()
        try:
            for _ in range(int(max_new_tokens)):
                ids = out[:, -self.config.block_size:]
                nxt = self.hf_model(input_ids=ids).logits[:, -1, :].argmax(-1, keepdim=True)
                out = torch.cat([out, nxt], dim=1)
        finally:
            self.train(was_training)
        return out.cpu().numpy()


def from_gpt(gpt, dtype: torch.dtype | None = None, attn_implementation: str = "eager") -> CausalLM:
    """The tiny NumPy GPT as a transformers GPT2LMHeadModel with the same weights, wrapped in CausalLM
    (dtype: default the GPT's). Built from a config in memory: nothing is downloaded."""
    import transformers  # an optional dependency of the torch path (the [torch] extra installs it)

    from ..hf import hf_gpt2_config, hf_gpt2_state_dict

    config = transformers.GPT2Config(**{k: v for k, v in hf_gpt2_config(gpt.config).items() if k != "architectures"})
    config._attn_implementation = attn_implementation
    target = dtype if dtype is not None else torch.from_numpy(np.zeros(0, gpt.transformer.wte.weight.dtype)).dtype
    hf = transformers.GPT2LMHeadModel(config).to(target)  # before loading: a float32 model would round the weights
    state = {k: torch.as_tensor(np.asarray(v)) for k, v in hf_gpt2_state_dict(gpt).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"from_gpt: GPT2LMHeadModel and the GPT differ: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return CausalLM(hf)
