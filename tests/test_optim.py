"""Optimizers step for step against torch.optim (float64), optimizer state, clipping, schedules."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyslim import optim
from tinyslim.autograd import Tensor
from tinyslim.nn import GPT, GPTConfig, Parameter

SHAPES = [(3, 4), (5,), (2, 1, 3), ()]


def make_params(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) for s in shapes]


def grads_for(seed, shapes, steps):
    """Per step, one gradient per parameter; None now and then (a parameter that got no gradient)."""
    rng = np.random.default_rng([seed, 1])
    out = []
    for t in range(steps):
        out.append([None if (t % 7 == 3 and i == 1) else rng.normal(size=s) for i, s in enumerate(shapes)])
    return out


def run_both(make_ours, make_torch, groups_of, seed, steps=20, shapes=SHAPES, check_every_step=True):
    """Run a tinyslim optimizer and a torch one on the same parameters and gradients; compare each step."""
    import torch

    init = make_params(seed, shapes)
    ours = [Parameter(a.copy()) for a in init]
    ref = [torch.tensor(a, requires_grad=True) for a in init]
    opt, ref_opt = make_ours(groups_of(ours)), make_torch(groups_of(ref))
    for t, grads in enumerate(grads_for(seed, shapes, steps)):
        for p, q, g in zip(ours, ref, grads):
            p.grad = None if g is None else g.copy()
            q.grad = None if g is None else torch.tensor(g)
        opt.step()
        ref_opt.step()
        if check_every_step or t == steps - 1:
            for i, (p, q) in enumerate(zip(ours, ref)):
                np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-12, atol=1e-15,
                                           err_msg=f"parameter {i} after step {t + 1}")
    return opt, ours


def one_group(params):
    return params


def two_groups(params):
    # different weight decay and lr per group; a group's missing keys take the optimizer defaults
    return [{"params": params[:2], "weight_decay": 0.1, "lr": 0.02}, {"params": params[2:], "weight_decay": 0.0}]


@pytest.mark.torch
@given(lr=st.sampled_from([1e-3, 3e-2, 0.5]), b1=st.sampled_from([0.0, 0.9, 0.95]),
       b2=st.sampled_from([0.9, 0.999]), eps=st.sampled_from([1e-8, 1e-3]),
       wd=st.sampled_from([0.0, 0.01, 0.3]), seed=st.integers(0, 2**32 - 1))
def test_adamw_matches_torch_step_for_step(lr, b1, b2, eps, wd, seed):
    import torch

    run_both(lambda ps: optim.AdamW(ps, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd),
             lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd),
             one_group, seed)


@pytest.mark.torch
def test_adamw_param_groups_match_torch():
    import torch

    opt, _ = run_both(lambda ps: optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
                      lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05), two_groups, seed=4)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [0.02, 1e-2]


@pytest.mark.torch
@pytest.mark.parametrize("lr", [1e-3, 0.1])
def test_adam_matches_torch_adam(lr):
    import torch

    run_both(lambda ps: optim.Adam(ps, lr=lr), lambda ps: torch.optim.Adam(ps, lr=lr), one_group, seed=5)


@pytest.mark.torch
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_sgd_matches_torch(momentum, wd):
    import torch

    run_both(lambda ps: optim.SGD(ps, lr=0.05, momentum=momentum, weight_decay=wd),
             lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum, weight_decay=wd), one_group, seed=6)


@pytest.mark.torch
def test_sgd_param_groups_match_torch():
    import torch

    run_both(lambda ps: optim.SGD(ps, lr=0.05, momentum=0.5), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5),
             two_groups, seed=7)


# ---- optimizer state ---------------------------------------------------------------------------


def steps(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.copy()
        opt.step()


def test_updates_are_in_place():
    p = Parameter(np.ones(3))
    array = p.data
    p.grad = np.ones(3)
    optim.AdamW([p]).step()
    assert p.data is array and not np.array_equal(array, np.ones(3))


def test_reset_state_zeroes_moments_and_step_count():
    params = [Parameter(a) for a in make_params(0)]
    opt = optim.AdamW(params, lr=1e-2)
    steps(opt, params, grads_for(0, SHAPES, 5))
    assert opt.step_count == 5 and opt.state
    opt.reset_state()
    assert opt.step_count == 0 and opt.state == {} and opt.state_dict() == {"step": 0}
    # the next step is a first step again: it equals a fresh optimizer's first step from the same weights
    fresh_params = [Parameter(p.data.copy()) for p in params]
    fresh = optim.AdamW(fresh_params, lr=1e-2)
    grads = grads_for(1, SHAPES, 1)
    steps(opt, params, grads)
    steps(fresh, fresh_params, grads)
    for p, q in zip(params, fresh_params):
        assert np.array_equal(p.data, q.data)
    assert opt.state[id(params[0])]["step"] == 1


@pytest.mark.parametrize("make", [lambda ps: optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
                                  lambda ps: optim.SGD(ps, lr=1e-2, momentum=0.9)], ids=["AdamW", "SGD"])
def test_state_dict_round_trip_continues_identically(make):
    params = [Parameter(a) for a in make_params(2)]
    opt = make(params)
    grads = grads_for(2, SHAPES, 10)
    steps(opt, params, grads[:5])
    state = opt.state_dict()
    saved = {k: np.array(v) for k, v in state.items()}
    clone_params = [Parameter(p.data.copy()) for p in params]
    clone = make(clone_params)
    clone.load_state_dict(state)
    steps(opt, params, grads[5:])
    steps(clone, clone_params, grads[5:])
    for p, q in zip(params, clone_params):
        assert np.array_equal(p.data, q.data)
    assert clone.step_count == opt.step_count == 10
    for k, v in state.items():  # a saved state is a copy: later steps do not change it
        assert np.array_equal(v, saved[k]), k


def test_load_state_dict_rejects_mismatched_state():
    params = [Parameter(a) for a in make_params(3)]
    opt = optim.AdamW(params)
    steps(opt, params, grads_for(3, SHAPES, 1))
    state = opt.state_dict()
    other = optim.AdamW([Parameter(np.zeros((4, 3)))])
    with pytest.raises(ValueError, match=r"0\.exp_avg has shape \(3, 4\), parameter is \(4, 3\)"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="parameter 1 but there are 1"):
        optim.AdamW([Parameter(np.zeros((3, 4)))]).load_state_dict(state)


# ---- gradient clipping -------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clips / leaves alone
def test_clip_grad_norm_matches_torch(max_norm):
    import torch

    grads = [g for g in grads_for(8, SHAPES, 1)[0] if g is not None]
    ours = [Parameter(np.zeros(g.shape)) for g in grads]
    ref = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for p, q, g in zip(ours, ref, grads):
        p.grad, q.grad = g.copy(), torch.tensor(g)
    frozen = Parameter(np.zeros(2))  # no gradient: ignored, as in torch
    norm = optim.clip_grad_norm_(ours + [frozen], max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    np.testing.assert_allclose(norm, ref_norm.item(), rtol=1e-12)
    for p, q in zip(ours, ref):
        np.testing.assert_allclose(p.grad, q.grad.numpy(), rtol=1e-12, atol=0)
    if max_norm > norm:
        assert all(np.array_equal(p.grad, g) for p, g in zip(ours, grads))
    else:
        total = np.sqrt(sum(np.sum(p.grad**2) for p in ours))
        np.testing.assert_allclose(total, max_norm, rtol=1e-5)  # torch's 1e-6 guard in the coefficient


def test_clip_grad_norm_accepts_a_generator_and_keeps_dtype():
    params = [Parameter(np.zeros(3, dtype=np.float32)) for _ in range(2)]
    for p in params:
        p.grad = np.full(3, 10.0, dtype=np.float32)
    norm = optim.clip_grad_norm_((p for p in params), 1.0)  # a one-shot iterable, as torch accepts
    assert norm == pytest.approx(np.sqrt(600.0))
    assert all(p.grad.dtype == np.float32 for p in params)
    assert np.sqrt(sum(float(np.sum(p.grad.astype(np.float64) ** 2)) for p in params)) == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_with_no_gradients_returns_zero():
    assert optim.clip_grad_norm_([Parameter(np.zeros(2))], 1.0) == 0.0


# ---- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [optim.cosine_schedule, optim.linear_schedule])
def test_schedule_endpoints_and_monotone_decay(schedule):
    total, warmup, lr_max, lr_min = 100, 10, 1e-3, 1e-5
    lrs = [schedule(t, total, lr_max, warmup, lr_min) for t in range(total + 5)]
    assert lrs[0] == pytest.approx(lr_max / warmup)  # warm-up starts above 0 (step 0 still learns)
    assert lrs[warmup - 1] == pytest.approx(lr_max) and lrs[warmup] == pytest.approx(lr_max)
    assert all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[warmup:total], lrs[warmup + 1:total + 1]))  # then decays
    assert lrs[total] == pytest.approx(lr_min) and all(lr == lr_min for lr in lrs[total:])
    middle = schedule(warmup + (total - warmup) // 2, total, lr_max, warmup, lr_min)
    assert middle == pytest.approx((lr_max + lr_min) / 2)  # both are symmetric about the middle


@pytest.mark.parametrize("schedule", [optim.cosine_schedule, optim.linear_schedule])
def test_schedule_without_warmup_starts_at_lr_max(schedule):
    assert schedule(0, 50, 0.1) == pytest.approx(0.1)
    assert schedule(50, 50, 0.1) == 0.0


def test_lr_scheduler_drives_every_group():
    params = [Parameter(np.zeros(2)), Parameter(np.zeros(2))]
    opt = optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    sched = optim.LRScheduler(opt, "cosine", total_steps=10, warmup_steps=2)
    assert opt.lr == pytest.approx(0.05)
    seen = []
    for _ in range(10):
        sched.step()
        seen.append(opt.lr)
        assert all(g["lr"] == opt.lr for g in opt.param_groups)
    assert seen[0] == pytest.approx(0.1) and seen[-1] == 0.0
    with pytest.raises(ValueError, match="unknown schedule 'exp'"):
        optim.LRScheduler(opt, "exp", total_steps=10)


# ---- what an optimizer refuses ----------------------------------------------------------------


@pytest.mark.parametrize("make", [optim.SGD, optim.AdamW, optim.Adam], ids=["SGD", "AdamW", "Adam"])
def test_optimizer_refuses_empty_and_frozen_parameters(make):
    with pytest.raises(ValueError, match="empty parameter list"):
        make([])
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)).freeze()
    with pytest.raises(ValueError, match="empty parameter list"):
        make(model.parameters(trainable_only=True))
    with pytest.raises(ValueError, match="frozen"):
        make(model.parameters())
    with pytest.raises(ValueError, match="frozen"):
        make([Tensor(np.zeros(2))])


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(eps=-1e-8), dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1))])
def test_adamw_rejects_invalid_hyper_parameters(kwargs):
    with pytest.raises(ValueError, match="invalid hyper-parameters"):
        optim.AdamW([Parameter(np.zeros(2))], **kwargs)


def test_zero_grad_clears_every_group():
    params = [Parameter(np.zeros(2)), Parameter(np.zeros(2))]
    for p in params:
        p.grad = np.ones(2)
    optim.AdamW([{"params": params[:1]}, {"params": params[1:]}]).zero_grad()
    assert all(p.grad is None for p in params)
