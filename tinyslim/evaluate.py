"""The measurements of a language model on fixed data: validation loss, next-character accuracy
(or top-1 agreement with a reference), greedy answers and fact recall.

The model is the NumPy GPT or, on the torch engine, a ``tinyslim.torch.CausalLM`` (the same call and
``generate``): ``no_grad_for(model)`` is the matching no-grad context and ``to_numpy(logits)`` the
logits as a NumPy array on either engine (this module never imports torch itself)."""
from __future__ import annotations

import sys

import numpy as np

from .autograd import no_grad
from .data import CharTokenizer, KnowledgeBase
from .nn import GPT

__all__ = ["evaluate_loss", "next_char_accuracy", "greedy_answers", "knowledge_recall", "no_grad_for", "to_numpy"]


def _is_torch_module(model) -> bool:
    torch = sys.modules.get("torch")  # a torch model means torch is already imported
    return torch is not None and isinstance(model, torch.nn.Module)


def no_grad_for(model):
    """Gradients off for `model`'s engine: torch.no_grad() for a torch module, else tinyslim's no_grad()."""
    return sys.modules["torch"].no_grad() if _is_torch_module(model) else no_grad()


def to_numpy(t) -> np.ndarray:
    """A tinyslim Tensor's array (``.data``, no copy) or a torch tensor as a NumPy array (a CPU copy)."""
    data = t.data
    return data if isinstance(data, np.ndarray) else data.detach().cpu().numpy()


def _non_empty(batches, who: str) -> list:
    batches = list(batches)
    if not batches:
        raise ValueError(f"{who}: got no batches; a mean over an empty dataset is undefined")
    return batches


def evaluate_loss(model: GPT, batches) -> float:
    """Mean cross-entropy (nats/char) over fixed (x, y) batches."""
    batches = _non_empty(batches, "evaluate_loss")
    was_training = model.training
    model.eval()
    with no_grad_for(model):
        losses = [model(x, y)[1].item() for x, y in batches]
    model.train(was_training)
    return float(np.mean(losses))


def next_char_accuracy(model: GPT, batches, reference: GPT | None = None) -> float:
    """Top-1 next-character accuracy over fixed batches; with a reference model, the top-1
    agreement with it instead (a bounded measure of drift from the base)."""
    batches = _non_empty(batches, "next_char_accuracy")
    was_training = model.training
    model.eval()
    hits = total = 0
    with no_grad_for(model), no_grad_for(reference):
        for x, y in batches:
            pred = to_numpy(model(x)[0]).argmax(-1)
            target = y if reference is None else to_numpy(reference(x)[0]).argmax(-1)
            hits += int((pred == target).sum())
            total += pred.size
    model.train(was_training)
    return hits / total


def greedy_answers(model: GPT, tokenizer: CharTokenizer, prompts: list[str], max_new_tokens: int,
                   stop: str = "\n") -> list[str]:
    """Greedy continuation of each prompt, cut at the first `stop` character (prompts of equal
    length are decoded together in one batch)."""
    answers = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for _, members in sorted(by_length.items()):
        idx = np.stack([tokenizer.encode(prompts[i]) for i in members])
        out = model.generate(idx, max_new_tokens, greedy=True)[:, idx.shape[1]:]
        for i, row in zip(members, out):
            answers[i] = tokenizer.decode(row).split(stop)[0]
    return answers


def knowledge_recall(model: GPT, kb: KnowledgeBase, tokenizer: CharTokenizer, split: str = "heldout") -> float:
    """Fraction of knowledge prompts (of one split) whose greedy answer is exactly the city."""
    items = kb.prompts(split)
    longest = max(len(answer) for _, answer, _, _ in items)
    outputs = greedy_answers(model, tokenizer, [p for p, _, _, _ in items], longest)
    return float(np.mean([out[:len(answer)] == answer for out, (_, answer, _, _) in zip(outputs, items)]))
