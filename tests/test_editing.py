"""Scenario C, lifelong editing (tinyslim/experiments/editing.py), at a tiny size: the edit stream is
well-formed and deterministic, the result is JSON with every method and stream length, metrics lie in
range, the base model is never changed, the θ sweep's per-row selection equals ELDER's own deferral,
and `python -m tinyslim run editing` writes parseable JSON holding every method."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from tinyslim.adapters import Elder
from tinyslim.adapters.elder import ELDER_PAPER, subject_positions
from tinyslim.data import TEMPLATES, CharTokenizer, make_knowledge_base, render
from tinyslim.experiments.elder_routing import (block_states, fact_prompts, neighbour_rate, routing_census,
                                                top_direction_energy)
from tinyslim.experiments.editing import (EDITORS, EditingConfig, Predictor, PromptSet, format_editing,
                                          make_edit_stream, run_editing)
from tinyslim.nn import GPT, GPTConfig
from tinyslim.tasks import encode_examples

TINY = GPTConfig(vocab_size=CharTokenizer().vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=16)
CONFIG = EditingConfig(stream_lengths=(3, 2), n_iter=2, n_locality_entities=3, n_calib_entities=2, n_text_windows=3,
                       text_prompt_len=8, text_answer_len=4, first_k=2)
KB = make_knowledge_base()


@pytest.fixture(scope="module")
def base():
    return GPT(TINY, seed=0)


@pytest.fixture(scope="module")
def result(base):
    before = {k: v.copy() for k, v in base.state_dict().items()}
    return run_editing(CONFIG, base, seed=0, progress=False), before


def test_the_edit_stream_is_well_formed_and_deterministic():
    world = make_edit_stream(KB, 20, seed=3, new_entity_fraction=0.5, n_locality=10, n_calib=5)
    assert world == make_edit_stream(KB, 20, seed=3, new_entity_fraction=0.5, n_locality=10, n_calib=5)
    edits = world["edits"]
    assert [e["kind"] for e in edits].count("new") == 10 and len(edits) == 20
    entities = [e["entity"] for e in edits]
    assert len(set(entities)) == 20
    untouched = set(world["locality_entities"]) | set(world["calib_entities"])
    assert len(untouched) == 15 and not untouched & set(entities) and untouched <= set(KB.entities)
    for e in edits:
        assert e["city"] in KB.cities
        if e["kind"] == "new":
            assert e["entity"] not in KB.entities and e["old_city"] is None
        else:
            assert e["old_city"] == KB.city_of[e["entity"]] != e["city"]
        used = [e["template"], e["calib_template"], *e["generality_templates"]]
        assert sorted(used) == list(range(len(TEMPLATES)))
    with pytest.raises(ValueError, match="distinct seen entities"):
        make_edit_stream(KB, 150, seed=0, new_entity_fraction=0.0)


def test_the_result_is_well_formed_and_in_range(result):
    doc, _ = result
    json.dumps(doc)
    assert doc["scenario"] == "editing" and set(doc["results"]) == set(EDITORS)
    assert doc["config"]["stream_lengths"] == [2, 3]
    keys = ("reliability", "reliability_tokens", "generality", "generality_tokens", "first2_reliability",
            "locality", "locality_text", "locality_facts", "leak", "leak_last")
    rows = [doc["results"][name]["by_T"][T] for name in ("ft_lora", "grace") for T in ("2", "3")]
    for T in ("2", "3"):  # GRACE: a key per edit (distinct facts), and the edit prompts hit their own keys
        g = doc["results"]["grace"]["by_T"][T]
        assert g["n_keys"] == int(T) and g["deferral_rate"]["edit"] == 1.0
        assert 0 <= g["deferral_rate"]["generality"] <= 1 and 0 <= g["deferral_rate"]["unrelated"] <= 1
    for T in ("2", "3"):
        c = doc["results"]["elder"]["by_T"][T]
        rows += [c["default"], c["calibrated"], c["no_deferral"]]
        assert [s["theta"] for s in c["sweep"]] == [2, 4, 6, 8, 10] and c["default_theta"] == 2
        assert c["calibrated_theta"] in [2, 4, 6, 8, 10] and c["n_codes"] == int(T)
        for s in c["calibration"]:
            assert 0 <= s["tpr"] <= 1 and 0 <= s["fpr"] <= 1
        last = c["sweep"][-1]  # θ above every Hamming distance: nothing deferred
        assert last["deferral_rate"]["unrelated"] == 1.0 and last["locality"] == c["no_deferral"]["locality"]
        assert c["sweep"][0]["generality"] == c["default"]["generality"]
        for rate in c["default"]["deferral_rate"].values():
            assert 0 <= rate <= 1
    for m in rows:
        for key in keys:
            assert 0 <= m[key] <= 1, key
    assert doc["results"]["elder"]["trainable_params"] > 0 and len(doc["results"]["ft_lora"]["edit_losses"]) == 3
    assert "elder θ=2 (default)" in format_editing(doc) and "grace ε=1 (3 keys)" in format_editing(doc)


def test_the_base_model_is_never_changed(result, base):
    _, before = result
    for key, value in base.state_dict().items():
        assert np.array_equal(value, before[key]), key


@pytest.mark.parametrize("paper", [True, False])
def test_the_theta_selection_equals_elders_own_deferral(base, paper):
    """The sweep's shortcut: with deferral on, ELDER's argmax = its deferral-off argmax where the row's
    min-Hamming distance is below θ, and the base model's argmax elsewhere (the paper's key, and the
    default subject key with its centred query)."""
    elder = Elder(**{**(ELDER_PAPER if paper else {}), "n_iter": 3, "lr": 1e-1, "top_k": 1, "n_experts": 4})
    elder.attach(copy.deepcopy(base), seed=0)
    if not paper:
        elder.fit_query_mean(np.arange(1, 41).reshape(2, 20) % 90)
    tok = CharTokenizer()
    for entity, city in zip(KB.entities[:3], KB.cities[5:8]):
        p, a = render(entity, city, 0)
        kw = {} if paper else {"key_pos": subject_positions([p], [entity]),
                               "queries": elder.subject_queries([tok.encode(entity)])}
        elder.edit(*encode_examples([(p, a)], len(p) + len(a)), **kw)
    entities = KB.entities[:6]
    rows = [render(e, KB.city_of[e], t) for e in entities for t in range(4)]
    subjects = [e for e in entities for _ in range(4)]
    s = PromptSet(rows, subjects=subjects)
    on, mh = Predictor(elder.model, elder).forward(s.x, s.key_pos, s.subject_pos, s.subjects)
    base_pred, _ = Predictor(base).forward(s.x, s.key_pos)
    key = s.key_pos if paper else s.subject_pos
    given = None if paper else elder.subject_queries([tok.encode(e) for e in subjects])
    for theta in (1, 2, 3):
        elder.config.theta = theta
        out = elder.route(s.x, key, given)
        np.testing.assert_array_equal(out["z"], mh < theta)
        np.testing.assert_array_equal(out["logits"].argmax(-1), np.where((mh < theta)[:, None], on, base_pred))
    assert (mh == 0)[:4].any()  # an edited prompt routes to its own stored code
    if not paper:  # every template of an edited entity has its code (the subject read alone)
        assert (mh[:12] == 0).all()


def test_the_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown"):
        EditingConfig(methods=("elder", "rome"))
    with pytest.raises(ValueError, match="stream_lengths"):
        EditingConfig(stream_lengths=(0, 5))


def test_cli_run_editing_writes_json_with_every_method(tmp_path):
    args = [sys.executable, "-m", "tinyslim", "run", "editing", "--seed", "0", "--set", "stream_lengths=(2,)",
            "--set", "n_iter=2", "--set", "n_locality_entities=3", "--set", "n_calib_entities=2",
            "--set", "n_text_windows=3", "--runs-dir", str(tmp_path), "--name", "tiny", "--quiet"]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "TINYSLIM_NUM_THREADS": "1"}
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "tiny" / "editing.json").read_text())
    assert set(doc["results"]) == set(EDITORS) and list(doc["results"]["elder"]["by_T"]) == ["2"]
    assert "ft_lora" in out.stdout and "calibrated" in doc["table"]
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_neighbour_rate_and_top_direction_energy_on_known_geometry():
    rng = np.random.default_rng(0)
    entity, template = np.repeat(np.arange(5), 4), np.tile(np.arange(4), 5)
    by_entity = 10 * rng.normal(size=(5, 12))[entity] + rng.normal(size=(20, 12))
    by_template = 10 * rng.normal(size=(4, 12))[template] + rng.normal(size=(20, 12))
    assert neighbour_rate(by_entity, entity, template) == 1.0
    assert neighbour_rate(by_template, entity, template) <= 0.4  # the other templates only: never its own
    assert top_direction_energy(np.outer(rng.normal(size=7), rng.normal(size=12))) == pytest.approx(1.0)
    assert top_direction_energy(np.eye(4)) == pytest.approx(0.25)


def test_fact_prompts_key_the_last_prompt_character_and_the_entitys_last(base):
    facts = fact_prompts(KB, KB.entities[:3])
    assert len(facts["prompts"]) == 12 and facts["template"].tolist() == [0, 1, 2, 3] * 3
    for p, e, last, subj in zip(facts["prompts"], facts["entity"], facts["last"], facts["subject"]):
        name = KB.entities[e]
        assert last == len(p) - 1 and p[subj - len(name) + 1:subj + 1] == name
    states = block_states(base, facts["prompts"], facts["subject"])
    assert len(states) == TINY.n_layer and states[0].shape == (12, TINY.n_embd)
    # templates 0 and 3 begin with the entity: a causal model's state at its last character is the same
    np.testing.assert_allclose(states[-1][facts["template"] == 0], states[-1][facts["template"] == 3], rtol=1e-5)


def test_routing_census_frozen_routers_keep_every_code_and_trained_ones_pull_queries(base):
    frozen = routing_census(base, dict(n_iter=2), n_edits=2)  # the defaults: routers frozen
    trained = routing_census(base, {**ELDER_PAPER, "key_pos": "subject_last", "n_iter": 2, "lr": 0.1}, n_edits=2)
    assert [r["edit"] for r in frozen] == [0, 1, 2]
    assert len({(r["distinct"], r["top_share"]) for r in frozen}) == 1  # frozen routers: codes never move
    assert all(r["logit_shift_to_preset"] == 0 for r in frozen)
    assert all(r["logit_shift_to_preset"] > 0 for r in trained[1:])  # each edit pulls every query to its preset
    assert 1 <= trained[0]["distinct"] <= 4 * 40 and 0 < trained[0]["top_share"] <= 1
