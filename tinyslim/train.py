"""Pretraining the base model (its measurements of general capability live in evaluate.py).

``pretrain`` runs AdamW with warm-up + cosine decay on batches of pydoc text mixed with the
knowledge corpus (data.PretrainData), shows a progress bar, evaluates the validation loss every
``eval_every`` steps, and writes an atomic checkpoint (model + optimizer + step) that a later call
resumes from. Every step draws its batch from ``default_rng([seed, step])``, so an interrupted and
resumed run sees exactly the batches of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import PretrainData
from .evaluate import evaluate_loss, greedy_answers, knowledge_recall, next_char_accuracy  # (the last three: re-exported)
from .io import load_checkpoint, save_checkpoint
from .nn import GPT, GPTConfig
from .optim import AdamW, clip_grad_norm_, cosine_schedule

__all__ = ["PretrainConfig", "pretrain", "evaluate_loss", "next_char_accuracy", "knowledge_recall", "greedy_answers"]


@dataclass
class PretrainConfig:
    """Pretraining hyper-parameters (defaults: the tiny preset's recipe on two CPU cores)."""

    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1  # on matrices only, as GPT-2 / nanoGPT
    grad_clip: float = 1.0
    knowledge_fraction: float = 0.3
    n_entities: int = 100
    n_cities: int = 20
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1 or self.eval_batches < 1:
            raise ValueError(f"PretrainConfig: steps, batch_size, eval_every, eval_batches must be >= 1, got {self}")


def _param_groups(model: GPT, weight_decay: float):
    decay = [p for p in model.parameters(trainable_only=True) if p.ndim >= 2]
    no_decay = [p for p in model.parameters(trainable_only=True) if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _checkpoint_meta(model, config, step, history):
    return {"kind": "gpt", "config": model.config.to_dict(), "pretrain": dataclasses.asdict(config),
            "step": step, "history": history}


def pretrain(model_config: GPTConfig, config: PretrainConfig, out: str | Path | None = None,
             resume: bool = True, progress: bool = True, log=print, stop_at: int | None = None) -> tuple[GPT, dict]:
    """Pretrain a GPT; returns (model, summary). With `out`, checkpoints there and resumes from it.

    stop_at: leave after that many steps (as an interruption would); a later call resumes."""
    from tqdm.auto import tqdm

    data = PretrainData(block_size=model_config.block_size, knowledge_fraction=config.knowledge_fraction,
                        seed=config.seed, n_entities=config.n_entities, n_cities=config.n_cities)
    if model_config.vocab_size != data.tokenizer.vocab_size:
        raise ValueError(f"model vocab_size {model_config.vocab_size} != tokenizer vocab_size "
                         f"{data.tokenizer.vocab_size}")
    model = GPT(model_config, seed=config.seed)
    optimizer = AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    val = data.val_batches(config.batch_size, config.eval_batches)
    start, history = 0, []
    out = Path(out) if out is not None else None
    if out is not None and resume and out.exists():
        start, history = _resume(out, model, optimizer, model_config, config)
        log(f"resuming from {out} at step {start}/{config.steps}")

    t0, tokens = time.perf_counter(), 0
    bar = tqdm(range(start, config.steps), total=config.steps, initial=start, disable=not progress,
               desc="pretrain", unit="step")
    for step in bar:
        optimizer.lr = cosine_schedule(step, config.steps, config.lr, config.warmup_steps, config.min_lr)
        x, y = data.get_batch("train", config.batch_size, np.random.default_rng([config.seed, step]))
        _, loss = model(x, y)
        model.zero_grad()
        loss.backward()
        clip_grad_norm_(optimizer.params, config.grad_clip)
        optimizer.step()
        tokens += x.size
        bar.set_postfix(loss=f"{loss.item():.3f}")
        last = step + 1 == config.steps
        if (step + 1) % config.eval_every == 0 or last:
            val_loss = evaluate_loss(model, val)
            history.append({"step": step + 1, "train_loss": loss.item(), "val_loss": val_loss,
                            "elapsed_s": time.perf_counter() - t0})
            bar.write(f"step {step + 1:5d}  train {loss.item():.4f}  val {val_loss:.4f} nats/char")
            if out is not None:
                tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                           **{f"optim.{k}": v for k, v in optimizer.state_dict().items()}}
                save_checkpoint(out, tensors, _checkpoint_meta(model, config, step + 1, history))
        if stop_at is not None and step + 1 >= stop_at:
            break
    bar.close()
    elapsed = time.perf_counter() - t0
    summary = {"val_loss": history[-1]["val_loss"] if history else evaluate_loss(model, val),
               "steps": config.steps, "wall_s": elapsed, "tokens_per_s": tokens / elapsed if elapsed else 0.0,
               "history": history}
    return model, summary


def _resume(path, model, optimizer, model_config, config):
    arrays, meta = load_checkpoint(path)
    saved = GPTConfig.from_dict(meta["config"])
    if saved != model_config:
        raise ValueError(f"cannot resume from {path}: it was made for another model config ({saved.diff(model_config)})")
    # the recipe must match too, or the resumed run silently differs from an uninterrupted one; `steps` may
    # grow (continuing a run: the schedule then follows the new length), evaluation settings may change
    ours = dataclasses.asdict(config)
    differ = {k: (v, ours.get(k)) for k, v in meta.get("pretrain", {}).items()
              if k not in ("steps", "eval_every", "eval_batches") and ours.get(k) != v}
    if differ:
        raise ValueError(f"cannot resume from {path}: it was made with another PretrainConfig "
                         f"({', '.join(f'{k}: checkpoint {a!r} vs now {b!r}' for k, (a, b) in differ.items())}); "
                         "pass the same recipe, or resume=False to start over")
    model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("model.")})
    optimizer.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("optim.")})
    return int(meta["step"]), list(meta.get("history", []))
