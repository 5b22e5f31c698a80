"""The torch engine of the scenario runners against the NumPy one, in float64.

The same scenario-A run (tiny GPT, two tasks, a few steps, one seed) on both engines: every training loss,
every accuracy matrix, the general-capability measurements and the final adapter arrays agree to float64
rounding; the torch engine's Adam and clip are tinyslim.optim's step for step; a torch run resumes from
its checkpoint bit-identically; the evaluation helpers take torch outputs."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tinyslim import optim  # noqa: E402
from tinyslim.adapters import METHODS as NUMPY_METHODS  # noqa: E402
from tinyslim.data import CharTokenizer  # noqa: E402
from tinyslim.evaluate import evaluate_loss, next_char_accuracy  # noqa: E402
from tinyslim.experiments.continual import ContinualConfig, build_method, run_continual, run_methods  # noqa: E402
from tinyslim.experiments.engine import NUMPY, get_engine  # noqa: E402
from tinyslim.io import load_checkpoint  # noqa: E402
from tinyslim.nn import GPT, GPTConfig, Parameter  # noqa: E402
from tinyslim.tasks import make_tasks, model_answerer  # noqa: E402
from tinyslim.torch import METHODS as TORCH_METHODS  # noqa: E402
from tinyslim.torch import from_gpt  # noqa: E402
from tinyslim.torch.optim import Adam, clip_grad_norm_  # noqa: E402

TINY = GPTConfig(vocab_size=CharTokenizer().vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)
CONFIG = ContinualConfig(tasks=("rev", "cap"), steps=6, batch_size=4, rank=2, lora_alpha=4, n_train=40, n_test=6,
                         eval_batches=1, eval_batch_size=4, fact_recall=False, lr=1e-2)
BOTH = sorted(set(NUMPY_METHODS) & set(TORCH_METHODS))  # every method both engines have now
OVERRIDES = {"lora": {"lora_dropout": 0.1}, "er": {"buffer_size": 6}}  # the dropout stream; a full reservoir
RTOL = 1e-9  # float64: a few hundred operations per value, each within 2⁻⁵³ relative


@pytest.fixture(scope="module")
def world():
    base = GPT(TINY, seed=0).to(np.float64)
    return base, make_tasks(CONFIG.tasks, seed=0, n_train=CONFIG.n_train, n_test=CONFIG.n_test)


def run(world, name, engine, **kw):
    base, tasks = world
    method = build_method(name, CONFIG, OVERRIDES.get(name), engine=engine)
    result = run_continual(method, tasks, CONFIG, base, seed=2, progress=False, engine=engine, **kw)
    with method.evaluating() as model:  # the greedy answers themselves (the tiny GPT gets them all wrong)
        result["answers"] = [model_answerer(model, t.max_answer_len)([p for p, _ in t.test]) for t in tasks]
    arrays, meta = method.state_dict()
    return result, {k: np.array(v) for k, v in arrays.items()}, meta


def scaled_diff(a, b) -> float:
    """max |a − b| / max(1, max |a|): absolute near zero, relative for large entries."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b), initial=0.0) / max(1.0, float(np.max(np.abs(a), initial=0.0))))


def test_both_registries_share_the_basic_methods():
    assert {"lora", "er"} <= set(BOTH)
    assert get_engine() is NUMPY and get_engine("numpy") is NUMPY and get_engine("torch") is get_engine("torch")
    with pytest.raises(ValueError, match="unknown engine"):
        get_engine("jax")


@pytest.mark.parametrize("name", BOTH)
def test_a_scenario_a_run_is_the_same_on_both_engines(world, name):
    ours, ours_arrays, ours_meta = run(world, name, "numpy")
    theirs, theirs_arrays, theirs_meta = run(world, name, "torch")
    assert theirs["learners"] == ours["learners"] and theirs["trainable_params"] == ours["trainable_params"]
    assert theirs["answers"] == ours["answers"]
    for a, b in zip(ours["train_log"], theirs["train_log"]):
        assert scaled_diff(a["loss_curve"], b["loss_curve"]) < RTOL and abs(a["first_loss"] - b["first_loss"]) < RTOL
    for learner in ours["learners"]:
        mine, other = ours["by_learner"][learner], theirs["by_learner"][learner]
        assert mine["acc_matrix"] == other["acc_matrix"]
        for g, h in zip(mine["general"], other["general"]):
            assert g["next_char_acc"] == h["next_char_acc"] and g["agreement"] == h["agreement"]
            assert abs(g["val_loss"] - h["val_loss"]) < RTOL * g["val_loss"]
    assert abs(ours["base_general"]["val_loss"] - theirs["base_general"]["val_loss"]) < RTOL
    assert sorted(ours_arrays) == sorted(theirs_arrays)
    for key in ours_arrays:  # the trained adapters (and a method's other arrays: replay buffer, EMA copies …)
        assert ours_arrays[key].shape == theirs_arrays[key].shape, key
        assert scaled_diff(ours_arrays[key], theirs_arrays[key]) < RTOL, key
    assert ours_meta["streams"] == theirs_meta["streams"]  # every named stream drew as often on both engines


def test_run_methods_on_the_torch_engine_writes_the_engine_and_builds_every_row(world):
    base, _ = world
    config = ContinualConfig(tasks=("rev",), steps=2, batch_size=2, rank=2, lora_alpha=4, n_train=10, n_test=2,
                             eval_batches=1, eval_batch_size=2, fact_recall=False)
    doc = run_methods(["lora"], config, [0], base, progress=False, engine="torch")
    assert doc["engine"] == "torch" and doc["results"]["lora"][0]["method"] == "lora"
    assert "engine" not in run_methods(["lora"], config, [0], base, progress=False)  # NumPy documents as before
    for row in ("slim-no-masks", "lora-r4"):  # an ablation row and a parameter-matched LoRA: same config
        mine, theirs = build_method(row, config), build_method(row, config, engine="torch")
        assert type(theirs).__module__.startswith("tinyslim.torch") and theirs.name == mine.name
        assert theirs.config == mine.config
    with pytest.raises(ValueError, match="unknown method 'elder' on the torch engine"):
        build_method("elder", config, engine="torch")  # scenario C's, not scenario A's


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("name", ["lora", "er"])
def test_a_torch_run_resumes_bit_identically_from_its_checkpoint(world, tmp_path, name):
    straight, straight_arrays, straight_meta = run(world, name, "torch")
    base, tasks = world
    path = tmp_path / "run.safetensors"
    method = build_method(name, CONFIG, OVERRIDES.get(name), engine="torch")
    hook = method.after_step

    def after_step(step, optimizer):
        hook(step, optimizer)
        if (method.task_id, step) == (1, 3):
            raise Interrupt
    method.after_step = after_step
    with pytest.raises(Interrupt):
        run_continual(method, tasks, CONFIG, base, seed=2, progress=False, engine="torch", checkpoint=path,
                      checkpoint_every=2)
    saved = load_checkpoint(path)[1]
    assert saved["runner"]["position"] == [1, 2] and saved["identity"]["engine"] == "torch"
    resumed, arrays, meta = run(world, name, "torch", checkpoint=path, checkpoint_every=2)
    assert resumed["train_log"] == straight["train_log"] and resumed["by_learner"] == straight["by_learner"]
    assert meta == straight_meta and sorted(arrays) == sorted(straight_arrays)
    for key in arrays:
        assert np.array_equal(arrays[key], straight_arrays[key]), key


# ---- the optimizer and the clip ----------------------------------------------------------------------

SHAPES = [(3, 4), (5,), (2, 1, 3)]


@given(seed=st.integers(0, 2**16), lr=st.sampled_from([1e-3, 4e-3, 3e-2]), steps=st.integers(1, 12),
       max_norm=st.sampled_from([None, 0.5, 1e3]))
def test_adam_and_clip_step_as_tinyslim_optim(seed, lr, steps, max_norm):
    rng = np.random.default_rng(seed)
    init = [rng.normal(size=s) for s in SHAPES]
    ours = [Parameter(a.copy()) for a in init]
    theirs = [torch.tensor(a, requires_grad=True) for a in init]
    opt, ref = optim.Adam(ours, lr=lr), Adam(theirs, lr=lr)
    for t in range(steps):
        grads = [None if (t % 4 == 2 and i == 1) else rng.normal(size=s) for i, s in enumerate(SHAPES)]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = (None, None) if g is None else (g.copy(), torch.tensor(g))
        if max_norm is not None:
            assert clip_grad_norm_(theirs, max_norm) == pytest.approx(optim.clip_grad_norm_(ours, max_norm), rel=1e-12)
        opt.lr = ref.lr = lr * (1 - t / (steps + 1))  # a schedule sets lr between steps
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(q.detach().numpy(), p.data, rtol=1e-12, atol=1e-15)
    assert ref.step_count == opt.step_count == steps
    flat, theirs_flat = opt.state_dict(), ref.state_dict()
    assert sorted(flat) == sorted(theirs_flat)
    for key in flat:
        np.testing.assert_allclose(theirs_flat[key], flat[key], rtol=1e-12, atol=1e-15, err_msg=key)


def test_adam_state_round_trips_resets_and_refuses_a_nan_gradient():
    p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = Adam([p], lr=0.1)
    p.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
    opt.step()
    state = opt.state_dict()
    assert set(state) == {"step", "0.step", "0.exp_avg", "0.exp_avg_sq"} and int(state["0.step"]) == 1
    q = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    other = Adam([q], lr=0.1)
    other.load_state_dict(state)
    with torch.no_grad():
        q.copy_(p)
    p.grad, q.grad = torch.tensor([0.1, 0.3], dtype=torch.float64), torch.tensor([0.1, 0.3], dtype=torch.float64)
    opt.step()
    other.step()
    assert torch.equal(p, q)
    other.load_state_dict(opt.torch_state_dict())  # torch's own form loads too
    opt.reset_state()
    assert opt.state_dict() == {"step": 0} and opt.step_count == 0
    before = p.detach().clone()
    p.grad = torch.tensor([float("nan"), 1.0], dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="parameter 0"):
        opt.step()
    assert torch.equal(p.detach(), before)
    with pytest.raises(ValueError, match="frozen"):
        Adam([torch.zeros(2)])
    assert clip_grad_norm_([torch.zeros(2, requires_grad=True)], 1.0) == 0.0  # no gradient at all


# ---- the evaluation helpers on torch outputs ----------------------------------------------------------

def test_the_evaluation_helpers_measure_a_torch_model_as_the_numpy_one(world):
    base, _ = world
    lm = from_gpt(base)
    rng = np.random.default_rng(0)
    batches = [(x, np.roll(x, -1, axis=1)) for x in (rng.integers(0, TINY.vocab_size, (3, 12)) for _ in range(2))]
    assert abs(evaluate_loss(lm, batches) - evaluate_loss(base, batches)) < RTOL
    assert next_char_accuracy(lm, batches) == next_char_accuracy(base, batches)
    assert next_char_accuracy(lm, batches, reference=from_gpt(base)) == 1.0


# ---- the command line ------------------------------------------------------------------------------

def test_cli_run_continual_on_the_torch_engine(tmp_path, capsys):
    import json

    from tinyslim.cli import main

    common = ["--tasks", "rev", "--steps", "2", "--batch-size", "2", "--n-train", "10", "--n-test", "2",
              "--eval-batches", "1", "--no-fact-recall", "--runs-dir", str(tmp_path), "--quiet"]
    assert main(["run", "continual", "--engine", "torch", "--methods", "lora", "--name", "t", *common]) == 0
    doc = json.loads((tmp_path / "t" / "continual.json").read_text())
    assert doc["engine"] == "torch" and doc["cli_args"]["engine"] == "torch" and "lora" in doc["summary"]
    assert main(["run", "composition", "--engine", "torch", "--runs-dir", str(tmp_path), "--quiet"]) == 2
    assert "--engine" in capsys.readouterr().err
