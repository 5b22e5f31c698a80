"""Data-parallel training of a method on the torch path: torch.distributed and DistributedDataParallel.

Shape legend: B the global batch, W processes (world size), b = B / W the batch of one process.

Every process holds the whole model and attaches the same method with the same seed, so the initial
adapters are the same everywhere (they are drawn from the named NumPy streams). At every step each
process draws the same global batch from the shared data stream and keeps its shard, rows
[r·b, (r+1)·b) of process r. DistributedDataParallel wraps the method's whole loss (``MethodLoss``: the
hook ``method.loss`` with every model call it makes) and, during backward, replaces every trainable
gradient by its mean over the processes:

    g = (1/W) Σ_r ∇L_r,        L_r = the method's loss on shard r (a masked mean over its answer tokens)

When every shard holds the same number of loss tokens — every scenario-A task, whose answers have a fixed
length — this is the gradient of the one-process loss on the whole batch of B. The clip, Adam's step
and the method's hooks (after_step, after_task) then see identical gradients in every process, so the
adapters stay identical without further communication, and the run equals the one-process run to
floating-point rounding (tests/test_torch_ddp.py checks it in float64). Randomness drawn per example
inside the loss (adapter dropout masks, replay samples) is drawn by each process for its own shard from
the same named streams: such a run is a valid data-parallel run, but not the one-process one.

Launch one process per GPU (backend NCCL) or several on a CPU (backend gloo) with torchrun:

    torchrun --nproc_per_node=2 -m tinyslim.torch.distributed --method lora --tasks rev,cap --steps 200 \\
        --batch-size 16 --out runs/ddp/lora.safetensors

``python -m tinyslim.torch.distributed`` without torchrun is the same training in one process.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from datetime import timedelta

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

from ..adapters.streams import stream
from ..optim import LRScheduler
from .optim import Adam, clip_grad_norm_
from .registry import METHODS, make_method

__all__ = ["MethodLoss", "init_from_env", "train_distributed", "main"]


class MethodLoss(nn.Module):
    """The method's training loss as one module: ``forward(x, y, mask, rng) = method.loss(x, y, mask, rng)``.
    DistributedDataParallel wraps this (not the bare model), so every forward pass the loss makes (a
    replay batch, a second learner) belongs to the one DDP forward whose backward averages the gradients."""

    def __init__(self, method):
        super().__init__()
        self.lm = method.model  # a registered sub-module: DDP finds (and checks) its parameters here
        self.method = method

    def forward(self, x, y, mask, rng=None):
        return self.method.loss(x, y, mask, rng)


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK in the environment) joins the process group: backend NCCL on GPUs, one per
    process (cuda:LOCAL_RANK), else gloo on the CPU. Without WORLD_SIZE: one process, no group."""
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return 0, 1, torch.device("cuda" if backend == "nccl" else "cpu")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _mean_over_processes(value: torch.Tensor, world: int) -> float:
    """The mean of a scalar over the processes (the whole batch's loss, for the log)."""
    value = value.detach().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return float(value)


def train_distributed(method, model, tasks, *, steps: int, batch_size: int, lr: float, seed: int = 0,
                      grad_clip: float | None = 1.0, lr_schedule: str = "linear",
                      find_unused_parameters: bool = False) -> dict:
    """Attach `method` to `model` (a CausalLM on this process's device) and train it through `tasks` in
    order, `steps` steps each, on the global batch `batch_size` split over the processes of the current
    process group (one process when there is none). The step is scenario A's (run_continual): at each task
    Adam is reset, lr ← schedule(0), before_task; every step: the batch from the "runner/data" stream → the
    method's loss → zero_grad, backward (DDP: mean gradient) → clip → Adam → lr ← schedule(s + 1) →
    after_step; after_task. Returns {"losses": per task, every step's loss of the whole batch, "world_size"}."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if batch_size % world:
        raise ValueError(f"the global batch ({batch_size}) must split evenly over the {world} processes")
    shard = slice(rank * (batch_size // world), (rank + 1) * (batch_size // world))
    method.attach(model, seed)
    params = list(method.trainable_parameters())
    optimizer = Adam(params, lr=lr)
    data_rng, step_rng = stream(seed, "runner/data"), stream(seed, "runner/model-dropout")  # the runner's streams
    schedule = LRScheduler.SCHEDULES[lr_schedule]
    losses = []
    for k, task in enumerate(tasks):
        optimizer.reset_state()
        optimizer.lr = schedule(0, steps, lr)
        method.before_task(k, steps, optimizer)
        step_loss = MethodLoss(method)  # wrapped per task: a method may change what trains at a boundary
        if world > 1:
            step_loss = nn.parallel.DistributedDataParallel(step_loss, broadcast_buffers=False,
                                                            find_unused_parameters=find_unused_parameters)
        losses.append([])
        for step in range(steps):
            x, y, mask = task.batch(batch_size, data_rng)
            loss = step_loss(x[shard], y[shard], mask[shard], step_rng)
            optimizer.zero_grad()
            loss.backward()
            if grad_clip:
                clip_grad_norm_(params, grad_clip)
            optimizer.step()
            optimizer.lr = schedule(step + 1, steps, lr)
            method.after_step(step, optimizer)
            losses[-1].append(_mean_over_processes(loss, world))
        method.after_task(k)
    return {"losses": losses, "world_size": world}


# ---- the command line: python -m tinyslim.torch.distributed (under torchrun or alone) ---------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tinyslim.torch.distributed", description="Train one method on "
                                "the torch path with DistributedDataParallel (launch with torchrun "
                                "--nproc_per_node=N; alone it is one process). Rank 0 writes the trained "
                                "method's state and prints the losses and the test accuracies.")
    p.add_argument("--method", default="lora", help=f"a torch method: {', '.join(sorted(METHODS))} "
                   "(default %(default)s)")
    p.add_argument("--tasks", default="rev,cap", help="comma-separated task tags (default %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="steps per task (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="the global batch, split over the processes")
    p.add_argument("--lr", type=float, default=4e-3, help="Adam's peak lr, linear decay to 0 in each task")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (α = 2·rank) (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200, help="test examples per task; 0: no evaluation")
    p.add_argument("--base", default=None, help="a tinyslim base model checkpoint (default: the shipped one)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="default: nccl with GPUs, else gloo")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait (default 300)")
    p.add_argument("--out", default=None, help="where rank 0 writes the method's state (.safetensors)")
    return p


def _method_from_args(args):
    from ..data import PAD_ID

    if args.method not in METHODS:
        raise ValueError(f"unknown torch method {args.method!r}; the torch engine has {sorted(METHODS)}")
    fields = {f.name for f in dataclasses.fields(METHODS[args.method].config_class)}
    shared = {"r": args.rank, "lora_alpha": 2.0 * args.rank, "pad_token_id": PAD_ID,
              "target_modules": ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"]}  # scenario A's adapter shape
    return make_method(args.method, **{k: v for k, v in shared.items() if k in fields})


def main(argv: list[str] | None = None) -> int:
    from ..io import jsonable, save_checkpoint
    from ..pretrained import load_base
    from ..tasks import evaluate_task, make_tasks
    from .lm import from_gpt

    args = _parser().parse_args(argv)
    rank, world, device = init_from_env(args.backend, args.timeout)
    method = _method_from_args(args)
    base = load_base(args.base, progress=False, log=lambda *a: None)
    model = from_gpt(base.to(np.float64) if args.dtype == "float64" else base).to(device)
    tasks = make_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], args.seed, args.n_train,
                       max(args.n_test, 1))
    t0 = time.perf_counter()
    log = train_distributed(method, model, tasks, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            seed=args.seed)
    if rank == 0:
        for task, losses in zip(tasks, log["losses"]):
            print(f"{method.name} {task.name}: loss {losses[0]:.4f} -> {losses[-1]:.4f} ({len(losses)} steps, "
                  f"batch {args.batch_size} over {world} process{'es' if world > 1 else ''})")
        print(f"trained in {time.perf_counter() - t0:.1f} s on {device}")
        if args.n_test:
            with method.evaluating():
                print("test accuracy: " + ", ".join(f"{t.name} {evaluate_task(model, t):.0%}" for t in tasks))
        if args.out:
            arrays, meta = method.state_dict()
            save_checkpoint(args.out, arrays, jsonable({
                "kind": "method", "method": method.name, "method_config": dataclasses.asdict(method.config),
                "method_state": meta, "world_size": world, "losses": log["losses"], "args": vars(args)}))
            print(f"written: {args.out}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
