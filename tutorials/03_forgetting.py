# %% [markdown]
# # 03 · Catastrophic forgetting, made visible
#
# Tutorial 02 taught one LoRA one task. Real fine-tuning is a *sequence*: a model learns task 1,
# then task 2, then task 3, and nobody retrains it on the old data. The naive recipe, Seq-LoRA,
# keeps training one and the same LoRA through the sequence. It learns every new task, and it
# forgets the old ones almost completely: the phenomenon that I-LoRA (05), MoLE (06) and SLIM (07)
# were invented against. This tutorial runs Seq-LoRA through three tasks with tinyslim's scenario-A
# runner, draws the accuracy matrix as a heatmap, computes the two numbers the continual-learning
# literature reports (ACC and BWT), and watches what happens to the base model's general
# capability (its pretraining loss) on the way.
#
# Run it: `python tutorials/03_forgetting.py`. `TINYSLIM_FAST=1` trains for a few steps only.

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before numpy)
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from tinyslim import load_base  # noqa: E402
from tinyslim.experiments.continual import ContinualConfig, build_method, run_continual  # noqa: E402
from tinyslim.experiments.metrics import average_accuracy, backward_transfer, forgetting, learning_accuracy  # noqa: E402
from tinyslim.tasks import make_tasks  # noqa: E402

FAST = os.environ.get("TINYSLIM_FAST") == "1"  # the test suite runs every tutorial in this mode
OUT = Path("runs/tutorials")
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. The setting: one LoRA, a sequence of tasks
#
# The tasks are tagged character maps from `tinyslim/tasks.py`: the prompt names the map, the model
# must write the answer (`rev abcd=dcba`, `cap abcd=ABCD`, `sft abcd=bcde`). Because every prompt
# carries its tag, one model *could* solve all three at once; nothing in the architecture forces
# forgetting.
#
# Seq-LoRA (`make_method("lora")`, `tinyslim.adapters.SeqLoRA`) is plain LoRA trained task after
# task: for task $k = 0, 1, \dots, T-1$ it minimises only the current task's answer loss
#
# $$\theta_k = \arg\min_\theta \; \mathbb{E}_{(x,y)\sim \mathcal{D}_k}\, \mathrm{CE}(x, y;\, W_0 + sBA),
#   \qquad \theta = \{A, B\},$$
#
# starting from $\theta_{k-1}$. Nothing in that objective mentions $\mathcal{D}_0, \dots,
# \mathcal{D}_{k-1}$, so gradient descent is free to overwrite whatever the old tasks relied on.
#
# The runner (`tinyslim.experiments.continual.run_continual`) does exactly the loop of a real
# continual fine-tune: Adam reset at every task boundary, the learning rate decaying linearly to 0
# within each task, gradient clipping at 1, and after every task an evaluation of *every* task.

# %%
TASKS = ("rev", "cap", "sft")
if FAST:  # mechanics only: a few steps, a few test prompts, no fact-recall probe
    config = ContinualConfig(tasks=TASKS, steps=15, n_train=200, n_test=10, eval_batches=1, eval_batch_size=8,
                             fact_recall=False)
else:  # 800 steps per task at lr 2e-3: at scenario A's 4e-3 the third task is learnt or not depending on the
    # CPU's BLAS kernel (sft 100% with OpenBLAS's Haswell kernel, 4% with SkylakeX: README, "Determinism");
    # at 2e-3 each task is learnt with both (measured 98-100%)
    config = ContinualConfig(tasks=TASKS, steps=800, lr=2e-3, n_train=2000, n_test=100, eval_batches=2,
                             eval_batch_size=32, fact_recall=False)
tasks = make_tasks(config.tasks, seed=0, n_train=config.n_train, n_test=config.n_test)
for t in tasks:
    print(t, "e.g.", repr(t.train[0][0] + t.train[0][1]))
base, source = load_base(with_source=True)
print(f"base from {source}; {config.steps} steps per task, batch {config.batch_size}, lr {config.lr} (linear decay)")

# %% [markdown]
# ## 2. Run Seq-LoRA through the sequence
#
# `build_method("lora", config)` makes a Seq-LoRA with the scenario's shared adapter shape (rank 8,
# α = 16, on `attn.c_attn`, `mlp.c_fc`, `mlp.c_proj`). The runner copies the base model, so `base`
# stays untouched, and returns the accuracy matrix
#
# $$R_{ij} = \text{exact-match accuracy on task } j \text{ after training through task } i .$$

# %%
method = build_method("lora", config)
result = run_continual(method, tasks, config, base, seed=0, progress=False)
R = np.array(result["by_learner"][result["reported_learner"]]["acc_matrix"])
print(f"trained {result['trainable_params']:,d} LoRA numbers in {result['train_s']:.0f} s "
      f"(+ {result['eval_s']:.0f} s evaluation)")
print("R[i][j] (%): accuracy on task j (columns) after training through task i (rows)")
print("after    " + "".join(f"{t:>6}" for t in TASKS))
for name, row in zip(TASKS, R):
    print(f"{name:<9}" + "".join(f"{100 * v:6.0f}" for v in row))

# the runner's matrix is well formed whatever the size
assert R.shape == (len(TASKS), len(TASKS))
assert np.all((R >= 0) & (R <= 1))

# %% [markdown]
# ## 3. Two numbers from the matrix: ACC and BWT
#
# Read the matrix by its rows and its diagonal (`tinyslim/experiments/metrics.py`):
#
# $$\mathrm{ACC} = \frac{1}{T}\sum_{j} R_{T-1,\,j}
#   \qquad\text{(how good the final model is on everything)}$$
#
# $$\mathrm{BWT} = \frac{1}{T-1}\sum_{j<T-1} \big(R_{T-1,\,j} - R_{jj}\big)
#   \qquad\text{(how much later training changed earlier tasks; } < 0 \text{ is forgetting)}$$
#
# and the diagonal's mean, the *learning accuracy* $\frac1T\sum_j R_{jj}$, says whether each task
# was learnt at all (plasticity). A method that never forgets has BWT = 0; Seq-LoRA in a world
# where every task is learnt and then wiped has BWT ≈ −1 and ACC ≈ 1/T (only the last task
# survives). Below, the library's functions against the formulas written out by hand.

# %%
T = len(TASKS)
acc, bwt, learned = average_accuracy(R), backward_transfer(R), learning_accuracy(R)
by_hand_bwt = sum(R[T - 1, j] - R[j, j] for j in range(T - 1)) / (T - 1)
print(f"ACC {100 * acc:.1f}  BWT {100 * bwt:+.1f}  learning accuracy {100 * learned:.1f}  (points)")
print("forgetting per earlier task (best seen − final):", [f"{100 * f:.0f}" for f in forgetting(R)])
assert np.isclose(acc, R[-1].mean()) and np.isclose(bwt, by_hand_bwt) and np.isclose(learned, np.trace(R) / T)
assert np.isclose(result["acc"], acc) and np.isclose(result["bwt"], bwt)  # what the runner reports

# %% [markdown]
# ## 4. The heatmap
#
# Below the diagonal is the past (tasks trained earlier), above it the future (tasks not trained yet,
# which the base model cannot do: 0%). Forgetting is a bright diagonal over a dark lower triangle.

# %%
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(4.2, 3.6))
im = ax.imshow(100 * R, vmin=0, vmax=100, cmap="viridis")
for i in range(T):
    for j in range(T):
        ax.text(j, i, f"{100 * R[i, j]:.0f}", ha="center", va="center", color="w" if R[i, j] < 0.6 else "k")
ax.set_xticks(range(T), TASKS)
ax.set_yticks(range(T), [f"after {t}" for t in TASKS])
ax.set(xlabel="evaluated on task", title=f"Seq-LoRA: ACC {100 * acc:.0f}, BWT {100 * bwt:+.0f}")
fig.colorbar(im, ax=ax, label="exact match (%)")
fig.tight_layout()
fig.savefig(OUT / "03_forgetting_matrix.png", dpi=100)
print("plot written to", OUT / "03_forgetting_matrix.png")

# %% [markdown]
# ## 5. Why it forgets: the latest map wins
#
# The tag is in every prompt, yet after training on `sft` the model answers a `rev` prompt with a
# shifted string. Look at what the final model writes for the first tasks' test prompts: the
# errors are not noise, they are the *last* task's map applied to the old prompt.

# %%
from tinyslim.data import CharTokenizer  # noqa: E402
from tinyslim.train import greedy_answers  # noqa: E402

last, latest_map = tasks[-1].spec, []
with method.evaluating() as model:
    for t in tasks[:-1]:
        prompts = [p for p, _ in t.test]
        got = greedy_answers(model, CharTokenizer(), prompts, t.max_answer_len + 1)
        for (p, want), g in list(zip(t.test, got))[:3]:
            print(f"  {p}{g!r:8s} (want {want!r}; {last.tag}'s map gives {last.solve(p[len(t.name) + 1:-1])!r})")
        as_last = np.mean([g == last.solve(p[len(t.name) + 1:-1]) for p, g in zip(prompts, got)])
        latest_map.append(as_last)
        print(f"  {t.name}: {as_last:.0%} of the final model's answers are exactly {last.tag}'s map of the input")

# %% [markdown]
# ## 6. General capability drifts too
#
# The LoRA was trained only on answer characters of three toy maps. What did that do to the
# model's pretraining skill, next-character prediction on held-out Python documentation? The
# runner measures it after every task (`GeneralEval`): loss in nats/char, next-character accuracy,
# and how often the top-1 prediction still agrees with the base model's.

# %%
base_g = result["base_general"]
print(f"{'':<12}{'pydoc loss':>11}{'next-char':>11}{'agree w/ base':>15}")
print(f"{'base':<12}{base_g['val_loss']:11.2f}{base_g['next_char_acc']:11.0%}{'100%':>15}")
for name, g in zip(TASKS, result["by_learner"][result["reported_learner"]]["general"]):
    print(f"{'after ' + name:<12}{g['val_loss']:11.2f}{g['next_char_acc']:11.0%}{g['agreement']:15.0%}")
print(f"general loss increase after the sequence: {result['general_loss_increase']:+.2f} nats/char")

# %% [markdown]
# ## 7. What this run shows
#
# The cell below puts this run's numbers into words. At full size (800 steps per task) the tutorial
# also asserts the story it tells: every task is learnt right after training on it (diagonal ≥ 80%),
# then largely forgotten (BWT ≤ −50 points), the pretraining loss goes up, and most of the final
# model's answers to the old tasks' prompts are exactly the last task's map of the input: the tag is
# ignored, the latest map wins. The same holds over seeds and over five tasks: see the README's
# results at full size (`python -m tinyslim run continual --seeds 3`). Tutorial 05 shows the simplest
# cure, replaying old examples, and I-LoRA's refinement of it.

# %%
diag = ", ".join(f"{100 * v:.0f}" for v in np.diag(R))
final = ", ".join(f"{100 * v:.0f}" for v in R[-1])
as_last = " and ".join(f"{v:.0%} of its `{t.name}` answers" for t, v in zip(tasks[:-1], latest_map))
print(f"Right after training on each task, Seq-LoRA scored {diag}% on it (the diagonal); the final model scores "
      f"{final}% on {', '.join(TASKS)}: ACC {100 * acc:.1f}, BWT {100 * bwt:+.1f} points. {as_last[0].upper()}"
      f"{as_last[1:]} are exactly the `{last.tag}` map of the input. The pretraining loss went from "
      f"{base_g['val_loss']:.2f} to {base_g['val_loss'] + result['general_loss_increase']:.2f} nats/char.")
if not FAST:
    assert np.diag(R).min() >= 0.8  # each task learnt right after training on it
    assert bwt <= -0.5  # and then largely forgotten
    assert result["general_loss_increase"] > 0  # the pretraining loss went up
    assert min(latest_map) > 0.5  # old prompts get the last task's map
print("tutorial 03 checks passed")
