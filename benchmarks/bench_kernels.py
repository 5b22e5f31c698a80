"""Benchmark of the low-rank mixture kernel against NumPy and torch formulations (docs/benchmarks.md).

    python benchmarks/bench_kernels.py [--full] [--json PATH] [--device cpu|cuda] [--threads T]
    python -m tinyslim bench kernels [same options]

Shape legend: N tokens, D in, O out, r rank, E experts, k active experts per token, w bytes per element.
    x (N, D)   A (E, r, D)   B (E, O, r)   gates: dense G (N, E) | top-k (idx, w) (N, k) | index (N,)

What one run does, in order (docs/benchmarks.md):
  1. measure the roofs in this process: P_peak = best of 5 float32 2048³ matmuls, BW = best sum
     over a 256 MB array (GPU: a large matmul and a 1 GB device-to-device copy);
  2. per shape: check every path against a float64 reference (max relative error of y, dx, dA, dB,
     dgate), then time it: 3 warm-ups, ≥ 20 rounds of every path once, in a new shuffled order each round, every
     call on the next of a rotating pool of inputs (--blocked: each path's calls back to back instead);
     median and p10/p90;
  3. print one row per shape and direction: time, GFLOP/s, GB/s, bound, % of roofline, speed-up
     against each baseline and the best, then a geometric-mean summary and the targets; --json
     writes everything.

FLOPs: forward 2·N·k·r·(D+O), backward 4·N·k·r·(D+O). Ideal bytes: forward w·(N·D + N·O + E_act·r·(D+O))
+ gate bytes, backward w·(2·N·D + N·O + 2·E_act·r·(D+O)) + 2·gate bytes. T_min = max(F/P, bytes/BW).
"""
# (no `from __future__ import annotations`: the CLI loads this file without registering it in
# sys.modules, and dataclasses then cannot resolve string annotations)
import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

# One OpenMP wait policy for everybody, chosen before torch loads its OpenMP runtime (torch exports it
# globally, so the extension then runs on it too): passive, unless the caller set one. On a shared
# 2-core machine a spinning barrier costs whole scheduler ticks per call (see kernels/cpu.py).
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from tinyslim import kernels  # noqa: E402
from tinyslim.kernels import reference  # noqa: E402

try:
    import torch
except ImportError:  # torch columns are skipped
    torch = None

LLC_BYTES = 32 << 20


# ---- the shapes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    kind: str       # "lora" (E = 1, index ≡ 0) | "dense" | "topk" | "token" (per-token index)
    N: int
    D: int
    O: int
    r: int
    E: int
    k: int = 1      # top-k picks; ignored otherwise
    pattern: str = "uniform"  # per-token: uniform | identical | zipf | distinct

    @property
    def name(self) -> str:
        extra = {"lora": "", "dense": f" E{self.E}", "topk": f" top{self.k}/{self.E}",
                 "token": f" E{self.E} {self.pattern}"}[self.kind]
        return f"{self.kind} N{self.N} D{self.D} O{self.O} r{self.r}{extra}"

    @property
    def active(self) -> int:  # k in the FLOP formula
        return {"lora": 1, "dense": self.E, "topk": self.k, "token": 1}[self.kind]


def default_cases() -> list[Case]:
    """A few minutes on 2 cores: every gate form, the targets' shapes, the per-call floor."""
    return [
        Case("lora", 1, 256, 256, 8, 1),            # per-call floor
        Case("lora", 16, 256, 256, 8, 1),
        Case("lora", 256, 1024, 1024, 16, 1),
        Case("lora", 4096, 1024, 1024, 8, 1),
        Case("lora", 4096, 1024, 1024, 16, 1),
        Case("dense", 256, 512, 512, 8, 4),
        Case("dense", 4096, 512, 512, 8, 4),
        Case("dense", 4096, 1024, 1024, 16, 8),
        Case("topk", 256, 1024, 1024, 16, 8, k=2),
        Case("topk", 4096, 1024, 1024, 16, 8, k=2),
        Case("topk", 4096, 512, 512, 8, 8, k=1),
        Case("topk", 4096, 100, 72, 5, 4, k=2),     # ragged
        Case("token", 4096, 1024, 1024, 16, 8, pattern="uniform"),
        Case("token", 4096, 1024, 1024, 16, 8, pattern="identical"),
        Case("token", 4096, 1024, 1024, 16, 8, pattern="zipf"),
        Case("token", 4096, 512, 512, 8, 64, pattern="distinct"),
    ]


# The tiny GPT's adapted layers (attn.c_attn 128 → 384, mlp.c_fc 128 → 512, mlp.c_proj 512 → 128) at rank
# 8, on scenario A's batches (16 lines of 13 characters: N = 208) and pretraining's (32 × 128: N = 4096),
# as plain LoRA and as SLIM's / MoE-LoRA's top-2 of 6: what tinyslim itself spends its kernel time on.
WORKLOAD_LAYERS = ((128, 384), (128, 512), (512, 128))


def workload_cases() -> list[Case]:
    return [Case(kind, N, D, O, 8, E, k=2) for N in (208, 4096) for D, O in WORKLOAD_LAYERS
            for kind, E in (("lora", 1), ("topk", 6))]


def full_cases() -> list[Case]:
    cases = []
    for N in (1, 16, 256, 4096, 65536):
        for D in (64, 256, 512, 1024):
            for r in (4, 16, 64):
                cases.append(Case("lora", N, D, D, r, 1))
            if N >= 256:
                cases.append(Case("dense", N, D, D, 8, 4))
                cases.append(Case("dense", N, D, D, 16, 16))
                for k in (1, 2):
                    cases.append(Case("topk", N, D, D, 16, 8, k=k))
                cases.append(Case("topk", N, D, D, 8, 64, k=2))
                for pattern in ("identical", "uniform", "zipf", "distinct"):
                    cases.append(Case("token", N, D, D, 16, 8 if pattern != "distinct" else 64, pattern=pattern))
        cases.append(Case("topk", N, 100, 72, 5, 4, k=2))
    cases += [Case("lora", 4096, 1024, 1024, 32, 1), Case("dense", 4096, 512, 512, 32, 4)]
    return cases


def gpu_cases(full: bool) -> list[Case]:
    Ns = (1, 4096, 65536, 262144) if full else (1, 65536)
    Ds = (1024, 4096) if full else (1024,)
    cases = []
    for N in Ns:
        for D in Ds:
            cases += [Case("lora", N, D, D, 16, 1), Case("dense", N, D, D, 16, 8), Case("topk", N, D, D, 16, 8, k=2),
                      Case("token", N, D, D, 16, 8, pattern="uniform")]
    return cases


# ---- data ---------------------------------------------------------------------------------------------
def make_data(case: Case, rng, dtype=np.float32) -> dict:
    N, D, O, r, E = case.N, case.D, case.O, case.r, case.E
    x = rng.standard_normal((N, D)).astype(dtype)
    A = (rng.standard_normal((E, r, D)) / math.sqrt(D)).astype(dtype)
    B = (rng.standard_normal((E, O, r)) / math.sqrt(r)).astype(dtype)
    dy = rng.standard_normal((N, O)).astype(dtype)
    scale = np.full(E, 2.0, dtype)
    if case.kind == "lora":
        gates, idx = np.zeros(N, np.int32), None
    elif case.kind == "dense":
        logits = rng.standard_normal((N, E))
        G = np.exp(logits - logits.max(1, keepdims=True))
        gates = (G / G.sum(1, keepdims=True)).astype(dtype)   # softmax
    elif case.kind == "topk":
        logits = rng.standard_normal((N, E))
        idx = np.argsort(-logits, axis=1)[:, :case.k].astype(np.int32)
        w = np.take_along_axis(logits, idx, 1)
        w = np.exp(w - w.max(1, keepdims=True))
        gates = (idx, (w / w.sum(1, keepdims=True)).astype(dtype))
    else:
        if case.pattern == "identical":
            gates = np.full(N, E // 2, np.int32)
        elif case.pattern == "distinct":  # neighbours never share an adapter
            gates = (np.arange(N) % E).astype(np.int32)
        elif case.pattern == "zipf":
            gates = np.minimum(rng.zipf(1.5, N) - 1, E - 1).astype(np.int32)
        else:
            gates = rng.integers(0, E, N).astype(np.int32)
    G, listed = reference.dense_gates(kernels.as_gates(gates).form, *_idx_w(gates), N, E, dtype)
    return dict(x=x, A=A, B=B, gates=gates, scale=scale, dy=dy, G=G, listed=listed)


def _idx_w(gates):
    g = kernels.as_gates(gates)
    return getattr(g, "idx", None), getattr(g, "w", getattr(g, "G", None))


def flops_bytes(case: Case, itemsize=4):
    N, D, O, r, E, k = case.N, case.D, case.O, case.r, case.E, case.active
    e_act = {"lora": 1, "dense": E, "topk": E, "token": E}[case.kind]
    gate = {"lora": 4 * N, "dense": itemsize * N * E, "topk": (itemsize + 4) * N * k, "token": 4 * N}[case.kind]
    fwd = (2 * N * k * r * (D + O), itemsize * (N * D + N * O + e_act * r * (D + O)) + gate)
    bwd = (4 * N * k * r * (D + O), itemsize * (2 * N * D + N * O + 2 * e_act * r * (D + O)) + 2 * gate)
    return fwd, bwd


# ---- baselines: (forward(x, dy), backward(x, dy)) pairs on the same arrays ------------------------------
def _dgate_from_dG(gates, dG):
    g = kernels.as_gates(gates)
    if dG is None:
        return None
    if g.form == "topk":
        return np.take_along_axis(dG, np.maximum(g.idx, 0), 1)
    return None if g.form == "index" else dG


def numpy_baselines(case: Case, d: dict) -> dict:
    A, B, G, s, gates = d["A"], d["B"], d["G"], d["scale"], d["gates"]
    E, r, D = A.shape
    O = B.shape[1]
    Acat = A.reshape(E * r, D)                                   # (E·r, D)
    Bcat = np.ascontiguousarray(B.transpose(1, 0, 2).reshape(O, E * r))  # (O, E·r)
    Gs = G * s                                                   # (N, E)
    want_g = kernels.as_gates(gates).form in ("dense", "topk")  # the index form has no gate gradient
    out = {}

    # concat-GEMM: H = X A_catᵀ, scale columns by the gates, · B_catᵀ (dense-masked for top-k / index)
    def concat_fwd(x, dy):
        C = (x @ Acat.T) * np.repeat(Gs, r, axis=1)
        return C @ Bcat.T

    def concat_bwd(x, dy):
        gs = np.repeat(Gs, r, axis=1)
        H = x @ Acat.T                                           # (N, E·r)
        g = dy @ Bcat                                            # (N, E·r)  B'ᵀ dy per expert
        dG = s * (g * H).reshape(-1, E, r).sum(-1) if want_g else None
        cg = g * gs
        return cg @ Acat, (cg.T @ x).reshape(E, r, D), (dy.T @ (H * gs)).reshape(O, E, r).transpose(1, 0, 2), \
            _dgate_from_dG(gates, dG)
    out["np.concat"] = (concat_fwd, concat_bwd)

    # loop over experts: gather the rows that use e, two skinny GEMMs, scatter-add

    def loop_fwd(x, dy):
        y = np.zeros((x.shape[0], O), x.dtype)
        for e in range(E):
            rows = np.flatnonzero(Gs[:, e])
            y[rows] += Gs[rows, e, None] * ((x[rows] @ A[e].T) @ B[e].T)
        return y

    def loop_bwd(x, dy):
        dx, dA, dB, dG = np.zeros_like(x), np.empty_like(A), np.empty_like(B), np.zeros_like(G)
        for e in range(E):
            rows = np.flatnonzero(Gs[:, e])
            xe, dye, c = x[rows], dy[rows], Gs[rows, e, None]
            h, g = xe @ A[e].T, dye @ B[e]
            if want_g:
                dG[rows, e] = s[e] * np.sum(g * h, 1)
            dx[rows] += (c * g) @ A[e]
            dA[e], dB[e] = (c * g).T @ xe, dye.T @ (c * h)
        return dx, dA, dB, _dgate_from_dG(gates, dG)
    out["np.loop"] = (loop_fwd, loop_bwd)

    if case.kind in ("dense", "topk") or (case.kind == "token" and E <= 8):
        def einsum_fwd(x, dy):
            return np.einsum("nd,erd,ne,eor->no", x, A, Gs, B, optimize=True)

        def einsum_bwd(x, dy):
            h = np.einsum("nd,erd->ner", x, A, optimize=True)
            g = np.einsum("no,eor->ner", dy, B, optimize=True)
            dG = s * np.einsum("ner,ner->ne", g, h, optimize=True) if want_g else None
            return (np.einsum("ne,ner,erd->nd", Gs, g, A, optimize=True),
                    np.einsum("ne,ner,nd->erd", Gs, g, x, optimize=True),
                    np.einsum("ne,no,ner->eor", Gs, dy, h, optimize=True), _dgate_from_dG(gates, dG))
        out["np.einsum"] = (einsum_fwd, einsum_bwd)

    if case.kind in ("token", "lora"):
        idx = d["gates"]

        def segments():
            order = np.argsort(idx, kind="stable")
            bounds = np.searchsorted(idx[order], np.arange(-1, E + 1))
            return order, bounds

        def seg_fwd(x, dy):
            order, bounds = segments()
            y = np.zeros((x.shape[0], O), x.dtype)
            for e in range(E):
                rows = order[bounds[e + 1]:bounds[e + 2]]
                if len(rows):
                    y[rows] = s[e] * ((x[rows] @ A[e].T) @ B[e].T)
            return y

        def seg_bwd(x, dy):
            order, bounds = segments()
            dx, dA, dB = np.zeros_like(x), np.zeros_like(A), np.zeros_like(B)
            for e in range(E):
                rows = order[bounds[e + 1]:bounds[e + 2]]
                if len(rows):
                    xe, dye = x[rows], dy[rows]
                    cg = s[e] * (dye @ B[e])
                    dx[rows] = cg @ A[e]
                    dA[e], dB[e] = cg.T @ xe, dye.T @ (s[e] * (xe @ A[e].T))
            return dx, dA, dB, None
        out["np.segments"] = (seg_fwd, seg_bwd)
    return out


def torch_baselines(case: Case, d: dict, device="cpu") -> dict:
    """The same formulations in torch; backward = autograd of the forward graph."""
    if torch is None:
        return {}, ()
    dt = torch.float32
    form = kernels.as_gates(d["gates"]).form
    A = torch.tensor(d["A"], device=device, requires_grad=True)
    B = torch.tensor(d["B"], device=device, requires_grad=True)
    G = torch.tensor(d["G"], device=device, requires_grad=form in ("dense", "topk"))  # index: no gate grad
    s = torch.tensor(d["scale"], device=device)
    E, r, D = d["A"].shape
    O = d["B"].shape[1]
    idx_t = None if form == "dense" else torch.as_tensor(_idx_w(d["gates"])[0], device=device).long()
    out = {}

    def concat(x):
        Acat = A.reshape(E * r, D)
        Bcat = B.permute(1, 0, 2).reshape(O, E * r)
        return ((x @ Acat.T) * (G * s).repeat_interleave(r, dim=1)) @ Bcat.T
    out["torch.concat"] = concat

    def loop(x):
        y = torch.zeros(x.shape[0], O, device=device, dtype=dt)
        Gs = G * s
        for e in range(E):
            rows = torch.nonzero(Gs[:, e].detach()).squeeze(1)
            if rows.numel():
                u = ((x.index_select(0, rows) @ A[e].T) @ B[e].T) * Gs.index_select(0, rows)[:, e, None]
                y = y.index_add(0, rows, u)
        return y
    out["torch.loop"] = loop

    k = 1 if form == "index" else (idx_t.shape[1] if form == "topk" else 0)
    if form != "dense" and case.N * k * r * (D + O) * 4 <= (256 << 20):
        ii = idx_t.reshape(case.N, k).clamp(min=0)
        wk = (idx_t.reshape(case.N, k) >= 0).to(dt)

        def gather_bmm(x):  # gather each token's factors and batch the two matmuls
            Ag, Bg = A[ii], B[ii]                                   # (N, k, r, D), (N, k, O, r)
            Gk = torch.gather(G * s, 1, ii) * wk                    # (N, k)
            h = torch.einsum("nkrd,nd->nkr", Ag, x)
            return torch.einsum("nkor,nkr,nk->no", Bg, h, Gk)
        out["torch.bmm"] = gather_bmm

    return out, ((A, B, G) if form in ("dense", "topk") else (A, B))


# ---- timing -------------------------------------------------------------------------------------------
def stats(ts):
    ts = np.asarray(ts)
    return dict(median=float(np.median(ts)), p10=float(np.percentile(ts, 10)), p90=float(np.percentile(ts, 90)),
                min=float(np.min(ts)), runs=len(ts))


STAT = "median"  # the statistic rows and ratios use; --stat min on a loaded machine (the least disturbed call)


def time_interleaved(calls: dict, runs: int, warmup: int, min_time=0.3) -> dict:
    """calls: {key: (fn, pool)}. In rounds: each round runs every path once, in an order shuffled anew
    each round (a fixed seed), and every call takes the next entry of the pool, so that no path always
    runs first on inputs nobody has touched, or always right after the same neighbour, while the
    others find the inputs in cache. Tiny shapes get more rounds (≥ min_time s)."""
    keys = list(calls)
    for key, (fn, pool) in calls.items():
        for i in range(warmup):
            fn(*pool[i % len(pool)])
    ts = {key: [] for key in calls}
    order = np.random.default_rng(0)
    gc.collect()
    gc.disable()  # as timeit does: a collection inside one timed call is not that call's cost
    try:
        start, i, c = time.perf_counter(), 0, 0
        while i < runs or (time.perf_counter() - start < min_time and i < 50 * runs):
            for j in order.permutation(len(keys)):
                key = keys[j]
                fn, pool = calls[key]
                args = pool[c % len(pool)]
                c += 1
                t0 = time.perf_counter()
                fn(*args)
                ts[key].append(time.perf_counter() - t0)
            i += 1
    finally:
        gc.enable()
    return {key: stats(v) for key, v in ts.items()}


def time_blocked(calls: dict, runs: int, warmup: int, min_time=0.3) -> dict:
    """calls: {key: (fn, pool)}. Each path alone: its warm-ups, then its timed calls back to back (still on
    the rotating pool), then the next path. Its code and the factors stay in cache, and no other path's
    threads or data come between two calls: the op's own speed, not its speed among other work."""
    return {key: time_interleaved({key: path}, runs, warmup, min_time)[key] for key, path in calls.items()}


def make_pool(d, dtype=np.float32, to=None):
    """Copies of (x, dy), taken in turn call after call, so that the working set exceeds the last-level
    cache (up to 32 copies: a call's inputs were last touched 32 calls before)."""
    per = d["x"].nbytes + d["dy"].nbytes
    n = int(min(32, max(1, math.ceil(2 * LLC_BYTES / max(per, 1)))))
    pool = [(d["x"], d["dy"])] + [(d["x"].copy(), d["dy"].copy()) for _ in range(n - 1)]
    return [tuple(to(a) for a in p) for p in pool] if to else pool


# ---- roofs --------------------------------------------------------------------------------------------
def cpu_roofs():
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    best = min(_once(lambda: a @ a) for _ in range(5))
    big = np.ones(64 << 20, np.float32)  # 256 MB
    best_sum = min(_once(lambda: big.sum()) for _ in range(5))
    return dict(peak_gflops=2 * 2048 ** 3 / best / 1e9, bw_gbs=big.nbytes / best_sum / 1e9)


def _once(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rel_err(got, want):
    if want is None or got is None:
        return None
    got = np.asarray(got.detach().cpu().numpy() if hasattr(got, "detach") else got, np.float64)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return float(np.max(np.abs(got - want)) / scale) if scale > 0 else float(np.max(np.abs(got - want), initial=0))


# ---- one CPU shape -------------------------------------------------------------------------------------
VERSION_WORK_LIMIT = 50e6  # multiply-adds: older (slower) kernel versions are timed only below this


def run_cpu_case(case: Case, roofs: dict, runs: int, warmup: int, rng, versions=False, blocked=False) -> dict:
    d = make_data(case, rng)
    args = dict(A=d["A"], B=d["B"], gates=d["gates"], scale=d["scale"])
    d64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v) for k, v in d.items()}
    want_y = reference.forward(d64["x"], d64["A"], d64["B"], d64["G"], d64["scale"])
    want_g = reference.backward(d64["dy"], d64["x"], d64["A"], d64["B"], d64["G"], d64["scale"], listed=d["listed"])
    want_g = want_g[:3] + (_dgate_from_dG(d["gates"], want_g[3]),)

    ext_fwd = lambda x, dy: kernels.forward(x, **args, backend="cpu")  # noqa: E731
    ext_bwd = lambda x, dy: kernels.backward(dy, x, **args, backend="cpu")  # noqa: E731
    paths = {"ext": (ext_fwd, ext_bwd)}
    work = case.N * case.active * case.r * (case.D + case.O)
    if versions and work <= VERSION_WORK_LIMIT:  # every older kernel version, validated and timed like the rest
        from tinyslim.kernels import cpu
        for v in sorted(cpu.VERSIONS):
            if v != cpu.LATEST:
                paths[f"ext.v{v}"] = (lambda x, dy, _b=f"cpu.v{v}": kernels.forward(x, **args, backend=_b),
                                      lambda x, dy, _b=f"cpu.v{v}": kernels.backward(dy, x, **args, backend=_b))
    paths.update(numpy_baselines(case, d))
    errors = {}
    for name, (f, b) in paths.items():
        y, grads = f(d["x"], d["dy"]), b(d["x"], d["dy"])
        errors[name] = {k: rel_err(v, w) for k, v, w in zip(("y", "dx", "dA", "dB", "dgate"), (y,) + tuple(grads),
                                                              (want_y,) + tuple(want_g))}
    for name in [n for n in paths if n.startswith("ext")]:  # a kernel that is wrong is not timed
        worst = max((e for e in errors[name].values() if e is not None), default=0.0)
        if worst > 1e-3:
            print(f"{case.name}: {name} is NOT timed: its relative error against the float64 reference is {worst:.1e}")
            del paths[name]
    pool = make_pool(d)
    calls = {}
    for name, (f, b) in paths.items():
        calls[name, "fwd"], calls[name, "bwd"] = (f, pool), (b, pool)

    if torch is not None:  # forward with autograd on; backward = autograd.grad on a graph built untimed
        fns, params = torch_baselines(case, d)
        tpool = [(torch.tensor(x, requires_grad=True), torch.tensor(dy)) for x, dy in pool]
        for name, fn in fns.items():
            x0, dy0 = tpool[0]
            y = fn(x0)
            grads = torch.autograd.grad(y, (x0,) + params, dy0, allow_unused=True)
            dG = grads[3].numpy() if len(grads) > 3 else np.zeros_like(d["G"])
            errors[name] = {k: rel_err(v, w) for k, v, w in zip(
                ("y", "dx", "dA", "dB", "dgate"), (y, grads[0], grads[1], grads[2], _dgate_from_dG(d["gates"], dG)),
                (want_y,) + tuple(want_g))}
            graphs = {id(x): fn(x) for x, _ in tpool}

            def back(x, dy, _graphs=graphs):
                torch.autograd.grad(_graphs[id(x)], (x,) + params, dy, retain_graph=True, allow_unused=True)
            calls[name, "fwd"] = (lambda x, dy, _fn=fn: _fn(x), tpool)
            calls[name, "bwd"] = (back, tpool)
    timed = (time_blocked if blocked else time_interleaved)(calls, runs, warmup)
    times = {}
    for (name, direction), st in timed.items():
        times.setdefault(name, {})[direction] = st

    row = {"case": asdict(case), "name": case.name, "errors": errors, "times": times}
    rescore(row, roofs)
    return row


def rescore(row: dict, roofs: dict):
    """The per-direction numbers of a row (time, GFLOP/s, GB/s, bound, % of roofline, speed-ups)."""
    case, times = Case(**row["case"]), row["times"]
    (ff, fb), (bf, bb) = flops_bytes(case)
    for direction, F, nbytes in (("fwd", ff, fb), ("bwd", bf, bb)):
        t = times["ext"][direction][STAT]
        t_flop, t_mem = F / (roofs["peak_gflops"] * 1e9), nbytes / (roofs["bw_gbs"] * 1e9)
        base = {n: times[n][direction][STAT] / t for n in times if not n.startswith("ext")}
        versions = {n: times[n][direction][STAT] / t for n in times if n.startswith("ext.v")}
        row[direction] = dict(ms=t * 1e3, p10=times["ext"][direction]["p10"] * 1e3,
                              p90=times["ext"][direction]["p90"] * 1e3, gflops=F / t / 1e9, gbs=nbytes / t / 1e9,
                              bound="compute" if t_flop >= t_mem else "memory",
                              roof_pct=100 * max(t_flop, t_mem) / t, speedup=base, versions=versions,
                              best=min(base.values()) if base else None,
                              best_name=min(base, key=base.get) if base else None)


# ---- printing -----------------------------------------------------------------------------------------
def print_row(row, baselines):
    for direction in ("fwd", "bwd"):
        r = row[direction]
        cols = " ".join(f"{r['speedup'][b]:6.2f}" if b in r["speedup"] else "     -" for b in baselines)
        err = max((e for e in row["errors"]["ext"].values() if e is not None), default=0.0)
        print(f"{row['name']:<40} {direction} {r['ms']:9.3f} ({r['p10']:8.3f}-{r['p90']:8.3f}) "
              f"{r['gflops']:7.1f} {r['gbs']:6.1f} {r['bound']:>7} {r['roof_pct']:5.1f}% | {cols} | "
              f"{(r['best'] or 0):5.2f}x {err:8.1e}"
              + "".join(f" | {n[4:]} {v:.1f}x" for n, v in r.get("versions", {}).items()), flush=True)


def geomean(values):
    values = [v for v in values if v and v > 0]
    return float(math.exp(sum(math.log(v) for v in values) / len(values))) if values else None


GROUP_TITLES = {
    "workload": "the tiny GPT's adapted layers at rank 8, N = 208 (scenario A) and 4096 (pretraining), LoRA and "
                "top-2 of 6; targets: geo-mean ≥ 2x the best baseline, never slower",
    "standard": "every gate form over the sweep's shapes; targets: ≥ 1.0x the best baseline at N ≥ 256, geo-mean "
                "≥ 60% of the roofline at N ≥ 4096, per-call floor (N = 1) ≤ 15 µs",
}


def summarise(rows, group="standard") -> dict:
    """Geo-means and target checks of one group, per direction (the floor: the N = 1 rows)."""
    out = {}
    for direction in ("fwd", "bwd"):
        best = [r[direction]["best"] for r in rows]
        s = dict(speedup_vs_best_geomean=geomean(best), rows=len(rows))
        floor = [r for r in rows if r["case"]["N"] == 1]
        if floor:
            s["floor_us"] = {r["name"]: r[direction]["ms"] * 1e3 for r in floor}
            s["floor_best_baseline_us"] = {r["name"]: r[direction]["ms"] * 1e3 * r[direction]["best"] for r in floor
                                           if r[direction]["best"]}
        if group == "workload":
            s["slower_than_best"] = [f"{r['name']} ({r[direction]['best']:.2f}x)" for r in rows
                                     if (r[direction]["best"] or 0) < 1.0]
        else:
            big = [r for r in rows if r["case"]["N"] >= 256]
            huge = [r for r in rows if r["case"]["N"] >= 4096]
            two_x = [r for r in big if r["case"]["kind"] in ("topk", "token")
                     or (r["case"]["kind"] == "lora" and r["case"]["r"] <= 16)]
            s.update(speedup_vs_best_geomean_N256=geomean([r[direction]["best"] for r in big]),
                     roof_pct_geomean_N4096=geomean([r[direction]["roof_pct"] for r in huge]),
                     slower_than_best_N256=[f"{r['name']} ({r[direction]['best']:.2f}x)" for r in big
                                            if (r[direction]["best"] or 0) < 1.0],
                     below_2x_target=[f"{r['name']} ({r[direction]['best']:.2f}x)" for r in two_x
                                      if (r[direction]["best"] or 0) < 2.0])
        out[direction] = s
    return out


def print_summary(summary, label):
    print(f"\nsummary ({label}):")
    fmt = lambda v, unit: "n/a" if v is None else f"{v:.2f}{unit}"  # noqa: E731
    for direction, s in summary.items():
        line = f"  {direction}: geo-mean speed-up vs best baseline {fmt(s['speedup_vs_best_geomean'], 'x')}"
        if "roof_pct_geomean_N4096" in s:
            line += (f" (N ≥ 256: {fmt(s['speedup_vs_best_geomean_N256'], 'x')}); geo-mean % of roofline at "
                     f"N ≥ 4096: {fmt(s['roof_pct_geomean_N4096'], '%')} (target ≥ 60%)")
        print(line)
        if "slower_than_best" in s:
            print(f"       slower than the best baseline (target: none): {', '.join(s['slower_than_best']) or 'none'}")
        if "slower_than_best_N256" in s:
            print(f"       slower than the best baseline at N ≥ 256 (target: none): "
                  f"{', '.join(s['slower_than_best_N256']) or 'none'}")
            print(f"       below 2x (top-k, per-token, LoRA r ≤ 16, N ≥ 256): {', '.join(s['below_2x_target']) or 'none'}")
        for name, us in s.get("floor_us", {}).items():
            base = s["floor_best_baseline_us"].get(name)
            print(f"       per-call floor {name}: {us:.1f} µs (target ≤ 15 µs)"
                  + (f"; best baseline {base:.1f} µs" if base else ""))


def environment(threads) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"python": platform.python_version(), "numpy": np.__version__, "cpu": cpu, "cores": os.cpu_count(),
           "ext_threads": threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
           }
    from tinyslim.kernels import cpu as cpu_mod
    env["ext_build"] = cpu_mod.build_info()
    if torch is not None:
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    return env


# ---- the GPU part -------------------------------------------------------------------------------------
def run_gpu(args) -> int:
    ok, why = kernels.available_backends()["cuda"]
    if not ok:
        print(f"--device cuda: the cuda backend is unavailable ({why}); nothing to benchmark on a GPU.")
        return 0
    if torch is None or not torch.cuda.is_available():
        print("--device cuda: needs torch with CUDA for the baselines and CUDA events; skipping.")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")

    def cuda_time(fn, pool, runs=100, warmup=20):
        for i in range(warmup):
            fn(*pool[i % len(pool)])
        ts = []
        for i in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*pool[i % len(pool)])
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end) / 1e3)
        return stats(ts)

    a = torch.randn(8192, 8192, device=dev)
    t = cuda_time(lambda: a @ a, [()], runs=5, warmup=2)["median"]
    peak = 2 * 8192 ** 3 / t / 1e9
    src = torch.empty(256 << 20, device=dev)  # 1 GB
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), [()], runs=10, warmup=2)["median"]
    bw = 2 * src.numel() * 4 / t / 1e9
    del a, src, dst
    print(f"GPU {torch.cuda.get_device_name()}: float32 matmul peak {peak:.0f} GFLOP/s, d2d copy {bw:.0f} GB/s")
    rows = []
    rng = np.random.default_rng(0)
    for case in gpu_cases(args.full):
        d = make_data(case, rng)
        gates_dev = d["gates"]
        if isinstance(gates_dev, tuple):
            gates_dev = (gates_dev[0], torch.tensor(gates_dev[1], device=dev))
        elif case.kind == "dense":
            gates_dev = torch.tensor(gates_dev, device=dev)
        A, B = torch.tensor(d["A"], device=dev), torch.tensor(d["B"], device=dev)
        pool = [(torch.tensor(d["x"], device=dev), torch.tensor(d["dy"], device=dev)) for _ in range(2)]
        fwd = lambda x, dy: kernels.forward(x, A, B, gates_dev, d["scale"], backend="cuda")  # noqa: E731
        bwd = lambda x, dy: kernels.backward(dy, x, A, B, gates_dev, d["scale"], backend="cuda")  # noqa: E731
        y = fwd(*pool[0]).cpu().numpy()
        err = rel_err(y, reference.forward(d["x"].astype(np.float64), d["A"].astype(np.float64),
                                           d["B"].astype(np.float64), d["G"].astype(np.float64), d["scale"]))
        times = {"ext": {"fwd": cuda_time(fwd, pool), "bwd": cuda_time(bwd, pool)}}
        fns, params = torch_baselines(case, d, device=dev)
        tpool = [(x.clone().requires_grad_(True), dy) for x, dy in pool]
        for name, fn in fns.items():
            graphs = {id(x): fn(x) for x, _ in tpool}
            times[name] = {"fwd": cuda_time(lambda x, dy: fn(x), tpool),
                           "bwd": cuda_time(lambda x, dy: torch.autograd.grad(graphs[id(x)], (x,) + params, dy,
                                                                              retain_graph=True, allow_unused=True),
                                            tpool)}
        (ff, fb), (bf, bb) = flops_bytes(case)
        row = {"case": asdict(case), "name": case.name, "y_err": err, "times": times}
        for direction, F, nbytes in (("fwd", ff, fb), ("bwd", bf, bb)):
            t = times["ext"][direction]["median"]
            base = {n: times[n][direction]["median"] / t for n in times if n != "ext"}
            row[direction] = dict(ms=t * 1e3, gflops=F / t / 1e9, gbs=nbytes / t / 1e9,
                                  roof_pct=100 * max(F / (peak * 1e9), nbytes / (bw * 1e9)) / t, speedup=base,
                                  best=min(base.values()) if base else None)
            print(f"{case.name:<40} {direction} {t * 1e3:9.3f} ms {F / t / 1e9:8.1f} GFLOP/s {nbytes / t / 1e9:7.1f} GB/s "
                  f"{row[direction]['roof_pct']:5.1f}% of roof | "
                  + " ".join(f"{n} {v:.2f}x" for n, v in base.items()) + f" | y err {err:.1e}", flush=True)
        rows.append(row)
    summary = {direction: dict(speedup_vs_best_geomean=geomean([r[direction]["best"] for r in rows]),
                               roof_pct_geomean=geomean([r[direction]["roof_pct"] for r in rows]))
               for direction in ("fwd", "bwd")}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": "cuda", "peak_gflops": peak, "bw_gbs": bw, "rows": rows,
                                               "summary": summary}, indent=1))
    return 0


# ---- main ---------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the full sweep of docs/benchmarks.md (long)")
    parser.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for the extension and torch (default: the extension's own setting)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per path (≥ 20 for reported numbers)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", default="", help="run only shapes whose name contains this text")
    parser.add_argument("--blocked", action="store_true",
                        help="time each path's calls back to back instead of interleaving the paths call by call: "
                             "each op alone, warm, with no other path's threads or data between its calls")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="the time each row and ratio uses (min: the fastest of the interleaved calls, for a busy "
                             "machine)")
    parser.add_argument("--versions", action="store_true",
                        help="also check and time the older versions of the C kernel (cpu.v1 …) on shapes up to "
                             f"{VERSION_WORK_LIMIT:.0e} multiply-adds; printed as how many times faster the newest is")
    parser.add_argument("--group", choices=("all", "workload", "standard"), default="all",
                        help="the workload group (the tiny GPT's own shapes), the standard sweep, or both")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from blas_env import reexec_if_needed
    reexec_if_needed(__file__, sys.argv[1:] if argv is None else list(argv))  # fair NumPy baselines

    global STAT
    STAT = args.stat
    if args.device == "cuda":
        return run_gpu(args)
    ok, why = kernels.available_backends()["cpu"]
    if not ok:
        print(f"the cpu extension is unavailable ({why}); build it first (make ext). Nothing to benchmark.")
        return 0
    if args.threads:
        kernels.set_num_threads(args.threads)
    threads = kernels.get_num_threads()
    thread_note = (f"{threads} (set by --threads)" if args.threads else
                   f"the library's default (up to {threads}, fewer for small problems)")
    if torch is not None:
        torch.set_num_threads(threads)
    env = environment(threads)
    roofs = cpu_roofs()  # measured again at the end; the best of both is used
    print(f"CPU {env['cpu']} ({env['cores']} cores); numpy {env['numpy']}"
          + (f", torch {env['torch']} ({env['torch_threads']} threads)" if torch is not None else ", torch: not installed")
          + f"; extension threads {threads}; OMP_NUM_THREADS={env['OMP_NUM_THREADS']} "
            f"OPENBLAS_NUM_THREADS={env['OPENBLAS_NUM_THREADS']} (NumPy's BLAS uses all cores unless set) "
            f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} GOMP_SPINCOUNT={env['GOMP_SPINCOUNT']}")
    print(f"times: the {STAT} of the {'calls of each path back to back (--blocked)' if args.blocked else 'interleaved calls'} "
          "(--stat)")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} (other processes share "
          "these cores: compare ratios, which are measured on the same data in the same process)")
    print(f"{env['ext_build']}")
    print(f"roofs measured now: float32 matmul peak {roofs['peak_gflops']:.0f} GFLOP/s, "
          f"read bandwidth {roofs['bw_gbs']:.1f} GB/s")
    groups = {"workload": workload_cases(), "standard": full_cases() if args.full else default_cases()}
    groups = {g: [c for c in cases if args.only in c.name] for g, cases in groups.items()
              if args.group in ("all", g)}
    baselines = ["np.loop", "np.concat", "np.einsum", "np.segments"] + \
        (["torch.concat", "torch.loop", "torch.bmm"] if torch is not None else [])
    rows = []
    rng = np.random.default_rng(0)
    for group, cases in groups.items():
        if not cases:
            continue
        print(f"\n{group} group: {GROUP_TITLES[group]}")
        print(f"{'shape':<40} dir   ext ms   (p10 - p90)      GFLOP/s   GB/s   bound  %roof | "
              + " ".join(f"{b[:6]:>6}" for b in baselines) + " |  best   max err")
        print(f"{'':<40}     speed-up of the extension over each baseline (× faster), '-' = not run for this shape")
        for case in cases:
            row = run_cpu_case(case, roofs, max(args.runs, 1), args.warmup, rng, args.versions, args.blocked)
            row["group"] = group
            print_row(row, baselines)
            rows.append(row)
    end = cpu_roofs()
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"roofs measured again at the end: {end['peak_gflops']:.0f} GFLOP/s, {end['bw_gbs']:.1f} GB/s"
          + ("" if end["peak_gflops"] <= roofs["peak_gflops"] and end["bw_gbs"] <= roofs["bw_gbs"]
             else " (higher: the roofline columns above used the start values; the summary uses the best)"))
    best = {k: max(roofs[k], end[k]) for k in roofs}
    extra = []
    for _ in range(3):  # a roof measured while the machine was busier than during some row: measure again
        for row in rows:
            rescore(row, best)
        if not any(row[d]["roof_pct"] > 100 for row in rows for d in ("fwd", "bwd")):
            break
        extra.append(cpu_roofs())
        best = {k: max(best[k], extra[-1][k]) for k in best}
        print(f"a row read above 100% of the roofline: roofs measured again: {extra[-1]['peak_gflops']:.0f} GFLOP/s, "
              f"{extra[-1]['bw_gbs']:.1f} GB/s")
    for row in rows:
        rescore(row, best)
    roofs = dict(best, start=roofs, end=end, extra=extra)
    print(f"roofs used (the best measured): {best['peak_gflops']:.0f} GFLOP/s, {best['bw_gbs']:.1f} GB/s")
    summary = {group: summarise([r for r in rows if r["group"] == group], group) for group in groups
               if any(r["group"] == group for r in rows)}
    for group, summ in summary.items():
        print_summary(summ, f"{group} group, CPU extension, float32, threads: {thread_note}")
    bad = {n: e for row in rows for n, errs in row["errors"].items() for e in errs.values() if e and e > 1e-3}
    if bad:
        print(f"WARNING: relative errors above 1e-3 in: {sorted(bad)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": "cpu", "env": env, "roofs": roofs, "blocked": args.blocked, "rows": rows,
                                               "summary": summary}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
