"""One training step (forward + backward + optimizer) of tinyslim against the same model in plain torch
on the CPU, with the same thread count, in one process, on the same batch.

    python -m tinyslim bench train-step [--part all|pretraining|scenario-a|torch-path] [--steps 20] [--threads 2]
                                        [--json out.json]

Three parts:
  pretraining   the whole GPT (batch 32 × 128, AdamW on every weight) against TorchGPT: tokens/s for
                both, the ratio (> 1 means tinyslim is faster), and where tinyslim's time goes (per op,
                forward and backward), measured by timing every Function during a few extra steps;
  scenario A    the steps the experiments take: batch 16 × 13, scenario A's adapters on the frozen GPT
                (rank 8, α 16, on attn.c_attn, mlp.c_fc, mlp.c_proj), Adam, gradient clipping at 1. A
                LoRA step and a SLIM step (top-2 of 4 LoRA + 2 identity experts, masks, L1), each against
                a torch twin doing the same step in float32 (tests/torch_adapters.py; SLIM's with its
                routing written in batched torch ops), the two timed in alternation; the ratio;
  torch path    the same scenario-A LoRA and SLIM steps on tinyslim's own two engines: the NumPy path beside
                the torch path (tinyslim.torch on a transformers GPT2LMHeadModel with the base's weights,
                docs/torch.md), alternating; the ratio.
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

# One OpenMP wait policy for every path timed here, set before torch loads its OpenMP runtime (the C
# kernels then run on it too): passive, unless the caller chose one (tinyslim/torch/__init__.py says why).
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


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


SCENARIO_A = dict(batch=16, T=13, r=8, lora_alpha=16.0, lr=4e-3, grad_clip=1.0,
                  target_modules=["attn.c_attn", "mlp.c_fc", "mlp.c_proj"])


def _alternating(steps: dict, warmup: int, n: int) -> dict:
    """{name: step}: every step `warmup` times, then n rounds that run each once (same load for all)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def pretraining(args, np, torch) -> dict:
    """The whole GPT, batch × block tokens, AdamW on every weight: tinyslim against TorchGPT."""
    from torch_gpt import TorchGPT, load_tinyslim_state  # the independent torch twin used by the tests

    from tinyslim import GPT, GPTConfig
    from tinyslim.optim import AdamW

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
    print(f"pretraining step: GPT {config.n_layer} layers, d {config.n_embd}, {config.n_head} heads, context "
          f"{args.block_size}, batch {args.batch_size} ({model.num_parameters():,} parameters), float32, AdamW")
    print(f"max |logit difference| between the two models on the batch: {diff:.2e} (float32)")
    print(f"{'':10s} {'median ms':>10s} {'p10':>8s} {'p90':>8s} {'tokens/s':>10s}")
    for name, t in (("tinyslim", ours), ("torch", theirs)):
        print(f"{name:10s} {t['median_s'] * 1e3:10.1f} {t['p10_s'] * 1e3:8.1f} {t['p90_s'] * 1e3:8.1f} "
              f"{tokens / t['median_s']:10.0f}")
    print(f"ratio torch time / tinyslim time: {ratio:.2f}  ({'tinyslim faster' if ratio >= 1 else 'torch faster'})")
    print(f"\nwhere tinyslim's {wall * 1e3:.0f} ms go (per step, ops only; the rest is Python glue and AdamW):")
    for (op, phase), secs in sorted(profile.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {op:22s} {phase:8s} {secs * 1e3:7.1f} ms  {secs / wall:5.1%}")
    return {"tinyslim": ours, "torch": theirs, "ratio_torch_over_tinyslim": ratio, "tokens_per_step": tokens,
            "max_logit_diff": diff, "profile_ms": {f"{op}.{phase}": s * 1e3 for (op, phase), s in profile.items()}}


def _fast_slim_twin(np, torch):
    """TorchSlimLinear (the tests' readable oracle) in float32 with its per-token Python loops batched:
    the same maths, as a torch user would write it for speed."""
    import torch.nn.functional as TF
    from torch_adapters import TorchSlimLinear

    class FastTorchSlimLinear(TorchSlimLinear):
        def draw_masks(self, rng=None):
            super().draw_masks(rng)
            if self.m_in is not None:
                self.m_in, self.m_out = self.m_in.float(), self.m_out.float()

        def forward(self, x):  # x (B, T, D); training mode, additive yielding, linear router, no logit norm
            cfg, lead = self.cfg, x.shape[:-1]
            X = x.reshape(-1, x.shape[-1])
            real = np.ones(X.shape[0], bool) if self.token_mask is None else np.asarray(self.token_mask, bool).ravel()
            Xn = X.detach()
            if not np.any(self.sigma > 0):  # seed the clusters on the first batch, as the oracle does
                R = Xn.numpy()[real].astype(np.float64)
                self.mu = R[self.cluster_rng.choice(len(R), size=len(self.mu), replace=len(R) < len(self.mu))].copy()
                self.sigma = np.broadcast_to(np.maximum(R.std(axis=0), cfg["floor"]), self.mu.shape).copy()
            mu, sigma = torch.from_numpy(self.mu).float(), torch.from_numpy(self.sigma).float()
            k_star = torch.cdist(Xn, mu).argmin(dim=1)  # nearest centre
            d = ((Xn - mu[k_star]).abs() / sigma[k_star]).amax(dim=1) - 1  # largest standardised deviation
            logits = X @ self.W.T + self.b  # (N, E)
            E_L, E = self.A.shape[0], logits.shape[1]
            logits = logits + cfg["gamma"] * d[:, None] * (torch.arange(E) >= E_L).float()[None, :]
            vals, idx = torch.topk(logits, cfg["K"], dim=1)
            G = torch.zeros_like(logits).scatter(1, idx, torch.softmax(vals, dim=1))  # (N, E)
            p = cfg["p"]
            if p and self.m_in is None:
                self.draw_masks()
            c = 1 / (1 - p) if (p and cfg["rescale"]) else 1.0
            delta = 0
            for e in range(E_L):
                xe = X if self.m_in is None else X * self.m_in[e]
                ue = (xe @ self.A[e].T) @ self.B[e].T
                delta = delta + G[:, e:e + 1] * (cfg["s"] * c) * (ue if self.m_out is None else ue * self.m_out[e])
            self.cache = (Xn.numpy()[real].astype(np.float64), k_star.numpy()[real])
            n = max(real.sum(), 1)
            f = torch.bincount(idx[torch.from_numpy(real)].reshape(-1), minlength=E)[:E_L].float() / (n * cfg["K"])
            P = TF.softmax(logits, dim=1)[torch.from_numpy(real)].sum(0) / n
            self.bal = E_L * (f * P[:E_L]).sum()
            return self.base(x) + delta.reshape(*lead, -1)

    return FastTorchSlimLinear


def scenario_a(args, np, torch) -> dict:
    """Scenario A's LoRA and SLIM steps (batch 16 × 13) against their torch twins, alternating."""
    from torch_adapters import add_lora, forward_hidden, masked_ce, replace_linears, slim_loss, twin_gpt

    from tinyslim import kernels
    from tinyslim.adapters import adapter_state_dict, make_method, stream
    from tinyslim.optim import AdamW, clip_grad_norm_
    from tinyslim.pretrained import load_base

    cfg = SCENARIO_A
    base = load_base(progress=False, log=lambda *a, **k: None)
    base_state = base.state_dict()
    rng = np.random.default_rng(0)
    V = base.config.vocab_size
    x, y = rng.integers(1, V, (cfg["batch"], cfg["T"])), rng.integers(1, V, (cfg["batch"], cfg["T"]))
    mask = np.ones((cfg["batch"], cfg["T"]))
    print(f"\nscenario A steps: batch {cfg['batch']} × {cfg['T']} tokens, adapters rank {cfg['r']} (α {cfg['lora_alpha']:g})"
          f" on {', '.join(cfg['target_modules'])}, Adam (AdamW, no decay), grad clip {cfg['grad_clip']}; kernel backend "
          f"{kernels.get_backend()}, up to {kernels.get_num_threads()} kernel threads, torch {torch.get_num_threads()}")
    print(f"{'step':10s} {'tinyslim ms':>12s} {'torch ms':>9s} {'ratio':>6s}  (median of {args.steps} alternating steps;"
          " ratio = torch / tinyslim, > 1: tinyslim faster)   loss tinyslim / torch at step 1")
    out = {}
    for name in ("lora", "slim"):
        model = type(base)(base.config)
        model.load_state_dict(base_state)
        method = make_method(name, r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"])
        method.attach(model, 0)
        for layer in method.layers():  # B = 0 at init: give every factor a gradient, as after a few steps
            layer.lora_B.data[...] = 0.01 * rng.standard_normal(layer.lora_B.shape)
        state = adapter_state_dict(model)
        twin = twin_gpt(base.config, base_state)
        if name == "lora":
            layers = add_lora(twin, {n: (state[f"{n}.lora_A"], state[f"{n}.lora_B"]) for n in method.adapted},
                              method.config.scale)
            twin_loss = lambda: masked_ce(forward_hidden(twin, x)[0], y, mask)  # noqa: E731
        else:
            c = method.config
            tcfg = dict(E_L=c.n_lora_experts, E_I=c.n_identity_experts, K=c.top_k, s=c.scale, gamma=c.gamma,
                        yield_mode=c.yield_mode, logit_norm=c.logit_norm, p=c.drop_p, rescale=c.mask_rescale,
                        eval_masks=c.eval_masks, momentum=c.cluster_momentum, floor=c.sigma_floor,
                        cluster_init=c.cluster_init, mlp=c.router == "residual_mlp")
            assert (c.yield_mode, c.logit_norm, c.router, c.cluster_init) == ("additive", "none", "linear", "first_batch")
            Fast = _fast_slim_twin(np, torch)
            streams = stream(0, "mask"), stream(0, "cluster"), stream(0, "eval_mask")
            layers = replace_linears(twin, {n: (lambda b, n=n: Fast(b, {k.rpartition(".")[2]: v for k, v in state.items()
                                                                        if k.rpartition(".")[0] == n}, tcfg, *streams))
                                            for n in method.adapted})
            twin_loss = lambda: slim_loss(twin, layers, x, y, mask, c.l1_coef, c.balance_coef, c.pad_token_id)  # noqa: E731
        twin.float()
        params = method.trainable_parameters()
        opt = AdamW(params, lr=cfg["lr"], weight_decay=0.0)  # Adam
        tparams = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
        topt = torch.optim.Adam(tparams, lr=cfg["lr"], foreach=True)
        losses = {}

        def step_tinyslim():
            loss = method.loss(x, y, mask)
            opt.zero_grad()
            loss.backward()
            clip_grad_norm_(params, cfg["grad_clip"])
            opt.step()
            method.after_step(0, opt)
            losses.setdefault("tinyslim", loss.item())

        def step_torch():
            loss = twin_loss()
            topt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tparams, cfg["grad_clip"])
            topt.step()
            for layer in layers.values():
                if hasattr(layer, "update_clusters"):
                    layer.update_clusters()
            losses.setdefault("torch", loss.item())

        times = _alternating({"tinyslim": step_tinyslim, "torch": step_torch}, args.warmup, args.steps)
        ours, theirs = _percentiles(times["tinyslim"]), _percentiles(times["torch"])
        ratio = theirs["median_s"] / ours["median_s"]
        print(f"{name:10s} {ours['median_s'] * 1e3:12.2f} {theirs['median_s'] * 1e3:9.2f} {ratio:6.2f}  "
              f"(p10 {ours['p10_s'] * 1e3:.2f} / {theirs['p10_s'] * 1e3:.2f} ms)   "
              f"{losses['tinyslim']:.5f} / {losses['torch']:.5f}")
        out[name] = {"tinyslim": ours, "torch": theirs, "ratio_torch_over_tinyslim": ratio, "first_loss": losses}
    return out


def torch_path(args, np, torch) -> dict:
    """Scenario A's step on tinyslim's two engines: the NumPy path (tinyslim.adapters on the NumPy GPT) and the
    torch path (tinyslim.torch on from_gpt of the same base, a transformers GPT2LMHeadModel), float32 both, the
    same method, seed, batch, step (loss, clip 1, Adam, after_step) and thread count, timed in alternation."""
    import copy

    import tinyslim.torch as tt
    from tinyslim.adapters import make_method
    from tinyslim.optim import Adam, clip_grad_norm_
    from tinyslim.pretrained import load_base

    cfg = SCENARIO_A
    base = load_base(progress=False, log=lambda *a, **k: None)
    rng = np.random.default_rng(0)
    V = base.config.vocab_size
    x, y = rng.integers(1, V, (cfg["batch"], cfg["T"])), rng.integers(1, V, (cfg["batch"], cfg["T"]))
    mask = np.ones((cfg["batch"], cfg["T"]))
    settings = dict(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"])
    engines = {"numpy": (lambda: copy.deepcopy(base), make_method, Adam, clip_grad_norm_),
               "torch": (lambda: tt.from_gpt(base), tt.make_method, tt.optim.Adam, tt.optim.clip_grad_norm_)}
    print(f"\ntorch path: scenario A's step (batch {cfg['batch']} × {cfg['T']}, rank {cfg['r']}, Adam, clip "
          f"{cfg['grad_clip']}) with tinyslim.torch on a GPT2LMHeadModel beside the NumPy path; float32, torch "
          f"{torch.get_num_threads()} threads, BLAS {os.environ.get('OPENBLAS_NUM_THREADS')}")
    print(f"{'method':10s} {'numpy ms':>9s} {'torch ms':>9s} {'ratio':>6s}  (median of {args.steps} alternating "
          "steps; ratio = torch path / NumPy path time, > 1: NumPy faster)   loss numpy / torch at step 1")

    def make_step(name, engine, losses):
        model_of, make, optimizer_class, clip = engines[engine]
        method = make(name, **settings)
        method.attach(model_of(), 0)
        params = method.trainable_parameters()
        opt = optimizer_class(params, lr=cfg["lr"])

        def step():
            loss = method.loss(x, y, mask)
            opt.zero_grad()
            loss.backward()
            clip(params, cfg["grad_clip"])
            opt.step()
            method.after_step(0, opt)
            losses.setdefault(engine, loss.item())
        return step

    out = {}
    for name in ("lora", "slim"):
        if name not in tt.METHODS:
            print(f"{name:10s} (no torch class yet)")
            continue
        losses = {}
        steps = {engine: make_step(name, engine, losses) for engine in engines}
        times = _alternating(steps, args.warmup, args.steps)
        ours, theirs = _percentiles(times["numpy"]), _percentiles(times["torch"])
        ratio = theirs["median_s"] / ours["median_s"]
        print(f"{name:10s} {ours['median_s'] * 1e3:9.2f} {theirs['median_s'] * 1e3:9.2f} {ratio:6.2f}  "
              f"(p10 {ours['p10_s'] * 1e3:.2f} / {theirs['p10_s'] * 1e3:.2f} ms)   "
              f"{losses['numpy']:.5f} / {losses['torch']:.5f}")
        out[name] = {"numpy": ours, "torch": theirs, "ratio_torch_over_numpy": ratio, "first_loss": losses}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m tinyslim bench train-step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "pretraining", "scenario-a", "torch-path"), default="all",
                        help="which steps to time (default: every part)")
    parser.add_argument("--batch-size", type=int, default=32, help="pretraining part: sequences per batch")
    parser.add_argument("--block-size", type=int, default=128, help="pretraining part: tokens per sequence")
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
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; threads: BLAS/OMP {os.environ.get('OPENBLAS_NUM_THREADS')}, "
          f"torch {torch.get_num_threads()}; numpy {np.__version__}, torch {torch.__version__}")
    result = {"threads": args.threads, "load_average_start": os.getloadavg()}
    if args.part in ("all", "pretraining"):
        result["pretraining"] = pretraining(args, np, torch)
    if args.part in ("all", "scenario-a"):
        result["scenario_a"] = scenario_a(args, np, torch)
    if args.part in ("all", "torch-path"):
        result["torch_path"] = torch_path(args, np, torch)
    result["load_average_end"] = os.getloadavg()
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in result['load_average_end'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
