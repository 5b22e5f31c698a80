"""Why SLIM at the spec's defaults learns nothing in scenario A: its LoRA factors, step by step.

``slim_dynamics`` trains SLIM with scenario A's runner (``build_method`` + ``run_continual``, the same
batches, clipping, schedule and hooks as every method) and, every few steps, records per adapted layer:

    a_rel      mean over the LoRA experts of ‖A_e‖_F, relative to its value at initialisation
    b          mean ‖B_e‖_F (0 at initialisation)
    delta      mean ‖s·B_e A_e‖_F: the size of each expert's weight change
    a_zero     fraction of A's entries whose task gradient (cross-entropy only) is exactly 0
    a_l1_wins  fraction of A's entries whose |task gradient| is below the spec's L1 gradient λ/(r·D)
               (λ = 1e-3 whatever the variant's own λ): where the L1 term sets the sign of the gradient
    experts_hit fraction of the LoRA experts that get any task gradient on B (routed some token)
    lora_share mean gate mass on LoRA experts (1 − identity mass) over the batch's real tokens
    d          mean OOD score d(x) of the batch's real tokens (the identity experts' logit bonus is γ·d)
    mask_cos   (forward masks only) the cosine between this step's masked task gradient of the layer's
               factors (A, B) and the gradient the same batch gives without masks: how well a masked
               step points where the unmasked model wants to go (None where a layer got no gradient)

and, once per record, the batch's task loss and the L1 term L_L1 (unweighted). By default one task
(rev, the first of scenario A's quick sequence) at the quick size's 600 steps, seed 100. The task gradient is
measured by a second forward/backward of the same batch with the same masks and parameters (the
optimizer never sees it; the training trajectory is bit-identical with or without records).

After training, ``mask_removal`` measures how much of each layer's trained update the masks of
p = 0.3 would remove: the share of ‖Δ(x)‖² (the gate-weighted mixture delta on a batch of the last
task's inputs) that the masked delta misses, for m^in alone, m^out alone and both, averaged over draws.

Variants (``VARIANTS``) separate the candidate causes: the spec's defaults (γ 1, λ_L1 1e-3, p 0.3);
L1 off; masks off; both off; λ_L1 1e-5; the same λ applied beside Adam as a proximal step
(soft-thresholding after each step, instead of a term in the loss that Adam normalises); and SGD
(with and without L1). The ``g0.5`` variants start from the setting tuning chose for scenario A (γ 0.5,
no L1, no masks) and add the masks in each way SLIM offers: both sides at p 0.3 or 0.1, B's rows only,
A's columns only, DARE's rescaling, and the masks on each step's update (``mask_mode="update"``).
``python -m tinyslim.experiments.slim_dynamics`` prints the table;
docs/slim_dynamics.md has the measured numbers and what they show.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from ..adapters.base import token_context
from ..adapters.slim import SlimConfig, drop_probabilities, l1_penalty
from ..autograd import Tensor, no_grad
from ..lowrank import mixture_lowrank
from ..io import jsonable
from ..optim import SGD, Adam
from ..tasks import evaluate_task, make_tasks
from .continual import ContinualConfig, build_method, run_continual

__all__ = ["VARIANTS", "MASK_STUDY", "EARLY_STEPS", "mask_removal", "format_masks", "Recorder", "task_gradients", "slim_dynamics", "format_table", "format_layers",
           "main"]

SPEC_L1 = SlimConfig().l1_coef  # λ_L1 of docs/methods.md §2.8: the a_l1_wins threshold in every variant

# name: (optimizer, SLIM config overrides, proximal λ: L1 applied after each step by soft-thresholding)
VARIANTS = {
    "spec": ("adam", {}, 0.0),  # γ 1, λ_L1 1e-3, p 0.3: SLIM's defaults
    "no-l1": ("adam", {"l1_coef": 0.0}, 0.0),
    "no-masks": ("adam", {"drop_p": 0.0}, 0.0),
    "no-l1-no-masks": ("adam", {"l1_coef": 0.0, "drop_p": 0.0}, 0.0),
    "l1-1e-5-no-masks": ("adam", {"l1_coef": 1e-5, "drop_p": 0.0}, 0.0),
    "prox-l1-no-masks": ("adam", {"l1_coef": 0.0, "drop_p": 0.0}, SPEC_L1),
    # the same four without yielding (γ = 0): how much of the failure is the routing
    "no-yield": ("adam", {"gamma": 0.0}, 0.0),
    "no-yield-no-l1": ("adam", {"gamma": 0.0, "l1_coef": 0.0}, 0.0),
    "no-yield-no-masks": ("adam", {"gamma": 0.0, "drop_p": 0.0}, 0.0),
    "no-yield-no-l1-no-masks": ("adam", {"gamma": 0.0, "l1_coef": 0.0, "drop_p": 0.0}, 0.0),
    "sgd": ("sgd", {}, 0.0),
    "sgd-no-l1": ("sgd", {"l1_coef": 0.0}, 0.0),
    "sgd-no-masks": ("sgd", {"drop_p": 0.0}, 0.0),
    "sgd-no-l1-no-masks": ("sgd", {"l1_coef": 0.0, "drop_p": 0.0}, 0.0),
    # scenario A's tuned setting (γ 0.5, no L1, no masks), then the masks added in each way SLIM offers
    "g0.5-no-masks": ("adam", {"gamma": 0.5, "l1_coef": 0.0, "drop_p": 0.0}, 0.0),
    "g0.5-masks": ("adam", {"gamma": 0.5, "l1_coef": 0.0}, 0.0),
    "g0.5-masks-p0.1": ("adam", {"gamma": 0.5, "l1_coef": 0.0, "drop_p": 0.1}, 0.0),
    "g0.5-masks-rows": ("adam", {"gamma": 0.5, "l1_coef": 0.0, "mask_split": "rows"}, 0.0),
    "g0.5-masks-columns": ("adam", {"gamma": 0.5, "l1_coef": 0.0, "mask_split": "columns"}, 0.0),
    "g0.5-masks-rescale": ("adam", {"gamma": 0.5, "l1_coef": 0.0, "mask_rescale": True}, 0.0),
    "g0.5-masks-update": ("adam", {"gamma": 0.5, "l1_coef": 0.0, "mask_mode": "update"}, 0.0),
}
MASK_STUDY = tuple(name for name in VARIANTS if name.startswith("g0.5"))
OPTIMIZERS = {"adam": Adam, "sgd": SGD}
EARLY_STEPS = (1, 2, 5, 10, 20)  # always recorded: A collapses (or not) within the first steps


def task_gradients(method, x, y, mask) -> tuple:
    """(task loss, [(dCE/dA, dCE/dB) per layer]) of one batch at the current parameters and masks.

    A second forward/backward of the cross-entropy alone; the layers' per-step state (cluster cache,
    diagnostics) is put back and the gradients cleared, so training goes on as if it never ran."""
    layers = method.layers()
    for p in method.trainable_parameters():
        p.grad = None  # (the previous step's gradients are still there; the runner clears them after loss())
    saved = [(layer._cache, layer.last_d, layer.last_identity_mass, layer.balance_loss) for layer in layers]
    with token_context(layers, token_mask=method.real_tokens(x)):
        _, ce = method.model(x, y, loss_mask=mask)
    ce.backward()
    grads = [tuple(np.zeros_like(p.data) if p.grad is None else p.grad.copy() for p in (layer.lora_A, layer.lora_B))
             for layer in layers]
    for p in method.trainable_parameters():
        p.grad = None
    for layer, state in zip(layers, saved):
        layer._cache, layer.last_d, layer.last_identity_mass, layer.balance_loss = state
    return ce.item(), grads


def _expert_norms(layer) -> tuple:
    A, B = layer.lora_A.data.astype(np.float64), layer.lora_B.data.astype(np.float64)
    delta = layer.scale * np.linalg.norm(np.einsum("eor,erd->eod", B, A), axis=(1, 2))
    return np.linalg.norm(A, axis=(1, 2)).mean(), np.linalg.norm(B, axis=(1, 2)).mean(), delta.mean()


class Recorder:
    """The SLIM Method as the runner sees it, recording the factors every `every` steps (and at
    EARLY_STEPS, and once after each task). `prox_l1` = λ > 0: after every optimizer step, A and B are
    soft-thresholded by lr·λ/(r·D) and lr·λ/(O·r), the L1 term's weights per entry (a proximal L1 step
    beside the optimizer; use it with l1_coef = 0)."""

    def __init__(self, method, every: int, prox_l1: float = 0.0):
        self.method, self.every, self.prox_l1 = method, every, prox_l1
        self.records, self.a0, self.step, self.task, self.optimizer, self.lr = [], None, 0, 0, None, None

    def __getattr__(self, name):  # everything else: the method itself
        if name == "method":
            raise AttributeError(name)
        return getattr(self.method, name)

    def record_now(self, step: int) -> bool:
        return step % self.every == 0 or step in EARLY_STEPS

    def before_task(self, task_id, steps, optimizer):
        self.task, self.step, self.optimizer = task_id, 0, optimizer
        self.method.before_task(task_id, steps, optimizer)
        if self.a0 is None:
            self.a0 = [_expert_norms(layer)[0] for layer in self.method.layers()]

    def loss(self, x, y, mask, rng=None):
        self.lr = float(self.optimizer.lr)  # this step's (the runner moves it on before after_step)
        loss = self.method.loss(x, y, mask, rng)  # draws this step's masks
        if self.record_now(self.step):
            self._record(x, y, mask)
        return loss

    def after_step(self, step, optimizer):
        if self.prox_l1:
            for layer in self.method.layers():
                for p in (layer.lora_A, layer.lora_B):
                    t = self.lr * self.prox_l1 / (p.shape[1] * p.shape[2])  # the L1 term's per-entry weight
                    p.data[...] = np.sign(p.data) * np.maximum(np.abs(p.data) - t, 0)
        self.method.after_step(step, optimizer)
        self.step = step + 1

    def after_task(self, task_id):
        self.method.after_task(task_id)
        self.lr = float(self.optimizer.lr)
        self._record(None, None, None)  # the trained factors (no batch: norms only)

    def _record(self, x, y, mask):
        layers = self.method.layers()
        row = {"task": self.task, "step": self.step, "lr": self.lr, "l1": float(l1_penalty(layers).item()),
               "task_loss": None, "layers": []}
        grads = unmasked = [None] * len(layers)
        if x is not None:
            row["task_loss"], grads = task_gradients(self.method, x, y, mask)
            real = self.method.real_tokens(x).reshape(-1)
            cfg = self.method.config
            if cfg.drop_p and cfg.mask_mode == "forward":  # the same batch and parameters without the masks
                row["task_loss_unmasked"], unmasked = _unmasked_gradients(self.method, x, y, mask)
        for layer, a0, g in zip(layers, self.a0, grads):
            a, b, delta = _expert_norms(layer)
            out = {"a_rel": a / a0, "b": b, "delta": delta}
            if g is not None:
                _, r, D = layer.lora_A.shape
                out.update(a_zero=float(np.mean(g[0] == 0)), b_zero=float(np.mean(g[1] == 0)),
                           a_l1_wins=float(np.mean(np.abs(g[0]) < SPEC_L1 / (r * D))),
                           experts_hit=float(np.mean(np.any(g[1] != 0, axis=(1, 2)))),
                           lora_share=float(1 - layer.last_identity_mass[real].mean()),
                           d=float(layer.last_d[real].mean()))
                if unmasked[0] is not None:
                    out["mask_cos"] = _cosine(g, unmasked[layers.index(layer)])
            row["layers"].append(out)
        self.records.append(row)


def _unmasked_gradients(method, x, y, mask) -> tuple:
    """task_gradients with every layer's masks off (p = 0 for the call), then the masks and config put back."""
    layers = method.layers()
    saved = [(layer.config, layer.in_mask, layer.out_mask) for layer in layers]
    for layer in layers:
        layer.config, layer.in_mask, layer.out_mask = dataclasses.replace(layer.config, drop_p=0.0), None, None
    try:
        return task_gradients(method, x, y, mask)
    finally:
        for layer, (cfg, in_mask, out_mask) in zip(layers, saved):
            layer.config, layer.in_mask, layer.out_mask = cfg, in_mask, out_mask


def _cosine(g, h):
    """cos between two (dA, dB) pairs taken as one vector; None when either is all zero."""
    a = np.concatenate([np.ravel(v) for v in g]).astype(np.float64)
    b = np.concatenate([np.ravel(v) for v in h]).astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return None if na == 0 or nb == 0 else float(a @ b / (na * nb))


def mask_removal(method, task, p: float = 0.3, draws: int = 20, seed: int = 0, batch: int = 32) -> list:
    """Per adapted layer: the share of the trained update's energy ‖Δ(X)‖² that p's masks remove (m^in
    alone, m^out alone, both; the mean over `draws` draws of the "both" split, from an RNG of its own),
    on the real tokens of a batch of `task`'s training inputs with the layer's own routing, and the LoRA
    gate share there. None where the update is 0 on that batch (no token routed to a trained expert)."""
    layers, rng = method.layers(), np.random.default_rng(seed)
    x = task.batch(batch, np.random.default_rng(seed))[0]
    saved = [(layer.config, layer.in_mask, layer.out_mask, layer._cache) for layer in layers]
    was_training = method.model.training
    for layer in layers:  # unmasked forward in training mode: each layer caches its real input tokens X
        layer.config, layer.in_mask, layer.out_mask = dataclasses.replace(layer.config, drop_p=0.0), None, None
    method.model.train()
    rows = []
    try:
        with no_grad(), token_context(layers, token_mask=method.real_tokens(x)):
            method.model(x)
            p_r, p_c = drop_probabilities(p)
            for layer in layers:
                X = Tensor(layer._cache[0])
                w, idx, _ = layer.route(layer.router_logits(X), layer.ood_score(X.data)[1])
                slot = np.where(idx < layer.E_L, idx, -1).astype(np.int32)
                full = mixture_lowrank(X, layer.lora_A, layer.lora_B, (slot, w), scale=layer.scale).data
                energy = float((full.astype(np.float64) ** 2).sum())
                row = {"lora_share": float(1 - np.where(idx >= layer.E_L, w.data, 0).sum(axis=1).mean())}
                for name, (q_r, q_c) in (("in", (0.0, p_c)), ("out", (p_r, 0.0)), ("both", (p_r, p_c))):
                    removed = []
                    for _ in range(draws):
                        out_mask = (rng.random((layer.E_L, layer.out_features)) >= q_r).astype(full.dtype)
                        in_mask = (rng.random((layer.E_L, layer.in_features)) >= q_c).astype(full.dtype)
                        masked = mixture_lowrank(X, layer.lora_A, layer.lora_B, (slot, w), scale=layer.scale,
                                                 in_mask=in_mask, out_mask=out_mask).data
                        removed.append(float(((full - masked).astype(np.float64) ** 2).sum()))
                    row[name] = float(np.mean(removed)) / energy if energy > 0 else None
                rows.append(row)
    finally:
        for layer, (cfg, in_mask, out_mask, cache) in zip(layers, saved):
            layer.config, layer.in_mask, layer.out_mask, layer._cache = cfg, in_mask, out_mask, cache
        method.model.train(was_training)
    return rows


def _accuracy_by_eval_mode(method, tasks) -> dict:
    """Mean accuracy on `tasks` with SLIM's three ways of evaluating a masked delta: "expected" (the
    default: no masks, c = 1 − p), "sampled" (fresh masks, c = 1: what training saw) and "full"
    (no masks, c = 1: the trained delta unscaled)."""
    layers, cfg = method.layers(), method.config
    modes = {"expected": {}, "sampled": {"eval_masks": "sampled"}, "full": {"mask_rescale": True}}
    out = {}
    for mode, change in modes.items():
        if cfg.drop_p == 0 and mode != "expected":
            continue  # all three are the same delta
        for layer in layers:
            layer.config = dataclasses.replace(cfg, **change)
        with method.evaluating():
            out[mode] = float(np.mean([evaluate_task(method.model, t) for t in tasks]))
    for layer in layers:
        layer.config = cfg
    return out


def slim_dynamics(base_model, variants=tuple(VARIANTS), tasks=("rev",),
                  steps: int = 600, seed: int = 100, every: int = 100, sgd_lr: float = 1.0,
                  config: ContinualConfig | None = None, progress: bool = False) -> dict:
    """Train SLIM in each variant through `tasks` (scenario A's quick settings unless `config` is given;
    its tasks and steps are replaced) and return {variant: {"optimizer", "lr", "overrides", "prox_l1",
    "records", "learned", "accuracy_by_eval_mode"}}. `sgd_lr`: the peak lr of the SGD variants."""
    from .suite import suite_configs

    config = dataclasses.replace(config or suite_configs("quick")["continual"], tasks=tuple(tasks), steps=steps)
    task_list = make_tasks(config.tasks, seed, config.n_train, config.n_test)
    out = {}
    for name in variants:
        opt_name, overrides, prox = VARIANTS[name]
        run_config = dataclasses.replace(config, lr=sgd_lr) if opt_name == "sgd" else config
        recorder = Recorder(build_method("slim", run_config, overrides), every, prox)
        result = run_continual(recorder, task_list, run_config, base_model, seed, progress=progress,
                               optimizer_class=OPTIMIZERS[opt_name])
        out[name] = {"optimizer": opt_name, "lr": run_config.lr, "overrides": overrides, "prox_l1": prox,
                     "config": jsonable(dataclasses.asdict(recorder.method.config)),
                     "records": recorder.records, "learned": result["learning_acc"],
                     "final_loss": [t["final_loss"] for t in result["train_log"]],  # last 10% of steps, per task
                     "accuracy_by_eval_mode": _accuracy_by_eval_mode(recorder.method, task_list[-1:]),
                     "mask_removal": mask_removal(recorder.method, task_list[-1])}
    return out


def _mean(row, key):
    values = [layer[key] for layer in row["layers"] if key in layer]
    return float(np.mean(values)) if values else None


def format_table(runs: dict) -> str:
    """One line per record (means over the adapted layers), then one summary line per variant."""
    def f(v, fmt):
        return "-" if v is None else fmt.format(v)

    w = max(20, *(len(name) + 1 for name in runs))
    head = (f"{'variant':<{w}}{'task':>5}{'step':>6}{'task loss':>10}{'λ·L1':>9}{'|A|/|A0|':>9}{'|B|':>8}"
            f"{'|sBA|':>8}{'A g=0':>7}{'A L1>g':>7}{'LoRA':>6}")
    lines = ["means over the adapted layers; |A|/|A0|: expert norm of A relative to its init; A g=0: share of A's "
             "entries with task gradient exactly 0; A L1>g: share where |task gradient| < λ_spec/(r·D); LoRA: "
             "gate mass on LoRA experts", head]
    for name, run in runs.items():
        lam = run["config"]["l1_coef"]
        for row in run["records"]:
            lines.append(f"{name:<{w}}{row['task']:>5}{row['step']:>6}{f(row['task_loss'], '{:.3f}'):>10}"
                         f"{lam * row['l1']:>9.5f}{_mean(row, 'a_rel'):>9.3f}{_mean(row, 'b'):>8.3f}"
                         f"{_mean(row, 'delta'):>8.3f}{f(_mean(row, 'a_zero'), '{:.0%}'):>7}"
                         f"{f(_mean(row, 'a_l1_wins'), '{:.0%}'):>7}{f(_mean(row, 'lora_share'), '{:.2f}'):>6}")
    lines += ["", "end of training: |A|/|A0|, |sBA| (means over layers); loss: mean training loss over the last "
              "10% of the steps (of the last task); learned: mean accuracy right after each task",
              f"{'variant':<{w}}{'opt':>5}{'lr':>6}{'γ':>4}{'λ_L1':>7}{'prox λ':>7}{'p':>5}{'|A|/|A0|':>9}"
              f"{'|sBA|':>7}{'loss':>7}{'learned':>8}  accuracy by evaluation: expected / sampled / full"]
    for name, run in runs.items():
        cfg, last = run["config"], run["records"][-1]
        acc = " / ".join(f"{k} {100 * v:.0f}" for k, v in run["accuracy_by_eval_mode"].items())
        lines.append(f"{name:<{w}}{run['optimizer']:>5}{run['lr']:>6g}{cfg['gamma']:>4g}{cfg['l1_coef']:>7g}"
                     f"{run['prox_l1']:>7g}{cfg['drop_p']:>5g}{_mean(last, 'a_rel'):>9.3f}{_mean(last, 'delta'):>7.2f}"
                     f"{run['final_loss'][-1]:>7.3f}{100 * run['learned']:>8.1f}  {acc}")
    return "\n".join(lines)


def format_masks(runs: dict) -> str:
    """The mask study: per variant, learned and the final loss; the share of the trained update's energy that
    p 0.3's masks remove (mean over the layers whose update is not 0: m^in, m^out, both), the number of
    layers whose LoRA experts get no token of the batch, and (forward masks) the mean cosine between the
    masked and the unmasked task gradient at each recorded step."""
    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    w = max(20, *(len(name) + 1 for name in runs))
    lines = [f"{'variant':<{w}}{'learned':>8}{'loss':>7}{'rm in':>7}{'rm out':>7}{'rm both':>8}{'starved':>8}"
             "  cos(masked, unmasked task gradient) by step"]
    for name, run in runs.items():
        removal = run.get("mask_removal") or []
        rm = {k: mean([r[k] for r in removal]) for k in ("in", "out", "both")}
        starved = sum(r["both"] is None for r in removal)
        cos = [(row["step"], mean([layer.get("mask_cos") for layer in row["layers"]])) for row in run["records"]
               if any("mask_cos" in layer for layer in row["layers"])]
        cells = "".join("{:>7}".format("-" if rm[k] is None else f"{rm[k]:.2f}") for k in ("in", "out"))
        lines.append(f"{name:<{w}}{100 * run['learned']:>8.1f}{run['final_loss'][-1]:>7.3f}{cells}"
                     f"{'-' if rm['both'] is None else format(rm['both'], '.2f'):>8}{starved:>8}  "
                     + " ".join(f"{step}:{'-' if c is None else format(c, '.2f')}" for step, c in cos))
    return "\n".join(lines)


def format_layers(runs: dict, names: list | None = None) -> str:
    """Per adapted layer (columns), per variant: the mean over the records of d and of the LoRA gate share,
    the mean share of A's entries with task gradient exactly 0 (records after step 0), and |A|/|A0| at the end."""
    names = names or [f"h{i}.{m}" for i in range(99) for m in ("attn", "fc", "proj")]
    n = len(next(iter(runs.values()))["records"][0]["layers"])
    lines = ["per layer (h<block>.attn = attn.c_attn, .fc = mlp.c_fc, .proj = mlp.c_proj)",
             f"{'':<34}" + "".join(f"{name:>9}" for name in names[:n])]
    for name, run in runs.items():
        rows = [r for r in run["records"] if r["task_loss"] is not None]
        for key, label, fmt, recs in (("d", "d", "{:9.1f}", rows), ("lora_share", "LoRA share", "{:9.2f}", rows),
                                      ("a_zero", "A g=0", "{:9.2f}", rows[1:]),
                                      ("a_rel", "|A|/|A0| end", "{:9.2f}", run["records"][-1:])):
            values = np.mean([[layer[key] for layer in r["layers"]] for r in recs], axis=0)
            lines.append(f"{name + ' ' + label:<34}" + "".join(fmt.format(v) for v in values))
    return "\n".join(lines)


def _tables(runs: dict, args) -> str:
    text = format_table(runs) + ("\n\n" + format_layers(runs) if args.layers else "")
    if any(run.get("mask_removal") for run in runs.values()):
        text += "\n\n" + format_masks(runs)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinyslim.experiments.slim_dynamics",
                                     description="SLIM's LoRA factors step by step, per variant (see "
                                                 "docs/slim_dynamics.md)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per task (quick size: 600)")
    parser.add_argument("--seed", type=int, default=100, help="run seed (default 100, a tuning seed)")
    parser.add_argument("--tasks", default="rev", help="comma-separated task sequence (quick size: rev,cap,sft)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--every", type=int, default=100, help="record every this many steps (and at steps "
                                                                f"{', '.join(map(str, EARLY_STEPS))})")
    parser.add_argument("--sgd-lr", type=float, default=1.0, help="peak learning rate of the SGD variants")
    parser.add_argument("--mask-study", action="store_true", help="the variants that add masks to scenario A's "
                        f"tuned setting ({', '.join(MASK_STUDY)}) and their table")
    parser.add_argument("--json", metavar="OUT", help="write every record (per layer) to this JSON file")
    parser.add_argument("--layers", action="store_true", help="also the per-layer table")
    parser.add_argument("--from-json", metavar="IN", help="print the tables of a saved --json file (no training)")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as fh:
            runs = json.load(fh)["runs"]
        print(_tables(runs, args))
        return 0
    variants = list(MASK_STUDY) if args.mask_study else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")

    from ..pretrained import load_base

    model = load_base(progress=False)
    runs = slim_dynamics(model, variants, tuple(t.strip() for t in args.tasks.split(",")), args.steps, args.seed,
                         args.every, args.sgd_lr, progress=args.progress)
    print(_tables(runs, args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(jsonable({"args": vars(args), "runs": runs}), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
