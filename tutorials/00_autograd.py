# %% [markdown]
# # 00 · Autograd from scratch
#
# Every number tinyslim learns is moved by a gradient, and every gradient comes from the ~200 lines
# of `tinyslim/autograd.py`. This tutorial opens that engine:
#
# 1. a `Tensor` remembers the `Function` that made it;
# 2. `loss.backward()` visits the graph in reverse topological order and applies the chain rule;
# 3. you write a new op — SiLU — as a `Function` with an explicit backward;
# 4. you prove the backward right, twice: against central finite differences and against torch.
#
# Run it: `python tutorials/00_autograd.py` (or open it as a notebook in Jupyter / VS Code).

# %%
import os

import numpy as np

from tinyslim import functional as F
from tinyslim.autograd import Function, Tensor

FAST = os.environ.get("TINYSLIM_FAST") == "1"  # the test suite runs every tutorial in this mode
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. A graph, built as you compute
#
# For $y = \sum_i \tanh(a_i) \cdot b_i$ the chain rule gives
# $\partial y/\partial a_i = (1 - \tanh^2 a_i)\, b_i$ and $\partial y/\partial b_i = \tanh a_i$.
# Each op below records itself; `backward` walks the records from `y` back to the leaves.

# %%
a = Tensor(rng.normal(size=4), requires_grad=True)
b = Tensor(rng.normal(size=4), requires_grad=True)
y = (a.tanh() * b).sum()
y.backward()
print("dy/da, autograd:", a.grad)
print("dy/da, by hand: ", (1 - np.tanh(a.data) ** 2) * b.data)
assert np.allclose(a.grad, (1 - np.tanh(a.data) ** 2) * b.data)
assert np.allclose(b.grad, np.tanh(a.data))

# %% [markdown]
# **The rule for calling backward twice.** Leaf gradients *accumulate* across graphs, as in
# torch, so an optimizer step must start from `zero_grad`. A graph is freed after its backward:
# walking it again raises, instead of silently doubling gradients.

# %%
try:
    y.backward()
except RuntimeError as err:
    print("second backward:", str(err)[:80], "…")
else:
    raise AssertionError("a second backward through a freed graph must raise")

# %% [markdown]
# ## 2. A new op: SiLU
#
# $\mathrm{silu}(x) = x\,\sigma(x)$ with $\sigma(x) = 1/(1+e^{-x})$. Its derivative, by the
# product rule and $\sigma' = \sigma(1-\sigma)$:
#
# $$\frac{d}{dx}\,x\sigma(x) = \sigma(x) + x\,\sigma(x)\,(1 - \sigma(x)).$$
#
# A `Function` holds exactly that: `forward` computes on NumPy arrays and saves what the
# backward needs; `backward` turns the upstream gradient into one gradient per input.

# %%
class SiLU(Function):
    @staticmethod
    def forward(ctx, x):
        s = 1.0 / (1.0 + np.exp(-x))
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad_out):
        x, s = ctx.saved_tensors
        return (grad_out * (s + x * s * (1 - s)),)  # product rule with σ' = σ(1-σ)


def silu(x):
    return SiLU.apply(x)

# %% [markdown]
# ## 3. Check it against central finite differences
#
# For each entry $x_j$: $\;\partial L/\partial x_j \approx [L(x + h e_j) - L(x - h e_j)] / 2h$,
# with an error of order $h^2$. In float64 with $h = 10^{-5}$ that is far below the $10^{-6}$
# relative error we demand. $L = \langle \mathrm{silu}(x), g\rangle$ for a random upstream $g$, so
# every output entry matters (a plain `sum` would hide some bugs).

# %%
def central_differences(f, x, g, h=1e-5):
    grad = np.zeros_like(x)
    for j in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[j] += h
        xm[j] -= h
        grad[j] = (np.sum(f(xp) * g) - np.sum(f(xm) * g)) / (2 * h)
    return grad


x = rng.normal(size=(3, 5))
g = rng.normal(size=(3, 5))
xt = Tensor(x, requires_grad=True)
silu(xt).backward(g)
numeric = central_differences(lambda v: silu(Tensor(v)).data, x, g)
rel = np.abs(xt.grad - numeric) / np.maximum(np.abs(numeric), 1e-12)
print(f"{'entry':>8} {'autograd':>12} {'numerical':>12} {'rel err':>9}")
for j in list(np.ndindex(x.shape))[:6]:
    print(f"{str(j):>8} {xt.grad[j]:12.8f} {numeric[j]:12.8f} {rel[j]:9.1e}")
print(f"max relative error over all {x.size} entries: {rel.max():.2e}")
assert rel.max() < 1e-6

# %% [markdown]
# ## 4. Check it against torch (float64), if torch is installed
#
# torch is tinyslim's oracle in the tests (`make test` installs the CPU build). The same input,
# the same upstream gradient: forward and gradient must agree to rounding.

# %%
try:
    import torch
except ImportError:
    torch = None
    print("torch is not installed: skipping the torch comparison (make test installs it)")
if torch is not None:
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.silu(tx).backward(torch.tensor(g))
    fwd_err = np.abs(silu(Tensor(x)).data - torch.nn.functional.silu(torch.tensor(x)).numpy()).max()
    grad_err = np.abs(xt.grad - tx.grad.numpy()).max()
    print(f"forward max |diff| {fwd_err:.1e}, gradient max |diff| {grad_err:.1e}")
    assert fwd_err < 1e-12 and grad_err < 1e-12

# %% [markdown]
# ## 5. Every tinyslim op passes the same two checks
#
# `tests/test_ops.py` runs this comparison for every op in `tinyslim.functional`, on random
# shapes drawn by hypothesis, with broadcasting and non-contiguous inputs. Here is one of them,
# the GPT-2 GELU, checked by hand the same way:

# %%
x = rng.normal(size=(2, 7))
g = rng.normal(size=(2, 7))
xt = Tensor(x, requires_grad=True)
F.gelu(xt).backward(g)
numeric = central_differences(lambda v: F.gelu(Tensor(v)).data, x, g)
err = np.abs(xt.grad - numeric).max() / np.abs(numeric).max()
print(f"gelu: max relative error {err:.1e}")
assert err < 1e-6
print("tutorial 00 checks passed")
