"""What ELDER's routers see on a character-level model (docs/elder_routing.md): where the query must be
taken, and why the paper's routing collapses here.

Shape legend: B prompts, T time, d width.

    neighbour_rate     100 entities × 4 templates: how often a prompt's nearest neighbour (cosine) among the
                       OTHER templates' prompts is the same entity, per block, with the state taken at the
                       last prompt character or at the entity's last character
    top_direction_energy  the share of Σ‖q‖² on the top uncentred principal direction (one shared
                       direction dominates → every router logit moves together)
    code_census        how many distinct allocation codes a set of queries gets, and the share of the
                       most common one (1 code for every prompt = the collapse)
    overwrite_census   ELDER through scenario C's stream: is each edit still right at the end, and how many
                       later edits share an expert with it (why reliability falls short)
    routing_census     ELDER through an edit stream: after each edit, the census of unrelated prompts'
                       codes, whether the edit's preset equals the previous edit's, and the shift of the
                       unrelated prompts' router logits (the mechanism of the collapse, edit by edit)

    python -m tinyslim.experiments.elder_routing     # the tables of docs/elder_routing.md (seed 0, ~1 min)
"""
from __future__ import annotations

import copy

import numpy as np

from ..adapters.elder import ELDER_PAPER, Elder, subject_positions
from ..autograd import no_grad
from ..data import PAD_ID, TEMPLATES, CharTokenizer, PretrainData, render
from ..tasks import encode_examples

__all__ = ["fact_prompts", "block_states", "neighbour_rate", "top_direction_energy", "code_census",
           "routing_queries", "routing_census", "overwrite_census"]


def fact_prompts(kb, entities=None) -> dict:
    """Every (entity, template) prompt of the knowledge base: {"prompts", "entity" (B,), "template" (B,),
    "last" (B,) the last prompt character, "subject" (B,) the entity's last character}."""
    entities = list(kb.entities if entities is None else entities)
    rows = [(e, t, render(e, kb.city_of.get(e, kb.cities[0]), t)[0]) for e in entities for t in range(len(TEMPLATES))]
    prompts = [p for _, _, p in rows]
    return {"prompts": prompts, "entity": np.array([entities.index(e) for e, _, _ in rows]),
            "template": np.array([t for _, t, _ in rows]), "last": np.array([len(p) - 1 for p in prompts]),
            "subject": subject_positions(prompts, [e for e, _, _ in rows])}


def block_states(model, prompts: list, positions: np.ndarray) -> list:
    """[(B, d) per block]: the residual stream after each block at each prompt's position (the base model)."""
    x, _, _ = encode_examples([(p, "") for p in prompts], max(len(p) for p in prompts) + 1)
    was = model.training
    model.eval()
    with no_grad():
        _, _, hidden = model(x, return_hidden=True)
    model.train(was)
    rows = np.arange(len(prompts))
    return [h.data[rows, positions].astype(np.float64) for h in hidden]


def neighbour_rate(states: np.ndarray, entity: np.ndarray, template: np.ndarray) -> float:
    """The share of rows whose nearest row by cosine, among the rows of the other templates, has the same entity."""
    u = states / np.maximum(np.linalg.norm(states, axis=1, keepdims=True), 1e-12)
    cos = u @ u.T
    cos[template[:, None] == template[None, :]] = -np.inf  # other templates only (and never itself)
    return float(np.mean(entity[np.argmax(cos, axis=1)] == entity))


def top_direction_energy(states: np.ndarray) -> float:
    """s₁² / Σ sᵢ² of the uncentred states (B, d): the share of the energy on the top principal direction."""
    s = np.linalg.svd(np.asarray(states, dtype=np.float64), compute_uv=False)
    return float(s[0] ** 2 / (s ** 2).sum())


def code_census(elder: Elder, q: np.ndarray) -> dict:
    """The codes of queries q (B, d_q) (as the routers see them): {"distinct", "top_share"}."""
    codes = np.concatenate(elder.codes(q), axis=1)
    _, counts = np.unique(codes, axis=0, return_counts=True)
    return {"distinct": int(len(counts)), "top_share": float(counts.max() / len(q))}


def routing_queries(elder: Elder, prompts: list, positions: np.ndarray, subjects: list | None = None) -> np.ndarray:
    """q (B, d_q) of prompts at positions (key_pos="subject_alone": of the subjects read alone), as the
    routers see it (the base model only)."""
    if elder.config.key_pos == "subject_alone":
        tok = CharTokenizer()
        return elder.subject_queries([tok.encode(s) for s in subjects])
    x, _, _ = encode_examples([(p, "") for p in prompts], max(len(p) for p in prompts) + 1)
    with elder.evaluating(), elder.keys(positions):
        elder.model(x)
    return elder.routing.q.copy()


def routing_census(base_model, overrides: dict, n_edits: int = 10, seed: int = 0) -> list:
    """ELDER (ElderConfig with overrides) through n_edits counterfactual edits (each given in template 0),
    seed `seed`. Row 0, before any edit: the census and the logits' spread over the prompts (the std of each
    expert's logit, averaged: the scale a shift must reach to reorder the codes). Per edit: the census of 40 untouched entities' prompts (all templates), whether its preset
    equals the previous edit's, the mean shift of their router logits along the edit's preset experts
    minus the others (how much one edit pulls every prompt toward its experts), and the untouched prompts
    routed at θ = k·L_a/2 (z = 1). Returns a list of dicts, one per edit."""
    data = PretrainData(block_size=base_model.config.block_size, seed=0)
    kb = data.kb
    rng = np.random.default_rng([seed, 0xE1DE])
    order = [kb.entities[i] for i in rng.permutation(len(kb.entities))]
    edited, untouched = order[:n_edits], order[n_edits:n_edits + 40]
    elder = Elder(**{"pad_token_id": PAD_ID, **overrides})
    elder.attach(copy.deepcopy(base_model), seed)
    if elder.config.query_norm == "centred":
        L = base_model.config.block_size
        elder.fit_query_mean(data.streams["train"][:256 * L].astype(np.int64).reshape(-1, L))
    probe = fact_prompts(kb, untouched)
    pos = probe["subject"] if elder.config.key_pos.startswith("subject") else probe["last"]
    names = [untouched[e] for e in probe["entity"]]
    q = routing_queries(elder, probe["prompts"], pos, names)
    spread = float(np.mean([layer.router_logits(q).data.std(axis=0).mean() for layer in elder.layers()]))
    rows, previous = [{"edit": 0, **code_census(elder, q), "same_preset_as_previous": False,
                       "logit_shift_to_preset": 0.0, "unrelated_routed": 0.0, "logit_spread": spread}], None
    for i, entity in enumerate(edited):
        city = kb.cities[(kb.cities.index(kb.city_of[entity]) + 1 + i) % len(kb.cities)]
        prompt, answer = render(entity, city, 0)
        x, y, mask = encode_examples([(prompt, answer)], len(prompt) + len(answer))
        key, given = None, None
        if elder.config.key_pos.startswith("subject"):
            key = subject_positions([prompt], [entity])
            given = routing_queries(elder, [prompt], key, [entity]) if elder.config.key_pos == "subject_alone" else None
        q = routing_queries(elder, probe["prompts"], pos, names)
        before = [layer.router_logits(q).data.copy() for layer in elder.layers()]
        elder.edit(x, y, mask, key_pos=key, queries=given)
        preset = [p.copy() for p in elder.last_presets] if elder.last_presets else None
        shift = 0.0
        for layer, b, s in zip(elder.layers(), before, preset or []):
            d = layer.router_logits(q).data - b  # (B, E)
            inside = np.zeros(layer.E, dtype=bool)
            inside[s] = True
            shift += float((d[:, inside].mean() - d[:, ~inside].mean()) / len(before))
        z = elder.min_hamming(q) < elder.theta
        rows.append({"edit": i + 1, **code_census(elder, q), "same_preset_as_previous":
                     bool(previous is not None and all(np.array_equal(a, b) for a, b in zip(preset, previous))),
                     "logit_shift_to_preset": shift, "unrelated_routed": float(z.mean())})
        previous = preset
    return rows


def overwrite_census(base_model, overrides: dict, n_edits: int = 10, seed: int = 0, stream_len: int = 50) -> list:
    """Why an edit is lost: ELDER (ElderConfig with overrides) through the first n_edits of scenario C's stream
    of stream_len edits for `seed` (make_edit_stream; the scenario's default is 50). Per edit: whether its prompt answers the new city right after its own edit
    and after the whole stream, and how many later edits share an expert with it (in any adapted layer)."""
    from .editing import make_edit_stream

    data = PretrainData(block_size=base_model.config.block_size, seed=0)
    tok = CharTokenizer()
    edits = make_edit_stream(data.kb, max(stream_len, n_edits), seed)["edits"][:n_edits]
    elder = Elder(**{"pad_token_id": PAD_ID, **overrides})
    elder.attach(copy.deepcopy(base_model), seed)
    if elder.config.query_norm == "centred":
        L = base_model.config.block_size
        elder.fit_query_mean(data.streams["train"][:256 * L].astype(np.int64).reshape(-1, L))
    rows = [render(e["entity"], e["city"], e["template"]) for e in edits]
    subjects = [e["entity"] for e in edits]

    def right(i):
        prompt, answer = rows[i]
        x, y, mask = encode_examples([rows[i]], len(prompt) + len(answer))
        key = subject_positions([prompt], [subjects[i]]) if elder.config.key_pos.startswith("subject") else None
        given = routing_queries(elder, [prompt], key, [subjects[i]]) if elder.config.key_pos == "subject_alone" \
            else None
        return key, given, (x, y, mask)

    after_own, codes = [], []
    for i in range(n_edits):
        key, given, (x, y, mask) = right(i)
        elder.edit(x, y, mask, key_pos=key, queries=given)
        out = elder.route(x, key, given)
        after_own.append(bool((out["logits"].argmax(-1) == y)[mask > 0].all()))
        q = elder.routing.q
        codes.append(np.concatenate(elder.codes(q), axis=1)[0])
    result = []
    for i in range(n_edits):
        key, given, (x, y, mask) = right(i)
        out = elder.route(x, key, given)
        shared = sum(bool((codes[i] * codes[j]).any()) for j in range(i + 1, n_edits))
        result.append({"edit": i + 1, "right_after_own_edit": after_own[i],
                       "right_after_stream": bool((out["logits"].argmax(-1) == y)[mask > 0].all()),
                       "later_edits_sharing_an_expert": shared})
    return result


def _main() -> None:  # the tables of docs/elder_routing.md
    from ..pretrained import load_base

    base = load_base()
    kb = PretrainData(block_size=base.config.block_size, seed=0).kb
    facts = fact_prompts(kb)
    print("nearest neighbour among the other templates' prompts is the same entity (100 entities × 4 templates)")
    for where in ("last", "subject"):
        states = block_states(base, facts["prompts"], facts[where])
        rates = [neighbour_rate(s, facts["entity"], facts["template"]) for s in states]
        energy = [top_direction_energy(s) for s in states]
        print(f"  {where:8s} rate per block {' '.join(f'{r:.2f}' for r in rates)}   "
              f"top-direction energy {' '.join(f'{e:.2f}' for e in energy)}")
    _main_overwrites(base)
    for name, overrides in ROWS.items():
        print(f"\nrouting census, {name}: {overrides}")
        census = routing_census(base, overrides)
        print(f"  spread of the router logits over the prompts before editing: {census[0]['logit_spread']:.2f}")
        print("  edit distinct top_share same_preset logit_shift unrelated_routed")
        for r in census:
            print(f"  {r['edit']:4d} {r['distinct']:8d} {r['top_share']:9.2f} {str(r['same_preset_as_previous']):>11s} "
                  f"{r['logit_shift_to_preset']:11.2f} {r['unrelated_routed']:16.2f}")


ROWS = {"paper (ELDER_PAPER: last prompt char, raw q, routers trained, E = 8)": dict(ELDER_PAPER),
        "paper with the subject key in the prompt": {**ELDER_PAPER, "key_pos": "subject_last"},
        "paper with the subject key, routers at lr x 0.01": {**ELDER_PAPER, "key_pos": "subject_last",
                                                             "router_lr_scale": 0.01},
        "default with the routers trained (router_lr_scale=1)": {"router_lr_scale": 1.0},
        "default with the raw query (query_norm='none')": {"query_norm": "none"},
        "default (subject alone, centred q, routers frozen, E = 32)": {}}

def _main_overwrites(base) -> None:
    rows = overwrite_census(base, {}, n_edits=10, seed=100)
    print("\nthe default through the first 10 edits of tuning seed 100's stream: is each edit kept?")
    print("  edit  right after its edit  right after 10 edits  later edits sharing an expert")
    for r in rows:
        print(f"  {r['edit']:4d}  {str(r['right_after_own_edit']):>20s}  {str(r['right_after_stream']):>20s}"
              f"  {r['later_edits_sharing_an_expert']:29d}")


if __name__ == "__main__":
    _main()
