# %% [markdown]
# # 02 · LoRA from first principles
#
# Fine-tuning all 0.8M weights of the tiny GPT to teach it one small skill is wasteful, and it
# rewrites everything the model knew. LoRA (Hu et al., arXiv 2106.09685) freezes the pretrained
# weights and learns, next to a chosen few of its linear layers, a *low-rank* correction. This
# tutorial writes down the math, attaches LoRA to the shipped base model, counts what trains,
# checks the three promises LoRA makes (it starts as a no-op, it only moves its own factors, and it
# can be folded into the weights), and fine-tunes it on one task of `tinyslim/tasks.py`.
#
# Run it: `python tutorials/02_lora.py`. `TINYSLIM_FAST=1` shortens the fine-tune.

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before numpy)
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from tinyslim.adapters import (LoraConfig, adapted_layers, inject, mark_only_adapters_trainable, merge,  # noqa: E402
                               merge_and_unload, print_trainable_parameters, unmerge)
from tinyslim.autograd import no_grad  # noqa: E402
from tinyslim import load_base  # noqa: E402
from tinyslim.data import CharTokenizer  # noqa: E402
from tinyslim.optim import Adam, clip_grad_norm_  # noqa: E402
from tinyslim.tasks import evaluate_task, make_task  # noqa: E402
from tinyslim.train import greedy_answers  # noqa: E402

FAST = os.environ.get("TINYSLIM_FAST") == "1"  # the test suite runs every tutorial in this mode
OUT = Path("runs/tutorials")
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. The math
#
# A linear layer computes $y = W_0 x + b_0$ with $W_0 \in \mathbb{R}^{d_{out}\times d_{in}}$.
# Fine-tuning would learn a full $\Delta W$ of the same size. LoRA bets that the useful
# $\Delta W$ has low rank and writes it as a product of two thin matrices:
#
# $$y = W_0 x + b_0 + s\, B (A x), \qquad A \in \mathbb{R}^{r\times d_{in}},\;
#   B \in \mathbb{R}^{d_{out}\times r},\; s = \alpha / r .$$
#
# * **Cheap.** Per adapted layer it trains $r\,(d_{in} + d_{out})$ numbers instead of
#   $d_{in} d_{out}$. The forward never forms $BA$: it computes $H = X A^\top$ ($N\times r$),
#   then $H B^\top$.
# * **A no-op at the start.** $A \sim U(\pm 1/\sqrt{d_{in}})$ and $B = 0$, so the adapted model
#   is the base model, bit for bit, and the first gradient step moves only $B$ (because
#   $\partial L/\partial A = s\,B^\top (\partial L/\partial y)\, x^\top = 0$ when $B = 0$).
# * **Mergeable.** After training, $W_0 \leftarrow W_0 + s\,BA$ gives a plain dense model with no
#   extra cost at inference; $W_0 \leftarrow W_0 - s\,BA$ takes it out again.
#
# `tinyslim.adapters.LoraLinear` is exactly these lines (its docstring lists them); its low-rank
# path is one call of the shared kernel `mixture_lowrank` with a single expert (tutorial 09).

# %% [markdown]
# ## 2. Attach LoRA to the pretrained base
#
# `inject` replaces every `Linear` whose name ends with one of `target_modules` (PEFT's rule) by a
# `LoraLinear` that keeps the frozen layer as its child `base_layer`. We adapt the attention's
# fused q,k,v projection and both MLP matrices of every block, with r = 8, α = 16 (s = 2).

# %%
config = LoraConfig(r=8, lora_alpha=16, target_modules=["attn.c_attn", "mlp.c_fc", "mlp.c_proj"])
reference = load_base()  # an untouched copy, to compare against
model, source = load_base(with_source=True)
names = inject(model, config, seed=0)
mark_only_adapters_trainable(model)
print(f"base from {source}; adapted {len(names)} layers, e.g. {names[:3]}")
print(adapted_layers(model)[0][1])
line = print_trainable_parameters(model)

expected = sum(config.r * (layer.in_features + layer.out_features) for _, layer in adapted_layers(model))
trainable = model.num_parameters(trainable_only=True)
print(f"r·(d_in + d_out) summed over the adapted layers: {expected:,d}")
assert trainable == expected
assert trainable / model.num_parameters() < 0.1  # a few percent of the model trains

# %% [markdown]
# ## 3. Promise one: B = 0 is a no-op
#
# Same batch through the base and through the freshly adapted model: the logits must be
# *bit-identical* (`np.array_equal`, not `allclose`), because the kernel skips nothing but adds an
# exact zero.

# %%
task = make_task("cap", seed=0, n_train=2000, n_test=100)
print(task)
print("an example:", repr(task.train[0][0] + task.train[0][1]))
x, y, mask = task.batch(16, np.random.default_rng(0))
with no_grad():
    base_logits = reference(x)[0].data
    model.eval()
    lora_logits = model(x)[0].data
    model.train()
assert np.array_equal(base_logits, lora_logits)
print("logits with B = 0 are bit-identical to the base model's")

# %% [markdown]
# ## 4. Promise two: at initialisation only B gets a gradient
#
# $\partial L/\partial A = s\,B^\top g\,x^\top$ vanishes while $B = 0$; $\partial L/\partial B =
# s\,g\,(Ax)^\top$ does not. The loss is the answer-only cross-entropy (`loss_mask`): the prompt
# `cap abcd=` is given, only `ABCD\n` is learned.

# %%
_, loss = model(x, y, loss_mask=mask)
loss.backward()
layer = adapted_layers(model)[0][1]
print(f"initial answer loss {loss.item():.3f} nats/char")
print(f"|dA| max = {np.abs(layer.lora_A.grad).max():.1e}, |dB| max = {np.abs(layer.lora_B.grad).max():.1e}")
assert np.all(layer.lora_A.grad == 0) and np.abs(layer.lora_B.grad).max() > 0
model.zero_grad()

# %% [markdown]
# ## 5. A short fine-tune on `cap` (upper-case four letters)
#
# Adam on the LoRA factors only, batch 16, a learning rate that decays linearly to 0, gradient
# clipping at 1 (the recipe scenario A was calibrated with; `ContinualConfig`'s docstring in
# `tinyslim/experiments/continual.py` records what it reaches). We measure exact-match accuracy of the
# greedy answer on 100 held-out prompts before and after.

# %%
frozen_before = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
params = model.parameters(trainable_only=True)
steps, lr0 = (200, 4e-3) if FAST else (800, 4e-3)
optimizer = Adam(params, lr=lr0)
rng = np.random.default_rng(1)
model.eval()
acc_before = evaluate_task(model, task)
model.train()
losses = []
for step in range(steps):
    optimizer.lr = lr0 * (1 - step / steps)
    x, y, mask = task.batch(16, rng)
    _, loss = model(x, y, loss_mask=mask)
    optimizer.zero_grad()
    loss.backward()
    clip_grad_norm_(params, 1.0)
    optimizer.step()
    losses.append(loss.item())
model.eval()
acc_after = evaluate_task(model, task)
print(f"{steps} steps: answer loss {np.mean(losses[:5]):.3f} → {np.mean(losses[-5:]):.3f} nats/char")
print(f"exact match on held-out cap prompts: {acc_before:.0%} → {acc_after:.0%}")
for (prompt, answer), got in zip(task.test[:3], greedy_answers(model, CharTokenizer(), [p for p, _ in task.test[:3]], 5)):
    print(f"  {prompt}{got!r:8s} (want {answer!r})")

assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
if not FAST:
    assert acc_after >= 0.8  # measured 95-99% at 800 steps; the base model gets 0%
# frozen means frozen: every base weight is bit-identical after training
assert all(np.array_equal(p.data, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(losses)
ax.set(title=f"LoRA r=8 on cap: {acc_before:.0%} → {acc_after:.0%} exact match", xlabel="step",
       ylabel="answer loss (nats/char)")
fig.tight_layout()
fig.savefig(OUT / "02_lora_loss.png", dpi=100)
print("plot written to", OUT / "02_lora_loss.png")

# %% [markdown]
# ## 6. Promise three: merge and unmerge
#
# `merge(model)` adds $s\,BA$ into every $W_0$ and the forward skips the low-rank path; the
# function must not change (equal up to float32 rounding, since $W_0 x + s B A x$ and
# $(W_0 + sBA)x$ round differently). `unmerge` subtracts it again and restores $W_0$ up to
# rounding. Merging twice would add $\Delta W$ twice, so it raises.

# %%
x, _, _ = task.batch(16, np.random.default_rng(2))
W0 = layer.base_layer.weight.data.copy()
with no_grad():
    unmerged = model(x)[0].data
    merge(model)
    merged = model(x)[0].data
    dW = layer.base_layer.weight.data - W0
print(f"max |logits merged − unmerged| = {np.abs(merged - unmerged).max():.1e}")
print(f"rank of the merged ΔW of {names[0]}: {np.linalg.matrix_rank(dW.astype(np.float64), tol=1e-6)} "
      f"(≤ r = {config.r})")
assert np.allclose(merged, unmerged, rtol=1e-4, atol=1e-4)
assert np.linalg.matrix_rank(dW.astype(np.float64), tol=1e-6) <= config.r
try:
    merge(model)
except RuntimeError as err:
    print("merging twice:", str(err)[:70], "…")
else:
    raise AssertionError("merging twice must raise")
unmerge(model)
print(f"after unmerge, max |W − W0| = {np.abs(layer.base_layer.weight.data - W0).max():.1e}")
assert np.allclose(layer.base_layer.weight.data, W0, rtol=1e-5, atol=1e-6)

# %% [markdown]
# `merge_and_unload` makes the result permanent: a plain GPT with the original parameter names
# (no `base_layer`, no `lora_A`), the same function, and no adapter left to pay for.

# %%
dense = merge_and_unload(model)
with no_grad():
    dense_logits = dense(x)[0].data
print("parameter names:", [n for n, _ in dense.named_parameters()][2:5])
assert not adapted_layers(dense)
assert all("lora" not in n and "base_layer" not in n for n, _ in dense.named_parameters())
assert np.allclose(dense_logits, unmerged, rtol=1e-4, atol=1e-4)
assert dense.num_parameters() == reference.num_parameters()
print("tutorial 02 checks passed")
