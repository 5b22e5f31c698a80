"""Scenario B: composing K frozen single-task LoRAs (MoLE against NLA and the unnormalised sum).

``run_composition`` does, on copies of the base model (the caller's model is never touched):

    1. sources   for each of the K tasks, a fresh plain LoRA trained on that task alone (scenario A's
                 runner, ``run_continual`` with a one-task sequence); then frozen
    2. compose   lora_sum   W = W0 + Σ_i s_i B_i A_i                     (nothing trains)
                 nla        W = W0 + (1/K) Σ_i s_i B_i A_i               (nothing trains)
                 mole       per-layer gates G = softmax(eᵀ LN([u_1; …; u_K]) / τ), L = CE + 0.5·L_bal,
                            U averaged over the line's prefix up to each token (gate_pool="prefix")
                 mole_nobal the same gates trained with CE only (balance_coef = 0)
                 MoLE trains only (e, ρ), on a small mixed set: the first ``mix_fraction`` of every
                 task's training split, shuffled together (Adam, reset once, linear decay).
    3. evaluate  exact-match accuracy on the test split of every task (the union), per task and mean;
                 general capability (held-out pydoc loss, next-char accuracy, top-1 agreement with the
                 base, held-out fact recall: continual.GeneralEval); each single source LoRA on every task
    4. gates     per MoLE variant: the mean gate per adapted layer on each task's test lines
                 (``Mole.gate_means``), the largest mean gate share max_i q_i (q_i = mean of G_i over
                 every gate and token of the union), the entropy of q and the mean per-token entropy
    5. masking   MoLE with LoRA j masked out (G'_i = G_i·1[i≠j] / Σ_{l≠j} G_l, no retraining): the
                 other tasks should keep their score and task j should drop; and MoLE with only LoRA j
                 kept, which is LoRA j alone (docs/methods.md §4.8, invariant 1)

Everything returned is JSON-serialisable. Shape legend: B batch, T time, K source LoRAs.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from ..adapters.base import stream
from ..io import jsonable
from ..optim import Adam, LRScheduler, clip_grad_norm_
from ..tasks import Task, encode_examples, evaluate_task, make_tasks
from .continual import ContinualConfig, GeneralEval, build_method, run_continual

__all__ = ["CompositionConfig", "COMPOSERS", "run_composition", "format_composition", "train_sources", "compose",
           "train_mole", "evaluate_composed", "masking_demo", "gate_statistics", "answer_gates"]

COMPOSERS = ("lora_sum", "nla", "mole", "mole_nobal")  # the rows of the table, in order


@dataclass
class CompositionConfig:
    """Settings of scenario B. How the defaults were chosen (the source budget, the MoLE gate lr):
    docs/experiments.md, "Calibration notes"; the gate's pooling and step count: docs/mole_gates.md."""

    tasks: tuple[str, ...] = ("rev", "cap", "sft")  # K = 3 single-task LoRAs
    # the source LoRAs (scenario A's adapter shape)
    source_steps: int = 800
    source_batch_size: int = 16
    source_lr: float = 4e-3
    rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")
    n_train: int = 2000  # per task; the mixed set takes the first mix_fraction of each
    n_test: int = 200
    # MoLE gates
    mix_fraction: float = 0.1
    mole_steps: int = 600  # 200 left the gates half-trained (docs/mole_gates.md)
    mole_batch_size: int = 12
    mole_lr: float = 1e-3
    mole_lr_schedule: str = "linear"
    mole_warmup_steps: int = 0  # linear warm-up of the gate lr over the first steps
    mole_balanced_batches: bool = False  # True: every gate batch holds mole_batch_size / K lines of each task
    balance_coef: float = 0.5  # the "mole" row; "mole_nobal" uses 0
    tau_init: float = 1.0
    gate_granularity: str = "token"  # MoleConfig variants: "layer" (one gate per block)
    gate_pool: str = "prefix"  # token t: mean U over tokens <= t, the gate decoding sees (docs/mole_gates.md)
    grad_clip: float | None = 1.0
    # general capability
    eval_batches: int = 4
    eval_batch_size: int = 32
    fact_recall: bool = True
    methods: tuple[str, ...] = COMPOSERS

    def __post_init__(self):
        self.tasks, self.target_modules, self.methods = tuple(self.tasks), tuple(self.target_modules), tuple(self.methods)
        if len(self.tasks) < 2:
            raise ValueError(f"CompositionConfig.tasks needs at least 2 tasks to compose, got {self.tasks}")
        for name in ("source_steps", "source_batch_size", "rank", "n_train", "n_test", "mole_steps",
                     "mole_batch_size", "eval_batches", "eval_batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise ValueError(f"CompositionConfig.{name} must be an int >= 1, got {value!r}")
        warmup = self.mole_warmup_steps
        if not (isinstance(warmup, (int, np.integer)) and 0 <= warmup < self.mole_steps):
            raise ValueError(f"CompositionConfig.mole_warmup_steps must be an int in [0, mole_steps), "
                             f"got {self.mole_warmup_steps!r}")
        if not 0 < self.mix_fraction <= 1:
            raise ValueError(f"CompositionConfig.mix_fraction must be in (0, 1], got {self.mix_fraction}")
        unknown = sorted(set(self.methods) - set(COMPOSERS))
        if unknown or not self.methods:
            raise ValueError(f"CompositionConfig.methods: unknown {unknown}; choose from {COMPOSERS}")
        if self.mole_lr_schedule not in LRScheduler.SCHEDULES:
            raise ValueError(f"CompositionConfig.mole_lr_schedule must be one of {sorted(LRScheduler.SCHEDULES)}")

    def source_config(self) -> ContinualConfig:
        """Scenario A's runner settings for training one source LoRA on one task."""
        return ContinualConfig(tasks=self.tasks, steps=self.source_steps, batch_size=self.source_batch_size,
                               lr=self.source_lr, rank=self.rank, lora_alpha=self.lora_alpha,
                               target_modules=self.target_modules, n_train=self.n_train, n_test=self.n_test,
                               eval_batches=self.eval_batches, eval_batch_size=self.eval_batch_size,
                               fact_recall=self.fact_recall, grad_clip=self.grad_clip)

    def to_dict(self) -> dict:
        return jsonable(dataclasses.asdict(self))


# ---- helpers -------------------------------------------------------------------------------------------

def _task_accuracies(model, tasks: list[Task]) -> dict:
    return {t.name: evaluate_task(model, t) for t in tasks}


def _mean(d: dict) -> float:
    return float(np.mean(list(d.values())))


def _entropy(p: np.ndarray, axis=-1) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=axis)


def _mixed_set(tasks: list[Task], fraction: float):
    """(x, y, mask) of the first `fraction` of every task's training split (all tasks share seq_len), in
    task order, and the number of rows each task holds."""
    examples, sizes = [], []
    for t in tasks:
        part = t.train[:max(1, int(round(fraction * len(t.train))))]
        examples += part
        sizes.append(len(part))
    return encode_examples(examples, tasks[0].seq_len), sizes


def _batch_rows(rng, sizes: list, batch_size: int, balanced: bool) -> np.ndarray:
    """Row indices of one mini-batch of the mixed set: uniform over its rows, or (balanced) as equal a
    number from every task as batch_size allows (the first batch_size % K tasks get one more)."""
    if not balanced:
        return rng.integers(0, sum(sizes), batch_size)
    K, starts = len(sizes), np.cumsum([0] + list(sizes[:-1]))
    counts = [batch_size // K + (k < batch_size % K) for k in range(K)]
    return np.concatenate([start + rng.integers(0, size, c) for start, size, c in zip(starts, sizes, counts)])


def train_mole(mole, arrays, config: CompositionConfig, seed: int, progress: bool, label: str,
               sizes: list | None = None) -> dict:
    """Adam on the gates only (e, ρ) over mini-batches of the mixed set (balanced over the tasks when
    config.mole_balanced_batches and the per-task `sizes` are given); returns the train log."""
    from tqdm.auto import tqdm

    params = list(mole.trainable_parameters())
    opt = Adam(params, lr=config.mole_lr)
    schedule = LRScheduler.SCHEDULES[config.mole_lr_schedule]
    rng, drop_rng = stream(seed, f"composition/{label}/data"), stream(seed, f"composition/{label}/dropout")
    sizes = [len(arrays[0])] if sizes is None else list(sizes)
    balanced = config.mole_balanced_batches and len(sizes) > 1
    losses = []
    bar = tqdm(range(config.mole_steps), disable=not progress, leave=False, unit="step", desc=f"{label} gates")
    for step in bar:
        opt.lr = schedule(step, config.mole_steps, config.mole_lr, config.mole_warmup_steps)
        rows = _batch_rows(rng, sizes, config.mole_batch_size, balanced)
        loss = mole.loss(*(a[rows] for a in arrays), rng=drop_rng)
        opt.zero_grad()
        loss.backward()
        if config.grad_clip:
            clip_grad_norm_(params, config.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    curve = [float(np.mean(c)) for c in np.array_split(losses, min(10, len(losses)))]
    return {"first_loss": losses[0], "final_loss": curve[-1], "loss_curve": curve,
            "tau": [float(np.exp(l.log_tau.data[0])) for l in mole.gate_layers()]}


def gate_statistics(mole, tasks: list[Task]) -> dict:
    """Mean gates per layer on each task's test lines, the largest mean gate share and entropies."""
    per_task, all_gates = {}, []
    for t in tasks:
        x, _, _ = encode_examples(t.test, t.seq_len)
        means = mole.gate_means(x)  # {layer: (K,)}, real tokens only
        per_task[t.name] = {name: g.tolist() for name, g in means.items()}
        real = (np.asarray(x) != 0).reshape(-1)
        all_gates += [layer.current_gate.data[real] for layer in mole.gate_layers()]
    G = np.concatenate(all_gates, axis=0)  # (every gate × token, K)
    at_answer = answer_gates(mole, tasks)
    q = G.mean(axis=0)
    K = G.shape[1]
    # per layer, over the union: which LoRA each layer favours
    layers = list(per_task[tasks[0].name])
    union_layer = {name: np.mean([per_task[t.name][name] for t in tasks], axis=0).tolist() for name in layers}
    return {"per_task_layer_means": per_task, "layer_means": union_layer, "mean_share": q.tolist(),
            "max_share": float(q.max()), "argmax_source": int(q.argmax()),
            "entropy_of_mean": float(_entropy(q)), "mean_token_entropy": float(_entropy(G).mean()),
            "max_entropy": float(np.log(K)), "answer_gates": at_answer,
            "answer_own_share": {t.name: float(np.mean([g[j] for g in at_answer[t.name].values()]))
                                 for j, t in enumerate(tasks)}}


def answer_gates(mole, tasks: list[Task]) -> dict:
    """{task: {layer: mean G (K,)}} at the last prompt token of each test prompt, fed alone: the gate that
    chooses the first answer character in greedy decoding (the teacher-forced lines of gate_means also
    hold the answer, which a "sequence" pool reads but decoding has not written yet)."""
    from ..data import CharTokenizer

    tokenizer, out = CharTokenizer(), {}
    for t in tasks:
        by_length = {}
        for prompt, _ in t.test:
            by_length.setdefault(len(prompt), []).append(tokenizer.encode(prompt))
        sums, n = {}, 0
        for rows in by_length.values():
            x = np.stack(rows)
            with mole.evaluating():
                mole.model(x)
            for name, layer in zip(mole.adapted, mole.layers()):
                if layer.owns_gate:
                    last = layer.current_gate.data.reshape(x.shape[0], x.shape[1], -1)[:, -1]  # (B, K)
                    sums[name] = sums.get(name, 0) + last.sum(axis=0)
            n += x.shape[0]
        out[t.name] = {name: (v / n).tolist() for name, v in sums.items()}
    return out


def train_sources(config: CompositionConfig, base_model, tasks: list[Task], seed: int, general: GeneralEval,
                  progress: bool = True) -> tuple[list, dict]:
    """A fresh plain LoRA per task, trained on that task alone (scenario A's runner); (methods, singles):
    singles[task] = its accuracy on every task, its general capability and training log."""
    from tqdm.auto import tqdm

    src_cfg = config.source_config()
    sources, singles = [], {}
    for task in tasks:
        lora = build_method("lora", src_cfg)
        res = run_continual(lora, [task], src_cfg, base_model, seed, progress=progress, general=general)
        sources.append(lora)
        with lora.evaluating() as model:
            accs = _task_accuracies(model, tasks)
        singles[task.name] = {"per_task": accs, "own_acc": accs[task.name], "mean_acc": _mean(accs),
                              "general": res["final_general"], "train_log": res["train_log"][0],
                              "trainable_params": res["trainable_params"]}
        if progress:
            tqdm.write(f"source LoRA {task.name}: own task {accs[task.name]:.0%}, on the union {_mean(accs):.0%}")
    return sources, singles


def compose(name: str, states: list, scales: list, base_model, config: CompositionConfig, seed: int):
    """The composed method `name` (one of COMPOSERS) over the frozen sources, attached to a copy of the base."""
    from ..adapters import NLA, LoraSum, Mole
    from ..data import PAD_ID

    if name not in COMPOSERS:
        raise ValueError(f"unknown composition {name!r}; choose from {COMPOSERS}")
    if name in ("lora_sum", "nla"):
        method = (LoraSum if name == "lora_sum" else NLA)(lora_sources=states, lora_scales=scales)
    else:
        method = Mole(lora_sources=states, lora_scales=scales, pad_token_id=PAD_ID,
                      balance_coef=config.balance_coef if name == "mole" else 0.0,
                      gate_granularity=config.gate_granularity, gate_pool=config.gate_pool, tau_init=config.tau_init)
    model = copy.deepcopy(base_model)  # the caller's model is never touched
    model.train()
    method.attach(model, seed)
    return method


def evaluate_composed(method, tasks: list[Task], general: GeneralEval) -> dict:
    """Accuracy on every task (and the mean) and general capability; MoLE adds its gate statistics."""
    with method.evaluating() as m:
        out = {"per_task": _task_accuracies(m, tasks), "general": general.measure(m)}
    out["mean_acc"] = _mean(out["per_task"])
    if hasattr(method, "gate_means"):
        out["gates"] = gate_statistics(method, tasks)
    return out


def masking_demo(mole, tasks: list[Task]) -> dict:
    """{task j: {"without": accuracies with LoRA j masked out, "only": with LoRA j alone}} (no retraining)."""
    out = {}
    for j, task in enumerate(tasks):
        others = [i for i in range(len(tasks)) if i != j]
        with mole.masked(others), mole.evaluating() as m:
            without = _task_accuracies(m, tasks)
        with mole.masked([j]), mole.evaluating() as m:
            only = _task_accuracies(m, tasks)
        out[task.name] = {"without": without, "only": only}
    return out


# ---- the runner -------------------------------------------------------------------------------------

def run_composition(config: CompositionConfig, base_model, seed: int = 0, progress: bool = True,
                    general: GeneralEval | None = None) -> dict:
    """Scenario B for one seed: train the K sources, compose them every way, evaluate; a JSON-able dict."""
    from tqdm.auto import tqdm

    from ..adapters import sources_from_methods

    t0 = time.perf_counter()
    timings = {}
    src_cfg = config.source_config()
    general = general or GeneralEval(base_model, src_cfg)
    tasks = make_tasks(config.tasks, seed, config.n_train, config.n_test)
    if tasks[0].seq_len > base_model.config.block_size:
        raise ValueError(f"task lines need {tasks[0].seq_len} positions but block_size is "
                         f"{base_model.config.block_size}")
    say = tqdm.write if progress else (lambda *_: None)

    # 1. the K single-task source LoRAs, trained independently from the base, then frozen
    t = time.perf_counter()
    sources, singles = train_sources(config, base_model, tasks, seed, general, progress)
    timings["sources_s"] = time.perf_counter() - t
    states, scales = sources_from_methods(sources)
    source_states = [{k: v.copy() for k, v in s.items()} for s in states]  # to check they stay frozen

    # 2–5. compose
    arrays, sizes = _mixed_set(tasks, config.mix_fraction)
    n_mix = sum(sizes)
    methods, masking = {}, {}
    for name in config.methods:
        t = time.perf_counter()
        method = compose(name, states, scales, base_model, config, seed)
        row = {"trainable_params": int(sum(p.size for p in method.trainable_parameters()))}
        if name.startswith("mole"):
            row["train_log"] = train_mole(method, arrays, config, seed, progress, name, sizes)
        row.update(evaluate_composed(method, tasks, general))
        if name.startswith("mole"):
            masking[name] = masking_demo(method, tasks)
            row["lora_factors_unchanged"] = all(
                np.array_equal(layer.lora_A.data[i, :states[i][f"{n}.lora_A"].shape[0]], states[i][f"{n}.lora_A"])
                for n, layer in zip(method.adapted, method.layers()) for i in range(len(states)))
        row["wall_s"] = time.perf_counter() - t
        methods[name] = row
        say(f"{name}: " + "  ".join(f"{k} {v:.0%}" for k, v in row["per_task"].items())
            + f"  mean {row['mean_acc']:.0%}  (pydoc loss {row['general']['val_loss']:.2f})")
    sources_frozen = all(np.array_equal(a[k], b[k]) for a, b in zip(states, source_states) for k in a)
    wall = time.perf_counter() - t0
    return jsonable({
        "scenario": "composition", "seed": seed, "config": config.to_dict(), "tasks": [t.name for t in tasks],
        "n_mixed_examples": n_mix, "base_general": general.base,
        "base_per_task": _task_accuracies(base_model, tasks),
        "singles": singles, "methods": methods, "masking": masking,
        "sources_frozen": sources_frozen, "wall_s": wall, "timings": timings,
    })


def format_composition(doc: dict) -> str:
    """The scenario-B tables: accuracy on the union and general capability; gates; masking."""
    tasks = doc["tasks"]
    b = doc["base_general"]
    lines = [f"scenario B (composition), seed {doc['seed']}: K = {len(tasks)} source LoRAs ({', '.join(tasks)}); "
             f"MoLE gates trained on {doc['n_mixed_examples']} mixed examples; {doc['wall_s']:.0f} s",
             "exact-match accuracy (%) on each task's test split; general capability on held-out pydoc text",
             f"{'model':<12}" + "".join(f"{t:>6}" for t in tasks) + f"{'mean':>7} {'val loss':>9} {'next-ch':>8} "
             f"{'agree':>6} {'facts':>6} {'maxG':>5} {'H(G)':>5}"]

    def row(name, r):
        g = r["general"]
        facts = f"{100 * g['fact_recall']:6.0f}" if "fact_recall" in g else f"{'-':>6}"
        gates = r.get("gates")
        gs = f"{gates['max_share']:5.2f} {gates['mean_token_entropy']:5.2f}" if gates else f"{'-':>5} {'-':>5}"
        return (f"{name:<12}" + "".join(f"{100 * r['per_task'][t]:6.0f}" for t in tasks)
                + f"{100 * r['mean_acc']:7.1f} {g['val_loss']:9.2f} {100 * g['next_char_acc']:8.1f} "
                  f"{100 * g['agreement']:6.1f} {facts} {gs}")

    base_row = {"per_task": doc["base_per_task"], "mean_acc": _mean(doc["base_per_task"]), "general": b}
    lines.append(row("base", base_row))
    for t, r in doc["singles"].items():
        lines.append(row(f"lora:{t}", r))
    for name, r in doc["methods"].items():
        lines.append(row(name, r))
    lines.append(f"maxG = largest mean gate share max_i q_i; H(G) = mean per-token gate entropy "
                 f"(uniform = {np.log(len(tasks)):.2f})")
    for name, r in doc["methods"].items():
        if "gates" not in r:
            continue
        lines.append(f"\n{name}: mean gate per adapted layer over the union (sources {', '.join(tasks)})")
        for layer, g in r["gates"]["layer_means"].items():
            lines.append(f"  {layer:<28}" + "".join(f"{v:6.2f}" for v in g))
        own = r["gates"].get("answer_own_share")
        if own:
            forced = {t: np.mean([g[j] for g in r["gates"]["per_task_layer_means"][t].values()])
                      for j, t in enumerate(tasks)}
            lines.append(f"{name}: mean gate on the task's own LoRA, at the first answer character (decoding) / "
                         "over the teacher-forced line: "
                         + ", ".join(f"{t} {own[t]:.2f} / {forced[t]:.2f}" for t in tasks))
        lines.append(f"{name}: masking (accuracy %, rows: the LoRA masked out / the only LoRA kept)")
        lines.append(f"  {'':<14}" + "".join(f"{t:>6}" for t in tasks))
        for t, m in doc["masking"][name].items():
            lines.append(f"  {'without ' + t:<14}" + "".join(f"{100 * m['without'][u]:6.0f}" for u in tasks))
            lines.append(f"  {'only ' + t:<14}" + "".join(f"{100 * m['only'][u]:6.0f}" for u in tasks))
    return "\n".join(lines)
