"""Scenario A: continual fine-tuning through a sequence of tasks, and what it forgets.

``run_continual`` copies the base model, lets a method attach its adapters, and trains through the
tasks in order with the method's hooks, knowing no method by name:

    for task k = 0..T−1:
        reset Adam (moments and step count); lr ← schedule(0); method.before_task(k, steps, opt)
        for each step s: batch of task k → method.loss → backward → clip → Adam step →
                         lr ← schedule(s + 1) → method.after_step(s, opt)
        method.after_task(k)
        for every learner of the method (I-LoRA: slow, fast):
            R[k][j] = exact-match accuracy on the test split of every task j
            general capability: held-out pydoc loss, next-character accuracy, top-1 agreement with
            the base model, held-out-template fact recall

The optimiser state is reset at every task boundary for every method: carrying Adam's moments
into a new task wrecks plasticity (docs/experiments.md, "Calibration notes"). The learning rate follows one
schedule within each task for every method (linear decay to 0 by default); the runner sets it
*before* the hooks, so a method that owns its learning rate (COLA, whose default schedule is this same
line) has the last word. Metrics: metrics.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..adapters.base import stream
from ..io import CheckpointError, jsonable, load_checkpoint, save_checkpoint
from ..optim import LRScheduler
from ..tasks import DEFAULT_TASKS, TASKS, Task, evaluate_task, make_tasks
from . import metrics
from .engine import NUMPY, get_engine

__all__ = ["ContinualConfig", "GeneralEval", "run_continual", "build_method", "run_methods", "methods_doc",
           "method_overrides", "parity_rank", "aggregate", "format_results"]


@dataclass
class ContinualConfig:
    """Settings of scenario A, shared by every method so that only the method differs.

    Calibrated on the shipped tiny base so that plain Seq-LoRA learns every task to >= 90% right
    after training on it and then clearly forgets it; what was measured: docs/experiments.md,
    "Calibration notes"."""

    tasks: tuple[str, ...] = DEFAULT_TASKS  # the sequence, in training order
    steps: int = 800  # optimiser steps per task
    batch_size: int = 16
    lr: float = 4e-3  # Adam's peak learning rate (Adam is reset at every task boundary)
    lr_schedule: str = "linear"  # within each task: "linear" decay to 0 (COLA's global schedule), "cosine", "constant"
    warmup_steps: int = 0  # linear warm-up at each task start (keep 0: COLA reads the peak lr at step 0)
    grad_clip: float | None = 1.0  # global gradient-norm clip; None = off
    # the adapter shape every method gets (a method's own defaults are overridden for a fair race)
    rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")
    # data and evaluation
    n_train: int = 2000  # examples per task (train split); test split: n_test
    n_test: int = 200
    eval_batches: int = 4  # held-out pydoc windows for general capability: eval_batches × eval_batch_size
    eval_batch_size: int = 32
    fact_recall: bool = True  # also measure held-out-template fact recall (about a second per evaluation)

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        self.target_modules = tuple(self.target_modules)
        for name in ("steps", "batch_size", "rank", "n_train", "n_test", "eval_batches", "eval_batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise ValueError(f"ContinualConfig.{name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"ContinualConfig.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or (self.grad_clip is not None and not self.grad_clip > 0):
            raise ValueError(f"ContinualConfig: warmup_steps must be >= 0 and grad_clip > 0 or None, got "
                             f"{self.warmup_steps} and {self.grad_clip}")
        if self.lr_schedule not in LRScheduler.SCHEDULES:
            raise ValueError(f"ContinualConfig.lr_schedule must be one of {sorted(LRScheduler.SCHEDULES)}, "
                             f"got {self.lr_schedule!r}")
        if not self.tasks:
            raise ValueError("ContinualConfig.tasks is empty; name at least one task")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"ContinualConfig.tasks: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")

    def method_defaults(self) -> dict:
        """The settings every method gets (each takes those its config has; see build_method)."""
        from ..data import PAD_ID
        return {"r": self.rank, "lora_alpha": self.lora_alpha, "target_modules": list(self.target_modules),
                "pad_token_id": PAD_ID}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- general capability ---------------------------------------------------------------------------

class GeneralEval:
    """What fine-tuning forgets, measured against the base model on fixed held-out data.

    val_loss (nats/char) and next_char_acc on held-out pydoc windows; agreement = fraction of those
    positions where the model's top-1 next character equals the base model's; fact_recall = greedy
    exact recall of the knowledge corpus's held-out templates. The pydoc split and the knowledge base
    use seed 0, the base model's pretraining seed, whatever the run's seed.
    """

    def __init__(self, base_model, config: ContinualConfig):
        from ..data import CharTokenizer, PretrainData

        data = PretrainData(block_size=base_model.config.block_size, seed=0)
        self.batches = data.val_batches(config.eval_batch_size, config.eval_batches)
        self.kb = data.kb if config.fact_recall else None
        self.tokenizer = CharTokenizer()
        self.base_top1 = None
        self.base = self.measure(base_model)  # also records the base's top-1 predictions

    def measure(self, model) -> dict:
        from ..evaluate import knowledge_recall, no_grad_for, to_numpy

        was_training = model.training
        model.eval()
        losses, hits, agree, total, top1s = [], 0, 0, 0, []
        with no_grad_for(model):  # one forward per batch gives loss, accuracy and agreement together
            for b, (x, y) in enumerate(self.batches):
                logits, loss = model(x, y)
                top1 = to_numpy(logits).argmax(-1)
                losses.append(loss.item())
                hits += int((top1 == y).sum())
                agree += int((top1 == (self.base_top1[b] if self.base_top1 else top1)).sum())
                total += y.size
                top1s.append(top1)
        if self.base_top1 is None:
            self.base_top1 = top1s
        out = {"val_loss": float(np.mean(losses)), "next_char_acc": hits / total, "agreement": agree / total}
        if self.kb is not None:
            out["fact_recall"] = knowledge_recall(model, self.kb, self.tokenizer, "heldout")
        model.train(was_training)
        return out


# ---- the runner -------------------------------------------------------------------------------------

def run_continual(method, tasks: list[Task], config: ContinualConfig, base_model, seed: int = 0,
                  progress: bool = True, general: GeneralEval | None = None, checkpoint=None,
                  checkpoint_every: int | None = 100, resume: bool = True, diagnose=None,
                  optimizer_class=None, engine=None) -> dict:
    """Train `method` through `tasks` in order on a copy of `base_model`; return the result dict.

    engine: "numpy" (default), "torch" or an Engine (experiments/engine.py): the model is made from the
    NumPy `base_model` by the engine (torch: a GPT2LMHeadModel with its weights) and `method` must be of
    that engine (tinyslim.torch.make_method for torch; build_method(..., engine=) makes either).

    optimizer_class: what trains the adapters, made as optimizer_class(params, lr=config.lr); the engine's
    Adam (docs/methods.md §0) unless a study swaps it (slim_dynamics.py runs SLIM under SGD too).

    diagnose: an optional ``fn(method, tasks) -> dict`` called on the trained method after the last
    task (e.g. SLIM's routing shares); what it returns is stored as result["diagnostics"].

    general: a GeneralEval to reuse across runs (it holds the base model's measurements).
    checkpoint: a file path; the run state (the method's state_dict, Adam's state, the position (task, step),
    the results so far and the runner's RNG streams) is written there atomically at every task boundary and
    every `checkpoint_every` steps (None: at boundaries only). If the file exists (and `resume`), the run
    goes on from it and ends bit-identical to an uninterrupted run (same backend and thread count); a
    checkpoint of another config, method, seed, base model or task data is a CheckpointError naming the
    differing fields. resume=False starts over (and overwrites the file)."""
    t_start = time.perf_counter()
    block = base_model.config.block_size
    if any(t.seq_len > block for t in tasks):
        raise ValueError(f"task lines need {max(t.seq_len for t in tasks)} positions but the model's block_size "
                         f"is {block}; use a model with a larger block_size")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, (int, np.integer)) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be an int >= 1 or None, got {checkpoint_every!r}")
    engine = get_engine(engine)
    optimizer_class = optimizer_class or engine.optimizer_class
    identity = _run_identity(method, tasks, config, base_model, seed) if checkpoint is not None else None
    if identity is not None and optimizer_class is not engine.optimizer_class:  # (Adam runs keep their identity)
        identity["optimizer"] = optimizer_class.__name__
    if identity is not None and engine is not NUMPY:  # (NumPy runs keep their old identity)
        identity["engine"] = engine.name
    general = general or GeneralEval(engine.view(base_model), config)
    run = _Run(method, tasks, config, base_model, seed, general, optimizer_class, progress, t_start, engine)
    if checkpoint is not None and resume and Path(checkpoint).exists():
        run.resume(checkpoint, identity)
    save_every = checkpoint_every if checkpoint is not None else None
    for k in range(run.start_task, len(tasks)):
        run.train_task(k, save=lambda k, step: run.save(checkpoint, identity, k, step), save_every=save_every)
        run.evaluate(k)
        if checkpoint is not None:
            run.losses = []
            run.save(checkpoint, identity, k + 1, 0)  # the boundary: task k trained and evaluated
    return run.result(diagnose)


class _Run:
    """One scenario-A run's state, in the steps run_continual takes: resume, train a task, evaluate
    after it, save, and the result document."""

    def __init__(self, method, tasks, config: ContinualConfig, base_model, seed: int, general: GeneralEval,
                 optimizer_class, progress: bool, t_start: float, engine=NUMPY):
        self.method, self.tasks, self.config, self.seed, self.general = method, tasks, config, seed, general
        self.progress, self.t_start, self.engine = progress, t_start, engine
        self.model = engine.model(base_model)  # a copy: the caller's model is never touched
        self.model.train()
        method.attach(self.model, seed)
        self.params = list(method.trainable_parameters())
        self.optimizer = optimizer_class(self.params, lr=config.lr)
        self.learners = list(method.learners())
        T = len(tasks)
        self.R = {name: np.zeros((T, T)) for name in self.learners}
        self.general_rows = {name: [] for name in self.learners}
        self.train_log, self.eval_s, self.losses = [], 0.0, []
        # the runner's own streams (docs/methods.md §0); the method draws from its own (init, reservoir, …)
        self.data_rng, self.step_rng = stream(seed, "runner/data"), stream(seed, "runner/model-dropout")
        self.schedule = LRScheduler.SCHEDULES[config.lr_schedule]
        self.start_task, self.start_step, self.elapsed_before = 0, 0, 0.0

    def resume(self, checkpoint, identity: dict) -> None:
        """Restore the method, the optimizer and the runner's state from a run checkpoint."""
        from tqdm.auto import tqdm

        runner = _load_run_checkpoint(checkpoint, identity, self.method, self.optimizer)
        self.start_task, self.start_step = runner["position"]
        T = len(self.tasks)
        for name in self.learners:
            self.R[name][:self.start_task] = np.array(runner["R"][name], dtype=float).reshape(self.start_task, T)
            self.general_rows[name] = list(runner["general"][name])
        self.train_log, self.losses = list(runner["train_log"]), list(runner["losses"])
        self.eval_s, self.elapsed_before = float(runner["eval_s"]), float(runner["elapsed_s"])
        self.data_rng.bit_generator.state = runner["data_rng"]
        self.step_rng.bit_generator.state = runner["step_rng"]
        self.optimizer.lr = runner["lr"]
        if self.progress:
            tqdm.write(f"{self.method.name}: resuming from {checkpoint} at task {self.start_task + 1}/{T}, step "
                       f"{self.start_step}/{self.config.steps}")

    def save(self, checkpoint, identity: dict, task_k: int, step: int) -> None:
        arrays, meta = self.method.state_dict()
        tensors = {**{f"method.{k}": v for k, v in arrays.items()},
                   **{f"optim.{k}": v for k, v in self.optimizer.state_dict().items()}}
        runner = {"position": [task_k, step], "lr": float(self.optimizer.lr),
                  "losses": [float(v) for v in self.losses],
                  "R": {name: self.R[name][:task_k].tolist() for name in self.learners},
                  "general": self.general_rows, "train_log": self.train_log, "eval_s": self.eval_s,
                  "elapsed_s": self.elapsed_before + time.perf_counter() - self.t_start,
                  "data_rng": self.data_rng.bit_generator.state, "step_rng": self.step_rng.bit_generator.state}
        save_checkpoint(checkpoint, tensors, {"kind": "continual", "version": 1, "identity": identity,
                                              "method_state": meta, "runner": jsonable(runner)})

    def train_task(self, k: int, save, save_every: int | None) -> None:
        """Task k's steps (from where a resumed run stopped), then the method's after_task and the loss log."""
        from tqdm.auto import tqdm

        method, optimizer, config, task = self.method, self.optimizer, self.config, self.tasks[k]
        first = self.start_step if k == self.start_task else 0
        if first == 0:  # a fresh task (a resumed one has its optimizer, lr, method and losses restored)
            self.losses = []
            optimizer.reset_state()  # every method, every boundary (carried Adam state wrecks plasticity)
            optimizer.lr = self.schedule(0, config.steps, config.lr, config.warmup_steps)
            method.before_task(k, config.steps, optimizer)
        bar = tqdm(range(first, config.steps), total=config.steps, initial=first, disable=not self.progress,
                   leave=False, unit="step", desc=f"{method.name} {k + 1}/{len(self.tasks)} {task.name}")
        for step in bar:
            x, y, mask = task.batch(config.batch_size, self.data_rng)
            loss = method.loss(x, y, mask, self.step_rng)
            optimizer.zero_grad()
            loss.backward()
            if config.grad_clip:
                self.engine.clip_grad_norm_(self.params, config.grad_clip)
            optimizer.step()
            optimizer.lr = self.schedule(step + 1, config.steps, config.lr, config.warmup_steps)
            method.after_step(step, optimizer)
            self.losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{self.losses[-1]:.3f}")
            if save_every is not None and (step + 1) % save_every == 0 and step + 1 < config.steps:
                save(k, step + 1)
        bar.close()
        method.after_task(k)
        losses = self.losses
        curve = [float(np.mean(c)) for c in np.array_split(losses, min(10, len(losses)))]  # 10 chunk means
        self.train_log.append({"task": task.name, "first_loss": losses[0], "final_loss": curve[-1],
                               "loss_curve": curve})

    def evaluate(self, k: int) -> None:
        """Row k of every learner's accuracy matrix and its general capability."""
        from tqdm.auto import tqdm

        t_eval = time.perf_counter()
        for name in self.learners:
            with self.method.evaluating(name):
                self.R[name][k] = [evaluate_task(self.model, t) for t in self.tasks]
                self.general_rows[name].append(self.general.measure(self.model))
        self.eval_s += time.perf_counter() - t_eval
        if self.progress:
            first = self.learners[0]
            row = "  ".join(f"{t.name} {self.R[first][k, j]:.0%}" for j, t in enumerate(self.tasks))
            tqdm.write(f"{self.method.name} after {self.tasks[k].name}: {row}  (pydoc loss "
                       f"{self.general_rows[first][-1]['val_loss']:.2f})")

    def result(self, diagnose) -> dict:
        """The run's result document (see run_continual)."""
        learners, general = self.learners, self.general
        per_learner = {}
        for name in learners:
            final = self.general_rows[name][-1]
            per_learner[name] = {
                "acc_matrix": self.R[name].tolist(),
                **metrics.summarize(self.R[name]),
                "general": self.general_rows[name],
                "general_loss_increase": final["val_loss"] - general.base["val_loss"],
            }
        diagnostics = jsonable(diagnose(self.method, self.tasks)) if diagnose is not None else None
        wall = self.elapsed_before + time.perf_counter() - self.t_start
        return {
            "method": self.method.name,
            "describe": jsonable(self.method.describe()),
            "seed": self.seed,
            "tasks": [t.name for t in self.tasks],
            "learners": learners,
            "reported_learner": learners[0],
            **{k: per_learner[learners[0]][k] for k in ("acc", "bwt", "learning_acc", "forgetting",
                                                        "general_loss_increase")},
            "final_general": per_learner[learners[0]]["general"][-1],
            "by_learner": per_learner,
            "base_general": general.base,
            "trainable_params": int(sum(self.engine.param_count(p) for p in self.params)),
            "train_log": self.train_log,
            "optimizer_reset_per_task": True,
            "wall_s": wall,
            "train_s": wall - self.eval_s,
            "eval_s": self.eval_s,
            "config": self.config.to_dict(),
            **({"diagnostics": diagnostics} if diagnostics is not None else {}),
        }


# ---- checkpoints of a run ---------------------------------------------------------------------------

def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _run_identity(method, tasks, config, base_model, seed) -> dict:
    """What a checkpoint must agree on to be resumed: the scenario config, the method and its config, the
    seed, the tasks (names and data), the base model (config and weights)."""
    state = base_model.state_dict()
    return jsonable({
        "config": config.to_dict(),
        "method": method.name,
        "method_config": dataclasses.asdict(method.config),
        "seed": int(seed),
        "tasks": [t.name for t in tasks],
        "task_data_sha256": _digest(a for t in tasks for a in getattr(t, "_train_arrays", ())),
        "model_config": base_model.config.to_dict(),
        "base_model_sha256": _digest(state[k] for k in sorted(state)),
    })


def _identity_diff(saved: dict, ours: dict) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(ours)):
        a, b = saved.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: checkpoint {a!r} vs now {b!r}")
    return out


def _load_run_checkpoint(path, identity: dict, method, optimizer) -> dict:
    """Check a run checkpoint against this run and load the method's and the optimizer's state; returns
    the runner's part of the meta. Every problem is a CheckpointError naming the file."""
    arrays, meta = load_checkpoint(path)
    if meta.get("kind") != "continual":
        raise CheckpointError(f"checkpoint {path} holds a {meta.get('kind')!r}, not a `run continual` state")
    differ = _identity_diff(meta.get("identity") or {}, identity)
    if differ:
        raise CheckpointError(f"cannot resume from {path}: it was made for another run ({'; '.join(differ)}); "
                              "use the same settings, or start over (resume=False / another run directory)")
    try:
        method.load_state_dict({k[len("method."):]: v for k, v in arrays.items() if k.startswith("method.")},
                               meta["method_state"])
        optimizer.load_state_dict({k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")})
        runner = meta["runner"]
        runner["position"] = [int(v) for v in runner["position"]]
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this run: {type(err).__name__}: {err}") from None
    return runner




# ---- several methods and seeds -------------------------------------------------------------------

def build_method(name: str, config: ContinualConfig, overrides: dict | None = None, engine=None):
    """make_method(name) with the scenario's shared settings (those fields its config has), then the
    user's overrides on top (an unknown field there is an error). SLIM's ablation rows
    ("slim-no-identity", "slim-no-yielding", "slim-no-masks", …) are names too.
    engine: "numpy" (default) or "torch": whose method class is made."""
    engine = get_engine(engine)
    METHODS, make_method = engine.methods, engine.make_method
    SLIM_ABLATIONS, make_slim_ablation = engine.ablations, engine.make_ablation

    rank = parity_rank(name)
    if rank is not None:  # "lora-r35": plain LoRA at rank 35, same scale α/r as every method
        overrides = {"r": rank, "lora_alpha": config.lora_alpha / config.rank * rank, **(overrides or {})}
        name = "lora"
    if name not in METHODS and name not in SLIM_ABLATIONS:
        raise ValueError(f"unknown method {name!r}{'' if engine is NUMPY else ' on the ' + engine.name + ' engine'}; "
                         f"valid names are {sorted(METHODS)}, SLIM's ablation rows "
                         f"{sorted(set(SLIM_ABLATIONS) - set(METHODS))} and lora-r<N> (LoRA at rank N)")
    cls = METHODS.get(name) or METHODS["slim"]
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    shared = {k: v for k, v in config.method_defaults().items() if k in fields}
    if name in METHODS:
        return make_method(name, **{**shared, **(overrides or {})})
    return make_slim_ablation(name, **{**shared, **(overrides or {})})


def parity_rank(name: str) -> int | None:
    """N for a row named "lora-r<N>" (plain LoRA at rank N, the parameter-matched baseline of a mixture
    method), else None."""
    import re

    match = re.fullmatch(r"lora-r([1-9][0-9]*)", name)
    return int(match.group(1)) if match else None


def method_overrides(specs: list[str], methods: list[str]) -> dict[str, dict]:
    """["ilora.ema_lambda=0.99", "r=4"] → {"ilora": {"ema_lambda": 0.99}, "lora": {"r": 4}, …}; a
    key without "method." applies to every method. Values are Python literals, else strings."""
    import ast

    out: dict[str, dict] = {m: {} for m in methods}
    for spec in specs:
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"method argument {item!r} is not of the form [method.]field=value")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
            where, dot, name = key.rpartition(".")
            targets = [where] if dot else methods
            for m in targets:
                if m not in out:
                    raise ValueError(f"method argument {item!r} names method {m!r}, which is not among "
                                     f"the methods run ({', '.join(methods)})")
                out[m][name] = value
    return out


def run_methods(methods: list[str], config: ContinualConfig, seeds: list[int], base_model,
                overrides: dict[str, dict] | None = None, progress: bool = True, checkpoint_dir=None,
                checkpoint_every: int | None = 100, resume: bool = True, diagnose: dict | None = None,
                engine=None) -> dict:
    """Every method on every seed (one shared base measurement); the JSON document of the run:
    config, per-seed results, and the mean ± std summary per method. engine: "numpy" (default) or "torch".

    diagnose: {method name: fn(method, tasks) -> dict}, see run_continual.

    checkpoint_dir: each (method, seed) run checkpoints to "<dir>/<method>-seed<seed>.safetensors" (see
    run_continual); with `resume`, finished runs are read back and an interrupted one goes on."""
    overrides, engine = overrides or {}, get_engine(engine)
    for name in methods:  # fail on a bad name or field before any training
        build_method(name, config, overrides.get(name), engine)
    general = GeneralEval(engine.view(base_model), config)
    results: dict[str, list] = {name: [] for name in methods}
    for seed in seeds:
        tasks = make_tasks(config.tasks, seed, config.n_train, config.n_test)
        for name in methods:
            method = build_method(name, config, overrides.get(name), engine)
            path = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{name}-seed{seed}.safetensors"
            results[name].append(run_continual(method, tasks, config, base_model, seed, progress, general,
                                               checkpoint=path, checkpoint_every=checkpoint_every, resume=resume,
                                               diagnose=(diagnose or {}).get(name), engine=engine))
    doc = methods_doc(config, seeds, overrides, results)
    if engine is not NUMPY:  # (NumPy documents keep their old keys)
        doc["engine"] = engine.name
    return doc


def methods_doc(config: ContinualConfig, seeds: list[int], overrides: dict, results: dict[str, list]) -> dict:
    """The JSON document of a scenario-A run from its per-method, per-seed results (see run_methods)."""
    first = next(iter(results.values()))[0]
    return {"scenario": "continual", "config": config.to_dict(), "methods": list(results), "seeds": list(seeds),
            "method_overrides": jsonable(overrides), "optimizer_reset_per_task": True,
            "base_general": first["base_general"], "results": results,
            "summary": {name: aggregate(runs) for name, runs in results.items()}}


def aggregate(runs: list[dict]) -> dict:
    """Mean ± std over seeds of one method's headline numbers, plus the mean accuracy matrix."""
    keys = ("acc", "bwt", "learning_acc", "forgetting", "general_loss_increase", "wall_s")
    out = {k: metrics.mean_std([r[k] for r in runs]) for k in keys}
    for k in runs[0]["final_general"]:
        out[k] = metrics.mean_std([r["final_general"][k] for r in runs])
    out["other_learners"] = {  # ACC / BWT of the learners not reported (I-LoRA's fast one)
        name: {k: metrics.mean_std([r["by_learner"][name][k] for r in runs]) for k in ("acc", "bwt")}
        for name in runs[0]["learners"][1:]}
    out["acc_matrix"] = np.mean([r["by_learner"][r["reported_learner"]]["acc_matrix"] for r in runs], 0).tolist()
    out["trainable_params"] = runs[0]["trainable_params"]
    out["n_seeds"] = len(runs)
    return out


def format_results(summary: dict[str, dict], tasks: list[str], base: dict) -> str:
    """The scenario-A table (one row per method, mean ± std when several seeds) and the matrices."""
    def ms(pair, scale=1.0, fmt="{:.1f}"):
        m, sd = pair
        return fmt.format(m * scale) + (f"±{fmt.format(sd * scale)}" if several else "")

    several = any(s["n_seeds"] > 1 for s in summary.values())
    w = max(8, *(len(name) for name in summary))  # the method column fits the longest name
    lines = [f"base model: pydoc val loss {base['val_loss']:.3f} nats/char, next-char acc "
             f"{base['next_char_acc']:.1%}" + (f", fact recall {base['fact_recall']:.1%}" if "fact_recall" in base else ""),
             "ACC, BWT, learned (mean diagonal) in points; val loss, next-char acc, agreement with the base and "
             "fact recall after the last task; Adam state reset at every task boundary",
             f"{'method':<{w}} {'ACC':>11} {'BWT':>12} {'learned':>11} {'val loss':>11} {'next-char':>10} "
             f"{'agree':>10} {'facts':>10} {'params':>8} {'time s':>8}"]
    for name, s in summary.items():
        facts = ms(s["fact_recall"], 100) if "fact_recall" in s else "-"
        lines.append(f"{name:<{w}} {ms(s['acc'], 100):>11} {ms(s['bwt'], 100):>12} {ms(s['learning_acc'], 100):>11} "
                     f"{ms(s['val_loss'], fmt='{:.2f}'):>11} {ms(s['next_char_acc'], 100):>10} "
                     f"{ms(s['agreement'], 100):>10} {facts:>10} {s['trainable_params']:>8,} "
                     f"{ms(s['wall_s'], fmt='{:.0f}'):>8}")
        for learner, o in s["other_learners"].items():
            lines.append(f"  └ {learner} learner: ACC {ms(o['acc'], 100)}, BWT {ms(o['bwt'], 100)}")
    for name, s in summary.items():
        lines.append(f"\n{name}: R[i][j] = accuracy (%) on task j after training through task i"
                     + (f" (mean of {s['n_seeds']} seeds)" if s["n_seeds"] > 1 else ""))
        lines.append("after    " + "".join(f"{t:>6}" for t in tasks))
        for t, row in zip(tasks, s["acc_matrix"]):
            lines.append(f"{t:<9}" + "".join(f"{100 * v:6.0f}" for v in row))
    return "\n".join(lines)
