"""Resuming `run continual`: every method, interrupted after a mid-task (or a task-boundary) checkpoint and
resumed, ends bit-identical to an uninterrupted run under the same seed — adapter arrays, non-parameter
state (replay buffer, counters, tied knots, cluster statistics, RNG streams), accuracy matrices, loss logs.
A damaged checkpoint and one from another run are CheckpointErrors naming the file / the differing fields."""
import dataclasses

import numpy as np
import pytest

from tinyslim.adapters import METHODS
from tinyslim.data import CharTokenizer
from tinyslim.experiments.continual import ContinualConfig, GeneralEval, build_method, run_continual, run_methods
from tinyslim.io import CheckpointError, load_checkpoint
from tinyslim.nn import GPT, GPTConfig
from tinyslim.tasks import make_tasks

TINY = GPTConfig(vocab_size=CharTokenizer().vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)
CONFIG = ContinualConfig(tasks=("rev", "cap"), steps=5, batch_size=4, rank=2, lora_alpha=4, n_train=40, n_test=6,
                         eval_batches=1, eval_batch_size=2, fact_recall=False)
EVERY = 2  # checkpoints after steps 2 and 4 of each task, and at each boundary
OVERRIDES = {"lora": {"lora_dropout": 0.1}, "er": {"buffer_size": 6}, "ilora": {"buffer_size": 6}}  # exercise
# the dropout stream, and a full reservoir (its replacement draws) by the second task


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def world():
    base = GPT(TINY, seed=0)
    return base, make_tasks(CONFIG.tasks, seed=0, n_train=CONFIG.n_train, n_test=CONFIG.n_test), \
        GeneralEval(base, CONFIG)


def method(name):
    return build_method(name, CONFIG, OVERRIDES.get(name))


def full_state(m):
    arrays, meta = m.state_dict()
    return {k: v.copy() for k, v in arrays.items()}, meta


@pytest.fixture(scope="module")
def straight(world):
    """Uninterrupted runs (no checkpoint), one per method, computed on first use."""
    base, tasks, general = world
    cache = {}

    def get(name):
        if name not in cache:
            m = method(name)
            result = run_continual(m, tasks, CONFIG, base, seed=3, progress=False, general=general)
            cache[name] = (result, full_state(m))
        return cache[name]
    return get


def interrupted_then_resumed(world, name, path, at):
    """Run with checkpoints, raise from after_step at (task, step), then resume from the file."""
    base, tasks, general = world
    m = method(name)
    hook = m.after_step

    def after_step(step, optimizer):
        hook(step, optimizer)
        if (m.task_id, step) == at:
            raise Interrupt
    m.after_step = after_step
    with pytest.raises(Interrupt):
        run_continual(m, tasks, CONFIG, base, seed=3, progress=False, general=general, checkpoint=path,
                      checkpoint_every=EVERY)
    position = load_checkpoint(path)[1]["runner"]["position"]
    resumed = method(name)
    result = run_continual(resumed, tasks, CONFIG, base, seed=3, progress=False, general=general, checkpoint=path,
                           checkpoint_every=EVERY)
    return result, full_state(resumed), position


def assert_same_run(a, b, state_a, state_b):
    for learner in a["learners"]:
        assert a["by_learner"][learner]["acc_matrix"] == b["by_learner"][learner]["acc_matrix"]
        assert a["by_learner"][learner]["general"] == b["by_learner"][learner]["general"]
    assert a["train_log"] == b["train_log"]
    (arrays_a, meta_a), (arrays_b, meta_b) = state_a, state_b
    assert sorted(arrays_a) == sorted(arrays_b)
    for key in arrays_a:
        assert arrays_a[key].dtype == arrays_b[key].dtype and np.array_equal(arrays_a[key], arrays_b[key]), key
    assert meta_a == meta_b  # counters, schedules, and the state of every RNG stream


# (task, step) of the interruption: the step index whose after_step raises; the resumed position is the last
# checkpoint before it. (0, 2): mid-task 0 from (0, 2); (1, 3): mid-task 1 from (1, 2), after a boundary.
@pytest.mark.parametrize("at, position", [((0, 2), [0, 2]), ((1, 3), [1, 2])])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_resumes_bit_identically(world, straight, tmp_path, name, at, position):
    result, state, resumed_from = interrupted_then_resumed(world, name, tmp_path / "run.safetensors", at)
    assert resumed_from == position
    reference, reference_state = straight(name)
    assert_same_run(reference, result, reference_state, state)


def test_an_interruption_right_after_a_boundary_resumes_from_it(world, straight, tmp_path):
    result, state, position = interrupted_then_resumed(world, "cola", tmp_path / "run.safetensors", (1, 0))
    assert position == [1, 0]
    assert_same_run(*straight("cola")[:1], result, straight("cola")[1], state)


def test_a_finished_checkpoint_gives_the_result_back_without_training(world, straight, tmp_path):
    base, tasks, general = world
    path = tmp_path / "run.safetensors"
    first = run_continual(method("er"), tasks, CONFIG, base, seed=3, progress=False, general=general, checkpoint=path)
    assert load_checkpoint(path)[1]["runner"]["position"] == [2, 0]
    m = method("er")
    m.loss = None  # any training step would fail
    again = run_continual(m, tasks, CONFIG, base, seed=3, progress=False, general=general, checkpoint=path)
    assert again["by_learner"] == first["by_learner"] == straight("er")[0]["by_learner"]


def test_run_methods_resumes_from_its_checkpoint_directory(world, tmp_path):
    base, _, _ = world
    plain = run_methods(["lora", "er"], CONFIG, [3], base, overrides=OVERRIDES, progress=False)
    doc = run_methods(["lora", "er"], CONFIG, [3], base, overrides=OVERRIDES, progress=False,
                      checkpoint_dir=tmp_path / "ck", checkpoint_every=EVERY)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["er-seed3.safetensors", "lora-seed3.safetensors"]
    again = run_methods(["lora", "er"], CONFIG, [3], base, overrides=OVERRIDES, progress=False,
                        checkpoint_dir=tmp_path / "ck")  # both runs finished: read back, not retrained
    for name in ("lora", "er"):
        for other in (doc, again):
            assert other["results"][name][0]["by_learner"] == plain["results"][name][0]["by_learner"]
            assert other["results"][name][0]["train_log"] == plain["results"][name][0]["train_log"]


# ---- damaged and foreign checkpoints ------------------------------------------------------------------

@pytest.fixture
def checkpoint(world, tmp_path):
    base, tasks, general = world
    path = tmp_path / "run.safetensors"
    m = method("ilora")
    hook = m.after_step

    def after_step(step, optimizer):
        hook(step, optimizer)
        if step == 2:
            raise Interrupt
    m.after_step = after_step
    with pytest.raises(Interrupt):
        run_continual(m, tasks, CONFIG, base, seed=3, progress=False, general=general, checkpoint=path,
                      checkpoint_every=EVERY)
    return path


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_a_checkpoint_error_naming_the_file(world, checkpoint, damage):
    base, tasks, general = world
    raw = bytearray(checkpoint.read_bytes())
    if damage == "truncate":
        raw = raw[:len(raw) // 2]
    else:
        raw[-3] ^= 0x10
    checkpoint.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=str(checkpoint)):
        run_continual(method("ilora"), tasks, CONFIG, base, seed=3, progress=False, general=general,
                      checkpoint=checkpoint)


def test_a_checkpoint_of_another_run_names_the_differing_fields(world, checkpoint):
    base, tasks, general = world
    other = dataclasses.replace(CONFIG, lr=1e-3)
    with pytest.raises(CheckpointError, match=r"config\.lr: checkpoint 0\.004 vs now 0\.001") as err:
        run_continual(build_method("ilora", other, OVERRIDES["ilora"]), tasks, other, base, seed=3, progress=False,
                      general=general, checkpoint=checkpoint)
    assert str(checkpoint) in str(err.value)
    with pytest.raises(CheckpointError, match=r"seed: checkpoint 3 vs now 4"):
        run_continual(method("ilora"), tasks, CONFIG, base, seed=4, progress=False, general=general,
                      checkpoint=checkpoint)
    with pytest.raises(CheckpointError, match=r"method: checkpoint 'ilora' vs now 'er'"):
        run_continual(method("er"), tasks, CONFIG, base, seed=3, progress=False, general=general,
                      checkpoint=checkpoint)
    with pytest.raises(CheckpointError, match=r"method_config\.gamma: checkpoint 1\.0 vs now 0\.5"):
        run_continual(build_method("ilora", CONFIG, {**OVERRIDES["ilora"], "gamma": 0.5}), tasks, CONFIG, base,
                      seed=3, progress=False, general=general, checkpoint=checkpoint)
    with pytest.raises(CheckpointError, match=r"base_model_sha256"):
        run_continual(method("ilora"), tasks, CONFIG, GPT(TINY, seed=1), seed=3, progress=False, general=general,
                      checkpoint=checkpoint)
    # resume=False starts over and overwrites the file
    result = run_continual(method("er"), tasks, CONFIG, base, seed=3, progress=False, general=general,
                           checkpoint=checkpoint, resume=False)
    assert load_checkpoint(checkpoint)[1]["identity"]["method"] == "er" and result["method"] == "er"


def test_method_state_round_trips_for_every_method(world):
    base, tasks, general = world
    for name in sorted(METHODS):
        m = method(name)
        run_continual(m, tasks, dataclasses.replace(CONFIG, steps=3), base, seed=1, progress=False, general=general)
        arrays, meta = full_state(m)
        fresh = method(name)
        fresh.attach(GPT(TINY, seed=0), seed=1)
        fresh.load_state_dict(arrays, meta)
        again_arrays, again_meta = full_state(fresh)
        assert again_meta == meta, name
        for key in arrays:
            assert np.array_equal(arrays[key], again_arrays[key]), (name, key)
        with pytest.raises(ValueError, match="saved from method"):
            fresh.load_state_dict(arrays, {**meta, "method": "other"})


# ---- the command line ------------------------------------------------------------------------------------

def test_cli_run_continual_resume(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    args = [sys.executable, "-m", "tinyslim", "run", "continual", "--methods", "lora,er", "--tasks", "rev,cap",
            "--steps", "3", "--batch-size", "4", "--n-train", "20", "--n-test", "4", "--eval-batches", "1",
            "--no-fact-recall", "--runs-dir", str(tmp_path), "--name", "tiny", "--quiet"]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "TINYSLIM_NUM_THREADS": "1"}
    first = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "tiny"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["er-seed0.safetensors",
                                                                           "lora-seed0.safetensors"]
    doc = json.loads((run_dir / "continual.json").read_text())
    again = subprocess.run(args + ["--resume"], cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    resumed = json.loads((run_dir / "continual.json").read_text())
    for name in ("lora", "er"):
        a, b = doc["results"][name][0], resumed["results"][name][0]
        assert a["by_learner"] == b["by_learner"] and a["train_log"] == b["train_log"]
    other = subprocess.run(args + ["--resume", "--lr", "0.001"], cwd=root, capture_output=True, text=True,
                           timeout=300, env=env)
    assert other.returncode == 2 and "config.lr: checkpoint 0.004 vs now 0.001" in other.stderr, other.stderr
    assert "lora-seed0.safetensors" in other.stderr
