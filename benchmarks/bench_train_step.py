"""One training step (forward + backward + AdamW) of tinyslim's GPT against the same model in plain
torch on the CPU, with the same thread count, in one process, on the same batch.

    python -m tinyslim bench train-step [--batch-size 32] [--steps 20] [--threads 2] [--json out.json]

Prints tokens/s for both, the ratio (> 1 means tinyslim is faster), and where tinyslim's time goes
(per op, forward and backward), measured by timing every Function during a few extra steps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _percentiles(times):
    import numpy as np
    return {"median_s": float(np.median(times)), "p10_s": float(np.percentile(times, 10)),
            "p90_s": float(np.percentile(times, 90))}


def _time_steps(step, warmup: int, steps: int):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _op_profile(step, n: int = 3):
    """Seconds per (Function, forward|backward), summed over n steps and divided by n."""
    from tinyslim import functional as F
    from tinyslim.autograd import Function

    totals = defaultdict(float)
    classes = [c for c in vars(F).values() if isinstance(c, type) and issubclass(c, Function) and c is not Function]
    saved = {}
    for cls in classes:
        saved[cls] = (cls.__dict__["forward"], cls.__dict__["backward"])

        def timed(fn, key):
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                totals[key] += time.perf_counter() - t0
                return out
            return staticmethod(wrapper)
        cls.forward = timed(saved[cls][0].__func__, (cls.__name__, "forward"))
        cls.backward = timed(saved[cls][1].__func__, (cls.__name__, "backward"))
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        wall = (time.perf_counter() - t0) / n
    finally:
        for cls, (fwd, bwd) in saved.items():
            cls.forward, cls.backward = fwd, bwd
    return {k: v / n for k, v in totals.items()}, wall


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m tinyslim bench train-step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="BLAS / torch threads (both)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from blas_env import reexec_if_needed
    reexec_if_needed(__file__, argv, threads=args.threads)  # BLAS reads its thread count at import

    import numpy as np
    try:
        import torch
    except ImportError:
        print("torch is not installed: the baseline needs it (make test installs it)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tests"))
    from torch_gpt import TorchGPT, load_tinyslim_state  # the independent torch twin used by the tests

    from tinyslim import GPT, GPTConfig
    from tinyslim.optim import AdamW

    torch.set_num_threads(args.threads)
    config = GPTConfig(block_size=args.block_size)
    model = GPT(config)
    twin = load_tinyslim_state(TorchGPT.like(config), model.state_dict()).float()  # float32, as tinyslim
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.vocab_size, (args.batch_size, args.block_size))
    y = rng.integers(0, config.vocab_size, (args.batch_size, args.block_size))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    opt = AdamW(model.parameters(trainable_only=True), lr=1e-4, weight_decay=0.0)
    topt = torch.optim.AdamW(twin.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)

    def step_tinyslim():
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def step_torch():
        _, loss = twin(xt, yt)
        topt.zero_grad(set_to_none=True)
        loss.backward()
        topt.step()

    # correctness before timing: the two models give the same logits on the batch
    with torch.no_grad():
        diff = float(np.abs(model(x)[0].data - twin(xt)[0].numpy()).max())
    t_ours = _time_steps(step_tinyslim, args.warmup, args.steps)
    t_torch = _time_steps(step_torch, args.warmup, args.steps)
    profile, wall = _op_profile(step_tinyslim)

    tokens = args.batch_size * args.block_size
    ours, theirs = _percentiles(t_ours), _percentiles(t_torch)
    ratio = theirs["median_s"] / ours["median_s"]
    print(f"training step: GPT {config.n_layer} layers, d {config.n_embd}, {config.n_head} heads, context "
          f"{args.block_size}, batch {args.batch_size} ({model.num_parameters():,} parameters), float32, AdamW")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; threads: BLAS/OMP "
          f"{os.environ.get('OPENBLAS_NUM_THREADS')}, torch {torch.get_num_threads()}; numpy {np.__version__}, "
          f"torch {torch.__version__}")
    print(f"max |logit difference| between the two models on the batch: {diff:.2e} (float32)")
    print(f"{'':10s} {'median ms':>10s} {'p10':>8s} {'p90':>8s} {'tokens/s':>10s}")
    for name, t in (("tinyslim", ours), ("torch", theirs)):
        print(f"{name:10s} {t['median_s'] * 1e3:10.1f} {t['p10_s'] * 1e3:8.1f} {t['p90_s'] * 1e3:8.1f} "
              f"{tokens / t['median_s']:10.0f}")
    print(f"ratio torch time / tinyslim time: {ratio:.2f}  ({'tinyslim faster' if ratio >= 1 else 'torch faster'})")
    print(f"\nwhere tinyslim's {wall * 1e3:.0f} ms go (per step, ops only; the rest is Python glue and AdamW):")
    for (op, phase), secs in sorted(profile.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {op:22s} {phase:8s} {secs * 1e3:7.1f} ms  {secs / wall:5.1%}")
    result = {"tinyslim": ours, "torch": theirs, "ratio_torch_over_tinyslim": ratio, "tokens_per_step": tokens,
              "threads": args.threads, "max_logit_diff": diff,
              "profile_ms": {f"{op}.{phase}": s * 1e3 for (op, phase), s in profile.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
