"""I-LoRA (tinyslim/adapters/ilora.py), ER and Seq-LoRA (baselines.py), the reservoir (replay.py);
docs/methods.md §3, §7.1, §7.2.

* against an independent torch loop (tests/torch_adapters.py) on hypothesis-drawn tiny GPTs, methods
  (Seq-LoRA, ER, I-LoRA) and I-LoRA variants, over 2–3 tasks: the loss of every step and the fast and
  slow factors after training (relative error ≤ 1e-8)
* the §3.10 invariants, numbered as there: λ = 1 keeps slow fixed (1) or makes it the running mean with
  warm-up (2); λ = 0 gives slow = fast (3); slow = fast ⇒ L_cons = 0 with zero gradient (4); γ = 0 is ER
  and, without a buffer, Seq-LoRA, bit for bit (5); task 0 is CE alone with no replay (6); the
  reservoir (7); slow parameters outside the optimizer (8); Adam reset, global counter (9); finite
  differences of L_cons (10); one-sided consistency (11)
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from test_adapters_base import TINY, random_batch, random_gpt, relative_error, run_tasks, tiny_tasks
from tinyslim.adapters import ILoRA, Reservoir, adapter_state_dict, make_method, merge, stream, unmerge
from tinyslim.adapters.ilora import consistency_loss
from tinyslim.autograd import Tensor, no_grad
from tinyslim.nn import GPTConfig
from tinyslim.optim import Adam

seeds = st.integers(0, 2**32 - 1)
F32 = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)  # float32, for bit-identity


def factors(method, names=("lora_A", "lora_B", "lora_A_slow", "lora_B_slow")):
    return {f"{n}.{k}": getattr(layer, k).data.copy() for n, layer in zip(method.adapted, method.layers())
            for k in names if hasattr(layer, k)}


# ---- against torch -------------------------------------------------------------------------------


@st.composite
def continual_cases(draw):
    # n_embd ≥ 3: a LayerNorm over 2 channels outputs ±1 whatever its input, so its input gradient is pure
    # rounding noise, which Adam (≈ lr·sign(g)) turns into O(lr) differences over a trajectory
    n_head = draw(st.integers(1, 2))
    config = GPTConfig(vocab_size=draw(st.integers(5, 12)), block_size=5, n_layer=draw(st.integers(1, 2)),
                       n_head=n_head, n_embd=n_head * draw(st.integers(3, 4)), bias=draw(st.booleans()),
                       dtype="float64")
    kind = draw(st.sampled_from(["lora", "er", "ilora", "ilora", "ilora"]))
    over = dict(r=draw(st.integers(1, 3)), lora_alpha=draw(st.sampled_from([2, 8])), use_rslora=draw(st.booleans()),
                lora_dropout=draw(st.sampled_from([0.0, 0.0, 0.25])),
                target_modules=draw(st.sampled_from([["attn.c_attn", "attn.c_proj"], ["mlp.c_fc"], "all-linear"])))
    if kind != "lora":
        over.update(buffer_size=draw(st.sampled_from([2, 5, 50])),
                    replay_batch_size=draw(st.sampled_from([None, 1, 3])),
                    replay_order=draw(st.sampled_from(["sample_then_offer", "offer_then_sample"])))
    if kind == "ilora":
        over.update(gamma=draw(st.sampled_from([0.0, 0.7, 3.0])),
                    ema_lambda=draw(st.sampled_from([0.0, 0.25, 0.9, 1.0])),
                    ema_warmup=draw(st.booleans()), ema_counter=draw(st.sampled_from(["global", "per_task"])),
                    consistency=draw(st.sampled_from(["symmetric", "one_sided"])),
                    consistency_layers=draw(st.sampled_from(["all_blocks", "last_block"])),
                    slow_mode=draw(st.sampled_from(["interpolate", "interpolate", "frozen_base"])),
                    reset_slow_at_task_end=draw(st.sampled_from([False, False, True])),
                    pad_token_id=draw(st.sampled_from([None, 0, 1])))
    n_tasks, steps = draw(st.integers(2, 3)), draw(st.integers(1, 3))
    B, T = draw(st.integers(1, 3)), draw(st.integers(2, 5))
    return config, kind, over, (n_tasks, steps, B, T), draw(seeds)


@pytest.mark.torch
@given(case=continual_cases())
def test_seq_lora_er_and_ilora_match_an_independent_torch_loop(case):
    from torch_adapters import TwinReservoir, add_lora, run_ilora, twin_gpt

    config, kind, over, (n_tasks, steps, B, T), seed = case
    tasks = tiny_tasks(seed, n_tasks=n_tasks, steps=steps, B=B, T=T, config=config)
    model = random_gpt(config, seed)
    base_state = model.state_dict()
    method = make_method(kind, **over)
    run_seed = seed % 991
    method.attach(model, seed=run_seed)
    state = adapter_state_dict(model)
    ours = []
    losses, _ = run_tasks(method, tasks, lr=2e-2, on_step=lambda k, step, opt: ours.append(factors(method)))

    cfg = method.config
    dropout_rng = stream(run_seed, "dropout")
    twin = twin_gpt(config, base_state)
    layers = add_lora(twin, {n: (state[f"{n}.lora_A"], state[f"{n}.lora_B"]) for n in method.adapted}, cfg.scale,
                      cfg.lora_dropout, dropout_rng)
    ilora = kind == "ilora"
    buffer = TwinReservoir(cfg.buffer_size, stream(run_seed, "reservoir")) if kind != "lora" else None
    ref_losses, ref_snapshots = run_ilora(
        twin, layers, tasks, lr=2e-2, gamma=cfg.gamma if ilora else 0.0, ema_lambda=getattr(cfg, "ema_lambda", 1.0),
        ema_warmup=getattr(cfg, "ema_warmup", False), per_task_counter=ilora and cfg.ema_counter == "per_task",
        one_sided=ilora and cfg.consistency == "one_sided", last_block=ilora and cfg.consistency_layers == "last_block",
        buffer=buffer, replay_batch_size=getattr(cfg, "replay_batch_size", None),
        sample_first=getattr(cfg, "replay_order", "") == "sample_then_offer",
        slow_update=ilora and cfg.slow_mode == "interpolate",
        reset_slow_at_task_end=ilora and cfg.reset_slow_at_task_end, rngs=(dropout_rng,),
        pad_id=cfg.pad_token_id if ilora else None)

    np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)
    names = ("lora_A", "lora_B", "lora_A_slow", "lora_B_slow")[:4 if ilora else 2]
    for step, (mine, ref) in enumerate(zip(ours, ref_snapshots)):  # after every step (slow: after interpolation)
        for n in method.adapted:
            for i, key in enumerate(names):
                a, b = mine[f"{n}.{key}"], ref[n][i]
                err = relative_error(a, b)
                assert err <= 1e-8 or np.abs(a - b).max() <= 1e-14, f"step {step}, {n}.{key}: relative error {err:.2e}"


# ---- §3.10 invariants ----------------------------------------------------------------------------


def test_1_lambda_one_without_warmup_keeps_slow_fixed_and_equal_to_the_base():
    base = random_gpt(F32, 3)
    method = make_method("ilora", ema_lambda=1.0, ema_warmup=False, buffer_size=4, r=2)
    model = random_gpt(F32, 3)
    method.attach(model, seed=1)
    initial = factors(method)
    run_tasks(method, tiny_tasks(0, n_tasks=3, steps=3, config=F32))
    after = factors(method)
    for k in initial:
        if "slow" in k:
            np.testing.assert_array_equal(after[k], initial[k], err_msg=k)
        else:
            assert not np.array_equal(after[k], initial[k]), k
    x = tiny_tasks(9, n_tasks=1, steps=1, config=F32)[0][0][0]
    with method.evaluating("slow"):  # B_s = 0: the slow learner is the base model, bit for bit
        np.testing.assert_array_equal(model(x)[0].data, base(x)[0].data)


def test_2_lambda_one_with_warmup_makes_slow_the_running_mean_of_the_fast_iterates():
    method = make_method("ilora", ema_lambda=1.0, buffer_size=4, r=2)
    method.attach(random_gpt(TINY, 2), seed=0)
    history = []

    def on_step(task, step, opt):
        history.append(factors(method))
        for k in ("lora_A", "lora_B"):
            for n in method.adapted:
                mean = np.mean([h[f"{n}.{k}"] for h in history], axis=0)
                np.testing.assert_allclose(history[-1][f"{n}.{k}_slow"], mean, rtol=1e-10, atol=1e-14)

    run_tasks(method, tiny_tasks(1, n_tasks=2, steps=3), on_step=on_step)
    assert len(history) == 6


@pytest.mark.parametrize("warmup", [False, True])
def test_3_lambda_zero_gives_slow_equal_to_fast_and_warmup_copies_at_the_first_step(warmup):
    method = make_method("ilora", ema_lambda=0.0 if not warmup else 0.99, ema_warmup=warmup, buffer_size=4, r=2)
    method.attach(random_gpt(F32, 2), seed=0)
    seen = []

    def on_step(task, step, opt):
        f = factors(method)
        equal = all(np.array_equal(f[f"{n}.{k}"], f[f"{n}.{k}_slow"])
                    for n in method.adapted for k in ("lora_A", "lora_B"))
        seen.append(equal)

    run_tasks(method, tiny_tasks(1, n_tasks=2, steps=3, config=F32), on_step=on_step)
    assert seen == ([True] * 6 if not warmup else [True] + [False] * 5)


@pytest.mark.parametrize("consistency", ["symmetric", "one_sided"])
def test_4_slow_equal_to_fast_gives_zero_consistency_and_zero_gradient(consistency):
    # direct: L_cons of a replay batch is 0 and its gradient is exactly 0 when the two copies agree
    method = make_method("ilora", consistency=consistency, r=2, init_lora_weights=False)
    model = random_gpt(TINY, 4)
    method.attach(model, seed=0)
    for layer in method.layers():
        layer.copy_fast_to_slow()
    x, _, _ = random_batch(np.random.default_rng(0), TINY, 3, 5)
    with no_grad(), method.learner("slow"):
        _, _, h_s = model(x, return_hidden=True)
    _, _, h_f = model(x, return_hidden=True)
    cons = consistency_loss(h_f, [h.data for h in h_s], np.ones((3, 5)), one_sided=consistency == "one_sided")
    assert cons.item() == 0.0
    cons.backward()
    for p in method.trainable_parameters():
        assert p.grad is not None and not np.any(p.grad)

    # through the whole training loop, with adapter dropout on: with λ = 0 (slow = fast after every step)
    # γ changes nothing, bit for bit
    runs = []
    for gamma in (0.0, 5.0):
        m = make_method("ilora", consistency=consistency, ema_lambda=0.0, gamma=gamma, lora_dropout=0.3, r=2,
                        buffer_size=3)
        m.attach(random_gpt(F32, 4), seed=0)
        losses, _ = run_tasks(m, tiny_tasks(3, n_tasks=3, steps=2, config=F32))
        runs.append((losses, factors(m)))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        np.testing.assert_array_equal(v, runs[1][1][k], err_msg=k)


@pytest.mark.parametrize("order", ["sample_then_offer", "offer_then_sample"])
def test_5_gamma_zero_is_er_and_without_buffer_seq_lora_bit_for_bit(order):
    tasks = tiny_tasks(4, n_tasks=3, steps=3, config=F32)
    common = dict(r=2, lora_dropout=0.2, replay_order=order)
    runs = {}
    for name, kind, over in (("ilora", "ilora", dict(gamma=0.0, ema_lambda=0.5, buffer_size=3, **common)),
                             ("er", "er", dict(buffer_size=3, **common)),
                             ("ilora_nobuf", "ilora", dict(gamma=0.0, buffer_size=0, **common)),
                             ("seq", "lora", dict(r=2, lora_dropout=0.2))):
        m = make_method(kind, **over)
        m.attach(random_gpt(F32, 5), seed=3)
        trajectory = []
        losses, _ = run_tasks(m, tasks,
                              on_step=lambda t, s, o, m=m: trajectory.append(factors(m, ("lora_A", "lora_B"))))
        runs[name] = (losses, trajectory, m)
    for a, b in (("ilora", "er"), ("ilora_nobuf", "seq")):
        assert runs[a][0] == runs[b][0], (a, b)
        for fa, fb in zip(runs[a][1], runs[b][1]):
            for k in fa:
                np.testing.assert_array_equal(fa[k], fb[k], err_msg=f"{a} vs {b}: {k}")
    assert runs["er"][0] != runs["seq"][0]  # replay did change the run
    assert [x[0].tolist() for x in runs["ilora"][2].buffer.items] == [x[0].tolist() for x in runs["er"][2].buffer.items]


def test_6_first_task_is_ce_alone_with_no_replay_drawn():
    method = make_method("ilora", buffer_size=100, r=2, init_lora_weights=False)
    model = random_gpt(F32, 1)
    method.attach(model, seed=0)
    opt = Adam(method.trainable_parameters())
    method.before_task(0, 3, opt)
    state = method.buffer.rng.bit_generator.state
    method.buffer.sample = lambda b: pytest.fail("a replay batch was drawn on the first task")
    for x, y, mask in tiny_tasks(2, n_tasks=1, steps=3, config=F32)[0]:
        _, ce = model(x, y, loss_mask=mask)
        loss = method.loss(x, y, mask)
        assert loss.item() == ce.item()
    assert method.buffer.rng.bit_generator.state == state  # offers below capacity draw nothing
    assert len(method.buffer) == 9 and method.buffer.n_seen == 9  # the first task's rows are still offered


def test_7_reservoir_capacity_determinism_and_inclusion_rate():
    M, n, trials = 20, 200, 300
    counts = np.zeros(n)
    for trial in range(trials):
        buf = Reservoir(M, stream(trial, "reservoir"))
        for i in range(n):
            buf.offer((np.array([i]), np.array([i]), np.array([1.0])))
            assert len(buf) == min(i + 1, M)
        counts[[int(item[0][0]) for item in buf.items]] += 1
    rate = counts / trials  # each item's inclusion rate; M/n = 0.1 for every item
    sd = np.sqrt(0.1 * 0.9 / (trials * 50))
    for group in (rate[:50], rate[75:125], rate[-50:]):  # early, middle and late items alike
        assert abs(group.mean() - M / n) < 6 * sd
    chi2 = np.sum((counts - trials * M / n) ** 2 / (trials * M / n * (1 - M / n)))
    assert chi2 < (n - 1) + 6 * np.sqrt(2 * (n - 1))  # no item is favoured (χ² with n − 1 degrees of freedom)

    def fill(seed):
        buf = Reservoir(5, stream(seed, "reservoir"))
        for i in range(40):
            buf.offer((np.array([i]),) * 2 + (np.array([1.0]),))
        return [int(e[0][0]) for e in buf.items], buf.sample(3).x[:, 0].tolist()

    assert fill(1) == fill(1) and fill(1) != fill(2)


def test_7b_replay_pads_rows_of_different_lengths_and_consistency_skips_the_padding():
    buf = Reservoir(10, stream(0, "reservoir"))
    buf.offer_batch(np.ones((2, 3), int), np.ones((2, 3), int), np.ones((2, 3)))
    buf.offer_batch(np.full((1, 5), 2), np.full((1, 5), 2), np.ones((1, 5)))
    rep = buf.sample(3)
    assert rep.x.shape == (3, 5) and rep.valid.sum() == 3 + 3 + 5
    assert np.all(rep.mask[rep.valid == 0] == 0)
    rng = np.random.default_rng(0)
    h_s = [rng.standard_normal((3, 5, 4)) for _ in range(2)]
    h_f = [Tensor(h + rng.standard_normal(h.shape)) for h in h_s]
    valid = rep.valid
    expected = sum(((hf.data - hs) ** 2 * valid[:, :, None]).sum() for hf, hs in zip(h_f, h_s)) / (2 * valid.sum() * 4)
    assert np.isclose(consistency_loss(h_f, h_s, valid).item(), expected, rtol=1e-12)
    garbage = [Tensor(np.where(valid[:, :, None] == 0, 1e6, hf.data)) for hf in h_f]
    assert np.isclose(consistency_loss(garbage, h_s, valid).item(), expected, rtol=1e-12)
    # and ER trains on tasks of different lengths
    method = make_method("ilora", buffer_size=50, r=2)
    method.attach(random_gpt(TINY, 0), seed=0)
    losses, _ = run_tasks(method, [tiny_tasks(0, 1, 2, T=3)[0], tiny_tasks(1, 1, 2, T=5)[0]])
    assert np.all(np.isfinite(losses))


def test_7c_consistency_leaves_out_the_replayed_pad_positions():
    from tinyslim.adapters.replay import ReplayBatch

    method = make_method("ilora", r=2, pad_token_id=0, gamma=2.0, init_lora_weights=False)
    model = random_gpt(TINY, 1)
    method.attach(model, seed=0)
    for layer in method.layers():
        layer.lora_B_slow.data[...] = 0.0  # slow = base ≠ fast
    rng = np.random.default_rng(0)
    x, y, mask = random_batch(rng, TINY, 2, 5)
    xr, yr, mr = random_batch(rng, TINY, 3, 5)
    xr[:, 3:] = 0  # right padding, as the task suite's PAD
    xr[0, 1] = 0
    method.replay_batch = lambda *args: ReplayBatch(xr, yr, mr, np.ones(xr.shape))
    method.task_id = 1
    loss = method.loss(x, y, mask)
    _, ce_cur = model(x, y, loss_mask=mask)
    _, ce_rep, h_f = model(xr, yr, loss_mask=mr, return_hidden=True)
    with method.learner("slow"):
        _, _, h_s = model(xr, return_hidden=True)
    real = (xr != 0).astype(float)[:, :, None]
    cons = sum((((a.data - b.data) ** 2) * real).sum() for a, b in zip(h_f, h_s)) / (2 * real.sum() * TINY.n_embd)
    np.testing.assert_allclose(loss.item(), 0.5 * (ce_cur.item() + ce_rep.item()) + 2.0 * cons, rtol=1e-12)


def test_8_slow_parameters_get_no_gradient_and_are_not_in_the_optimizer():
    method = make_method("ilora", buffer_size=4, r=2)
    model = random_gpt(TINY, 0)
    method.attach(model, seed=0)
    slow = [getattr(l, k) for l in method.layers() for k in ("lora_A_slow", "lora_B_slow")]
    _, opt = run_tasks(method, tiny_tasks(0, n_tasks=2, steps=2))
    assert not {id(p) for p in slow} & {id(p) for p in opt.params}
    assert not {id(p) for p in slow} & {id(p) for p in method.trainable_parameters()}
    assert all(not p.requires_grad and p.grad is None for p in slow)
    assert all(id(p) not in opt.state for p in slow)


@pytest.mark.parametrize("counter", ["global", "per_task"])
def test_9_adam_state_is_zero_at_every_task_start_and_the_counter(counter):
    method = make_method("ilora", buffer_size=4, r=2, ema_counter=counter)
    method.attach(random_gpt(TINY, 0), seed=0)
    opt = Adam(method.trainable_parameters(), lr=1e-2)
    for k, batches in enumerate(tiny_tasks(0, n_tasks=3, steps=2)):
        method.before_task(k, len(batches), opt)
        assert opt.state == {} and opt.step_count == 0
        assert method.t == (2 * k if counter == "global" else 0)
        for step, (x, y, mask) in enumerate(batches):
            loss = method.loss(x, y, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_step(step, opt)
        assert opt.step_count == 2 and opt.state


@pytest.mark.parametrize("one_sided", [False, True])
@given(seed=seeds)
def test_10_consistency_gradient_matches_finite_differences(one_sided, seed):
    config = GPTConfig(vocab_size=7, block_size=4, n_layer=2, n_head=1, n_embd=3, dtype="float64")
    # s = 1: with LoRA deltas of scale 8 on a 3-channel LayerNorm model the curvature is so large that
    # the central differences' own truncation error (∝ eps²) reaches 1e-6
    method = make_method("ilora", r=2, lora_alpha=2, target_modules="all-linear", init_lora_weights=False)
    model = random_gpt(config, seed)
    method.attach(model, seed=seed % 1000)
    rng = np.random.default_rng(seed)
    for layer in method.layers():  # a slow copy that differs from the fast one
        layer.lora_A_slow.data[...] = layer.lora_A.data + 0.3 * rng.standard_normal(layer.lora_A.shape)
        layer.lora_B_slow.data[...] = layer.lora_B.data + 0.3 * rng.standard_normal(layer.lora_B.shape)
    x = rng.integers(0, 7, (2, 4))
    with no_grad(), method.learner("slow"):
        h_s = [h.data for h in model(x, return_hidden=True)[2]]
    if one_sided:  # keep every h_s − h_f at least 0.5 away from relu's kink, so the differences see one branch
        with no_grad():
            h_f = [h.data for h in model(x, return_hidden=True)[2]]
        h_s = [h + rng.choice([-1.0, 1.0], h.shape) * rng.uniform(0.5, 1.5, h.shape) for h in h_f]

    def cons():
        return consistency_loss(model(x, return_hidden=True)[2], h_s, np.ones((2, 4)), one_sided=one_sided)

    cons().backward()
    eps = 1e-6
    params = method.trainable_parameters()
    for p in params[:2] + params[-2:]:  # the first block's c_attn and the last block's mlp.c_proj
        num = np.zeros_like(p.data)
        with no_grad():
            for i in np.ndindex(p.shape):
                old = p.data[i]
                p.data[i] = old + eps
                up = cons().item()
                p.data[i] = old - eps
                down = cons().item()
                p.data[i] = old
                num[i] = (up - down) / (2 * eps)
        assert relative_error(p.grad, num) < 1e-6 or np.abs(p.grad - num).max() < 1e-10


def test_11_one_sided_consistency_is_zero_when_fast_is_above_slow():
    rng = np.random.default_rng(0)
    h_s = [rng.standard_normal((2, 3, 4)) for _ in range(3)]
    above = [Tensor(h + rng.uniform(0, 1, h.shape), requires_grad=True) for h in h_s]
    loss = consistency_loss(above, h_s, np.ones((2, 3)), one_sided=True)
    assert loss.item() == 0.0
    loss.backward()
    assert all(not np.any(h.grad) for h in above)
    assert consistency_loss(above, h_s, np.ones((2, 3))).item() > 0  # the symmetric one is not
    below = [Tensor(h - 1.0) for h in h_s]
    assert np.isclose(consistency_loss(below, h_s, np.ones((2, 3)), one_sided=True).item(), 1.0)


# ---- the learners and the variants --------------------------------------------------------------


def test_learners_switch_the_active_copy_and_restore_it():
    method = make_method("ilora", eval_learner="fast", r=2, init_lora_weights=False)
    model = random_gpt(TINY, 0)
    method.attach(model, seed=0)
    for layer in method.layers():
        layer.lora_B_slow.data[...] = 0.0
    assert method.learners() == ["fast", "slow"]
    x = tiny_tasks(0, 1, 1)[0][0][0]
    with method.evaluating() as m:
        fast = m(x)[0].data
        assert all(layer.active == "fast" for layer in method.layers())
    with method.evaluating("slow") as m:
        slow = m(x)[0].data
        assert all(layer.active == "slow" for layer in method.layers())
    assert all(layer.active == "fast" for layer in method.layers()) and model.training
    assert not np.allclose(fast, slow)
    assert make_method("ilora").learners() == ["slow", "fast"]
    with method.learner("slow"):  # either learner can be merged for deployment, but not switched while merged
        merge(model)
        with method.evaluating("slow") as m:
            np.testing.assert_allclose(m(x)[0].data, slow, rtol=1e-10, atol=1e-12)
        with pytest.raises(RuntimeError, match="slow copy is merged"):
            method.evaluating("fast").__enter__()
        unmerge(model)


def test_frozen_base_slow_and_reset_slow_at_task_end():
    frozen = make_method("ilora", slow_mode="frozen_base", buffer_size=4, r=2)
    frozen.attach(random_gpt(TINY, 0), seed=0)
    run_tasks(frozen, tiny_tasks(0, n_tasks=2, steps=2))
    assert all(not np.any(layer.lora_B_slow.data) for layer in frozen.layers())

    reset = make_method("ilora", reset_slow_at_task_end=True, buffer_size=4, r=2)
    reset.attach(random_gpt(TINY, 0), seed=0)
    ends = []
    reset.after_task = (lambda original: lambda k: (original(k), ends.append(factors(reset))))(reset.after_task)
    run_tasks(reset, tiny_tasks(0, n_tasks=2, steps=2))
    for f in ends:
        for n in reset.adapted:
            np.testing.assert_array_equal(f[f"{n}.lora_A_slow"], f[f"{n}.lora_A"])
            np.testing.assert_array_equal(f[f"{n}.lora_B_slow"], f[f"{n}.lora_B"])


def test_ilora_defaults_follow_the_spec():
    cfg = ILoRA().config
    assert (cfg.r, cfg.lora_alpha, cfg.ema_lambda, cfg.gamma, cfg.buffer_size) == (8, 16, 0.99, 1.0, 200)
    assert cfg.target_modules == ["attn.c_attn", "attn.c_proj"] and cfg.ema_warmup and cfg.ema_counter == "global"
    assert cfg.replay_order == "sample_then_offer" and cfg.eval_learner == "slow" and cfg.slow_mode == "interpolate"
