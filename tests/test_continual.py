"""Scenario A at a tiny size: the metrics on hand-made matrices, the runner with every real method,
and the `run continual` command line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyslim.adapters import METHODS, SeqLoRA
from tinyslim.data import CharTokenizer
from tinyslim.experiments.continual import (ContinualConfig, GeneralEval, build_method, method_overrides,
                                            run_continual)
from tinyslim.experiments.metrics import (average_accuracy, backward_transfer, forgetting, learning_accuracy,
                                          mean_std, summarize)
from tinyslim.nn import GPT, GPTConfig
from tinyslim.tasks import make_tasks

ROOT = Path(__file__).resolve().parent.parent


# ---- metrics ----------------------------------------------------------------------------------------

def test_acc_and_bwt_on_hand_made_matrices():
    R = [[0.9, 0.1, 0.0],
         [0.5, 1.0, 0.2],
         [0.3, 0.6, 0.8]]
    assert average_accuracy(R) == pytest.approx((0.3 + 0.6 + 0.8) / 3)
    assert backward_transfer(R) == pytest.approx(((0.3 - 0.9) + (0.6 - 1.0)) / 2)
    assert learning_accuracy(R) == pytest.approx((0.9 + 1.0 + 0.8) / 3)
    assert forgetting(R) == pytest.approx([0.9 - 0.3, 1.0 - 0.6])
    perfect = np.triu(np.ones((4, 4))).T  # learns each task and never forgets
    assert average_accuracy(perfect) == 1.0 and backward_transfer(perfect) == 0.0
    total = np.eye(4)  # learns each task and forgets it at once (Seq-LoRA in this world)
    assert average_accuracy(total) == 0.25 and backward_transfer(total) == -1.0
    assert backward_transfer([[0.7]]) == 0.0 and summarize([[0.7]])["acc"] == 0.7
    assert backward_transfer([[0.2, 0.0], [0.6, 0.9]]) == pytest.approx(0.4)  # later tasks can help too


def test_metrics_reject_malformed_matrices():
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[1.0, 0.5]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        backward_transfer([[1.0, 0.0], [0.0, 100.0]])  # percentages instead of fractions
    assert mean_std([0.2, 0.4]) == pytest.approx((0.3, np.std([0.2, 0.4], ddof=1)))
    assert mean_std([0.5]) == (0.5, 0.0)


def test_method_overrides_parse_per_method_and_global_fields():
    out = method_overrides(["ilora.ema_lambda=0.999,r=4", "cola.chain_len=2", "er.replay_order=offer_then_sample"],
                           ["lora", "er", "ilora", "cola"])
    assert out["ilora"] == {"ema_lambda": 0.999, "r": 4}
    assert out["lora"] == {"r": 4} and out["cola"] == {"r": 4, "chain_len": 2}
    assert out["er"] == {"r": 4, "replay_order": "offer_then_sample"}
    with pytest.raises(ValueError, match="not among"):
        method_overrides(["slim.x=1"], ["lora"])
    with pytest.raises(ValueError, match="form"):
        method_overrides(["lora.r"], ["lora"])


def test_every_method_gets_the_scenarios_adapter_shape():
    config = ContinualConfig(rank=4, lora_alpha=8)
    for name in SCENARIO_A:
        method = build_method(name, config)
        assert method.config.r == 4 and method.config.lora_alpha == 8
        assert list(method.config.target_modules) == list(config.target_modules)
    assert build_method("ilora", config).config.pad_token_id == 0
    assert build_method("cola", config, {"chain_len": 2}).config.chain_len == 2
    with pytest.raises(ValueError, match="unknown config fields"):
        build_method("lora", config, {"ema_lambda": 0.5})
    with pytest.raises(ValueError, match="unknown method"):
        build_method("nope", config)


# ---- the runner at a tiny size ---------------------------------------------------------------------

TINY = GPTConfig(vocab_size=CharTokenizer().vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)
CONFIG = ContinualConfig(tasks=("rev", "cap"), steps=3, batch_size=4, rank=2, lora_alpha=4, n_train=40, n_test=6,
                         eval_batches=1, eval_batch_size=2, fact_recall=False)


@pytest.fixture(scope="module")
def world():
    base = GPT(TINY, seed=0)
    return base, make_tasks(CONFIG.tasks, seed=0, n_train=CONFIG.n_train, n_test=CONFIG.n_test), \
        GeneralEval(base, CONFIG)


SCENARIO_A = ("lora", "er", "ilora", "cola") + tuple(m for m in ("slim", "moe_lora") if m in METHODS)


@pytest.mark.parametrize("name", SCENARIO_A)
def test_the_runner_completes_every_method_and_leaves_the_base_alone(name, world):
    base, tasks, general = world
    before = base.state_dict()
    result = run_continual(build_method(name, CONFIG), tasks, CONFIG, base, seed=0, progress=False, general=general)
    for key, value in base.state_dict().items():
        assert np.array_equal(value, before[key]), f"{name} changed the base model's {key}"
    assert result["method"] == name and result["tasks"] == ["rev", "cap"]
    assert result["learners"] == (["slow", "fast"] if name == "ilora" else ["default"])
    for learner in result["learners"]:
        R = np.array(result["by_learner"][learner]["acc_matrix"])
        assert R.shape == (2, 2) and ((0 <= R) & (R <= 1)).all()
        assert len(result["by_learner"][learner]["general"]) == 2
    assert -1 <= result["bwt"] <= 1 and 0 <= result["acc"] <= 1
    g = result["final_general"]
    assert g["val_loss"] > 0 and 0 <= g["next_char_acc"] <= 1 and 0 <= g["agreement"] <= 1
    assert result["base_general"]["agreement"] == 1.0
    assert result["trainable_params"] > 0 and result["optimizer_reset_per_task"] is True
    assert len(result["train_log"]) == 2 and result["wall_s"] > 0
    json.dumps(result)  # the whole result is JSON


class Spy(SeqLoRA):
    """Seq-LoRA that records what the runner hands its hooks."""

    name = "spy"
    config_class = SeqLoRA.config_class

    def before_task(self, task_id, steps, optimizer):
        self.starts = getattr(self, "starts", []) + [(task_id, steps, dict(optimizer.state), optimizer.step_count,
                                                       optimizer.lr)]
        super().before_task(task_id, steps, optimizer)

    def after_step(self, step, optimizer):
        self.steps_seen = getattr(self, "steps_seen", []) + [(step, optimizer.lr)]


def test_adam_is_reset_at_every_boundary_and_the_lr_decays_within_each_task(world):
    base, tasks, general = world
    spy = Spy(r=2, lora_alpha=4, target_modules=["attn.c_attn"])
    run_continual(spy, tasks, CONFIG, base, seed=0, progress=False, general=general)
    assert [(k, n) for k, n, *_ in spy.starts] == [(0, 3), (1, 3)]
    assert all(state == {} and count == 0 and lr == CONFIG.lr for _, _, state, count, lr in spy.starts)
    assert [s for s, _ in spy.steps_seen] == [0, 1, 2, 0, 1, 2]  # the step within the task
    lrs = [lr for _, lr in spy.steps_seen[:3]]  # the lr of the next step: linear decay to 0 at the end
    assert lrs == pytest.approx([CONFIG.lr * 2 / 3, CONFIG.lr / 3, 0.0])


def test_the_runner_is_deterministic_given_the_seed(world):
    base, tasks, general = world
    runs = [run_continual(build_method("er", CONFIG), tasks, CONFIG, base, seed=1, progress=False, general=general)
            for _ in range(2)]
    assert runs[0]["train_log"] == runs[1]["train_log"]
    assert runs[0]["by_learner"] == runs[1]["by_learner"]


def test_a_model_too_short_for_the_tasks_is_refused(world):
    base, _, general = world
    long_tasks = make_tasks(["dup"], n_train=10, n_test=2)
    short = GPT(GPTConfig(vocab_size=TINY.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="block_size"):
        run_continual(build_method("lora", CONFIG), long_tasks, CONFIG, short, progress=False, general=general)


# ---- the command line -----------------------------------------------------------------------------

def test_cli_run_continual_writes_json_with_every_method(tmp_path):
    args = [sys.executable, "-m", "tinyslim", "run", "continual", "--methods", "lora,er,ilora,cola",
            "--tasks", "rev,cap", "--steps", "3", "--batch-size", "4", "--n-train", "20", "--n-test", "4",
            "--eval-batches", "1", "--no-fact-recall", "--runs-dir", str(tmp_path), "--name", "tiny", "--quiet",
            "--method-args", "ilora.ema_lambda=0.9"]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "TINYSLIM_NUM_THREADS": "1"}  # tiny matrices: 1 thread
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "tiny" / "continual.json").read_text())
    assert set(doc["results"]) == set(doc["summary"]) == {"lora", "er", "ilora", "cola"}
    assert doc["results"]["ilora"][0]["describe"]["config"]["ema_lambda"] == 0.9
    for name, runs in doc["results"].items():
        assert np.array(runs[0]["by_learner"][runs[0]["reported_learner"]]["acc_matrix"]).shape == (2, 2)
    assert "ACC" in out.stdout and "cola" in out.stdout
    # an existing run directory is never overwritten by accident
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_cli_bad_arguments_fail_before_any_training(tmp_path):
    base = [sys.executable, "-m", "tinyslim", "run", "continual", "--runs-dir", str(tmp_path), "--quiet"]
    for extra, message in ((["--tasks", "rev,nope"], "unknown task"), (["--methods", "lora,nope"], "unknown method"),
                           (["--method-args", "lora.gamma=1"], "unknown config fields")):
        out = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not any(tmp_path.iterdir())  # nothing written
