# %% [markdown]
# # 10 · Verify a gradient yourself, with a property test
#
# Tutorial 00 checked a backward by hand. This one uses the toolkit tinyslim's own test suite is
# built on, `tinyslim.testing`, to prove the backward of an op *you* write — here a new gating
# rule, the kind of thing a mixture-of-LoRA paper invents — in three lines, and then to let
# hypothesis hunt for the input that breaks it.
#
# Run it: `python tutorials/10_verify_a_gradient.py`.

# %%
import numpy as np

from tinyslim.autograd import Function, Tensor
from tinyslim.testing import GradcheckError, gradcheck

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. A new op: a temperature softmax gate
#
# A router turns logits $\ell \in \mathbb{R}^E$ into gate weights
# $g = \mathrm{softmax}(\ell / \tau)$ with a learnable temperature $\tau = e^{\rho}$ (MoLE does
# exactly this). With $\zeta = \ell/\tau$ and an upstream gradient $\bar g$:
#
# $$\bar\zeta = g \odot (\bar g - \langle g, \bar g\rangle), \qquad
#   \bar\ell = \bar\zeta / \tau, \qquad
#   \bar\rho = -\textstyle\sum \bar\zeta \odot \zeta .$$
#
# The last one holds because $\partial\zeta/\partial\rho = -\zeta$.

# %%
class TemperatureGate(Function):
    @staticmethod
    def forward(ctx, logits, rho):  # logits (N, E), rho () -> g (N, E)
        tau = np.exp(rho)
        zeta = logits / tau
        z = np.exp(zeta - zeta.max(axis=1, keepdims=True))
        g = z / z.sum(axis=1, keepdims=True)
        ctx.save_for_backward(g, zeta, tau)
        return g

    @staticmethod
    def backward(ctx, gbar):
        g, zeta, tau = ctx.saved_tensors
        dzeta = g * (gbar - (g * gbar).sum(axis=1, keepdims=True))  # softmax Jacobian
        return dzeta / tau, -np.sum(dzeta * zeta)  # ζ = ℓ/τ: dℓ = dζ/τ, dρ = -Σ dζ·ζ


# %% [markdown]
# ## 2. Prove it: three lines
#
# `gradcheck` runs the op forward, back-propagates a *random* upstream gradient (so a backward
# that is right only for `.sum()` still fails), and compares every input gradient with
# fourth-order central differences in float64. Silence means every relative error is < 1e-6.

# %%
logits = rng.normal(size=(4, 3))
rho = np.array(0.3)
results = gradcheck(lambda l, r: TemperatureGate.apply(l, r), logits, rho)
for r in results:
    print(r)

# %% [markdown]
# ## 3. A checker must be able to fail
#
# Here is the same op with a classic slip — the sign of the temperature gradient. The report
# shows the worst entries side by side and the input that failed.

# %%
class BuggyGate(TemperatureGate):
    @staticmethod
    def backward(ctx, gbar):
        dl, drho = TemperatureGate.backward(ctx, gbar)
        return dl, -drho  # wrong sign


try:
    gradcheck(lambda l, r: BuggyGate.apply(l, r), logits, rho)
except GradcheckError as err:
    report = str(err)
    print("\n".join(report.splitlines()[:8]))
else:
    raise AssertionError("gradcheck missed a sign error")
assert "d/d" in report and "FAIL" in report

# %% [markdown]
# ## 4. Let hypothesis search for a counter-example
#
# One example proves little. A property test draws many shapes and values and, if one fails,
# shrinks it to the smallest failing input. `tinyslim.testing.strategies` has the strategies the
# test suite uses (shapes, bounded arrays, non-contiguous views, gate patterns, GPT configs).
#
# When this tutorial was written, hypothesis found an input that broke a *checker*, not the op:
# logits `[[3, 3, 3]]` at τ = 1, where the exact temperature gradient is 0 and both sides are
# rounding noise (−5.6e-17 vs 0), so their *relative* error was large. That is why `gradcheck`
# also accepts a difference whose norm is below `atol = 1e-10`: far below any real bug.

# %%
try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tinyslim.testing import strategies as ts
except ImportError:
    given = None
    print("hypothesis is not installed: skipping the property test (make test installs it)")

if given is not None:
    checked = []

    @settings(max_examples=25, deadline=None, database=None)
    @given(logits=ts.arrays(shape=ts.shapes(min_dims=2, max_dims=2), lo=-3, hi=3), rho=st.floats(-1, 1))
    def property_gate_backward(logits, rho):
        gradcheck(lambda l, r: TemperatureGate.apply(l, r), logits, np.array(rho))
        checked.append(logits.shape)

    property_gate_backward()
    print(f"the property held on {len(checked)} drawn inputs, shapes such as {sorted(set(checked))[:5]}")
    assert len(checked) >= 10

# %% [markdown]
# ## 5. Against torch, when it is installed
#
# `assert_matches_torch` compares the forward and every gradient with torch autograd in float64.

# %%
try:
    import torch

    from tinyslim.testing import assert_matches_torch
except ImportError:
    torch = None
    print("torch is not installed: skipping (make test installs it)")
if torch is not None:
    assert_matches_torch(lambda l, r: TemperatureGate.apply(l, r),
                         lambda l, r: torch.softmax(l / torch.exp(r), dim=1), logits, rho)
    print("forward and both gradients match torch float64")
print("tutorial 10 checks passed")
