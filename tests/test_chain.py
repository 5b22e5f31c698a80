"""COLA — Chain of LoRA (tinyslim/adapters/chain.py), docs/methods.md §6 and §7.6.

* against an independent torch COLA loop (tests/torch_adapters.py) on hypothesis-drawn tiny GPTs and
  chains (length, knots, rank step-down, α mode, LR schedule, optimizer reset): the learning rate of
  every step, the merged weights W and the last link's factors after training (relative error ≤ 1e-8)
* the §6.8 invariants: m = 1 is plain LoRA bit for bit (and never touches `reinit`); a knot keeps the
  function, zeroes B and the Adam state and draws a fresh A; W is bit-identical between knots and moves
  by s_j B_j A_j at one; the global LR schedule does not depend on m; rank(W_final − W0) ≤ Σ r_j and
  > r_1; the merged model equals the unmerged last link; zero-padded ranks stay zero
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from test_adapters_base import TINY, random_gpt, relative_error, run_tasks, tiny_tasks
from tinyslim.adapters import ColaConfig, adapted_layers, adapter_state_dict, make_method, merge_and_unload, stream
from tinyslim.nn import GPTConfig
from tinyslim.optim import Adam

seeds = st.integers(0, 2**32 - 1)


@st.composite
def cola_cases(draw):
    # n_embd ≥ 3: a LayerNorm over 2 channels outputs ±1 whatever its input, so its input gradient is pure
    # rounding noise, which Adam (≈ lr·sign(g)) turns into O(lr) differences over a trajectory
    n_head = draw(st.integers(1, 2))
    config = GPTConfig(vocab_size=draw(st.integers(5, 12)), block_size=5, n_layer=draw(st.integers(1, 2)),
                       n_head=n_head, n_embd=n_head * draw(st.integers(3, 4)), bias=draw(st.booleans()),
                       dtype="float64")
    m = draw(st.integers(1, 3))
    T = draw(st.integers(m + 1, 7))
    knots = None
    if m > 1 and draw(st.booleans()):
        knots = sorted(draw(st.lists(st.integers(1, T - 1), min_size=m - 1, max_size=m - 1, unique=True)))
    ranks = None
    if m > 1 and draw(st.booleans()):
        ranks = sorted(draw(st.lists(st.integers(1, 3), min_size=m, max_size=m)), reverse=True)
    reset = True if ranks is not None else draw(st.booleans())
    cola = dict(chain_len=m, knots=knots, ranks=ranks, r=draw(st.integers(1, 3)),
                lora_alpha=draw(st.sampled_from([2, 8])), use_rslora=draw(st.booleans()),
                alpha_mode=draw(st.sampled_from(["constant_scale", "fixed"])),
                lr_schedule=draw(st.sampled_from(["global", "restart"])), reset_optimizer_at_knot=reset,
                target_modules=draw(st.sampled_from([["attn.c_attn"], ["c_proj"], "all-linear"])), lr=2e-2)
    return config, cola, T, draw(seeds)


@pytest.mark.torch
@given(case=cola_cases())
def test_cola_matches_an_independent_torch_chain(case):
    from torch_adapters import add_lora, run_cola, twin_gpt

    config, cola, T, seed = case
    rng = np.random.default_rng(seed)
    batches = tiny_tasks(seed, n_tasks=1, steps=T, B=2, T=4, config=config)[0]
    model = random_gpt(config, seed)
    base_state = model.state_dict()
    method = make_method("cola", **cola)
    method.attach(model, seed=seed % 997)
    state = adapter_state_dict(model)
    cfg = method.config
    ranks, scales = cfg.link_ranks(), cfg.link_scales()

    after = []  # the lr after_step(t) sets is the one step t + 1 uses; step 0 uses lr0
    run_tasks(method, [batches], rng=rng, lr=123.0,  # COLA owns the learning rate: the runner's must not matter
              on_step=lambda task, step, opt: after.append(opt.lr))
    twin = twin_gpt(config, base_state)
    layers = add_lora(twin, {n: (state[f"{n}.lora_A"][:ranks[0]], state[f"{n}.lora_B"][:, :ranks[0]])
                             for n in method.adapted}, scales[0])
    ref_lrs = run_cola(twin, layers, batches, T=T, knots=cfg.knot_steps(T), ranks=ranks, scales=scales, lr0=method.lr0,
                       restart=cfg.lr_schedule == "restart", reinit_rng=stream(seed % 997, "reinit"),
                       reset_at_knot=cfg.reset_optimizer_at_knot)
    np.testing.assert_allclose([cfg.lr] + after[:-1], ref_lrs, rtol=1e-14, atol=0)

    r_last = ranks[method.j]
    for n, layer in zip(method.adapted, method.layers()):
        ref = layers[n]
        assert layer.scale == ref.scale
        err = relative_error(layer.base_layer.weight.data, ref.base.weight.detach().numpy())
        assert err <= 1e-8, f"{n}: W relative error {err:.2e}"
        for ours, theirs in ((layer.lora_A.data[:r_last], ref.A), (layer.lora_B.data[:, :r_last], ref.B)):
            err = relative_error(ours, theirs.detach().numpy())
            assert err <= 1e-8 or np.abs(ours - theirs.detach().numpy()).max() <= 1e-14, f"{n}: factor error {err:.2e}"
        assert not np.any(layer.lora_A.data[r_last:]) and not np.any(layer.lora_B.data[:, r_last:])


def test_chain_of_one_link_is_plain_lora_bit_for_bit():
    """§6.8.1 / §7.6: the (A, B) trajectory, the logits and the merged W_final, under the same seed and the
    same global linear schedule (set by hand for plain LoRA); the `reinit` stream is never created."""
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)  # float32: bit-identity
    T, lr0 = 6, 2e-2
    batches = tiny_tasks(3, n_tasks=1, steps=T, config=config)[0]
    cola = make_method("cola", chain_len=1, r=2, lora_alpha=4, lr=lr0)
    lora = make_method("lora", r=2, lora_alpha=4, target_modules=["attn.c_attn"])
    cola.attach(random_gpt(config, 7), seed=5)
    lora.attach(random_gpt(config, 7), seed=5)
    trajectories = []
    for method, owns_lr in ((cola, True), (lora, False)):
        opt = Adam(method.trainable_parameters(), lr=lr0)
        method.before_task(0, T, opt)
        traj = []
        for t, (x, y, mask) in enumerate(batches):
            if not owns_lr:
                opt.lr = lr0 * (1 - t / T)
            loss = method.loss(x, y, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_step(t, opt)
            traj.append(adapter_state_dict(method.model))
        trajectories.append(traj)
    for a, b in zip(*trajectories):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert "reinit" not in cola.streams.used()
    x = batches[0][0]
    with cola.evaluating(), lora.evaluating():
        np.testing.assert_array_equal(cola.model(x)[0].data, lora.model(x)[0].data)
    dense_cola, dense_lora = merge_and_unload(cola.model), merge_and_unload(lora.model)
    for k, v in dense_cola.state_dict().items():
        np.testing.assert_array_equal(v, dense_lora.state_dict()[k], err_msg=k)


def test_knots_keep_the_function_reset_the_link_and_move_W_by_the_link():
    """§6.8.2–6.8.4 on a 3-link chain over 9 steps (knots at 3 and 6)."""
    T, seed = 9, 4
    method = make_method("cola", chain_len=3, r=2, lr=2e-2, target_modules="all-linear")
    model = random_gpt(TINY, 1)
    method.attach(model, seed=seed)
    reinit = stream(seed, "reinit")  # the draws a knot must make, layer after layer
    opt = Adam(method.trainable_parameters(), lr=1.0)
    batches = tiny_tasks(0, n_tasks=1, steps=T)[0]
    method.before_task(0, T, opt)
    assert method.knots == [3, 6]
    x = batches[0][0]
    W_prev = {n: l.base_layer.weight.data.copy() for n, l in adapted_layers(model)}
    for t, (xb, yb, mb) in enumerate(batches):
        loss = method.loss(xb, yb, mb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        knot = t + 1 in method.knots
        if knot:
            with method.evaluating():
                before = model(x)[0].data.copy()
            deltas = {n: l.scale * (l.lora_B.data @ l.lora_A.data) for n, l in adapted_layers(model)}
        method.after_step(t, opt)
        for n, layer in adapted_layers(model):
            W = layer.base_layer.weight.data
            if knot:
                np.testing.assert_allclose(W, W_prev[n] + deltas[n], rtol=1e-12, atol=1e-14)
                assert not np.any(layer.lora_B.data)
                bound = 1 / math.sqrt(layer.in_features)
                np.testing.assert_array_equal(layer.lora_A.data, reinit.uniform(-bound, bound, (2, layer.in_features)))
            else:
                np.testing.assert_array_equal(W, W_prev[n])  # bit-identical between knots
            W_prev[n] = W.copy()
        if knot:
            assert opt.state == {} and opt.step_count == 0
            with method.evaluating():
                np.testing.assert_allclose(model(x)[0].data, before, rtol=1e-10, atol=1e-12)
    assert [h[1] for h in method.history] == [3, 6]


def test_global_schedule_is_the_same_function_of_t_for_every_chain_length():
    T = 12
    schedules = []
    for m in (1, 2, 3, 4):
        method = make_method("cola", chain_len=m, r=1, lr=0.5)
        method.attach(random_gpt(TINY, 0), seed=0)
        opt = Adam(method.trainable_parameters(), lr=7.0)
        method.before_task(0, T, opt)
        lrs = []
        for t in range(T):
            lrs.append(opt.lr)
            method.after_step(t, opt)
        schedules.append(lrs)
    for lrs in schedules:
        assert lrs == [0.5 * (1 - t / T) for t in range(T)]
    restart = make_method("cola", chain_len=2, r=1, lr=0.5, lr_schedule="restart")
    restart.attach(random_gpt(TINY, 0), seed=0)
    opt = Adam(restart.trainable_parameters())
    restart.before_task(0, 8, opt)
    lrs = []
    for t in range(8):
        lrs.append(opt.lr)
        restart.after_step(t, opt)
    np.testing.assert_allclose(lrs, [0.5, 0.375, 0.25, 0.125] * 2)
    runner_lr = make_method("cola", chain_len=2, r=1)  # lr None: lr0 is the runner's learning rate
    runner_lr.attach(random_gpt(TINY, 0), seed=0)
    opt = Adam(runner_lr.trainable_parameters(), lr=0.3)
    runner_lr.before_task(0, 4, opt)
    runner_lr.after_step(0, opt)
    assert runner_lr.lr0 == 0.3 and opt.lr == 0.3 * 0.75


def test_rank_of_the_chain_update_exceeds_one_link_and_merged_equals_unmerged():
    r, m = 2, 3
    method = make_method("cola", chain_len=m, r=r, lr=5e-2)
    model = random_gpt(TINY, 2)
    method.attach(model, seed=1)
    W0 = dict(method.W0)
    tasks = tiny_tasks(5, n_tasks=1, steps=12)
    run_tasks(method, tasks)
    x = tasks[0][0][0]
    with method.evaluating():
        unmerged = model(x)[0].data.copy()
    finals = method.merged_weights()
    for n, W in finals.items():
        s = np.linalg.svd(W - W0[n], compute_uv=False)
        rank = int(np.sum(s > 1e-9 * s[0]))
        assert r < rank <= m * r, f"{n}: numerical rank {rank} (singular values {s})"
    dense = merge_and_unload(model)
    dense.eval()
    np.testing.assert_allclose(dense(x)[0].data, unmerged, rtol=1e-10, atol=1e-12)
    for n, W in finals.items():
        np.testing.assert_array_equal(dense.get_submodule(n).weight.data, W)


@pytest.mark.parametrize("alpha_mode", ["constant_scale", "fixed"])
def test_rank_step_down_pads_with_zeros_that_stay_zero(alpha_mode):
    method = make_method("cola", chain_len=2, ranks=[3, 1], lora_alpha=6, alpha_mode=alpha_mode, lr=5e-2,
                         knots=[4])
    model = random_gpt(TINY, 3)
    method.attach(model, seed=2)
    run_tasks(method, tiny_tasks(1, n_tasks=1, steps=8))
    for layer in method.layers():
        assert layer.lora_A.shape == (3, TINY.n_embd)
        assert np.any(layer.lora_A.data[:1]) and np.any(layer.lora_B.data[:, :1])
        assert not np.any(layer.lora_A.data[1:]) and not np.any(layer.lora_B.data[:, 1:])
        assert layer.scale == (2.0 if alpha_mode == "constant_scale" else 6.0)  # s_1 = 6/3; fixed α: 6/1


def test_a_second_task_ties_the_last_link_and_starts_a_new_chain():
    method = make_method("cola", chain_len=2, r=2, lr=2e-2)
    model = random_gpt(TINY, 0)
    method.attach(model, seed=0)
    tasks = tiny_tasks(2, n_tasks=1, steps=4)
    run_tasks(method, tasks)
    x = tasks[0][0][0]
    with method.evaluating():
        before = model(x)[0].data.copy()
    expected = method.merged_weights()
    opt = Adam(method.trainable_parameters())
    method.before_task(1, 4, opt)
    assert method.j == 0 and method.t == 0 and [h[:2] for h in method.history] == [(0, 2), (0, 4)]
    for n, layer in zip(method.adapted, method.layers()):
        np.testing.assert_array_equal(layer.base_layer.weight.data, expected[n])
        assert not np.any(layer.lora_B.data)
    with method.evaluating():
        np.testing.assert_allclose(model(x)[0].data, before, rtol=1e-10, atol=1e-12)


def test_config_errors():
    with pytest.raises(ValueError, match="ranks must hold chain_len = 2"):
        ColaConfig(chain_len=2, ranks=[4])
    with pytest.raises(ValueError, match="the first the largest"):
        ColaConfig(chain_len=2, ranks=[2, 4])
    with pytest.raises(ValueError, match="reset_optimizer_at_knot"):
        ColaConfig(chain_len=2, ranks=[4, 2], reset_optimizer_at_knot=False)
    with pytest.raises(ValueError, match="knots must be chain_len − 1 = 2"):
        ColaConfig(chain_len=3, knots=[5])
    with pytest.raises(ValueError, match=r"distinct steps in \(0, T = 2\)"):
        ColaConfig(chain_len=3).knot_steps(2)
    method = make_method("cola")
    assert method.config.r == 4 and method.config.lora_alpha == 8 and method.config.chain_len == 3
