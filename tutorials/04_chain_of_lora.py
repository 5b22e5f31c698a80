# %% [markdown]
# # 04 · Chain of LoRA (COLA): tune, merge, re-initialise
#
# A rank-r LoRA can only ever add a rank-r update to a weight. COLA (Xia, Qin, Hazan; arXiv
# 2401.04151) gets a higher-rank update at the same cost: train a LoRA for a while, "tie a knot" by
# merging it into the frozen weight, start a fresh LoRA that learns what is left, and repeat. This
# tutorial runs a chain, checks the algebra of the knots numerically, and races chains of m = 2 and 3
# links against plain LoRA (m = 1) at the same step budget, on a task where the rank is the bottleneck
# (sorting letters at rank 1), over three seeds.
#
# Run it: `python tutorials/04_chain_of_lora.py`. `TINYSLIM_FAST=1` trains for fewer steps.

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before numpy)
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from tinyslim.adapters import make_method  # noqa: E402
from tinyslim import load_base  # noqa: E402
from tinyslim.optim import Adam, clip_grad_norm_  # noqa: E402
from tinyslim.tasks import evaluate_task, make_task  # noqa: E402

FAST = os.environ.get("TINYSLIM_FAST") == "1"
OUT = Path("runs/tutorials")
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. The chain
#
# During link $j$ an adapted layer computes
#
# $$y = W^{(j)} x + b_0 + s\,B_j A_j x, \qquad W^{(j)} = W_0 + \sum_{i<j} s\,B_i A_i ,$$
#
# and after the last link the model is dense again:
#
# $$W_{final} = W_0 + \sum_{j=1}^{m} s\,B_j A_j, \qquad \mathrm{rank}(W_{final} - W_0) \le m\,r .$$
#
# Over a budget of $T$ optimizer steps the knots sit at $\lfloor jT/m \rfloor$. At a knot: merge
# ($W \leftarrow W + sB_jA_j$), draw a fresh $A_{j+1}$, set $B_{j+1} = 0$ (so the function does not
# change) and reset Adam. One learning rate $lr_t = lr_0(1 - t/T)$ runs over the whole chain, so
# m = 1 *is* plain LoRA with the same budget. `tinyslim.adapters.COLA` implements exactly this
# (`tie_knot`, `after_step`).

# %%
TASK_NAME = "srt"  # sort the letters: a task a rank-1 update cannot fit in 800 steps (section 3 measures it)
T = 80 if FAST else 800
RANK = 1  # small on purpose: the effect can only show where the rank is a bottleneck
TARGETS = ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"]
N_TEST = 50 if FAST else 100
TASK = make_task(TASK_NAME, seed=0, n_train=2000, n_test=N_TEST)
print(TASK, f"\nbudget T = {T} steps, rank {RANK}")


def run_chain(m, seed=0, watch_knots=False):
    """Train COLA with m links for T steps on the task drawn with `seed` (the runner's loop); returns the
    method, its task, its losses and, with watch_knots, what each knot did and each link's update."""
    task = make_task(TASK_NAME, seed=seed, n_train=2000, n_test=N_TEST)
    cola = make_method("cola", chain_len=m, r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS)
    cola.attach(load_base(), seed=seed)
    params = cola.trainable_parameters()
    opt = Adam(params, lr=4e-3)
    cola.before_task(0, T, opt)  # COLA owns the learning rate from here: lr_t = lr0 (1 − t/T)
    rng, probe = np.random.default_rng(seed + 1), task.batch(8, np.random.default_rng(99))[0]
    losses, knots, link_deltas = [], [], []
    for step in range(T):
        x, y, mask = task.batch(16, rng)
        loss = cola.loss(x, y, mask)
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        at_knot = cola.t + 1 in cola.knots
        if watch_knots and at_knot:  # look just before and just after the knot is tied
            layer = cola.layers()[0]
            W_before, delta = layer.base_layer.weight.data.copy(), layer.delta_weight().copy()
            link_deltas.append({n: l.delta_weight().copy() for n, l in zip(cola.adapted, cola.layers())})
            with cola.evaluating() as model:
                before = model(probe)[0].data
        cola.after_step(step, opt)  # ties the knot when t reaches one
        if watch_knots and at_knot:
            with cola.evaluating() as model:
                after = model(probe)[0].data
            knots.append(dict(step=cola.t, logit_diff=np.abs(after - before).max(),
                              W_change_err=np.abs(layer.base_layer.weight.data - W_before - delta).max(),
                              B_zero=bool(np.all(layer.lora_B.data == 0)),
                              adam_reset=opt.state == {} and opt.step_count == 0))
    if watch_knots:
        link_deltas.append({n: l.delta_weight().copy() for n, l in zip(cola.adapted, cola.layers())})
    return cola, task, losses, knots, link_deltas

# %% [markdown]
# ## 2. The knots, checked numerically
#
# Three promises: a knot does not change the function (logits just before equal logits just after,
# up to float32 rounding); at a knot $W$ moves by exactly $s\,B_jA_j$ and the new $B$ is zero; and in
# the end $W_{final} = W_0 + \sum_j s\,B_jA_j$, whose rank exceeds $r$ once there are several links.

# %%
cola3, _, losses3, knots, link_deltas = run_chain(3, watch_knots=True)
for k in knots:
    print(f"knot at step {k['step']}: max |logits after − before| {k['logit_diff']:.1e}, "
          f"|ΔW − s·B·A| {k['W_change_err']:.1e}, new B = 0: {k['B_zero']}, Adam reset: {k['adam_reset']}")
    assert k["logit_diff"] < 1e-4 and k["W_change_err"] < 1e-6 and k["B_zero"] and k["adam_reset"]
assert [k["step"] for k in knots] == [T // 3, 2 * T // 3]

final = cola3.merged_weights()
for name in cola3.adapted[:3]:
    chain_sum = sum(d[name] for d in link_deltas)
    err = np.abs(final[name] - (cola3.W0[name] + chain_sum)).max()
    rank = np.linalg.matrix_rank((final[name] - cola3.W0[name]).astype(np.float64), tol=1e-5)
    print(f"{name}: |W_final − (W0 + Σ_j s B_j A_j)| = {err:.1e}; rank(W_final − W0) = {rank} "
          f"(r = {RANK}, m·r = {3 * RANK})")
    assert err < 1e-5 and RANK < rank <= 3 * RANK

# %% [markdown]
# ## 3. m = 1, 2, 3 at the same budget, over three seeds
#
# Same task, rank, data order and learning-rate line for every chain length; only the number of links
# differs. Each seed draws its own task split, adapter initialisation and batch order, and the three
# chain lengths of a seed share them, so the per-seed differences m − 1 are paired. The race uses the
# suite's own runner (`chain_job`, the loop of section 2 plus evaluation), so seeds 0–2 here are
# seeds 0–2 of the committed five-seed report. We report exact match on held-out prompts and the
# training loss over the last 10% of steps.
#
# Why srt at rank 1 and 800 steps: at rank 1 a LoRA can add only a rank-1 update per weight, and
# sorting needs more than that (the loss plateaus, section 4's plot). The step count was chosen on the
# tuning seeds 100–102, never on the seeds shown here: at 600 steps the chains were behind plain LoRA
# there (m = 2: −2.7 points, m = 3: −4.7), at 800 ahead (+3.0 and +2.3; docs/evidence.md, "COLA's
# step budget"). Whatever this run prints is what it found; the comparison is reported, not asserted.

# %%
from tinyslim.experiments.suite import chain_job, suite_configs  # noqa: E402

SEEDS = (0, 1, 2)
LINKS = (1, 2, 3)
chain = {**suite_configs("quick")["chain"], "task": TASK_NAME, "rank": RANK, "steps": T, "n_test": N_TEST}
base = load_base()
runs = {(m, seed): chain_job(base, chain, m, seed, False) for seed in SEEDS for m in LINKS}

print(f"{TASK_NAME}, rank {RANK}, {T} steps: exact match % (final train loss, nats/char)")
print(f"{'seed':<6}" + "".join(f"{'m = ' + str(m):>18}" for m in LINKS))
for seed in SEEDS:
    print(f"{seed:<6}" + "".join(f"{runs[m, seed]['acc']:>10.0%} ({runs[m, seed]['final_loss']:.3f})" for m in LINKS))
for m in LINKS[1:]:
    diffs = [100 * (runs[m, s]["acc"] - runs[1, s]["acc"]) for s in SEEDS]
    print(f"m = {m} − m = 1: {np.mean(diffs):+.1f} points on average (per seed: "
          f"{', '.join(f'{d:+.0f}' for d in diffs)}; ahead on {sum(d > 0 for d in diffs)} of {len(SEEDS)} seeds)")

# %% [markdown]
# How solid is that? The effect is a few points, measured on 100 test prompts. The same race run with
# section 2's loop, which draws its batches from another generator (`default_rng(seed + 1)` instead
# of the runner's data stream) but is otherwise the same, measured m = 2 − m = 1 = 0, −10 and −1 points
# on seeds 0–2: the data order alone moves one seed's difference by about ten points. That is why the
# claim is judged on five seeds with an interval (the cell below reads the committed verdicts), and
# why it is a weak one even where it is supported.

# %%
import json  # noqa: E402

import tinyslim  # noqa: E402

committed = Path(tinyslim.__file__).resolve().parent.parent / "docs" / "results" / "quick-5seeds" / "report.json"
if committed.is_file():
    for c in json.loads(committed.read_text())["claims"]:
        if c["paper"] == "COLA":
            lo, hi = c["ci95"]
            print(f"five seeds: {c['toy']}: effect {c['effect']:+.1f} [{lo:+.1f}, {hi:+.1f}] points, {c['verdict']}")
else:
    print(f"no committed report at {committed}")

cola1, _, losses1, _, _ = run_chain(1)  # seed 0 with section 2's loop, for the loss curves below
rank1 = max(np.linalg.matrix_rank((w - cola1.W0[n]).astype(np.float64), tol=1e-5)
            for n, w in cola1.merged_weights().items())
print(f"plain LoRA's update has rank {rank1}; the chain's has rank up to {3 * RANK}")
assert rank1 <= RANK

# %% [markdown]
# ## 4. The picture
#
# Left: the training loss of seed 0 for m = 1 and m = 3, from section 2's loop (dotted lines: the
# knots; at each the loss may jump as the fresh link starts from zero and Adam restarts). Right: exact
# match per seed and chain length from the race of section 3, with each seed's points joined.

# %%
import matplotlib.pyplot as plt  # noqa: E402

fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
smooth = lambda v: np.convolve(v, np.ones(10) / 10, mode="valid")  # noqa: E731
ax.plot(smooth(losses1), label="m = 1 (plain LoRA)")
ax.plot(smooth(losses3), label="m = 3 (COLA)")
for k in knots:
    ax.axvline(k["step"], color="gray", ls=":", lw=1)
ax.set(title=f"rank {RANK} on {TASK_NAME}, seed 0: same budget", xlabel="step", ylabel="answer loss (nats/char)")
ax.legend()
for seed in SEEDS:
    ax2.plot(LINKS, [100 * runs[m, seed]["acc"] for m in LINKS], "o-", alpha=0.6, label=f"seed {seed}")
ax2.plot(LINKS, [100 * np.mean([runs[m, s]["acc"] for s in SEEDS]) for m in LINKS], "k_", ms=25, mew=2, label="mean")
ax2.set(title="exact match on held-out prompts", xlabel="links m", ylabel="%", xticks=LINKS)
ax2.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "04_cola.png", dpi=100)
print("plot written to", OUT / "04_cola.png")

# %% [markdown]
# Every run learned (its final loss is below the loss at the start); which chain length wins is what
# the tables above printed.

# %%
start_loss = np.mean(losses1[:5])
for (m, seed), r in runs.items():
    assert r["final_loss"] < start_loss, (m, seed, r["final_loss"], start_loss)
print("tutorial 04 checks passed")
