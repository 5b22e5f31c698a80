"""Data-parallel training on the torch path: two processes (gloo, CPU, 127.0.0.1) launched as torchrun would
launch them, each training on half of every batch under DistributedDataParallel, end with the adapters of one
process trained on the whole batch, to float64 rounding; and one process of train_distributed is
run_continual's training on the torch engine."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tinyslim.data import CharTokenizer  # noqa: E402
from tinyslim.io import load_checkpoint, save_model  # noqa: E402
from tinyslim.nn import GPT, GPTConfig  # noqa: E402
from tinyslim.torch import METHODS  # noqa: E402
from tinyslim.torch.distributed import main, train_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = GPTConfig(vocab_size=CharTokenizer().vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)
# methods whose step is a function of the batch alone: no draws inside the loss (dropout, replay) and no state
# learned from the batch outside the gradient (SLIM's cluster statistics, ER's buffer), which each process would
# learn from its own shard
DDP_METHODS = ["lora"] + [m for m in ("cola",) if m in METHODS]
ARGS = ["--tasks", "rev,cap", "--steps", "3", "--batch-size", "4", "--rank", "2", "--lr", "1e-2", "--n-train", "20",
        "--n-test", "0", "--dtype", "float64", "--timeout", "60"]
RTOL = 1e-9  # float64, a few steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "tiny.safetensors"
    save_model(GPT(TINY, seed=0), path)  # float32 on disk; --dtype float64 casts it
    return path


def launch(world: int, argv: list[str], timeout: float = 240.0) -> list[subprocess.CompletedProcess]:
    """`world` processes of `python -m tinyslim.torch.distributed` with torchrun's environment variables; every
    process is killed if the group has not finished within `timeout` seconds (no hang)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tinyslim.torch.distributed", *argv], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.mark.parametrize("name", DDP_METHODS)
def test_two_processes_train_the_adapters_of_one_process_on_the_whole_batch(base_path, tmp_path, name):
    argv = ["--method", name, "--base", str(base_path), *ARGS]
    assert main([*argv, "--out", str(tmp_path / "one.safetensors")]) == 0  # here: one process, no group
    ranks = launch(2, [*argv, "--out", str(tmp_path / "two.safetensors")])
    assert all(r.returncode == 0 for r in ranks), "\n".join(r.stderr[-3000:] for r in ranks)
    assert "over 2 processes" in ranks[0].stdout and not ranks[1].stdout  # rank 0 reports and writes
    one, one_meta = load_checkpoint(tmp_path / "one.safetensors")
    two, two_meta = load_checkpoint(tmp_path / "two.safetensors")
    assert one_meta["world_size"] == 1 and two_meta["world_size"] == 2 and sorted(one) == sorted(two)
    for key in one:
        scale = max(1.0, float(np.abs(one[key]).max(initial=0.0)))
        assert float(np.abs(one[key] - two[key]).max(initial=0.0)) < RTOL * scale, key
    assert np.allclose(one_meta["losses"], two_meta["losses"], rtol=RTOL, atol=0)  # the whole batch's loss
    assert one_meta["method_state"]["streams"] == two_meta["method_state"]["streams"]


def test_one_process_is_run_continuals_training_on_the_torch_engine():
    from tinyslim.experiments.continual import ContinualConfig, build_method, run_continual
    from tinyslim.tasks import make_tasks
    from tinyslim.torch import from_gpt

    config = ContinualConfig(tasks=("rev", "cap"), steps=3, batch_size=4, rank=2, lora_alpha=4, n_train=20, n_test=2,
                             eval_batches=1, eval_batch_size=2, fact_recall=False, lr=1e-2)
    base = GPT(TINY, seed=0).to(np.float64)
    tasks = make_tasks(config.tasks, seed=1, n_train=config.n_train, n_test=config.n_test)
    runner = build_method("lora", config, engine="torch")
    result = run_continual(runner, tasks, config, base, seed=1, progress=False, engine="torch")
    alone = build_method("lora", config, engine="torch")
    log = train_distributed(alone, from_gpt(base), tasks, steps=config.steps, batch_size=config.batch_size,
                            lr=config.lr, seed=1)
    assert log["world_size"] == 1
    assert [(losses[0], losses[-1]) for losses in log["losses"]] == [(t["first_loss"], t["final_loss"])
                                                                     for t in result["train_log"]]  # 3 steps: last
    for key, value in runner.state_dict()[0].items():
        assert np.array_equal(value, alone.state_dict()[0][key]), key

