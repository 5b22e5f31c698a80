# %% [markdown]
# # 09 · The low-rank mixture kernel
#
# Every method in tinyslim — plain LoRA, MoLE, SLIM, ELDER, COLA, I-LoRA — spends its adapter time
# in one operator (docs/methods.md §8):
#
# $$y_n = \sum_{e=1}^{E} G[n,e]\; s_e\; B_e A_e x_n, \qquad n = 1..N,$$
#
# with $x_n \in \mathbb{R}^D$, $A_e \in \mathbb{R}^{r\times D}$, $B_e \in \mathbb{R}^{O\times r}$ and a
# gate $G$ that is dense (MoLE), top-k sparse (SLIM, ELDER) or one adapter per token (LoRA). This
# tutorial writes it three ways — the naive loop over experts, one concatenated GEMM, and the fused C
# kernel — checks that they agree, and puts their speed next to the *roofline*: the fastest this
# machine could possibly run the op.
#
# Correctness is asserted. Speed is only reported: these machines are shared and noisy, and
# `benchmarks/bench_kernels.py` is where speed is measured properly (`make bench`).
#
# Run it: `python tutorials/09_kernel.py`. `TINYSLIM_FAST=1` times fewer runs on smaller roofs.

# %%
import os

# Equal thread counts for every contender (docs/benchmarks.md): one BLAS thread and one kernel thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TINYSLIM_NUM_THREADS", "1")
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from tinyslim import kernels  # noqa: E402
from tinyslim.autograd import Tensor  # noqa: E402
from tinyslim.kernels import reference  # noqa: E402
from tinyslim.lowrank import mixture_lowrank  # noqa: E402

FAST = os.environ.get("TINYSLIM_FAST") == "1"
OUT = Path("runs/tutorials")
OUT.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for line in kernels.info_lines()[:4]:
    print(line)
HAVE_CPU = kernels.available_backends()["cpu"][0]

# %% [markdown]
# ## 1. Three ways to compute the same thing
#
# **The naive loop** (`tinyslim.kernels.reference`, the "numpy" backend and every backend's oracle):
# for each expert $e$, gather the tokens whose gate is non-zero, compute $h = A_e x$ ($r$ numbers per
# token), then $B_e h$, and scatter-add $G[n,e]\,s_e\,B_e h$ into $y$. Two skinny GEMMs per expert, and
# $x$ is read $E$ times.
#
# **The concatenated GEMM.** Stack the experts: $A_{cat} = [A_1; \dots; A_E]$ ($Er \times D$) and
# $B_{cat} = [B_1, \dots, B_E]$ ($O \times Er$). Then
#
# $$Y = \big( (X A_{cat}^\top) \odot \tilde G \big)\, B_{cat}^\top, \qquad
#   \tilde G[n, (e, j)] = G[n,e]\, s_e ,$$
#
# two ordinary GEMMs whatever $E$ is. For top-k gates it wastes work on the zero entries of $G$.
#
# **The fused C kernel** (`tinyslim.kernels`, backend "cpu", C with OpenMP): reads $x_n$ once, keeps
# the $r$-vector $h$ in registers, touches only the experts a token uses, and skips rows whose gate
# is all zero (so those rows stay bit-identical to the base model).
#
# The C kernel comes in **numbered versions**, as llm.c's `dev/cuda` kernels do: each version is a
# complete kernel, checked against the NumPy reference before anyone times it, and the backend
# `"cpu.v1"`, `"cpu.v2"` … runs one by number (`"cpu"` runs the newest).
#
# * **v1** (`ext/lowrank_v1.h`) is the equation in plain loops: one token, one gate entry at a time,
#   $h = A'_e x_n$ then $y_n \mathrel{+}= c\,B'_e h$. It fits on one screen and is easy to trust.
# * **v2** (`ext/lowrank_v2.h`) computes the same numbers in another order: tokens in blocks, the
#   factors packed once per call, register-tiled vector micro-kernels, OpenMP threads when the problem
#   is big enough to pay for them.
# * **v3** (`ext/lowrank_v3.h`) is v2 with the wide products organised as a GEMM is: each 4-row × 4-vector
#   accumulator block stays in registers while the sum runs over blocks of 64 rows that sit in L1, and
#   coefficient rows that are already contiguous (x, dy, the rank intermediates) are read in place
#   instead of being copied into a packed panel first; and a call is one OpenMP parallel region whose
#   phases wait for each other by short spins, where v2 opened several regions with barriers at which
#   an idle thread goes to sleep (and takes time to wake).
#
# We write the concat-GEMM here (it is four lines) and take the other two from tinyslim.

# %%
def concat_gemm(x, A, B, G, s):
    """Y (N, O) = ((X A_catᵀ) ⊙ G̃) B_catᵀ for dense gates G (N, E) and scales s (E,)."""
    E, r, D = A.shape
    A_cat = A.reshape(E * r, D)  # (E·r, D)
    B_cat = B.transpose(1, 0, 2).reshape(B.shape[1], E * r)  # (O, E·r)
    return ((x @ A_cat.T) * np.repeat(G * s, r, axis=1)) @ B_cat.T


def problem(N, D, O, r, E, dtype=np.float32):
    x = rng.standard_normal((N, D)).astype(dtype)
    A = (rng.standard_normal((E, r, D)) / np.sqrt(D)).astype(dtype)
    B = (rng.standard_normal((E, O, r)) / np.sqrt(r)).astype(dtype)
    G = rng.random((N, E)).astype(dtype)
    G /= G.sum(axis=1, keepdims=True)  # softmax-like dense gates
    s = np.full(E, 2.0, dtype=dtype)
    return x, A, B, G, s

# %% [markdown]
# ## 2. They agree (float64, then float32)
#
# In float64 every formulation must match the loop to ~1e-12 relative error; in float32 to a few
# ulps of the largest output. The backward (dx, dA, dB and the gate gradient dG, computed in rank
# space as $s_e\langle B_e^\top dy_n, A_e x_n\rangle$) is checked the same way.

# %%
def rel_err(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(1.0, np.abs(want).max()))


if HAVE_CPU:
    from tinyslim.kernels import cpu

    VERSIONS = [f"cpu.v{v}" for v in sorted(cpu.VERSIONS)]  # every numbered version of the C kernel
    for name in VERSIONS:
        print(f"{name}: {cpu.VERSIONS[int(name[5:])]}")
else:
    VERSIONS = []
backends = ["numpy"] + VERSIONS
for dtype, tol in ((np.float64, 1e-12), (np.float32, 3e-5)):
    x, A, B, G, s = problem(300, 100, 72, 5, 4, dtype)  # the ragged shape of docs/benchmarks.md
    dy = rng.standard_normal((300, 72)).astype(dtype)
    want = reference.forward(x.astype(np.float64), A.astype(np.float64), B.astype(np.float64),
                             G.astype(np.float64), s.astype(np.float64))
    want_grads = reference.backward(dy.astype(np.float64), x.astype(np.float64), A.astype(np.float64),
                                    B.astype(np.float64), G.astype(np.float64), s.astype(np.float64))
    errors = {"concat-GEMM": rel_err(concat_gemm(x, A, B, G, s), want)}
    for name in backends:
        errors[name] = rel_err(kernels.forward(x, A, B, G, s, backend=name), want)
        grads = kernels.backward(dy, x, A, B, G, s, backend=name)
        errors[name + " backward"] = max(rel_err(g, w) for g, w in zip(grads, want_grads))
    print(f"{np.dtype(dtype).name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < tol

# %% [markdown]
# The three gate forms are one op: top-k gates `(idx, w)` equal the dense $G$ that holds `w` at
# `idx` and 0 elsewhere, and a per-token index equals a one-hot $G$. An index of −1 (or an all-zero
# gate row) must leave the row exactly 0, not "0 up to rounding".

# %%
x, A, B, G, s = problem(64, 128, 128, 8, 8)
idx = np.argsort(-G, axis=1)[:, :2].astype(np.int32)  # top-2 of 8
w = np.take_along_axis(G, idx, axis=1)
G_top = np.zeros_like(G)
np.put_along_axis(G_top, idx, w, axis=1)
adapter = rng.integers(-1, 8, 64).astype(np.int32)  # −1: this token uses no adapter
G_one_hot = np.zeros_like(G)
G_one_hot[adapter >= 0, adapter[adapter >= 0]] = 1
for name in backends:
    y_top = kernels.forward(x, A, B, (idx, w), s, backend=name)
    y_idx = kernels.forward(x, A, B, adapter, s, backend=name)
    assert np.allclose(y_top, concat_gemm(x, A, B, G_top, s), rtol=1e-5, atol=1e-5)
    assert np.allclose(y_idx, concat_gemm(x, A, B, G_one_hot, s), rtol=1e-5, atol=1e-5)
    assert np.all(y_idx[adapter < 0] == 0) and not np.signbit(y_idx[adapter < 0]).any()
print("top-k and index forms equal their dense equivalents; index −1 rows are exactly +0")

# %% [markdown]
# Inside the model the op is an autograd `Function`, `tinyslim.lowrank.mixture_lowrank`: gradients
# flow into x, A, B and the gate weights, and a LoRA layer is the call with E = 1 and index 0.

# %%
xt, At, Bt, Gt = (Tensor(a.astype(np.float64), requires_grad=True) for a in (x, A, B, G))
y = mixture_lowrank(xt, At, Bt, Gt, scale=s.astype(np.float64), backend="numpy")
y.sum().backward()
dG_rank_space = Gt.grad
dG_explicit = np.stack([s[e] * (x.astype(np.float64) @ A[e].T.astype(np.float64) @ B[e].T.astype(np.float64))
                        .sum(axis=1) for e in range(8)], axis=1)  # ⟨1, s_e B_e A_e x_n⟩
print(f"dG in rank space vs explicit ⟨dy, u⟩: max diff {np.abs(dG_rank_space - dG_explicit).max():.1e}")
assert np.allclose(dG_rank_space, dG_explicit, rtol=1e-10, atol=1e-10)

# %% [markdown]
# ## 3. The roofline
#
# Count the work (docs/benchmarks.md), with $k$ the experts a token uses ($k = E$ dense, $k$ for top-k,
# 1 per-token) and $w = 4$ bytes:
#
# $$F_{fwd} = 2\,N k r (D + O), \qquad
#   \text{bytes}_{fwd} = w\,\big(N D + N O + E_{active}\, r (D + O)\big) + \text{gate bytes},$$
#
# gate bytes $= wNE$ dense, $(w + 4)Nk$ top-k, $4N$ per-token. The roofline says that no
# implementation can beat $T_{min} = \max(F / P,\ \text{bytes} / BW)$. With $r \ll D$ the op does
# ~$2kr$ FLOPs per input element, so it is memory-bound for small $kr$.
#
# What $P$ and $BW$ are here matters, so be precise: they are **measurements, not the hardware's
# specification**. $P$ is the speed one float32 $M \times M$ matmul (NumPy, one BLAS thread) reached,
# the best of 3–5 timings; $BW$ is the speed of one sum over a 64–256 MB array, larger than any cache,
# so it measures main memory, also the best of 3–5 timings. Both are taken twice, before and after the
# timings below, and the better of the two is used, as `benchmarks/bench_kernels.py` does. On a
# machine that other processes share, either measurement can come out low.

# %%
def best_time(fn, runs):
    fn()  # warm-up
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


M, BIG_MB = (1024, 64) if FAST else (2048, 256)


def measure_roofs():
    """(P in GFLOP/s, BW in GB/s): one M³ float32 matmul and one sum over BIG_MB, each the best of a few."""
    a = rng.standard_normal((M, M)).astype(np.float32)
    P = 2 * M ** 3 / min(best_time(lambda: a @ a, 1) for _ in range(3 if FAST else 5)) / 1e9
    big = np.ones(BIG_MB << 18, np.float32)
    BW = big.nbytes / min(best_time(big.sum, 1) for _ in range(3 if FAST else 5)) / 1e9
    return P, BW


roofs_before = measure_roofs()
print(f"roofs measured now: {M}³ sgemm {roofs_before[0]:.0f} GFLOP/s, read bandwidth {roofs_before[1]:.1f} GB/s "
      f"over {BIG_MB} MB (threads: BLAS {os.environ['OPENBLAS_NUM_THREADS']}, kernel {kernels.get_num_threads()})")


def roofline(N, D, O, r, E, k, gate_bytes, w=4):
    flops = 2 * N * k * r * (D + O)
    nbytes = w * (N * D + N * O + E * r * (D + O)) + gate_bytes
    return flops, nbytes

# %% [markdown]
# ## 4. Measured side by side (forward, float32)
#
# Small sizes at the tiny GPT's width (D = O = 128, r = 8): dense gates over 4 experts (MoLE), top-2
# of 8 (SLIM), and one LoRA (E = 1, index 0). Median of repeated runs; "% roof" is
# $T_{min}/T_{measured}$. Expect the numbers to move from run to run on a shared machine.
#
# A reading above 100% can happen, and it means that the op ran faster than our *measurement* of the
# roof, not faster than the hardware. There are two ways, and the cell prints which one each such row
# took:
#
# * a **memory-bound** row whose operands (a few hundred KB to a few MB) stayed in the CPU's caches,
#   which are faster than the main memory where $BW$ was measured. `benchmarks/bench_kernels.py`
#   rotates through a pool of inputs larger than the last-level cache so that its rows do read from
#   memory;
# * a **compute-bound** ("flops") row that ran at more GFLOP/s than the one large matmul behind $P$.
#   That matmul was timed at other moments than the op, on cores other processes share, and it is a
#   different computation; nothing makes its speed a ceiling for a small op whose data sits in cache.

# %%
runs = 5 if FAST else 30
rows = []
for N in ((256, 2048) if FAST else (256, 4096, 16384)):
    for label, E, form in (("dense E=4", 4, "dense"), ("top-2 of 8", 8, "topk"), ("LoRA E=1", 1, "index")):
        x, A, B, G, s = problem(N, 128, 128, 8, E)
        if form == "dense":
            gates, G_eq, k, gbytes = G, G, E, 4 * N * E
        elif form == "topk":
            idx = np.argsort(-G, axis=1)[:, :2].astype(np.int32)
            w = np.take_along_axis(G, idx, axis=1)
            gates, G_eq, k, gbytes = (idx, w), np.zeros_like(G), 2, 8 * N * 2
            np.put_along_axis(G_eq, idx, w, axis=1)
        else:
            gates, G_eq, k, gbytes = np.zeros(N, np.int32), np.ones((N, 1), np.float32), 1, 4 * N
        flops, nbytes = roofline(N, 128, 128, 8, E, k, gbytes)
        times = {"loop (numpy)": best_time(lambda: kernels.forward(x, A, B, gates, s, backend="numpy"), runs),
                 "concat-GEMM": best_time(lambda: concat_gemm(x, A, B, G_eq, s), runs)}
        for name in VERSIONS:  # v1's plain loops are slow: fewer runs
            times[f"C {name[4:]} ({name})"] = best_time(lambda: kernels.forward(x, A, B, gates, s, backend=name),
                                                       runs if name != "cpu.v1" else max(2, runs // 10))
        rows.append((N, label, flops, nbytes, times))

roofs_after = measure_roofs()
peak, bw = max(roofs_before[0], roofs_after[0]), max(roofs_before[1], roofs_after[1])
print(f"roofs measured again: {roofs_after[0]:.0f} GFLOP/s, {roofs_after[1]:.1f} GB/s; using the better of the two: "
      f"P = {peak:.0f} GFLOP/s, BW = {bw:.1f} GB/s")
names = list(rows[0][4])
print(f"{'N':>6} {'gates':<11} {'MFLOP':>6} {'KB':>6} {'bound':>6} " + " ".join(f"{n:>16}" for n in names)
      + "   (µs, and % of roofline)")
above = []
for N, label, flops, nbytes, times in rows:
    t_min = max(flops / (peak * 1e9), nbytes / (bw * 1e9))
    bound = "memory" if nbytes / bw > flops / peak else "flops"
    cells = " ".join(f"{t * 1e6:9.0f} ({100 * t_min / t:3.0f}%)" for t in times.values())
    print(f"{N:>6} {label:<11} {flops / 1e6:6.1f} {nbytes / 1e3:6.0f} {bound:>6} {cells}")
    above += [(N, label, name, t_min / t, bound, flops / t / 1e9, nbytes) for name, t in times.items() if t < t_min]
for N, label, name, frac, bound, gflops, nbytes in above:
    why = (f"every call reads the same {nbytes / 1e3:.0f} KB, which can stay in cache, while BW streamed {BIG_MB} MB "
           "from main memory" if bound == "memory" else
           f"it ran at {gflops:.0f} GFLOP/s, more than the {peak:.0f} GFLOP/s that the {M}³ matmul behind P reached")
    print(f"above 100%: N={N} {label}, {name}: {100 * frac:.0f}% of a {bound}-bound roof: {why}")

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 3.2))
labels = [f"{label}\nN={N}" for N, label, *_ in rows]
width = 0.8 / len(names)
for j, n in enumerate(names):
    ax.bar(np.arange(len(rows)) + j * width,
           [100 * max(f / (peak * 1e9), b / (bw * 1e9)) / t[n] for _, _, f, b, t in rows], width, label=n)
ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, labels, fontsize=6)
ax.set(ylabel="% of roofline (higher is better)", title="The mixture op, forward, float32")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "09_roofline.png", dpi=100)
print("plot written to", OUT / "09_roofline.png")

# %% [markdown]
# What to look for: the loop pays per expert (its cost grows with E even when each token uses two
# experts); the concat-GEMM is good for dense gates and wasteful for sparse ones; the fused kernel
# reads x once and does only the work the gates ask for. Between the C versions: v1 does exactly the
# arithmetic v2 does, in the order of the equation, one scalar at a time, and lands at a few % of the
# roofline; v2's blocking, packing and vector tiles are where most of the rest comes from, and v3's
# cache blocking of the long sums adds to it on the shapes with a wide rank side (dense gates). The full sweep, the backward and the torch
# baselines are in `python benchmarks/bench_kernels.py`. Nothing here asserts a speed: the checks
# above are about correctness only.

# %%
assert all(t > 0 for *_, times in rows for t in times.values())
print("tutorial 09 checks passed")
