# %% [markdown]
# # 08 · ELDER: lifelong editing with a routed pool of LoRAs
#
# Model editing rewrites single facts ("Zorbin lives in Quell" → "… in Vask") one after another,
# without retraining and without breaking anything else. Fine-tuning one LoRA edit after edit
# (FT-LoRA) overwrites earlier edits and leaks the latest one everywhere. ELDER (Li et al., arXiv
# 2408.11869) keeps a fixed pool of LoRAs per layer, mixes them per *sequence* from a query vector,
# pins each edit to a preset allocation of experts, and **defers** to the untouched base model when an
# input's allocation code is far from every stored edit.
#
# On our character-level model the paper's routing does nothing useful: every prompt gets the same
# code, so nothing is ever deferred. This tutorial measures why (where the query is read, and what
# training the routers does to it), shows the two changes that fix it, and ends with the edit stream:
# ELDER as fixed against ELDER as in the paper, FT-LoRA and a GRACE-like codebook.
#
# Run it: `python tutorials/08_elder.py`. `TINYSLIM_FAST=1` uses a shorter stream (its numbers are
# not the scenario's: `python -m tinyslim run editing --seeds 5` measures those).

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before numpy)
import copy  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from tinyslim import load_base  # noqa: E402
from tinyslim.adapters.elder import ELDER_PAPER, Elder, subject_positions  # noqa: E402
from tinyslim.autograd import no_grad  # noqa: E402
from tinyslim.data import CharTokenizer, PretrainData, render  # noqa: E402
from tinyslim.experiments.editing import EditingConfig, run_editing  # noqa: E402
from tinyslim.experiments.elder_routing import (block_states, fact_prompts, neighbour_rate,  # noqa: E402
                                                routing_census, top_direction_energy)
from tinyslim.tasks import encode_examples  # noqa: E402

FAST = os.environ.get("TINYSLIM_FAST") == "1"
OUT = Path("runs/tutorials")
OUT.mkdir(parents=True, exist_ok=True)
tok = CharTokenizer()
base = load_base()
data = PretrainData(block_size=base.config.block_size, seed=0)
kb = data.kb

# %% [markdown]
# ## 1. Routing from one query per sequence
#
# $q$ is the hidden state entering the first adapted layer at one **key token** of the prompt; it
# depends on the base model only. In each adapted layer $l$ (by default `mlp.c_fc` of the last two blocks):
#
# $$p^l = \mathrm{softmax}(W_g^l q + b_g^l), \quad S^l = \mathrm{TopK}(p^l, k), \quad
#   y_t = W_0 x_t + b_0 + z \sum_{e\in S^l} p^l_e\, s\, B^l_e A^l_e x_t \ \ \text{for every token } t.$$
#
# The top-k choices of all layers form a binary **allocation code** $c(q) \in \{0,1\}^{L_a E}$ with
# $k$ ones per layer. After each edit its code is stored; at inference
# $z = \mathbb{1}[\min_t \mathrm{Hamming}(c(q), c_t) < \theta]$, and $z = 0$ means the rows skip the
# LoRA branch entirely: the base model, bit for bit. Deferral can only work if different facts get
# different codes and the paraphrases of one fact get the same one.
#
# ## 2. Where the query must be read
#
# The paper reads $q$ at the last prompt token. On GPT2-XL that token has seen the subject; on a
# character-level model the last prompt character (the space after "lives in") mostly sees its own
# template. Take every entity of the knowledge base in its 4 templates and ask, block by block, how
# often a prompt's nearest neighbour (cosine) among the *other* templates' prompts is the same entity.

# %%
entities = kb.entities[:40] if FAST else kb.entities
facts = fact_prompts(kb, entities)
rates, energy = {}, {}
for where, label in (("last", "last prompt character"), ("subject", "entity's last character")):
    states = block_states(base, facts["prompts"], facts[where])
    rates[where] = [neighbour_rate(s, facts["entity"], facts["template"]) for s in states]
    energy[where] = [top_direction_energy(s) for s in states]
    print(f"{label:24s} same-entity neighbour per block: {' '.join(f'{r:.2f}' for r in rates[where])};  "
          f"top direction's share of the energy: {' '.join(f'{e:.2f}' for e in energy[where])}")
assert min(rates["subject"]) > max(rates["last"][:2])  # the subject's state names the entity from block 0 on

# %% [markdown]
# So the key must be the **subject's last character** (`key_pos="subject_last"`). Our default goes
# one step further, as ROME does for its subject key: `key_pos="subject_alone"` reads that character
# with the subject alone as its context, so every template of a fact gets the *same* query. An edit
# request names its subject (ROME, MEMIT and EasyEdit requests all carry one), so both keys are
# available to an editor; `subject_positions(prompts, subjects)` finds the character.
#
# Note the energy column: one direction shared by all prompts holds half or more of $\|q\|^2$.
#
# ## 3. Why the paper's routing collapses
#
# `routing_census` runs ELDER through a few edits and, after each, looks at 40 untouched entities'
# prompts: how many distinct codes they get, the share of the commonest, how far the edit moved their
# router logits toward its own preset experts, and how many are routed ($z = 1$) although untouched.

# %%
n_census = 3 if FAST else 10
rows = {"paper (ELDER_PAPER)": dict(ELDER_PAPER),
        "subject key, routers trained": dict(key_pos="subject_alone", query_norm="centred", router_lr_scale=1.0),
        "default (subject key, centred q, routers frozen)": {}}
census = {name: routing_census(base, over, n_edits=n_census) for name, over in rows.items()}
for name, rs in census.items():
    print(f"{name}: logit spread over prompts {rs[0]['logit_spread']:.2f}")
    print("   edit  distinct codes  top share  logit shift to preset  untouched routed")
    for r in rs:
        print(f"   {r['edit']:4d}  {r['distinct']:14d}  {r['top_share']:9.2f}  {r['logit_shift_to_preset']:21.2f}"
              f"  {r['unrelated_routed']:16.2f}")
paper, fixed = census["paper (ELDER_PAPER)"], census["default (subject key, centred q, routers frozen)"]
assert paper[-1]["top_share"] > 0.9 and fixed[-1]["top_share"] < 0.5

# %% [markdown]
# The first edit does it (almost entirely with the centred query, entirely with the paper's). The guided loss has one positive query per edit and no negative one,
# and Adam steps every router weight by about the learning rate whatever the gradient's size: 30 steps
# move the logits of *every* query toward the edit's preset experts by far more than the logits vary
# between queries (the shift against the spread above). With a query dominated by one shared direction
# the pull is the same for all prompts: one code for everything, so every prompt is routed. It is not
# the "init" preset feeding back on itself: the collapse is complete before a second preset is drawn.
#
# The fix, in `ElderConfig`'s defaults: the subject key; a **centred** query
# $q \leftarrow \sqrt{d}\,(q-\mu_t)/\|q-\mu_t\|$ with $\mu_t$ the base's mean state at that position over
# its own training text (`fit_query_mean`); the routers **frozen** at their random init
# (`router_lr_scale=0`), so a code is a random projection of the centred query (locality-sensitive
# hashing) and stays what it was when the edit was stored; a pool of $E = 32$ rank-1 experts (the same
# parameter count as 8 rank-4 ones), so that fewer edits share an expert.
#
# ## 4. Deferral keeps unrelated inputs exactly the base

# %%
elder = Elder()  # the defaults: subject_alone key, centred query, frozen routers, E = 32, k = 2
elder.attach(copy.deepcopy(base), seed=0)
elder.fit_query_mean(data.streams["train"][:64 * 128].astype(np.int64).reshape(-1, 128))
edits = [(e, kb.cities[(kb.cities.index(kb.city_of[e]) + 7) % len(kb.cities)]) for e in kb.entities[:4]]
for e, city in edits:
    p, a = render(e, city, 0)
    x, y, mask = encode_examples([(p, a)], len(p) + len(a))
    elder.edit(x, y, mask, key_pos=subject_positions([p], [e]), queries=elder.subject_queries([tok.encode(e)]))
probe = [(e, t) for e, _ in edits[:2] for t in (1, 2)] + [(e, 0) for e in kb.entities[40:44]]
prompts = [render(e, kb.city_of[e], t)[0] for e, t in probe]
names = [e for e, _ in probe]
x, _, _ = encode_examples([(p, "") for p in prompts], max(len(p) for p in prompts) + 1)
out = elder.route(x, subject_positions(prompts, names), elder.subject_queries([tok.encode(e) for e in names]))
with no_grad():
    base.eval()
    base_logits = base(x)[0].data
z = out["z"]
print("z per prompt (2 edited entities in 2 other templates, then 4 untouched entities):", z.astype(int))
assert z[:4].all() and not z[4:].any()  # paraphrases routed (same query), untouched entities deferred
assert np.array_equal(out["logits"][~z], base_logits[~z])
print(f"{int((~z).sum())} deferred rows are bit-identical to the base model")

# %% [markdown]
# ## 5. The edit stream
#
# Scenario C (`tinyslim/experiments/editing.py`): a stream of edits (half counterfactual, half new
# entities), each given in one template, 30 Adam steps per edit for every method. **Reliability**: the
# edit prompts answer the new city; **generality**: the same facts in two other templates;
# **locality**: unrelated prompts (untouched facts and pydoc text) unchanged; ELDER at the deferral
# threshold θ calibrated on held-out prompts. `elder_paper` is ELDER with `ELDER_PAPER`.

# %%
size = dict(stream_lengths=(4,), n_locality_entities=8, n_calib_entities=4, n_text_windows=8,
            n_query_windows=64) if FAST else {}
doc = run_editing(EditingConfig(**size), base, seed=0, progress=False)
# the same stream with the subject read in the prompt (key_pos="subject_last"): paraphrases no longer share the
# edit's exact code, so the deferral threshold θ has generality to buy
in_prompt = run_editing(EditingConfig(**size, methods=("elder",), elder={"key_pos": "subject_last"}), base, seed=0,
                        progress=False)
Ts = [str(t) for t in doc["config"]["stream_lengths"]]
T, T_long = Ts[0], Ts[-1]  # the bars: the shorter stream; the θ curves: the longest
head = {}
for t in Ts:
    print(f"after {t} edits, seed 0     reliability  generality  locality  leak  z on paraphrases  z on unrelated")
    for name, r in doc["results"].items():
        m = r["by_T"][t]
        m = m["calibrated"] if "calibrated" in m else m
        if t == T:
            head[name] = m
        z = m.get("deferral_rate") or {"generality": float("nan"), "unrelated": float("nan")}
        print(f"{name:24s} {m['reliability']:11.2f} {m['generality']:11.2f} {m['locality']:9.2f} {m['leak']:5.2f}"
              f" {z['generality']:17.2f} {z['unrelated']:15.2f}")

# %%
import matplotlib.pyplot as plt  # noqa: E402

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
keys = ("reliability", "generality", "locality")
for i, (name, m) in enumerate(head.items()):
    ax1.bar(np.arange(3) + 0.2 * i - 0.3, [m[k] for k in keys], width=0.2, label=name)
ax1.set(xticks=range(3), xticklabels=keys, ylim=(0, 1.05), title=f"after {T} edits (seed 0)")
ax1.legend(fontsize=7)
curves = {"elder": doc["results"]["elder"], "elder, subject in the prompt": in_prompt["results"]["elder"],
          "elder_paper": doc["results"]["elder_paper"]}
for name, r in curves.items():
    sweep = r["by_T"][T_long]["sweep"]
    ax2.plot([s["locality"] for s in sweep], [s["generality"] for s in sweep], "o-", label=name)
    for s in sweep:
        ax2.annotate(f"θ={s['theta']:g}", (s["locality"], s["generality"]), fontsize=6)
    print(f"θ sweep after {T_long} edits, {name}: " + ", ".join(f"θ={s['theta']:g} gen {s['generality']:.2f} loc {s['locality']:.2f}"
                                          for s in sweep))
ax2.set(xlabel="locality", ylabel="generality", title=f"the deferral threshold's trade-off after {T_long} edits")
ax2.legend(fontsize=7)
fig.savefig(OUT / "08_elder_stream.png", dpi=100, bbox_inches="tight")
print("plot written to", OUT / "08_elder_stream.png")

# %% [markdown]
# With the subject key, the centred query and frozen routers, ELDER does what the paper says it does:
# edits are kept, their paraphrases are routed to them, and unrelated prompts are deferred to the
# base. The paper's setting routes everything (z on unrelated prompts near 1) and is no better than
# FT-LoRA. With the subject read alone every paraphrase has its edit's exact code, so raising θ buys no
# generality and only costs locality (a flat curve); with the subject read in the prompt a paraphrase's
# code can differ from its edit's, and θ trades locality for generality, as in the paper. Over seeds
# 0–4 and 50 edits the numbers, with their confidence intervals, are in `docs/elder_routing.md`; not
# every target holds there (reliability after 50 edits is about one half: later edits retrain the
# experts an earlier edit shares with them).

# %%
if not FAST:
    assert head["elder"]["locality"] > head["elder_paper"]["locality"]
print("tutorial 08 checks passed")
