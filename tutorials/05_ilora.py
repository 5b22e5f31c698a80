# %% [markdown]
# # 05 · I-LoRA: a fast learner, a slow learner, and the line between two tasks
#
# Tutorial 03 watched Seq-LoRA forget. I-LoRA (Ren et al., arXiv 2402.18865) starts from an
# observation about *where* sequential fine-tuning goes: the LoRA at the end of task k and the LoRA
# at the end of task k+1 are often **linearly mode-connected**, i.e. points on the straight line
# between them have low loss on both tasks. So keep two copies of the LoRA: a *fast* one that
# trains (with replayed old examples, as ER does), and a *slow* one that never sees a gradient and
# only drifts towards the fast one by interpolation, so that it sits somewhere along that line.
#
# This tutorial (1) measures the loss along the line between two end-of-task LoRAs, (2) takes the
# slow learner's update rule apart and checks its invariants numerically, (3) races Seq-LoRA, ER
# and I-LoRA (both learners) on two tasks with the scenario-A runner, and (5) races ER and I-LoRA
# where replay alone is not enough: five tasks through the same buffer.
#
# Run it: `python tutorials/05_ilora.py`. `TINYSLIM_FAST=1` trains for a few steps only.

# %%
import copy
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before numpy)
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from tinyslim.adapters import adapter_state_dict, load_adapter_state_dict  # noqa: E402
from tinyslim.autograd import no_grad  # noqa: E402
from tinyslim import load_base  # noqa: E402
from tinyslim.experiments.continual import ContinualConfig, build_method, run_continual  # noqa: E402
from tinyslim.optim import Adam, clip_grad_norm_  # noqa: E402
from tinyslim.tasks import encode_examples, make_tasks  # noqa: E402

FAST = os.environ.get("TINYSLIM_FAST") == "1"  # the test suite runs every tutorial in this mode
OUT = Path("runs/tutorials")
OUT.mkdir(parents=True, exist_ok=True)

TASKS = ("sft", "cap")
if FAST:
    config = ContinualConfig(tasks=TASKS, steps=12, n_train=200, n_test=10, eval_batches=1, eval_batch_size=8,
                             fact_recall=False)
else:  # 400 steps per task (sft and cap are the fastest tasks to learn)
    config = ContinualConfig(tasks=TASKS, steps=400, n_train=2000, n_test=100, eval_batches=1, eval_batch_size=32,
                             fact_recall=False)
tasks = make_tasks(config.tasks, seed=0, n_train=config.n_train, n_test=config.n_test)
base, source = load_base(with_source=True)
print(f"base from {source}; tasks {TASKS}, {config.steps} steps each")

# %% [markdown]
# ## 1. Mode connectivity: the loss along the line between two tasks' LoRAs
#
# Train one LoRA on task 1 (`sft`), keep a copy of its factors $\theta_1 = \{A_1, B_1\}$, continue
# training the same LoRA on task 2 (`cap`) and keep $\theta_2 = \{A_2, B_2\}$. Then walk the line
#
# $$\theta(\alpha) = (1-\alpha)\,\theta_1 + \alpha\,\theta_2, \qquad \alpha \in [0, 1],$$
#
# **factor-wise**: $A(\alpha)$ and $B(\alpha)$ are interpolated separately, exactly as I-LoRA's slow
# learner does. (That is not the line between the two $\Delta W = sBA$: the product is bilinear,
# so $B(\alpha)A(\alpha)$ has an $\alpha(1-\alpha)$ cross term.) At each point we measure the
# held-out answer loss of both tasks, $L_1(\alpha)$ and $L_2(\alpha)$, and their mean. Mode
# connectivity says the mean stays low along the way; the paper's stronger hope is that some
# interior $\alpha$ beats *both* endpoints.
#
# The training loop is the runner's (Adam reset at each task, linear lr decay, clipping at 1),
# written out so we can snapshot the factors between the tasks.

# %%
def train_task(method, task, steps, rng):
    params = method.trainable_parameters()
    opt = Adam(params, lr=config.lr)
    method.before_task(0, steps, opt)
    for step in range(steps):
        opt.lr = config.lr * (1 - step / steps)
        x, y, mask = task.batch(config.batch_size, rng)
        loss = method.loss(x, y, mask)
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(params, config.grad_clip)
        opt.step()
        method.after_step(step, opt)


held_out = [encode_examples(t.test, t.seq_len) for t in tasks]  # (x, y, mask) of each test split


def answer_losses(model):
    with no_grad():
        return [model(x, y, loss_mask=m)[1].item() for x, y, m in held_out]


seq = build_method("lora", config)
seq.attach(copy.deepcopy(base), seed=0)
rng = np.random.default_rng(0)
train_task(seq, tasks[0], config.steps, rng)
theta1 = adapter_state_dict(seq.model)
train_task(seq, tasks[1], config.steps, rng)
theta2 = adapter_state_dict(seq.model)

alphas = np.linspace(0, 1, 11)
line = []
for a in alphas:
    load_adapter_state_dict(seq.model, {k: (1 - a) * theta1[k] + a * theta2[k] for k in theta1})
    seq.model.eval()
    line.append(answer_losses(seq.model))
line = np.array(line)  # (len(alphas), 2)
mean = line.mean(1)
print(f"{'α':>5} {'L_sft':>7} {'L_cap':>7} {'mean':>7}")
for a, (l1, l2), m in zip(alphas, line, mean):
    print(f"{a:5.1f} {l1:7.3f} {l2:7.3f} {m:7.3f}")
best = int(np.argmin(mean))
interior_wins = 0 < best < len(alphas) - 1
print(f"lowest mean loss at α = {alphas[best]:.1f} ({mean[best]:.3f} nats/char); endpoints {mean[0]:.3f} (θ1), "
      f"{mean[-1]:.3f} (θ2): an interior point beats both endpoints: {interior_wins}")
print(f"at α = {alphas[best]:.1f}: L_{TASKS[0]} {line[best, 0]:.3f} (its own endpoint θ1: {line[0, 0]:.3f}), "
      f"L_{TASKS[1]} {line[best, 1]:.3f} (θ2: {line[-1, 1]:.3f})")

# the endpoints are the trained LoRAs themselves, and training on task 2 made task 1 worse (forgetting)
assert alphas[0] == 0 and alphas[-1] == 1
if not FAST:
    assert line[-1, 0] > line[0, 0] and line[-1, 1] < line[0, 1]

# %% [markdown]
# Whether an interior point wins is *reported*, not asserted: it depends on the task pair, the
# learning rate and the seed. The second line above is the one to read: it puts each task's loss at
# the best α beside the loss that task had at its own endpoint. If both are close to their endpoints,
# the two LoRAs share a low-loss valley, as the paper reports for LLaMA-2; if they are far above them,
# the best point of the line is a compromise that is good at neither task. The plot shows the whole
# profile.

# %%
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(alphas, line[:, 0], "o-", label=f"L({TASKS[0]})")
ax.plot(alphas, line[:, 1], "s-", label=f"L({TASKS[1]})")
ax.plot(alphas, mean, "k--", label="mean of both")
ax.set(xlabel="α   (0 = end of task 1, 1 = end of task 2)", ylabel="answer loss (nats/char)",
       title="loss along the factor-wise line θ(α)")
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "05_ilora_line.png", dpi=100)
print("plot written to", OUT / "05_ilora_line.png")

# %% [markdown]
# ## 2. The slow learner: an exponential moving average of the fast one
#
# I-LoRA holds one LoRA per adapted layer twice (`tinyslim.adapters.ILoraLinear`): the fast factors
# $\theta_f = \{A_f, B_f\}$ are trained, the slow ones $\theta_s = \{A_s, B_s\}$ are a buffer that
# starts as a copy of the fast. After **every** optimizer step, with a global step counter
# $t = 0, 1, 2, \dots$ that never resets at task boundaries (`ILoRA.after_step`):
#
# $$a_t = \min\!\Big(1 - \frac{1}{t+1},\; \lambda\Big), \qquad
#   A_s \leftarrow a_t A_s + (1-a_t) A_f, \qquad B_s \leftarrow a_t B_s + (1-a_t) B_f .$$
#
# The warm-up $1 - 1/(t+1) = t/(t+1)$ makes the slow learner the plain *average* of the fast
# iterates until $t/(t+1)$ reaches $\lambda$ (at $t = 99$ for $\lambda = 0.99$); from then on it is
# an EMA with a memory of about $1/(1-\lambda) = 100$ steps. The training loss, from the second task
# on, is ER's replayed cross-entropy plus a consistency term that pulls the fast learner's hidden
# states $h^l$ (after every block $l$) towards the slow learner's on the replayed examples:
#
# $$L = \tfrac12\big[\mathrm{CE}(X_{cur};\theta_f) + \mathrm{CE}(X_{rep};\theta_f)\big]
#   + \gamma\,\frac{1}{C}\sum_l \sum_{n\in X_{rep}} \big\|h_f^l[n] - h_s^l[n]\big\|^2 .$$
#
# The schedule first, then three invariants checked on the real layers:
#
# * $\lambda = 0$: $a_t = 0$, so slow = fast after every step, **bit for bit**;
# * $\lambda = 1$ with warm-up: slow = the arithmetic mean of all fast iterates so far;
# * $\lambda = 1$ without warm-up (`ema_warmup=False`): the slow learner never moves, and since it
#   started with $B_s = 0$ its logits are the base model's, bit for bit.

# %%
lam = 0.99
for t in (0, 1, 2, 9, 98, 99, 100, 1000):
    print(f"t = {t:4d}: a_t = min(1 − 1/(t+1), λ) = {min(1 - 1 / (t + 1), lam):.4f}")


def run_ilora_steps(n, **overrides):
    """n steps of I-LoRA on task 1 (no replay there); returns the method and the fast factors after each step."""
    method = build_method("ilora", config, overrides)
    method.attach(copy.deepcopy(base), seed=0)
    params = method.trainable_parameters()
    opt = Adam(params, lr=config.lr)
    method.before_task(0, n, opt)
    rng, fast_iterates = np.random.default_rng(3), []
    for step in range(n):
        x, y, mask = tasks[0].batch(config.batch_size, rng)
        loss = method.loss(x, y, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step, opt)
        fast_iterates.append([(ly.lora_A.data.copy(), ly.lora_B.data.copy()) for ly in method.layers()])
        if overrides.get("ema_lambda") == 0.0:  # slow = fast after *every* step
            assert all(np.array_equal(ly.lora_A_slow.data, ly.lora_A.data) and
                       np.array_equal(ly.lora_B_slow.data, ly.lora_B.data) for ly in method.layers())
    return method, fast_iterates


n = 5
ilora0, _ = run_ilora_steps(n, ema_lambda=0.0)
print(f"λ = 0: slow = fast, bit-identical, after each of {n} steps; learners {ilora0.learners()}")

ilora1, iterates = run_ilora_steps(n, ema_lambda=1.0)
err = max(np.abs(layer.lora_B_slow.data - np.mean([it[i][1] for it in iterates], 0)).max()
          for i, layer in enumerate(ilora1.layers()))
print(f"λ = 1 with warm-up: max |B_s − mean of the {n} fast B iterates| = {err:.1e}")
assert err < 1e-6

frozen, _ = run_ilora_steps(n, ema_lambda=1.0, ema_warmup=False)
x, _, _ = tasks[0].batch(8, np.random.default_rng(9))
base.eval()
with no_grad():
    base_logits = base(x)[0].data
with frozen.evaluating("slow") as model:
    slow_logits = model(x)[0].data
with frozen.evaluating("fast") as model:
    fast_logits = model(x)[0].data
print(f"λ = 1 without warm-up: slow logits == base logits: {np.array_equal(slow_logits, base_logits)}; "
      f"the fast learner moved by {np.abs(fast_logits - base_logits).max():.2f}")
assert np.array_equal(slow_logits, base_logits) and not np.array_equal(fast_logits, base_logits)

# %% [markdown]
# `evaluating(learner)` is how the runner (and you) pick a learner: inside the block the model runs
# with that copy's factors, in eval mode, without gradients; on exit the previous learner and mode
# come back. `learners()` lists the slow one first, because it is the one I-LoRA reports.

# %% [markdown]
# ## 3. Seq-LoRA, ER and I-LoRA on two tasks
#
# Same base, tasks, seed, data order, adapter shape and learning-rate line; only the method differs
# (`build_method` gives each the scenario's settings). ER adds a 200-example reservoir of past
# examples and trains on $\tfrac12[\mathrm{CE}(X_{cur}) + \mathrm{CE}(X_{rep})]$; I-LoRA is ER plus the
# slow learner and the consistency term. The runner evaluates both I-LoRA learners after every task.

# %%
rows = {}
for name in ("lora", "er", "ilora"):
    result = run_continual(build_method(name, config), tasks, config, base, seed=0, progress=False)
    for learner in result["learners"]:
        r = result["by_learner"][learner]
        label = name if learner == "default" else f"{name} ({learner})"
        rows[label] = (r["acc"], r["bwt"], np.array(r["acc_matrix"]), result["train_s"])
print(f"{'method':<14} {'ACC':>6} {'BWT':>7}  {'R[0][0]':>8} {'R[1][0]':>8} {'R[1][1]':>8} {'train s':>8}")
for label, (acc, bwt, R, secs) in rows.items():
    print(f"{label:<14} {100 * acc:6.1f} {100 * bwt:+7.1f}  {100 * R[0, 0]:8.0f} {100 * R[1, 0]:8.0f} "
          f"{100 * R[1, 1]:8.0f} {secs:8.0f}")
for acc, bwt, R, _ in rows.values():
    assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1)) and np.isclose(bwt, R[1, 0] - R[0, 0])

# %% [markdown]
# ## 4. What this shows, honestly
#
# The cell below says in words what this run measured; at full size the tutorial asserts the part
# that is robust: replay keeps task 1 where sequential fine-tuning loses it. Read the slow learner's
# first row too: right after task 1 it *lags* the fast one, because it still averages in the early
# iterates (section 2).
#
# Are these numbers a fluke of the run? They are exactly reproducible: with the same seed, backend
# and thread counts, a second run gives the same bits (README, "Determinism"); the last check below
# trains ER twice and compares every factor bit for bit. To see how much they move with the *seed*,
# change `seed=0` in `run_continual`.
#
# Whether the *slow learner* adds anything on top of replay is a different question. Section 2 says
# why it may not: with λ = 0.99 the slow learner remembers about 100 steps, while a task lasts
# hundreds, so by the end of every task it has caught up with the fast learner and both sit at the
# same point of the line from section 1; and on two tasks replay leaves little to add anyway.
# Section 5 races the two where ER is not saturated. Try `ema_lambda=0.999`
# (`--method-args ilora.ema_lambda=0.999`) to give the slow learner a longer memory.

# %%
(acc_l, bwt_l, R_l, _), (acc_e, bwt_e, R_e, _) = rows["lora"], rows["er"]
(acc_s, bwt_s, R_s, _), (acc_f, bwt_f, R_f, _) = rows["ilora (slow)"], rows["ilora (fast)"]
print(f"Seq-LoRA: ACC {100 * acc_l:.1f}, BWT {100 * bwt_l:+.1f} (task 1 went from {R_l[0, 0]:.0%} to "
      f"{R_l[1, 0]:.0%}). ER: ACC {100 * acc_e:.1f}, BWT {100 * bwt_e:+.1f} (task 1: {R_e[0, 0]:.0%} → "
      f"{R_e[1, 0]:.0%}). I-LoRA: ACC {100 * acc_s:.1f} (slow), {100 * acc_f:.1f} (fast); after task 1 the slow "
      f"learner scored {R_s[0, 0]:.0%} on it against the fast learner's {R_f[0, 0]:.0%}.")
print("replay kept task 1 better than Seq-LoRA: " + ("yes" if min(R_e[1, 0], R_s[1, 0]) > R_l[1, 0] else "no")
      + "; a positive BWT (replayed examples kept training task 1 during task 2): "
      + (", ".join(f"{k} {100 * v[1]:+.1f}" for k, v in rows.items() if v[1] > 0) or "none"))


def er_factors(steps=4):
    er = build_method("er", config)
    er.attach(copy.deepcopy(base), seed=0)
    train_task(er, tasks[0], steps, np.random.default_rng(5))
    return adapter_state_dict(er.model)


first, second = er_factors(), er_factors()
print("two identical ER runs give bit-identical factors:", all(np.array_equal(first[k], second[k]) for k in first))
assert all(np.array_equal(first[k], second[k]) for k in first)
if not FAST:
    # robust at this size: replay keeps task 1 where sequential fine-tuning loses it
    assert rows["er"][0] > rows["lora"][0] + 0.2 and rows["ilora (slow)"][0] > rows["lora"][0] + 0.2
    assert rows["lora"][1] < -0.5  # Seq-LoRA forgot most of task 1

# %% [markdown]
# ## 5. Where replay alone is not enough: five tasks
#
# On two or three tasks a 200-example buffer holds enough of every old task for ER to keep nearly
# all of it, and I-LoRA has nothing left to add (scenario A: ER 99.0%, I-LoRA 96.8% over five seeds).
# The paper's claim is about the regime where replay is not enough. The suite's *replay study* is
# that regime: the same buffer through five tasks (rot, srt, rev, cap, sft; 600 steps each), where ER
# still learns every task but ends well below what it learned. The setting was chosen on a tuning
# seed by looking at ER alone (docs/evidence.md, "The replay study"); here it runs on seed 0, with
# the suite's own configuration, so it prints seed 0 of the committed five-seed report (ER: 85.6).
# An earlier build of the C kernel, whose sums round differently, gave 87.2: a few thousand steps
# turn those last bits into a point or so per seed (README, "Determinism").

# %%
from tinyslim.experiments.suite import suite_configs  # noqa: E402

study = suite_configs("tiny" if FAST else "quick")
replay_config, buffer = study["replay"], study["replay_buffer"]
replay_tasks = make_tasks(replay_config.tasks, seed=0, n_train=replay_config.n_train, n_test=replay_config.n_test)
replay = {name: run_continual(build_method(name, replay_config, {"buffer_size": buffer}), replay_tasks, replay_config,
                              base, seed=0, progress=False)
          for name in ("er", "ilora")}
print(f"{len(replay_tasks)} tasks × {replay_config.steps} steps, a {buffer}-example buffer; accuracy after the last "
      "task (%):")
print(f"{'':<14}" + "".join(f"{t:>6}" for t in replay_config.tasks) + f"{'ACC':>7}{'BWT':>7}{'learned':>9}")
finals = {}
for name, result in replay.items():
    for learner in result["learners"]:
        r = result["by_learner"][learner]
        label = name if learner == "default" else f"{name} ({learner})"
        finals[label] = np.array(r["acc_matrix"])[-1]
        print(f"{label:<14}" + "".join(f"{100 * v:6.0f}" for v in finals[label])
              + f"{100 * r['acc']:7.1f}{100 * r['bwt']:+7.1f}{100 * r['learning_acc']:9.1f}")
gain = replay["ilora"]["acc"] - replay["er"]["acc"]
print(f"seed 0: I-LoRA (slow) − ER = {100 * gain:+.1f} points of ACC")

# %% [markdown]
# One seed is an anecdote. The committed five-seed run (`python -m tinyslim run all --seeds 5`, seeds
# 0–4) judges the same ordering with a paired 95% interval; the cell below reads it, when the
# repository's `docs/results` is there.

# %%
import json  # noqa: E402
import re  # noqa: E402

import tinyslim  # noqa: E402

committed = Path(tinyslim.__file__).resolve().parent.parent / "docs" / "results" / "quick-5seeds" / "report.json"
if committed.is_file():
    for c in json.loads(committed.read_text())["claims"]:
        if c["paper"] == "I-LoRA":
            lo, hi = c["ci95"]
            ordering = re.split(r" (?:in|at) ", c["test"])[0]  # "ACC(I-LoRA) > ACC(ER)"
            print(f"{ordering:<34} {c['effect']:+5.1f} [{lo:+.1f}, {hi:+.1f}] points: {c['verdict']}")
else:
    print(f"no committed report at {committed}")

# %% [markdown]
# Why I-LoRA ties ER here, measured: its slow learner is an EMA of the fast one with a memory of about
# $1/(1-\lambda)$ steps. At the paper's λ = 0.99 that is 100 steps against 600 per task, so by each
# task's end the slow learner has caught up, and the two learners score nearly the same (over seeds
# 0–4: ACC 86.6 both; BWT −15.2 slow and −15.7 fast, half a point). A memory longer than a task does
# not rescue it: at λ = 0.999 the slow learner cannot follow at all. On tuning seed 100 it scored
# 8.8% on each task right after training on it (the fast learner 97.6%) and ended at ACC 42.0 against
# the fast learner's 78.6 (`python -m tinyslim run continual --methods ilora --seed 100 --steps 600 --n-test 100
# --eval-batches 2 --method-args ilora.ema_lambda=0.999`). The plot shows seed 0's final accuracies.

# %%
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6.5, 3))
width = 0.8 / len(finals)
for i, (label, final) in enumerate(finals.items()):
    ax.bar(np.arange(len(final)) + i * width, 100 * final, width, label=label)
ax.set(xticks=np.arange(len(replay_config.tasks)) + 0.4 - width / 2, xticklabels=replay_config.tasks,
       ylabel="accuracy after the last task (%)", title=f"five tasks, a {buffer}-example buffer (seed 0)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "05_ilora_replay.png", dpi=100)
print("plot written to", OUT / "05_ilora_replay.png")
for result in replay.values():
    assert len(result["by_learner"][result["reported_learner"]]["acc_matrix"]) == len(replay_tasks)
print("tutorial 05 checks passed")
