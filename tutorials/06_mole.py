# %% [markdown]
# # 06 · MoLE: composing trained LoRAs with learned gates
#
# You have several LoRAs, each good at one skill. Can one model serve all the skills at once,
# without retraining them? MoLE (Wu, Huang, Wei; arXiv 2404.13628) freezes the LoRAs and learns only
# a small **gate per layer** that decides, token by token, how much of each LoRA to use. This
# tutorial trains three small LoRAs, composes them three ways (sum, average, MoLE), draws the gates
# per layer, masks a LoRA out at inference without retraining, and ends with what the composition
# keeps of the single LoRAs' scores: MoLE as the paper defines its gate (one per token) beside the
# gate that works in this toy world (one per growing prefix of the line).
#
# Run it: `python tutorials/06_mole.py`. `TINYSLIM_FAST=1` trains for fewer steps.

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before numpy)
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from tinyslim.adapters import NLA, LoraSum, Mole, adapter_state_dict, make_method  # noqa: E402
from tinyslim.adapters.mole import balance_loss  # noqa: E402
from tinyslim.autograd import no_grad  # noqa: E402
from tinyslim import load_base  # noqa: E402
from tinyslim.data import PAD_ID  # noqa: E402
from tinyslim.optim import Adam, clip_grad_norm_  # noqa: E402
from tinyslim.tasks import evaluate_task, make_tasks  # noqa: E402

FAST = os.environ.get("TINYSLIM_FAST") == "1"
OUT = Path("runs/tutorials")
OUT.mkdir(parents=True, exist_ok=True)
TARGETS = ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"]

# %% [markdown]
# ## 1. Three source LoRAs
#
# One plain LoRA per task (tutorial 02), each trained alone from the base: `cap` (upper-case),
# `rev` (reverse) and `sft` (Caesar shift). `make_tasks` pads the three to one sequence length so that
# their batches can be mixed later.

# %%
tasks = make_tasks(["cap", "rev", "sft"], seed=0, n_train=2000, n_test=30 if FAST else 100)
STEPS = 100 if FAST else 600
MOLE_STEPS = 600  # the gate steps of the full run (scenario B's mole_steps)


def train(method, batches, steps, lr=4e-3):
    """The runner's loop (scenario A): Adam, linear decay to 0, clip at 1; returns the losses."""
    params = method.trainable_parameters()
    opt = Adam(params, lr=lr)
    method.before_task(0, steps, opt)
    losses = []
    for step in range(steps):
        opt.lr = lr * (1 - step / steps)
        x, y, mask = batches(step)
        loss = method.loss(x, y, mask)
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(params, 1.0)
        opt.step()
        method.after_step(step, opt)
        losses.append(loss.item())
    return losses


def accuracies(method):
    with method.evaluating() as model:
        return [evaluate_task(model, t) for t in tasks]


sources, own = [], []
for i, task in enumerate(tasks):
    lora = make_method("lora", r=4, lora_alpha=8, target_modules=TARGETS)
    lora.attach(load_base(), seed=i)
    rng = np.random.default_rng([1, i])
    train(lora, lambda step: task.batch(16, rng), STEPS)
    sources.append(lora)
    accs = accuracies(lora)
    own.append(accs[i])
    print(f"LoRA {i} on {task.name}: accuracy on (cap, rev, sft) = " + ", ".join(f"{a:.0%}" for a in accs))

# %% [markdown]
# Each LoRA is good at its own task and useless at the others (it applies its own map whatever the
# tag says). Now we want *one* model for all three.
#
# ## 2. Two compositions that need no training
#
# With the source deltas $\Delta W_i = s_i B_i A_i$:
#
# $$\text{sum: } W = W_0 + \textstyle\sum_i \Delta W_i, \qquad
#   \text{NLA: } W = W_0 + \tfrac{1}{N}\sum_i \Delta W_i .$$
#
# The sum applies every LoRA at full strength at once (they collide); the average keeps the model
# sane but gives each LoRA only a third of its strength.

# %%
states = [adapter_state_dict(m.model) for m in sources]
scales = [m.config.scale for m in sources]
results = {}
for name, cls in (("sum", LoraSum), ("NLA", NLA)):
    method = cls(lora_sources=states, lora_scales=scales)
    method.attach(load_base(), seed=0)
    results[name] = accuracies(method)
nla = method

# %% [markdown]
# ## 3. MoLE: a learned gate per layer
#
# In every adapted layer, MoLE computes all $N$ branch outputs first, then a softmax gate from them:
#
# $$u_i = s_i B_i A_i x, \quad U = \mathrm{LayerNorm}([u_1;\dots;u_N]), \quad
#   G = \mathrm{softmax}\!\big(e^\top U / \tau\big), \quad y = W_0 x + b_0 + \sum_i G_i\, u_i .$$
#
# Only the gate matrix $e$ ($N d_{out} \times N$) and $\rho = \log\tau$ train, on an equal mixture of
# the three tasks. A balance loss keeps the gates from collapsing onto one LoRA:
#
# $$q_i = \text{mean of } G_i \text{ over layers and tokens}, \qquad
#   L = L_{CE} + 0.5\,(-\textstyle\sum_i \log q_i), \qquad -\sum_i \log q_i \ge N \log N .$$
#
# `MoleLinear.gate` and `balance_loss` in `tinyslim/adapters/mole.py` are these equations.
#
# **Which U does the gate read?** The paper's gate reads $U$ at the current token (`gate_pool="token"`).
# In a character model one token's LoRA outputs say little about which task the line is: the tag
# (`cap`, `rev`, `sft`) sits at the start of the line, several characters back. A gate that reads the
# mean of $U$ over the whole line (`"sequence"`) sees the tag, but in training it also sees the answer,
# which greedy decoding has not written yet: a gate can learn to recognise `cap` from the upper-case
# answer and then, while decoding, never see it. `gate_pool="prefix"` reads, at token $t$, the mean of
# $U$ over tokens $0..t$: the tag is in it, the future is not, so the gate that trains is the gate that
# decodes. The gate is still $\mathrm{softmax}(e^\top \bar U/\tau)$ over frozen LoRAs, and still the
# only thing that trains. docs/mole_gates.md has the measurements behind this choice.
#
# We train both gates the same way, on the same mixed batches: Adam, lr 1e-3 (decaying linearly to
# 0), batches of 12 (4 per task).

# %%
mix_rng = np.random.default_rng(2)


def mixed_batch(step, per_task=4):
    parts = [t.batch(per_task, mix_rng) for t in tasks]
    return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))


GATE_STEPS, GATE_LR = (60 if FAST else MOLE_STEPS), 1e-3
moles = {}
for label, pool in (("MoLE (token)", "token"), ("MoLE (prefix)", "prefix")):
    m = Mole.from_methods(sources, pad_token_id=PAD_ID, gate_pool=pool)
    m.attach(load_base(), seed=0)
    if pool == "prefix":
        frozen = {n: p.data.copy() for n, p in m.model.named_parameters() if not p.requires_grad}
    mix_rng = np.random.default_rng(2)  # the same batches for both gates
    gate_losses = train(m, mixed_batch, GATE_STEPS, lr=GATE_LR)
    results[label] = accuracies(m)
    moles[label] = m
    print(f"{label}: trains {sum(p.size for p in m.trainable_parameters()):,d} numbers (the three LoRAs hold "
          f"{sum(v.size for s in states for v in s.values()):,d}, frozen); loss {np.mean(gate_losses[:5]):.3f} → "
          f"{np.mean(gate_losses[-5:]):.3f}")
mole = moles["MoLE (prefix)"]

print(f"\n{'':14s}" + "".join(f"{t.name:>7s}" for t in tasks) + "   mean")
for name, accs in results.items():
    print(f"{name:14s}" + "".join(f"{a:7.0%}" for a in accs) + f"{np.mean(accs):7.1%}")

# %% [markdown]
# Invariants that hold whatever the run: only $e$ and $\rho$ moved (the base and all three LoRAs are
# bit-identical), every gate is positive and sums to 1, and the balance loss is at least $N\log N$.

# %%
assert all(np.array_equal(p.data, frozen[n]) for n, p in mole.model.named_parameters() if not p.requires_grad)
x_all = np.concatenate([t.batch(8, np.random.default_rng(3))[0] for t in tasks])
with mole.evaluating() as model:
    model(x_all)
gates = [layer.current_gate for layer in mole.gate_layers()]
real = (x_all != PAD_ID).reshape(-1)
G = np.stack([g.data[real] for g in gates])  # (layers, real tokens, N)
print(f"gates over {G.shape[0]} layers × {G.shape[1]} tokens: min {G.min():.1e}, max |Σ_i G_i − 1| = "
      f"{np.abs(G.sum(axis=-1) - 1).max():.1e}")
assert np.all(G >= 0) and np.allclose(G.sum(axis=-1), 1, atol=1e-5)  # > 0 in exact arithmetic; float32 may underflow
L_bal = balance_loss(gates, real).item()
print(f"balance loss {L_bal:.4f} ≥ N·log N = {3 * np.log(3):.4f}")
assert L_bal >= 3 * np.log(3) - 1e-5

# %% [markdown]
# ## 4. Where does each layer look? The gates per layer
#
# `answer_gates(mole, tasks)` feeds each test prompt alone and reads every layer's gate at its last
# character: the gate that chooses the first answer character in greedy decoding. One heatmap per
# task's prompts, for each MoLE: rows are layers, columns are the three LoRAs. A perfect router is
# bright on its own task's column in every row.

# %%
import matplotlib.pyplot as plt  # noqa: E402

from tinyslim.experiments.composition import answer_gates  # noqa: E402

fig, axes = plt.subplots(2, 3, figsize=(9, 7), sharey=True, sharex=True)
own_gate = {}
for row, (label, m) in zip(axes, moles.items()):
    means = answer_gates(m, tasks)  # {task: {layer: mean G (3,)}}
    layer_names = list(means[tasks[0].name])
    own_gate[label] = {}
    for ax, (j, t) in zip(row, enumerate(tasks)):
        M = np.stack([means[t.name][n] for n in layer_names])
        im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set(title=f"{label}: {t.name} prompts", xticks=range(3), xticklabels=[s.name for s in tasks])
        own_gate[label][t.name] = float(M[:, j].mean())
    row[0].set(yticks=range(len(layer_names)), yticklabels=[n.replace("transformer.", "") for n in layer_names])
    row[0].tick_params(axis="y", labelsize=6)
    print(f"{label}: mean gate on the prompt's own LoRA at the first answer character: "
          + ", ".join(f"{t} {v:.2f}" for t, v in own_gate[label].items()) + " (uniform: 0.33)")
fig.colorbar(im, ax=axes, shrink=0.8, label="mean gate")
fig.savefig(OUT / "06_mole_gates.png", dpi=100, bbox_inches="tight")
print("plot written to", OUT / "06_mole_gates.png")

# %% [markdown]
# ## 5. Masking a LoRA at inference
#
# Keep a subset $S$ and renormalise: $G'_i = G_i\,\mathbb{1}[i\in S] / \sum_{j\in S} G_j$. With
# $S = \{j\}$ the gate is exactly 1 and the layer *is* LoRA $j$, so the logits equal those of the
# plain LoRA model $j$. With $e = 0$ the gates are uniform and MoLE *is* NLA.
#
# The compiled kernel sums in its own order for each gate form, so the two models would agree only to
# float32 rounding; on the NumPy backend (`TINYSLIM_BACKEND=numpy`) both take the same path and agree
# bit for bit.

# %%
x = tasks[1].batch(8, np.random.default_rng(5))[0]
backend = os.environ.get("TINYSLIM_BACKEND")
os.environ["TINYSLIM_BACKEND"] = "numpy"  # read at every kernel call
try:
    for j, src in enumerate(sources):
        with mole.masked([j]), mole.evaluating() as model:
            masked_logits = model(x)[0].data
        with src.evaluating() as model:
            alone = model(x)[0].data
        assert np.array_equal(masked_logits, alone), j  # bit for bit
finally:
    if backend is None:
        del os.environ["TINYSLIM_BACKEND"]
    else:
        os.environ["TINYSLIM_BACKEND"] = backend
print("MoLE masked to {j} equals LoRA j alone, bit for bit, for j = 0, 1, 2")

with mole.evaluating() as model, no_grad():
    saved = [layer.gate_e.data.copy() for layer in mole.gate_layers()]
    for layer in mole.gate_layers():
        layer.gate_e.data[...] = 0
    uniform_logits = model(x)[0].data
    for layer, e in zip(mole.gate_layers(), saved):
        layer.gate_e.data[...] = e
with nla.evaluating() as model:
    nla_logits = model(x)[0].data
assert np.allclose(uniform_logits, nla_logits, rtol=1e-4, atol=1e-4)
print("MoLE with e = 0 equals NLA")

masked = {}
for j, t in enumerate(tasks):
    keep = [i for i in range(3) if i != j]
    with mole.masked(keep):
        masked[t.name] = accuracies(mole)
    print(f"MoLE without LoRA {j} ({t.name}): " + ", ".join(f"{u.name} {a:.0%}" for u, a in zip(tasks, masked[t.name])))

# %% [markdown]
# ## 6. The effect: what the composition keeps of the single LoRAs
#
# Each single LoRA serves its own task; the composed model must serve all three. The bar chart puts
# each composition's accuracy per task beside the single LoRA's own score, and the number under it is
# the composed mean divided by the singles' mean (1.0: the union is served as well as each task is by
# its own LoRA). Nothing below is asserted: the cell prints what this run measured.

# %%
labels = ["single LoRA"] + list(results)
per_task = {"single LoRA": own, **results}
fig, ax = plt.subplots(figsize=(8, 3.5))
width = 0.8 / len(labels)
for k, name in enumerate(labels):
    ax.bar(np.arange(3) + (k - (len(labels) - 1) / 2) * width, per_task[name], width, label=name)
ax.set(xticks=range(3), xticklabels=[t.name for t in tasks], ylabel="exact match", ylim=(0, 1.05),
       title="composed accuracy per task, beside each task's own LoRA")
ax.legend(fontsize=7, ncol=3)
fig.savefig(OUT / "06_mole_effect.png", dpi=100, bbox_inches="tight")
print("plot written to", OUT / "06_mole_effect.png")

mean_acc = {name: float(np.mean(accs)) for name, accs in results.items()}
singles_mean = float(np.mean(own))
kept = {name: v / singles_mean if singles_mean > 0 else float("nan") for name, v in mean_acc.items()}  # nan: 0/0
for name in results:
    print(f"{name:14s} mean accuracy {mean_acc[name]:6.1%}  = {kept[name]:.2f} of the singles' mean "
          f"({singles_mean:.1%})")
best = max(mean_acc, key=mean_acc.get)
print(f"The three LoRAs reached {min(own):.0%}–{max(own):.0%} on their own tasks. MoLE with the paper's per-token "
      f"gate keeps {kept['MoLE (token)']:.2f} of their mean, MoLE with the prefix gate {kept['MoLE (prefix)']:.2f}; "
      f"NLA {kept['NLA']:.2f}, the sum {kept['sum']:.2f}. MoLE (prefix) > NLA > sum "
      f"{'holds' if mean_acc['MoLE (prefix)'] > mean_acc['NLA'] > mean_acc['sum'] else 'does not hold'} in this run "
      f"(best: {best}). Masking LoRA j dropped task j in "
      f"{sum(masked[t.name][j] < results['MoLE (prefix)'][j] for j, t in enumerate(tasks))} of 3 cases.")
print("tutorial 06 checks passed")
