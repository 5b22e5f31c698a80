# %% [markdown]
# # 01 · The tiny GPT and its pretraining
#
# Every experiment in tinyslim fine-tunes one small model: a character-level GPT-2 with
# 4 blocks, 4 heads, 128 channels and a context of 128 characters (about 0.8M parameters). This
# tutorial builds it, follows one batch through it, trains it for a few steps, and then loads
# the pretrained base that ships with tinyslim to see what two CPU cores can teach it.
#
# Run it: `python tutorials/01_tiny_gpt.py`. `TINYSLIM_FAST=1` shortens the training loop.

# %%
import os
from pathlib import Path

import numpy as np

from tinyslim.data import CharTokenizer, PretrainData
from tinyslim.nn import GPT, GPTConfig
from tinyslim.optim import AdamW
from tinyslim.train import evaluate_loss, knowledge_recall

FAST = os.environ.get("TINYSLIM_FAST") == "1"
OUT = Path("runs/tutorials")
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. The architecture
#
# GPT-2, top to bottom (as in nanoGPT): token and learned position embeddings, then pre-LN
# blocks $x \leftarrow x + \mathrm{attn}(\mathrm{ln_1}(x))$, $x \leftarrow x +
# \mathrm{mlp}(\mathrm{ln_2}(x))$, a final LayerNorm, and an LM head that shares its weight with
# the token embedding. Parameter names are Hugging Face's, so adapters can later be written in
# the PEFT format by name.

# %%
tok = CharTokenizer()
config = GPTConfig(vocab_size=tok.vocab_size)
model = GPT(config, seed=0)
print(config)
for name, p in list(model.named_parameters())[:8]:
    print(f"{name:34s} {str(p.shape):>12s}")
print(f"… {model.num_parameters():,} parameters in all")
per_block = sum(p.size for n, p in model.named_parameters() if n.startswith("transformer.h.0."))
assert per_block == 12 * config.n_embd ** 2 + 13 * config.n_embd  # 4 matrices (3C², C², 4C², 4C²) + biases + 2 LNs

# %% [markdown]
# ## 2. One batch through the model
#
# A batch is B rows of T characters; the target of position t is the character at t+1. At
# initialisation the model knows nothing, so the loss should be close to that of a uniform guess
# over the vocabulary: $\ln V = \ln 97 \approx 4.575$ nats per character.

# %%
data = PretrainData(tokenizer=tok, block_size=config.block_size, seed=0)
x, y = data.get_batch("train", 8, np.random.default_rng(0))
print("x", x.shape, "→", repr(tok.decode(x[0])[:60]))
logits, loss = model(x, y)
print("logits", logits.shape, f"loss {loss.item():.3f} nats/char (ln V = {np.log(tok.vocab_size):.3f})")
assert abs(loss.item() - np.log(tok.vocab_size)) < 0.1

# %% [markdown]
# ## 3. A few training steps
#
# AdamW, as in GPT-2. Each step: forward, `backward` (tutorial 00), update. The loss must fall.

# %%
optimizer = AdamW(model.parameters(trainable_only=True), lr=3e-3, weight_decay=0.0)
losses = []
steps = 15 if FAST else 60
for step in range(steps):
    x, y = data.get_batch("train", 16, np.random.default_rng([0, step]))
    _, loss = model(x, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print(f"loss after {steps} steps: {losses[-1]:.3f} (first {losses[0]:.3f})")
assert np.mean(losses[-5:]) < losses[0] - 0.5

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(losses)
ax.set(title="The first training steps", xlabel="step", ylabel="train loss (nats/char)")
fig.tight_layout()
fig.savefig(OUT / "01_loss.png", dpi=100)
print("plot written to", OUT / "01_loss.png")

# %% [markdown]
# ## 4. The pretrained base
#
# `python -m tinyslim pretrain` runs 1,200 such steps (batch 32, cosine schedule, 30% of rows
# from the knowledge corpus of invented facts). Its result ships in `tinyslim/assets/`. We
# measure the two things fine-tuning will later damage: the loss on held-out Python documentation
# and the recall of facts, asked in a wording (template) the model never saw for that entity.

# %%
from tinyslim import load_base  # noqa: E402

base, source = load_base(with_source=True)
val = data.val_batches(32, 2 if FAST else 8)
val_loss = evaluate_loss(base, val)
print(f"base model from {source}")
print(f"validation loss {val_loss:.3f} nats/char (the untrained model: {np.log(tok.vocab_size):.3f})")
recall = knowledge_recall(base, data.kb, tok, "heldout")
print(f"held-out-template fact recall {recall:.0%} (chance: {1 / len(data.kb.cities):.0%})")
prompt = "The return statement"
out = base.generate(tok.encode(prompt)[None], 120, temperature=0.8, top_k=20, rng=np.random.default_rng(0))
print(tok.decode(out[0]))
assert val_loss < 1.3
assert recall > 5 / len(data.kb.cities)  # far above chance
print("tutorial 01 checks passed")
