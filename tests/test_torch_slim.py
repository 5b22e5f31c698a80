"""SLIM and MoE-LoRA on the torch engine (tinyslim/torch/slim.py) against the NumPy methods
(tinyslim/adapters/slim.py, moe_lora.py): the NumPy GPT and its transformers twin (``from_gpt``), the same
config and seed, float64, run in lockstep.

* every step of a run of two tasks (a task boundary: the optimizer's state reset by before_task), for
  SLIM under named settings (the defaults, mask_mode "update", mask_split "rows" / "columns", the
  router / yielding / cluster / evaluation variants) with the rest of the config drawn by hypothesis,
  for MoE-LoRA, and for every row of make_slim_ablation: the loss, the gradient of every trainable
  tensor, each layer's masks, cluster statistics and balance loss after the forward, then the step
  (tinyslim.optim.Adam against torch.optim.Adam, same lr, betas, eps) and after_step: every trainable
  tensor and the cluster statistics (the EMA)
* after the run: the routing statistics (d and the identity experts' share per token), the evaluation
  logits (expected or sampled masks), the checkpoint (adapter arrays, the seeding flags and the state of
  every named stream: the same draws were made), and the NumPy checkpoint loaded into a torch method
* before any training: the evaluation logits and the routing statistics of unseeded clusters

Tolerances follow from float64: a forward agrees to 1e-12 of its scale; a gradient, a statistic or a
parameter to 1e-9 of the tensor's largest entry. Two floors, both rounding noise. A gradient entry that
cancels to 0 in the maths (e.g. the router's under L_bal when every token picks every expert: f uniform,
Σ f_e P_e constant) is ε-level noise of the terms that cancel, products of O(1) activations,
probabilities and coefficients ≤ 1: gradients also pass within GRAD_NOISE = 1e-15 (≈ 5 ε) of
max(1, the step's largest gradient entry) (measured: 3e-17). Adam divides such a noise gradient by
√v + eps with √v ≪ eps = 1e-8 and moves the entry by up to lr·noise/eps (1e-9) per step on either engine at
random: parameters also pass within the sum of that bound over the steps taken. Masks and seeding flags
are compared exactly. Measured over the ci examples (max |torch − numpy|): loss 1.3e-15, gradients
1.4e-13, parameters after the steps 2.7e-14, cluster statistics and d 4.7e-11 (d divides by σ ≥ σ_min),
evaluation logits 1.3e-14.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_adapters_base import random_gpt, tiny_tasks  # noqa: E402
from tinyslim import adapters  # noqa: E402
from tinyslim import torch as tst  # noqa: E402
from tinyslim.adapters.slim import ABLATIONS  # noqa: E402
from tinyslim.nn import GPTConfig  # noqa: E402
from tinyslim.optim import Adam  # noqa: E402
from tinyslim.torch import slim as tslim  # noqa: E402

seeds = st.integers(0, 2**32 - 1)
FORWARD_RTOL = 1e-12  # of the tensor's largest entry
RTOL = 1e-9  # gradients, statistics and parameters after steps, of the tensor's largest entry
GRAD_NOISE = 1e-15  # a gradient entry that cancels to 0 is rounding noise: ~5 ε of O(1) terms (or of the largest)
LR, EPS = 1e-2, 1e-8  # Adam's (betas 0.9, 0.999) on both engines


@pytest.fixture(autouse=True)
def _numpy_kernel(monkeypatch):
    monkeypatch.setenv("TINYSLIM_BACKEND", "numpy")  # tiny problems: no thread start-up of the compiled kernel


class TorchAdam(torch.optim.Adam):
    """torch.optim.Adam plus the one name the Method calls at a task boundary: reset_state (a fresh state)."""

    def reset_state(self):
        self.state.clear()


# ---- the two engines side by side ----------------------------------------------------------------------

def close(ours, ref, what: str, rtol: float = RTOL, atol: float = 0.0) -> float:
    """max |torch − numpy| ≤ rtol · max |numpy| + atol; returns that max |torch − numpy|."""
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    ref = np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} on torch, {ref.shape} on NumPy"
    if ref.size == 0:
        return 0.0
    scale, err = float(np.abs(ref).max()), float(np.abs(ours - ref).max())
    assert err <= rtol * scale + atol, f"{what}: max |torch − numpy| = {err:.3g} at scale {scale:.3g}"
    return err


def build(make_numpy, make_torch, config: GPTConfig, seed: int):
    """The NumPy method on a random float64 GPT and the torch method on its transformers twin, same seed;
    every B_e random (B = 0 would leave A and the routers without gradient), the same on both."""
    gpt = random_gpt(config, seed)
    lm = tst.from_gpt(gpt)
    ours, theirs = make_torch(), make_numpy()
    run_seed = seed % 997
    theirs.attach(gpt, run_seed)
    ours.attach(lm, run_seed)
    rng = np.random.default_rng([seed, 99])
    for a, b in zip(theirs.layers(), ours.layers()):
        B = 0.3 * rng.standard_normal(a.lora_B.shape)
        a.lora_B.data[...] = B
        with torch.no_grad():
            b.lora_B.copy_(torch.as_tensor(B))
    assert ours.adapted == theirs.adapted
    return theirs, gpt, ours, lm


def compare_layers(theirs, ours, errors: dict, after_forward: bool) -> None:
    """The hooks' state of every layer: masks (exactly), cluster statistics, seeding; after a training
    forward also the routing diagnostics and the balance loss."""
    for name, a, b in zip(theirs.adapted, theirs.layers(), ours.layers()):
        for key in ("in_mask", "out_mask"):
            ma, mb = getattr(a, key), getattr(b, key)
            assert (ma is None) == (mb is None), f"{name}.{key}: drawn on one engine only"
            if ma is not None:
                np.testing.assert_array_equal(mb.cpu().numpy(), ma, err_msg=f"{name}.{key}")
        assert a.seeded == b.seeded, f"{name}: seeded {a.seeded} on NumPy, {b.seeded} on torch"
        for key in ("cluster_mu", "cluster_sigma"):
            errors["stats"] = max(errors["stats"], close(getattr(b, key), getattr(a, key).data, f"{name}.{key}"))
        if after_forward:
            errors["stats"] = max(errors["stats"], close(b.last_d, a.last_d, f"{name}: d"),
                                  close(b.last_identity_mass, a.last_identity_mass, f"{name}: identity mass"))
            if a.balance_loss is not None:
                close(b.balance_loss, a.balance_loss.item(), f"{name}: L_bal", FORWARD_RTOL)


def lockstep(theirs, ours, tasks, errors: dict) -> None:
    """The runner's loop (tests/test_adapters_base.run_tasks) on both engines, compared after every
    forward, backward, step and after_step."""
    opt_np = Adam(theirs.trainable_parameters(), lr=LR, betas=(0.9, 0.999), eps=EPS)
    opt_t = TorchAdam(ours.trainable_parameters(), lr=LR, betas=(0.9, 0.999), eps=EPS)
    for t, batches in enumerate(tasks):
        theirs.before_task(t, len(batches), opt_np)
        ours.before_task(t, len(batches), opt_t)
        for step, (x, y, mask) in enumerate(batches):
            where = f"task {t} step {step}"
            loss_np, loss_t = theirs.loss(x, y, mask), ours.loss(x, y, mask)
            errors["loss"] = max(errors["loss"], close(loss_t, loss_np.item(), f"{where}: loss", FORWARD_RTOL))
            compare_layers(theirs, ours, errors, after_forward=True)
            opt_np.zero_grad()
            opt_t.zero_grad()
            loss_np.backward()
            loss_t.backward()
            noise = GRAD_NOISE * max([1.0] + [float(np.abs(p.grad).max()) for p in theirs.trainable_parameters()])
            for name, a, b in zip(theirs.adapted, theirs.layers(), ours.layers()):
                assert a.trainable_names == b.trainable_names
                for key in a.trainable_names:
                    g = getattr(b, key).grad
                    assert g is not None, f"{where}: {name}.{key} got no gradient on torch"
                    errors["grad"] = max(errors["grad"], close(g, getattr(a, key).grad, f"{where}: ∂{name}.{key}",
                                                               atol=noise))
            errors["adam_noise"] += LR * noise / EPS  # the most a noise gradient moves an entry this step
            opt_np.step()
            opt_t.step()
            theirs.after_step(step, opt_np)
            ours.after_step(step, opt_t)
            for name, a, b in zip(theirs.adapted, theirs.layers(), ours.layers()):
                for key in a.trainable_names:
                    errors["param"] = max(errors["param"], close(getattr(b, key), getattr(a, key).data,
                                                                 f"{where}: {name}.{key} after the step",
                                                                 atol=errors["adam_noise"]))
            compare_layers(theirs, ours, errors, after_forward=False)
        theirs.after_task(t)
        ours.after_task(t)


def compare_evaluation(theirs, gpt, ours, lm, x, errors: dict) -> None:
    """Evaluation logits and routing_stats (d, identity share per real token) on both engines."""
    with theirs.evaluating():
        ref = gpt(x)[0].data
    with ours.evaluating():
        got = lm(x)[0]
    errors["eval"] = max(errors["eval"], close(got, ref, "evaluation logits"))
    stats_np, stats_t = theirs.routing_stats(x), ours.routing_stats(x)
    assert list(stats_np) == list(stats_t)
    for name in stats_np:
        for key in ("d", "identity_mass"):
            close(stats_t[name][key], stats_np[name][key], f"routing_stats {name} {key}")


def compare_checkpoints(theirs, ours, make_torch, config: GPTConfig, seed: int, x, adam_noise: float) -> None:
    """state_dict on both engines: the same keys, arrays and meta (seeding flags and every stream's state);
    the NumPy checkpoint loaded into a fresh torch method gives the NumPy evaluation logits."""
    arrays_np, meta_np = theirs.state_dict()
    arrays_t, meta_t = ours.state_dict()
    assert meta_t == meta_np
    assert sorted(arrays_t) == sorted(arrays_np)
    for key, value in arrays_np.items():
        close(arrays_t[key], value, f"checkpoint {key}", atol=adam_noise)
    fresh, lm = make_torch(), tst.from_gpt(random_gpt(config, seed))
    fresh.attach(lm, seed % 997)
    fresh.load_state_dict(arrays_np, meta_np)
    with theirs.evaluating() as gpt, fresh.evaluating():
        close(lm(x)[0], gpt(x)[0].data, "evaluation logits of the NumPy checkpoint on torch")


def twin_tasks(seed: int, config: GPTConfig, steps: int, B: int, T: int, over: dict) -> tuple:
    """Two tasks of `steps` batches, and `over` with N_c at most the first batch's real tokens.

    Cluster assignment is an argmin, so an exact tie is broken by rounding, differently on the two engines:
    two identical tokens (the same prefix: same first token and position) seeded as two centres, or one
    token drawn twice (fewer real tokens than N_c), and an EMA step moving one copy by an ulp, would send
    the next token to either. So the rows of a batch start with distinct non-pad ids (every prefix differs),
    and the first batch holds at least N_c real tokens."""
    tasks = tiny_tasks(seed, n_tasks=2, steps=steps, B=B, T=T, config=config)
    rng = np.random.default_rng([seed, 7])
    for batches in tasks:
        for x, _, _ in batches:
            x[:, 0] = rng.choice(np.arange(1, config.vocab_size), size=B, replace=False)  # pad_token_id is 0 or None
    x = tasks[0][0][0]
    real = int(x.size if over.get("pad_token_id") is None else (x != over["pad_token_id"]).sum())
    return tasks, {**over, "n_clusters": min(over.get("n_clusters", adapters.SlimConfig().n_clusters), real)}


def run_case(make_numpy, make_torch, over: dict, config: GPTConfig, seed: int, steps: int, B: int, T: int) -> dict:
    """The whole comparison for one case; make_numpy / make_torch(**over) give the two methods. Returns the
    largest |torch − numpy| of each kind (the tolerances were checked on the way)."""
    errors = dict(loss=0.0, grad=0.0, param=0.0, stats=0.0, eval=0.0, adam_noise=0.0)
    tasks, over = twin_tasks(seed, config, steps, B, T, over)
    theirs, gpt, ours, lm = build(lambda: make_numpy(**over), lambda: make_torch(**over), config, seed)
    x = tasks[0][0][0]
    compare_evaluation(theirs, gpt, ours, lm, x, errors)  # unseeded clusters, initial router
    lockstep(theirs, ours, tasks, errors)
    compare_evaluation(theirs, gpt, ours, lm, x, errors)
    compare_checkpoints(theirs, ours, lambda: make_torch(**over), config, seed, x, errors["adam_noise"])
    return errors


# ---- the cases -------------------------------------------------------------------------------------------

slim_np, slim_torch = partial(adapters.make_method, "slim"), partial(tst.make_method, "slim")
moe_np, moe_torch = partial(adapters.make_method, "moe_lora"), partial(tst.make_method, "moe_lora")


@st.composite
def gpt_configs(draw):
    n_head = draw(st.integers(1, 2))
    return GPTConfig(vocab_size=draw(st.integers(5, 12)), block_size=6, n_layer=draw(st.integers(1, 2)),
                     n_head=n_head, n_embd=n_head * draw(st.integers(3, 4)), bias=True, dtype="float64")


@st.composite
def slim_overrides(draw):
    """Every SlimConfig field drawn (the named setting of a test then fixes some)."""
    E_L, E_I = draw(st.integers(1, 3)), draw(st.integers(0, 2))
    return dict(n_lora_experts=E_L, n_identity_experts=E_I, top_k=draw(st.integers(1, E_L + E_I)),
                r=draw(st.integers(1, 3)), lora_alpha=draw(st.sampled_from([2, 8])),
                target_modules=draw(st.sampled_from([["mlp.c_fc", "mlp.c_proj"], ["attn.c_attn"], "all-linear"])),
                router=draw(st.sampled_from(["linear", "linear", "residual_mlp"])),
                router_init_std=draw(st.sampled_from([0.02, 0.5])),
                yield_mode=draw(st.sampled_from(["additive", "additive", "multiplicative"])),
                gamma=draw(st.sampled_from([0.0, 1.0, 3.0])), logit_norm=draw(st.sampled_from(["none", "layernorm"])),
                n_clusters=draw(st.integers(1, 3)), cluster_momentum=draw(st.sampled_from([0.0, 0.05, 0.5])),
                sigma_floor=draw(st.sampled_from([1e-3, 0.5])),
                cluster_init=draw(st.sampled_from(["first_batch", "random"])),
                drop_p=draw(st.sampled_from([0.0, 0.3, 0.6])), mask_rescale=draw(st.booleans()),
                mask_mode=draw(st.sampled_from(["forward", "forward", "update"])),
                mask_split=draw(st.sampled_from(["both", "rows", "columns"])),
                eval_masks=draw(st.sampled_from(["expected", "sampled"])),
                l1_coef=draw(st.sampled_from([0.0, 1e-3, 0.3])), balance_coef=draw(st.sampled_from([0.0, 0.01, 1.0])),
                pad_token_id=draw(st.sampled_from([None, 0])))


# named settings: each test example keeps these fields whatever hypothesis drew for the others
SLIM_SETTINGS = {
    "defaults": None,  # SlimConfig's own defaults (docs/methods.md §2.8), only the sizes drawn
    "update-masks": dict(mask_mode="update", drop_p=0.5, n_lora_experts=2, top_k=2),
    "rows": dict(mask_split="rows", drop_p=0.6, mask_rescale=True),
    "columns-sampled": dict(mask_split="columns", drop_p=0.3, eval_masks="sampled"),
    "variants": dict(router="residual_mlp", yield_mode="multiplicative", logit_norm="layernorm",
                     cluster_init="random", balance_coef=1.0, pad_token_id=0, n_identity_experts=1),
}
SIZES = ("n_lora_experts", "n_identity_experts", "top_k", "r", "target_modules", "pad_token_id")


def setting_overrides(setting: str, drawn: dict) -> dict:
    fixed = SLIM_SETTINGS[setting]
    if fixed is None:
        return {k: drawn[k] for k in SIZES}
    over = {**drawn, **fixed}
    over["top_k"] = min(over["top_k"], over["n_lora_experts"] + over["n_identity_experts"])
    return over


@pytest.mark.parametrize("setting", list(SLIM_SETTINGS))
@settings(max_examples=3)
@given(config=gpt_configs(), drawn=slim_overrides(), steps=st.integers(2, 3), B=st.integers(1, 3),
       T=st.integers(3, 5), seed=seeds)
def test_slim_steps_gradients_and_hooks_match_numpy(setting, config, drawn, steps, B, T, seed):
    over = setting_overrides(setting, drawn)
    run_case(slim_np, slim_torch, over, config, seed, steps, B, T)


@settings(max_examples=4)
@given(config=gpt_configs(), E=st.integers(1, 4), K=st.integers(1, 2), r=st.integers(1, 3),
       balance=st.sampled_from([0.0, 0.5]), pad=st.sampled_from([None, 0]), steps=st.integers(2, 3),
       B=st.integers(1, 3), T=st.integers(3, 5), seed=seeds)
def test_moe_lora_steps_gradients_and_hooks_match_numpy(config, E, K, r, balance, pad, steps, B, T, seed):
    over = dict(n_lora_experts=E, top_k=min(K, E), r=r, balance_coef=balance, pad_token_id=pad,
                target_modules="all-linear")
    run_case(moe_np, moe_torch, over, config, seed, steps, B, T)


@pytest.mark.parametrize("row", list(ABLATIONS))
@settings(max_examples=1)
@given(config=gpt_configs(), seed=seeds)
def test_every_ablation_row_matches_numpy(row, config, seed):
    over = dict(n_lora_experts=2, n_identity_experts=1, r=2, gamma=2.0, drop_p=0.5, l1_coef=0.1, pad_token_id=0)
    made = tslim.make_slim_ablation(row, **over)
    reference = adapters.make_slim_ablation(row, **over)
    assert (made.name, made.config) == (reference.name, reference.config) and isinstance(made, tst.TorchMethod)
    run_case(partial(adapters.make_slim_ablation, row), partial(tslim.make_slim_ablation, row), over, config, seed,
             2, 2, 4)


def test_registry_and_classes():
    slim, moe = tst.make_method("slim"), tst.make_method("moe_lora", n_lora_experts=3)
    assert isinstance(slim, tslim.SLIM) and isinstance(slim, adapters.SLIM) and isinstance(slim, tst.TorchMethod)
    assert isinstance(moe, tslim.MoELoRA) and isinstance(moe, adapters.MoELoRA)
    assert moe.config == adapters.MoeLoraConfig(n_lora_experts=3) and slim.config == adapters.SlimConfig()
    assert (tst.METHODS["slim"], tst.METHODS["moe_lora"]) == (tslim.SLIM, tslim.MoELoRA)
    with pytest.raises(ValueError, match="unknown SLIM ablation"):
        tslim.make_slim_ablation("slim-no-such-row")


def test_identity_only_routing_is_the_base_bit_for_bit_and_slim_refuses_to_merge():
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, bias=True, dtype="float64")
    _, gpt, ours, lm = build(partial(slim_np, target_modules="all-linear"),
                             partial(slim_torch, target_modules="all-linear"), config, 4)
    x = np.random.default_rng(4).integers(1, 11, (2, 5))
    with tst.disable_adapters(lm):
        base = lm(x)[0]
    for layer in ours.layers():
        layer.logit_bias = np.r_[np.zeros(layer.E_L), np.full(layer.E_I, 1e30)]  # every pick an identity expert
    for train in (True, False):
        lm.train(train)
        with torch.no_grad():
            assert torch.equal(lm(x)[0], base)
        assert all(np.all(layer.last_identity_mass == 1) for layer in ours.layers())
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        tst.merge(lm)
