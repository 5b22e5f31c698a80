"""Scenario B, composition (tinyslim/experiments/composition.py), at a tiny size: the result is
well-formed JSON with every composer, metrics lie in range, the base model and the source LoRAs are
never changed, MoLE's masking behaves (only LoRA j = LoRA j alone; the mask is undone on exit), and
`python -m tinyslim run composition` writes parseable JSON holding every method."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from tinyslim.adapters import sources_from_methods
from tinyslim.data import CharTokenizer
from tinyslim.experiments.composition import (COMPOSERS, CompositionConfig, answer_gates, compose,
                                              format_composition, run_composition, train_sources)
from tinyslim.experiments.continual import GeneralEval
from tinyslim.nn import GPT, GPTConfig
from tinyslim.tasks import encode_examples, make_tasks

TINY = GPTConfig(vocab_size=CharTokenizer().vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)
CONFIG = CompositionConfig(tasks=("rev", "cap"), source_steps=4, source_batch_size=4, rank=2, lora_alpha=4,
                           n_train=40, n_test=6, mole_steps=3, mole_batch_size=4, eval_batches=1, eval_batch_size=2,
                           fact_recall=False)


@pytest.fixture(scope="module")
def base():
    return GPT(TINY, seed=0)


@pytest.fixture(scope="module")
def result(base):
    before = {k: v.copy() for k, v in base.state_dict().items()}
    doc = run_composition(CONFIG, base, seed=0, progress=False)
    return doc, before


def test_the_result_is_well_formed_and_in_range(result):
    doc, _ = result
    json.dumps(doc)
    assert doc["scenario"] == "composition" and doc["tasks"] == ["rev", "cap"]
    assert list(doc["methods"]) == list(COMPOSERS) and set(doc["singles"]) == {"rev", "cap"}
    assert doc["n_mixed_examples"] == 2 * round(0.1 * 40)
    for name, row in {**doc["methods"], **{f"lora:{t}": r for t, r in doc["singles"].items()}}.items():
        assert set(row["per_task"]) == {"rev", "cap"}
        assert all(0 <= a <= 1 for a in row["per_task"].values()), name
        assert row["mean_acc"] == pytest.approx(np.mean(list(row["per_task"].values())))
        g = row["general"]
        assert g["val_loss"] > 0 and 0 <= g["next_char_acc"] <= 1 and 0 <= g["agreement"] <= 1
    assert doc["base_general"]["agreement"] == 1.0
    for name in ("mole", "mole_nobal"):
        row = doc["methods"][name]
        gates = row["gates"]
        assert 0.5 - 1e-9 <= gates["max_share"] <= 1 and sum(gates["mean_share"]) == pytest.approx(1)
        assert gates["max_entropy"] == pytest.approx(np.log(2))
        assert 0 <= gates["mean_token_entropy"] <= gates["max_entropy"] + 1e-9
        for layer_means in gates["layer_means"].values():
            assert sum(layer_means) == pytest.approx(1, abs=1e-5)
        assert row["trainable_params"] > 0 and row["lora_factors_unchanged"] is True
        assert len(row["train_log"]["loss_curve"]) == 3
        for t in ("rev", "cap"):
            assert all(sum(g) == pytest.approx(1, abs=1e-5) for g in gates["answer_gates"][t].values())
            assert 0 <= gates["answer_own_share"][t] <= 1
        assert set(doc["masking"][name]) == {"rev", "cap"}
    assert doc["methods"]["nla"]["trainable_params"] == doc["methods"]["lora_sum"]["trainable_params"] == 0
    assert doc["sources_frozen"] is True
    table = format_composition(doc)
    assert "mole_nobal" in table and "masking" in table


def test_the_base_model_is_never_changed(result, base):
    _, before = result
    for key, value in base.state_dict().items():
        assert np.array_equal(value, before[key]), key


def test_masking_keeps_only_the_chosen_loras(base):
    tasks = make_tasks(CONFIG.tasks, seed=0, n_train=CONFIG.n_train, n_test=CONFIG.n_test)
    general = GeneralEval(base, CONFIG.source_config())
    sources, _ = train_sources(CONFIG, base, tasks, seed=0, general=general, progress=False)
    states, scales = sources_from_methods(sources)
    mole = compose("mole", states, scales, base, CONFIG, seed=0)
    for layer in mole.gate_layers():  # gates far from uniform, so that masking matters
        layer.gate_e.data[...] = np.random.default_rng(1).normal(0, 1.0, layer.gate_e.shape)
    x, _, _ = encode_examples(tasks[0].test + tasks[1].test, tasks[0].seq_len)
    with mole.evaluating() as m:
        full = m(x)[0].data
    for j, source in enumerate(sources):
        with source.evaluating() as m:
            alone = m(x)[0].data
        with mole.masked([j]), mole.evaluating() as m:  # invariant 1: G'_j = 1, the layer is LoRA j
            only = m(x)[0].data
        np.testing.assert_allclose(only, alone, rtol=1e-4, atol=1e-5)
        assert not np.allclose(full, alone, atol=1e-6)
    with mole.evaluating() as m:  # the mask is undone on exit
        np.testing.assert_array_equal(m(x)[0].data, full)


@pytest.mark.parametrize("pool", ["prefix", "sequence"])
def test_answer_gates_are_the_gates_decoding_uses_at_the_first_answer_character(base, pool):
    """answer_gates feeds the prompts alone. Under "prefix" pooling that equals the teacher-forced line's
    gate at the last prompt position; under "sequence" the line's answer changes the gate."""
    tasks = make_tasks(CONFIG.tasks, seed=0, n_train=CONFIG.n_train, n_test=CONFIG.n_test)
    general = GeneralEval(base, CONFIG.source_config())
    sources, _ = train_sources(CONFIG, base, tasks, seed=0, general=general, progress=False)
    states, scales = sources_from_methods(sources)
    mole = compose("mole", states, scales, base, dataclasses.replace(CONFIG, gate_pool=pool), seed=0)
    for layer in mole.gate_layers():
        layer.gate_e.data[...] = np.random.default_rng(1).normal(0, 1.0, layer.gate_e.shape)
    at_answer = answer_gates(mole, tasks)
    worst = 0.0
    for t in tasks:
        x, _, _ = encode_examples(t.test, t.seq_len)
        at = np.array([len(p) - 1 for p, _ in t.test])  # the last prompt position of each line
        with mole.evaluating() as m:
            m(x)
        for name, layer in zip(mole.adapted, mole.layers()):
            forced = layer.current_gate.data.reshape(len(t.test), t.seq_len, -1)[np.arange(len(at)), at].mean(0)
            worst = max(worst, float(np.abs(forced - np.asarray(at_answer[t.name][name])).max()))
    assert worst < 1e-5 if pool == "prefix" else worst > 1e-3


def test_balanced_gate_batches_hold_each_task_equally_and_random_ones_are_unchanged():
    from tinyslim.experiments.composition import _batch_rows

    sizes = [5, 7, 4]  # rows 0-4 task 0, 5-11 task 1, 12-15 task 2
    rng = np.random.default_rng(0)
    for batch, counts in ((12, [4, 4, 4]), (13, [5, 4, 4]), (2, [1, 1, 0])):
        rows = _batch_rows(rng, sizes, batch, balanced=True)
        task = np.searchsorted(np.cumsum(sizes), rows, side="right")
        assert len(rows) == batch and np.bincount(task, minlength=3).tolist() == counts
    a, b = np.random.default_rng(3), np.random.default_rng(3)  # the old uniform draw, bit for bit
    np.testing.assert_array_equal(_batch_rows(a, sizes, 12, balanced=False), b.integers(0, 16, 12))


def test_the_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown"):
        CompositionConfig(methods=("mole", "hub"))
    with pytest.raises(ValueError, match="at least 2"):
        CompositionConfig(tasks=("rev",))
    with pytest.raises(ValueError, match="mix_fraction"):
        CompositionConfig(mix_fraction=0)
    with pytest.raises(ValueError, match="mole_warmup_steps"):
        CompositionConfig(mole_steps=10, mole_warmup_steps=10)


def test_cli_run_composition_writes_json_with_every_method(tmp_path):
    args = [sys.executable, "-m", "tinyslim", "run", "composition", "--seed", "0", "--tasks", "rev,cap",
            "--n-train", "20", "--n-test", "3", "--eval-batches", "1", "--no-fact-recall",
            "--set", "source_steps=2", "--set", "mole_steps=2", "--set", "eval_batch_size=2",
            "--runs-dir", str(tmp_path), "--name", "tiny", "--quiet"]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "TINYSLIM_NUM_THREADS": "1"}
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "tiny" / "composition.json").read_text())
    assert set(doc["methods"]) == set(COMPOSERS) and doc["seed"] == 0
    assert "mole_nobal" in out.stdout and "masking" in doc["table"]
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    bad = subprocess.run(args[:4] + ["--steps", "3", "--runs-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "--set" in bad.stderr
