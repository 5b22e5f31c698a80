"""tinyslim/experiments/slim_dynamics.py at a tiny size: the records' structure, that recording never
changes training, and the mechanism it documents (docs/slim_dynamics.md): Adam moves an entry whose task
gradient is 0 by about lr per step under the L1 term, whatever λ_L1 is; a proximal L1 step of the same λ
moves it by lr·λ/(r·D)."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from tinyslim.adapters import adapter_state_dict
from tinyslim.data import CharTokenizer
from tinyslim.experiments.continual import ContinualConfig, build_method, run_continual
from tinyslim.adapters.slim import drop_probabilities
from tinyslim.experiments.slim_dynamics import (EARLY_STEPS, MASK_STUDY, Recorder, format_masks, format_table, main,
                                                mask_removal, slim_dynamics)
from tinyslim.nn import GPT, GPTConfig
from tinyslim.tasks import make_tasks

TINY = GPTConfig(vocab_size=CharTokenizer().vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)
TINY64 = dataclasses.replace(TINY, dtype="float64")  # step sizes of ~1e-7 on entries of ~0.1: float64
CONFIG = ContinualConfig(tasks=("rev",), steps=6, batch_size=4, rank=2, lora_alpha=4, n_train=40, n_test=6,
                         eval_batches=1, eval_batch_size=2, fact_recall=False)


@pytest.fixture(autouse=True)
def _numpy_kernel(monkeypatch):
    monkeypatch.setenv("TINYSLIM_BACKEND", "numpy")


@pytest.fixture(scope="module")
def base():
    return GPT(TINY, seed=0)


@pytest.fixture(scope="module")
def base64():
    return GPT(TINY64, seed=0)


def test_records_have_every_field_finite_and_start_from_the_b_zero_invariant(base):
    runs = slim_dynamics(base, ("spec", "no-l1", "sgd"), tasks=("rev",), steps=6, seed=100, every=3,
                         config=CONFIG)
    for name, run in runs.items():
        steps = [row["step"] for row in run["records"]]
        assert steps == sorted({0, 3, 6} | {s for s in EARLY_STEPS if s < 6}), name
        for row in run["records"]:
            assert np.isfinite(row["l1"]) and len(row["layers"]) == 3  # c_attn, c_fc, c_proj of one block
            for layer in row["layers"]:
                assert all(np.isfinite(v) for k, v in layer.items() if k != "mask_cos")
                # the masked-vs-unmasked gradient cosine: only with forward masks, and only where there is a batch
                has_cos = run["config"]["drop_p"] > 0 and row["task_loss"] is not None
                assert ("mask_cos" in layer) == has_cos, name
                assert layer.get("mask_cos") is None or -1 - 1e-9 <= layer["mask_cos"] <= 1 + 1e-9
                assert all(0 <= layer[k] <= 1 for k in ("a_zero", "b_zero", "a_l1_wins", "lora_share") if k in layer)
            assert (row["task_loss"] is None) == (row["step"] == 6)  # the final record has no batch
        first = run["records"][0]
        assert first["step"] == 0 and np.isfinite(first["task_loss"])
        for layer in first["layers"]:  # docs/methods.md §1.6: B = 0 at init, so dCE/dA is exactly 0
            assert layer["a_zero"] == 1.0 and layer["b"] == 0 and layer["delta"] == 0 and layer["a_rel"] == 1.0
        assert set(run["accuracy_by_eval_mode"]) == ({"expected", "sampled", "full"}
                                                     if run["config"]["drop_p"] else {"expected"})
    assert runs["sgd"]["optimizer"] == "sgd" and runs["sgd"]["lr"] == 1.0
    table = format_table(runs)
    assert "spec" in table and "sgd" in table and len(table.splitlines()) > 3 * len(EARLY_STEPS)


def test_recording_every_step_leaves_training_bit_identical(base):
    tasks = make_tasks(CONFIG.tasks, 100, CONFIG.n_train, CONFIG.n_test)
    plain = build_method("slim", CONFIG)
    run_continual(plain, tasks, CONFIG, base, 100, progress=False)
    recorded = Recorder(build_method("slim", CONFIG), every=1)
    run_continual(recorded, tasks, CONFIG, base, 100, progress=False)
    assert len(recorded.records) == CONFIG.steps + 1
    ours, theirs = adapter_state_dict(recorded.method.model), adapter_state_dict(plain.model)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert np.array_equal(ours[key], theirs[key]), key


def _first_step_change_of_A(base, l1_coef, optimizer="adam", prox=0.0):
    """|A after one step − A at init| per entry, for every adapted layer (B = 0: no task gradient on A)."""
    from tinyslim.experiments.slim_dynamics import OPTIMIZERS

    config = dataclasses.replace(CONFIG, steps=1, lr=CONFIG.lr if optimizer == "adam" else 1.0)
    tasks = make_tasks(config.tasks, 100, config.n_train, config.n_test)
    init = build_method("slim", config, {"drop_p": 0.0})
    init.attach(copy.deepcopy(base), 100)
    method = Recorder(build_method("slim", config, {"drop_p": 0.0, "l1_coef": l1_coef}), 1, prox)
    run_continual(method, tasks, config, base, 100, progress=False, optimizer_class=OPTIMIZERS[optimizer])
    return [(np.abs(a.lora_A.data - b.lora_A.data), a.lora_A.shape) for a, b in zip(method.layers(), init.layers())]


def test_adam_moves_a_zero_gradient_entry_by_lr_whatever_lambda_a_proximal_step_by_lr_lambda_over_rD(base64):
    base = base64
    lr = CONFIG.lr
    for lam in (1e-3, 1e-4):  # 10× apart, the same step (lr·g/(g + ε): ε = 1e-8 only shows as g nears it)
        for change, _ in _first_step_change_of_A(base, lam):
            np.testing.assert_allclose(change, lr, rtol=0.05)
    for change, (_, r, D) in _first_step_change_of_A(base, 0.0, prox=1e-3):  # soft-thresholding by lr·λ/(r·D)
        np.testing.assert_allclose(change, lr * 1e-3 / (r * D), rtol=1e-3)
    for change, (_, r, D) in _first_step_change_of_A(base, 1e-3, optimizer="sgd"):  # SGD: at most lr·λ/(r·D)
        assert change.max() <= 1.0 * 1e-3 / (r * D) * 1.001
    for change, _ in _first_step_change_of_A(base, 0.0):  # no L1: A does not move on the first step
        assert change.max() == 0


def test_cli_rejects_an_unknown_variant(capsys):
    with pytest.raises(SystemExit):
        main(["--variants", "spec,nope"])
    assert "nope" in capsys.readouterr().err


def test_mask_removal_knows_its_answer_for_one_expert_and_is_zero_at_p_zero(base):
    """One LoRA expert on every token: dropping B's rows removes exactly p_r of the update's energy in
    expectation (the rows are disjoint output coordinates), and p = 0 removes nothing."""
    one = {"n_lora_experts": 1, "n_identity_experts": 0, "top_k": 1, "drop_p": 0.0}
    runs = slim_dynamics(base, ("no-yield-no-l1-no-masks",), tasks=("rev",), steps=6, seed=100, every=3,
                         config=CONFIG)
    assert len(runs["no-yield-no-l1-no-masks"]["mask_removal"]) == 3
    tasks = make_tasks(CONFIG.tasks, 100, CONFIG.n_train, CONFIG.n_test)
    method = build_method("slim", CONFIG, one)
    run_continual(method, tasks, CONFIG, base, 100, progress=False)
    before = adapter_state_dict(method.model)
    rows = mask_removal(method, tasks[0], p=0.3, draws=400)
    p_r, p_c = drop_probabilities(0.3)
    for row in rows:
        assert row["lora_share"] == 1.0
        assert abs(row["out"] - p_r) < 0.03, row  # a statistical tolerance (400 draws)
        assert 0 < row["in"] and 0 < row["both"] < 1
    for row in mask_removal(method, tasks[0], p=0.0, draws=3):
        assert row["in"] == row["out"] == row["both"] == 0.0
    after = adapter_state_dict(method.model)  # measuring changes nothing
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(layer.in_mask is None and layer._cache is None for layer in method.layers())


def test_the_mask_study_variants_add_masks_to_the_tuned_setting_and_tabulate(base):
    assert MASK_STUDY[0] == "g0.5-no-masks" and len(MASK_STUDY) == 7
    runs = slim_dynamics(base, ("g0.5-masks", "g0.5-masks-update"), tasks=("rev",), steps=4, seed=100, every=2,
                         config=CONFIG)
    assert runs["g0.5-masks"]["config"]["gamma"] == 0.5 and runs["g0.5-masks"]["config"]["drop_p"] == 0.3
    assert runs["g0.5-masks-update"]["config"]["mask_mode"] == "update"
    # update masks leave the forward pass unmasked: no masked-vs-unmasked cosine to record
    assert not any("mask_cos" in layer for row in runs["g0.5-masks-update"]["records"] for layer in row["layers"])
    table = format_masks(runs)
    assert len(table.splitlines()) == 3 and "g0.5-masks-update" in table
