"""check_adapter_invariants: what every adapter method must satisfy, whatever its equations.

    from tinyslim.adapters import make_method
    from tinyslim.testing import check_adapter_invariants
    check_adapter_invariants(make_method("lora", r=2))      # silent, or CheckError naming each broken rule

The method runs through the runner's contract (tinyslim.adapters.Method: attach → before_task → loss →
backward → optimizer step → after_step → after_task → evaluating) on a small GPT with random weights,
and five rules are checked (docs/methods.md §0, §1.6):

1. no-op at init     the freshly attached adapter changes no logit: bit-identical to the base, every learner
2. adapter-only grads after loss.backward() exactly the trainable parameters have gradients, and every
                     trainable parameter is an adapter array (adapter_state_dict)
3. frozen base       every other parameter is bit-identical after each optimizer step and after_step hook
4. save → load       adapter_state_dict → a fresh base + fresh method (another seed) →
                     load_adapter_state_dict gives bit-identical logits for every learner
5. merge             where the method can merge: merged logits equal unmerged ones, and unmerge restores
                     W0 (docs/methods.md's "equal": rtol 1e-5, atol 1e-6 in float32; 1e-10 in float64)
"""
from __future__ import annotations

import copy

import numpy as np

from ..autograd import no_grad
from .arrays import randomize_parameters
from .report import CheckError, close_report

__all__ = ["check_adapter_invariants", "INVARIANTS"]

INVARIANTS = ("no-op at init", "adapter-only gradients", "frozen base", "save/load round trip", "merge")


def _logits(method, x, learner):
    with method.evaluating(learner) as model:
        return np.array(model(x)[0].data)


def check_adapter_invariants(method, config=None, *, seed: int = 0, tasks: int = 2, steps: int = 2,
                             task_steps: int = 10, lr: float = 1e-2, batch=None, can_merge: bool | None = None):
    """Run the five invariants above on `method` (a fresh, unattached tinyslim.adapters.Method).

    config: the base GPTConfig (default: 2 layers, 2 heads, 8 channels, vocabulary 11, float32, the
    working dtype of docs/methods.md). tasks × steps optimizer steps are taken with Adam(lr); before_task is
    told `task_steps` steps, so schedule events late in a task (COLA's knots) are not reached. batch:
    (x, y, mask) for method.loss (default: random, B 3 × T 5). can_merge: None detects it (a layer whose
    delta_weight raises NotImplementedError cannot merge), True / False forces it.
    Returns {invariant: "ok" | "skipped: why"}; raises CheckError listing every broken invariant.
    """
    from ..adapters import adapter_state_dict, load_adapter_state_dict, merge, unmerge  # not at import: the
    # adapters sit above tinyslim.testing's other checks, and a learner may be writing their own
    from ..nn import GPT, GPTConfig
    from ..optim import Adam

    if getattr(method, "model", None) is not None:
        raise ValueError("check_adapter_invariants needs a fresh method (not attached yet): it attaches it itself")
    config = config or GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype="float32")
    dtype = config.np_dtype
    rng = np.random.default_rng([seed, 1])
    if batch is None:
        B, T = 3, min(5, config.block_size)
        x, y = rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))
        mask = (rng.random((B, T)) < 0.6).astype(dtype)
        mask[:, -1] = 1
    else:
        x, y, mask = batch
    equal = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)

    def fresh_base():
        return randomize_parameters(GPT(config, seed=seed % 1000), seed)

    results, failures = {}, []

    def fail(invariant, lines):
        results.setdefault(invariant, "FAIL")
        failures.append((invariant, lines if isinstance(lines, list) else [lines]))

    model = fresh_base()
    model.eval()
    with no_grad():
        base_logits = np.array(model(x)[0].data)
    model.train()
    method.attach(model, seed)
    learners = method.learners()

    # 1. no-op at init
    for learner in learners:
        logits = _logits(method, x, learner)
        if not np.array_equal(logits, base_logits):
            lines = close_report(f"learner {learner!r}: logits with the fresh adapter vs the base model",
                                 logits, base_logits, 0.0, 0.0, ("adapted", "base"))
            fail(INVARIANTS[0], lines or [f"learner {learner!r}: logits differ from the base (bitwise)"])
    results.setdefault(INVARIANTS[0], "ok")

    # 2. adapter-only gradients and 3. frozen base, through the runner's contract
    adapter_names = set(adapter_state_dict(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    listed = {id(p) for p in method.trainable_parameters()}
    not_adapters = sorted(trainable - adapter_names)
    if not_adapters:
        fail(INVARIANTS[1], f"trainable parameters that are not adapter arrays (adapter_state_dict lacks them): "
                            f"{not_adapters[:6]}")
    if listed != {id(p) for n, p in model.named_parameters() if p.requires_grad}:
        fail(INVARIANTS[1], "method.trainable_parameters() is not the set of parameters with requires_grad=True")
    initial = adapter_state_dict(model)
    opt = Adam(method.trainable_parameters(), lr=lr)
    for task in range(tasks):
        method.before_task(task, task_steps, opt)
        frozen = {n: p.data.copy() for n, p in model.named_parameters() if n not in adapter_names}
        for step in range(steps):
            loss = method.loss(x, y, mask, np.random.default_rng([seed, 2, task, step]))
            opt.zero_grad()
            loss.backward()
            params = dict(model.named_parameters())
            leaked = sorted(n for n, p in params.items() if p.grad is not None and n not in trainable)
            missing = sorted(n for n in trainable if params[n].grad is None)
            if leaked:
                fail(INVARIANTS[1], f"task {task} step {step}: frozen parameters got gradients: {leaked[:6]}")
            if missing:
                fail(INVARIANTS[1], f"task {task} step {step}: trainable parameters got no gradient (the loss does "
                                    f"not reach them): {missing[:6]}")
            opt.step()
            method.after_step(step, opt)
            moved = sorted(n for n, p in model.named_parameters()
                           if n in frozen and not np.array_equal(p.data, frozen[n]))
            if moved:
                worst = moved[0]
                diff = np.max(np.abs(params[worst].data - frozen[worst]))
                fail(INVARIANTS[2], f"task {task} step {step}: frozen parameters changed: {moved[:6]} "
                                    f"(max |change| of {worst}: {diff:.3e})")
        method.after_task(task)
    results.setdefault(INVARIANTS[1], "ok")
    results.setdefault(INVARIANTS[2], "ok")
    trained = adapter_state_dict(model)
    if all(np.array_equal(trained[k], initial[k]) for k in trained):
        fail(INVARIANTS[1], f"{tasks * steps} optimizer steps moved no adapter array: the gradient does not reach "
                            "the adapters (or lr is 0)")

    # 4. save → load: a fresh GPT and a fresh method (another seed), given the trained model's base weights
    # (a method may write its base between tasks, as COLA ties its knots) and then the saved adapter state
    saved = {learner: _logits(method, x, learner) for learner in learners}
    other = type(method)(copy.deepcopy(method.config))
    model2 = GPT(config, seed=(seed + 1) % 1000)
    other.attach(model2, seed + 1)
    model2.load_state_dict({n: v for n, v in model.state_dict().items() if n not in adapter_names}, strict=False)
    try:
        load_adapter_state_dict(model2, trained)
    except (KeyError, ValueError, TypeError) as err:
        fail(INVARIANTS[3], f"load_adapter_state_dict refused the saved state: {err}")
    else:
        reloaded = adapter_state_dict(model2)
        for k in trained:
            if not np.array_equal(reloaded.get(k), trained[k]):
                fail(INVARIANTS[3], f"{k} is not the saved array after loading")
        for learner in learners:
            logits = _logits(other, x, learner)
            if not np.array_equal(logits, saved[learner]):
                lines = close_report(f"learner {learner!r}: reloaded vs trained logits", logits, saved[learner],
                                     0.0, 0.0, ("reloaded", "trained"))
                fail(INVARIANTS[3], (lines or [f"learner {learner!r}: logits differ"])
                     + ["    (is every array the forward uses listed in adapter_names?)"])
    results.setdefault(INVARIANTS[3], "ok")

    # 5. merge equals unmerged; unmerge restores W0
    if can_merge is False:
        results[INVARIANTS[4]] = "skipped: can_merge=False"
    else:
        layers = method.layers()
        W0 = [layer.base_layer.weight.data.copy() for layer in layers]
        for learner in learners:
            unmerged = _logits(method, x, learner)
            with method.evaluating(learner):
                try:
                    merge(model)
                except NotImplementedError:
                    if can_merge:
                        fail(INVARIANTS[4], "can_merge=True but delta_weight() is not implemented")
                    else:
                        results[INVARIANTS[4]] = "skipped: the method cannot merge (delta_weight not implemented)"
                    break
                merged = np.array(model(x)[0].data)
                unmerge(model)
            lines = close_report(f"learner {learner!r}: merged vs unmerged logits", merged, unmerged,
                                 equal["rtol"], equal["atol"], ("merged", "unmerged"))
            if lines:
                fail(INVARIANTS[4], lines)
            for name, layer, w in zip(method.adapted, layers, W0):
                lines = close_report(f"{name}: W0 after merge + unmerge", layer.base_layer.weight.data, w,
                                     equal["rtol"], equal["atol"], ("unmerged", "original"))
                if lines:
                    fail(INVARIANTS[4], lines)
        results.setdefault(INVARIANTS[4], "ok")

    if failures:
        report = [f"{type(method).__name__} ({getattr(method, 'name', '?')}) breaks "
                  f"{len({f for f, _ in failures})} adapter invariant(s):"]
        for invariant, lines in failures:
            report += [f"  [{invariant}] {lines[0]}"] + lines[1:]
        report.append("  every invariant: " + ", ".join(f"{k}: {v}" for k, v in results.items()))
        report.append(f"  set-up: {method.config!r}; base {config}; seed {seed}; {tasks} task(s) × {steps} step(s), "
                      f"Adam lr {lr:g}; batch x {x.shape}, learners {learners}")
        raise CheckError("\n".join(report))
    return results
