# %% [markdown]
# # 11 · From the toy to a real model
#
# Every method of tinyslim was written and tested first in NumPy, on a GPT small enough to read. This
# tutorial takes one of them — SLIM, the mixture of LoRA experts with identity experts and an
# out-of-distribution router (docs/methods.md §2) — up to real PyTorch models with `tinyslim.torch`:
#
# 1. the shipped base becomes a real `transformers` `GPT2LMHeadModel` (the same weights, the same layer
#    names), and it computes what the NumPy GPT computes;
# 2. SLIM trains on it with `tinyslim.torch`, step by step beside the NumPy SLIM on the NumPy GPT, from
#    the same seed and on the same batches, and we print how far apart the two runs end;
# 3. the same lines train SLIM on a Llama built from a config: any Hugging Face causal LM works.
#
# Nothing is downloaded: every model is the shipped base or built from a config. It needs the torch
# extra (`pip install -e '.[torch]'`; `make test` installs it). docs/torch.md explains the torch path.
#
# Run it: `python tutorials/11_toy_to_real.py`. `TINYSLIM_FAST=1` trains for fewer steps.

# %%
import copy
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before numpy)
from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import tinyslim.torch as tt  # noqa: E402
from tinyslim import load_base  # noqa: E402
from tinyslim.adapters import make_method  # noqa: E402
from tinyslim.autograd import no_grad  # noqa: E402
from tinyslim.data import CharTokenizer  # noqa: E402
from tinyslim.hf import save_hf_gpt2  # noqa: E402
from tinyslim.optim import Adam, clip_grad_norm_  # noqa: E402
from tinyslim.tasks import evaluate_task, make_task  # noqa: E402

FAST = os.environ.get("TINYSLIM_FAST") == "1"  # the test suite runs every tutorial in this mode
OUT = Path("runs/tutorials")
OUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()  # the toy vocabulary has no GPT-2 bos/eos ids: not an error here
transformers.logging.disable_progress_bar()

# %% [markdown]
# ## 1. The shipped base as a real GPT2LMHeadModel
#
# `tinyslim.hf.save_hf_gpt2` writes the NumPy GPT in GPT-2's layout (`config.json` and
# `model.safetensors`; the Conv1D weights transposed to (in, out)), and `transformers` reads it back
# with its own `from_pretrained`, from the local directory. Its logits must be the NumPy GPT's up to
# float32 rounding: the two compute the same function with different summation orders.
#
# `tinyslim.torch.from_gpt` does the same in memory and wraps the model in `CausalLM`, which answers the
# NumPy GPT's call (`model(x, y, loss_mask=mask) -> (logits, loss)`); that is the model the methods attach to.

# %%
base = load_base()
directory = save_hf_gpt2(base, OUT / "11_base_gpt2")
hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
print(type(hf).__name__, "from", directory, f"({sum(p.numel() for p in hf.parameters()):,} parameters)")

task = make_task("rev", seed=0, n_train=2000, n_test=50 if FAST else 200)
x, y, mask = task.batch(16, np.random.default_rng(0))
with no_grad():
    ours = base(x)[0].data
with torch.no_grad():
    theirs = hf(torch.as_tensor(x)).logits.numpy()
gap = float(np.abs(ours - theirs).max())
print(f"max |logits NumPy GPT − GPT2LMHeadModel| on a batch of 16: {gap:.1e} (float32)")
assert gap < 1e-4
print([name for name, _ in hf.named_modules() if name.endswith("c_attn")][:2], "— the NumPy GPT's layer names")

# %% [markdown]
# ## 2. SLIM on both engines, side by side
#
# The comparison is made in float64, where the two engines should agree to about 1e-12; in float32
# rounding alone would separate them. Both sides use:
#
# * the same base (`base.to(np.float64)` for NumPy, `from_gpt` of it for torch);
# * the same method and config (`make_method("slim", …)` from `tinyslim.adapters` and from
#   `tinyslim.torch`; the torch class is the NumPy class with the engine swapped, so the router, the
#   identity experts, the clusters and the masks are the same code);
# * the same seed: the torch layers draw their initial factors, masks and cluster seeds from the same
#   named NumPy streams, in the same order;
# * the same step: scenario A's (the method's loss, clip at 1, Adam — tinyslim's, and torch's
#   `torch.optim.Adam` behind the same interface in `tinyslim.torch.optim`), on the same batches.

# %%
steps = 40 if FAST else 300
settings = dict(r=8, lora_alpha=16, target_modules=["attn.c_attn", "mlp.c_fc", "mlp.c_proj"])
base64 = copy.deepcopy(base).to(np.float64)
engines = {"numpy": (make_method("slim", **settings), copy.deepcopy(base64), Adam, clip_grad_norm_),
           "torch": (tt.make_method("slim", **settings), tt.from_gpt(base64), tt.optim.Adam, tt.optim.clip_grad_norm_)}
losses = {}
for name, (method, model, optimizer_class, clip) in engines.items():
    method.attach(model, seed=0)
    params = method.trainable_parameters()
    optimizer = optimizer_class(params, lr=4e-3)
    rng = np.random.default_rng(1)  # the same batches on both engines
    losses[name] = []
    method.before_task(0, steps, optimizer)
    for step in range(steps):
        optimizer.lr = 4e-3 * (1 - step / steps)  # scenario A's linear decay
        x, y, mask = task.batch(16, rng)
        loss = method.loss(x, y, mask)
        optimizer.zero_grad()
        loss.backward()
        clip(params, 1.0)
        optimizer.step()
        method.after_step(step, optimizer)
        losses[name].append(loss.item())
    method.after_task(0)
print(engines["torch"][0].model.hf_model.__class__.__name__, "with", len(engines["torch"][0].adapted), "SLIM layers;",
      f"{steps} steps: loss {losses['numpy'][0]:.3f} → {np.mean(losses['numpy'][-5:]):.3f} (NumPy)")

# %% [markdown]
# How far apart did the two runs end? The adapter state dicts have the same keys on both engines (the
# NumPy GPT's layer names), so they compare entry by entry: every LoRA expert, router weight and cluster
# statistic.

# %%
numpy_state = engines["numpy"][0].state_dict()[0]
torch_state = engines["torch"][0].state_dict()[0]
assert sorted(numpy_state) == sorted(torch_state)
array_gap = max(float(np.abs(numpy_state[k] - torch_state[k]).max()) for k in numpy_state)
loss_gap = max(abs(a - b) for a, b in zip(losses["numpy"], losses["torch"]))
x, y, mask = task.batch(16, np.random.default_rng(2))
with engines["numpy"][0].evaluating() as model:
    numpy_logits = model(x)[0].data
with engines["torch"][0].evaluating() as model:
    torch_logits = model(x)[0].numpy()
logit_gap = float(np.abs(numpy_logits - torch_logits).max())
print(f"after {steps} steps, float64: max |Δ adapter arrays| {array_gap:.1e} over {len(numpy_state)} arrays, "
      f"max |Δ loss| {loss_gap:.1e}, max |Δ logits| {logit_gap:.1e}")
assert array_gap < 1e-8 and loss_gap < 1e-9 and logit_gap < 1e-8

accuracy = {}
for name, (method, *_) in engines.items():
    with method.evaluating() as model:  # eval mode (SLIM's masks at their expectation), gradients off
        accuracy[name] = evaluate_task(model, task)
print(f"exact match on {len(task.test)} held-out rev prompts: NumPy {accuracy['numpy']:.0%}, torch {accuracy['torch']:.0%}")
assert accuracy["numpy"] == accuracy["torch"]

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(losses["numpy"], label="NumPy (tinyslim.adapters)", lw=3, alpha=0.5)
ax.plot(losses["torch"], "--", label="torch (tinyslim.torch on GPT2LMHeadModel)")
ax.set(title=f"SLIM on rev, float64: the two engines (max |Δ loss| {loss_gap:.0e})", xlabel="step",
       ylabel="answer loss (nats/char)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "11_two_engines.png", dpi=100)
print("plot written to", OUT / "11_two_engines.png")

# %% [markdown]
# The scenario runners do this for you: `run_continual(..., engine="torch")`, or on the command line
# `python -m tinyslim run continual --engine torch --methods slim`; tests/test_torch_engine.py checks that a
# short scenario-A run gives the same numbers on both engines.
#
# ## 3. Any Hugging Face causal LM
#
# Nothing above was specific to GPT-2. A Llama built from a config (random weights, no download) has
# `nn.Linear` layers named `q_proj`, `v_proj`, `up_proj`, `down_proj`…; `target_modules` picks them by the
# end of their name, as in PEFT, and `CausalLM` gives the model the call the methods use. The training
# loop is the same lines as in section 2.

# %%
config = transformers.LlamaConfig(vocab_size=CharTokenizer().vocab_size, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=32)
torch.manual_seed(0)
llama = tt.CausalLM(transformers.LlamaForCausalLM(config))
method = tt.make_method("slim", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
method.attach(llama, seed=0)
print(f"SLIM on {type(llama.hf_model).__name__}: {len(method.adapted)} layers, e.g. {method.adapted[:2]}")
tt.print_trainable_parameters(llama)
params = method.trainable_parameters()
optimizer = tt.optim.Adam(params, lr=1e-2)
rng = np.random.default_rng(1)
llama_losses = []
for step in range(30 if FAST else 100):
    x, y, mask = task.batch(16, rng)
    loss = method.loss(x, y, mask)
    optimizer.zero_grad()
    loss.backward()
    tt.optim.clip_grad_norm_(params, 1.0)
    optimizer.step()
    method.after_step(step, optimizer)
    llama_losses.append(loss.item())
print(f"{len(llama_losses)} steps on a random Llama: loss {np.mean(llama_losses[:3]):.2f} → "
      f"{np.mean(llama_losses[-3:]):.2f}")
assert np.mean(llama_losses[-3:]) < np.mean(llama_losses[:3])
assert {id(p) for p in llama.parameters() if p.requires_grad} == {id(p) for p in params}  # only the adapters train

# %% [markdown]
# A random Llama knows no language, so a short run only starts to lower its loss; the point is that the
# method, its hooks and the loop did not change. On a GPU, move the model to the device
# before `attach` (the adapters are made on the base weights' device); for several processes,
# `torchrun --nproc_per_node=N -m tinyslim.torch.distributed` trains a method under
# DistributedDataParallel (docs/torch.md).

# %%
print("tutorial 11 checks passed")
