"""The continual-learning methods on the torch engine (tinyslim/torch/lora.py, ilora.py, chain.py) against
their NumPy twins, and the PEFT-style verbs of tinyslim.torch on GPT-2 (Conv1D) and Llama (nn.Linear).

* a hypothesis property test per method — Seq-LoRA ("lora"), ER, I-LoRA, COLA: the NumPy method on a
  random float64 GPT and the torch method on ``from_gpt`` of the same GPT, same run seed, driven in lock
  step by the runner's loop (tinyslim.optim.Adam against tinyslim.torch.optim.Adam, same lr/betas/eps) over
  two tasks. Every step compares, from the same state: the loss, EVERY trainable gradient, then after the
  optimizer step and after_step (a task boundary's Adam reset, I-LoRA's interpolation, COLA's knots and lr)
  the method's whole checkpoint (fast and slow factors, the buffer, streams, COLA's tied W and W0) and the
  optimizer's state; then the torch side takes the NumPy side's state (load_state_dict across engines), so
  rounding never compounds. At the end every learner's logits. Bounds: 1e-9 of each tensor's largest entry,
  plus Adam's 2·lr·δg/ε on the state after a step (a gradient entry near ε moves its step by that much).
  Measured on the ci examples: loss ≤ 4e-14, gradients ≤ 1.2e-13, state after a step ≤ 7e-14 absolute
  (2e-9 on one I-LoRA example, an entry whose gradient sits near ε).
* the hooks: I-LoRA's learners, slow = fast ⇒ L_cons = 0 even with the model's own dropout (torch's
  generator is forked for the slow pass), a checkpoint resumed on torch; COLA's knots (W moves by the
  link, the optimizer state is reset, the step-down padding stays zero, merged_weights).
* the verbs: inject by PEFT-style target_modules on GPT-2's Conv1D and on a Llama built from a config
  (nn.Linear), mark_only_adapters_trainable, adapter_state_dict keys and values equal the NumPy ones,
  load round trip, merge/unmerge/merge_and_unload keep the logits, disable_adapters gives the base,
  a merge into the tied LM head is refused, and bad input gets a one-line error that says what to do.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tinyslim.torch as tt  # noqa: E402
from test_adapters_base import assert_trained_outputs_close, random_batch, random_gpt, tiny_tasks  # noqa: E402
from tinyslim import adapters  # noqa: E402
from tinyslim.nn import GPTConfig  # noqa: E402
from tinyslim.optim import Adam  # noqa: E402
from tinyslim.torch.lora import LoraLinear  # noqa: E402

from tinyslim.torch.optim import Adam as TorchAdam  # noqa: E402  (the runner's optimizer on torch)

RTOL = 1e-9  # of a tensor's largest entry: float64 sums of a few hundred terms round at ~1e-15 of it
GPT_FIELDS = dict(block_size=6, bias=True, dtype="float64")


def assert_close(ours, ref, what: str, rtol: float = RTOL, atol: float = 0.0):
    """max |ours − ref| ≤ rtol · max(|ref|, |ours|) + atol, with a readable report (first values side by side)."""
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    ref = ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs NumPy's {ref.shape}"
    diff = float(np.abs(ours - ref).max()) if ours.size else 0.0
    scale = max(float(np.abs(ref).max()), float(np.abs(ours).max())) if ours.size else 0.0
    assert diff <= rtol * scale + atol, (f"{what}: max |torch − numpy| = {diff:.3e} > {rtol:g} · {scale:.3e} + {atol:.1e}; "
                                         f"first values torch {ours.ravel()[:4]} vs numpy {ref.ravel()[:4]}")
    return diff


def twins(config: GPTConfig, kind: str, over: dict, seed: int):
    """(NumPy method on a random GPT, torch method on from_gpt of the same GPT), both attached with `seed`."""
    gpt = random_gpt(config, seed)
    lm = tt.from_gpt(gpt)  # before the NumPy attach: from_gpt copies a plain GPT
    ours, ref = tt.make_method(kind, **over), adapters.make_method(kind, **over)
    ref.attach(gpt, seed=seed % 997)
    ours.attach(lm, seed=seed % 997)
    return ours, ref


def grads(method, torch_side: bool) -> dict:
    if torch_side:
        return {n: p.grad for n, p in tt.verbs.inner_model(method.model).named_parameters() if p.requires_grad}
    return {n: p.grad for n, p in method.model.named_parameters() if p.requires_grad}


def assert_states_close(ours: tuple, ref: tuple, what: str, atol: float = 0.0) -> float:
    """Two (arrays, meta) checkpoints (a method's, or an optimizer's flat state as (arrays, {})) agree:
    the same keys and meta, integer arrays equal, float arrays within RTOL of their scale plus `atol`."""
    (a_ours, m_ours), (a_ref, m_ref) = ours, ref
    assert sorted(a_ours) == sorted(a_ref), f"{what}: keys differ: {sorted(set(a_ours) ^ set(a_ref))}"
    assert m_ours == m_ref, f"{what}: meta differs: {m_ours} vs NumPy's {m_ref}"
    worst = 0.0
    for key, value in a_ref.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating) and np.ndim(value):
            worst = max(worst, assert_close(a_ours[key], value, f"{what} {key}", atol=atol))
        else:
            np.testing.assert_array_equal(np.asarray(a_ours[key]), value, err_msg=f"{what} {key}")
    return worst


def run_lock_step(ours, ref, tasks, lr: float = 2e-2) -> dict:
    """The runner's loop on both engines at once. Every step compares, from the same state: the loss, every
    trainable gradient, then (after the optimizer step and after_step) the method's whole checkpoint and the
    optimizer's state; then the torch side is set to the NumPy side's state (method.load_state_dict and the
    optimizer's flat state, across engines), so that rounding differences never compound and each step is
    checked at float64 precision. Returns the largest absolute difference seen per quantity.

    Adam divides by √v + ε: a gradient entry near ε = 1e-8 that differs by δg moves its step by up to
    2·lr·δg/ε, so the state after a step is allowed that much besides RTOL of its scale."""
    opt_ref, opt_ours = Adam(ref.trainable_parameters(), lr=lr), TorchAdam(ours.trainable_parameters(), lr=lr)
    worst = dict(loss=0.0, grad=0.0, state=0.0)
    for k, batches in enumerate(tasks):
        ref.before_task(k, len(batches), opt_ref)
        ours.before_task(k, len(batches), opt_ours)
        for step, (x, y, mask) in enumerate(batches):
            where = f"task {k} step {step}:"
            loss_ref, loss_ours = ref.loss(x, y, mask), ours.loss(x, y, mask)
            worst["loss"] = max(worst["loss"], assert_close(loss_ours, loss_ref.data, f"{where} loss"))
            opt_ref.zero_grad()
            loss_ref.backward()
            opt_ours.zero_grad()
            loss_ours.backward()
            g_ref, g_ours = grads(ref, False), grads(ours, True)
            assert list(g_ours) == list(g_ref), "the trainable tensors differ by name or order"
            delta_g = max(assert_close(g_ours[name], g, f"{where} ∂L/∂{name}") for name, g in g_ref.items())
            worst["grad"] = max(worst["grad"], delta_g)
            lr_step = opt_ref.lr
            opt_ref.step()
            opt_ours.step()
            ref.after_step(step, opt_ref)
            ours.after_step(step, opt_ours)
            assert opt_ours.lr == opt_ref.lr, f"{where} lr {opt_ours.lr} vs NumPy's {opt_ref.lr}"
            adam = 2 * lr_step * delta_g / 1e-8
            worst["state"] = max(worst["state"], assert_states_close(ours.state_dict(), ref.state_dict(),
                                                                     f"{where} method state", atol=adam))
            assert_states_close((opt_ours.state_dict(), {}), (opt_ref.state_dict(), {}), f"{where} Adam state",
                                atol=delta_g)
            ours.load_state_dict(*ref.state_dict())  # the next step starts from the same state
            opt_ours.load_state_dict(opt_ref.state_dict())
        ref.after_task(k)
        ours.after_task(k)
    return worst


def assert_learners_agree(ours, ref, x, rtol: float = RTOL):
    assert ours.learners() == ref.learners()
    for learner in ref.learners():
        with ref.evaluating(learner) as model_ref, ours.evaluating(learner) as model_ours:
            assert not torch.is_grad_enabled()
            assert_close(model_ours(x)[0], model_ref(x)[0].data, f"{learner} learner's logits", rtol=rtol)


# ---- the property tests ------------------------------------------------------------------------------

def gpt_configs():
    # n_embd ≥ 3: a LayerNorm over 2 channels outputs ±1 whatever its input (its input gradient is rounding
    # noise, which Adam turns into O(lr) differences)
    return st.builds(lambda V, L, H, c: GPTConfig(vocab_size=V, n_layer=L, n_head=H, n_embd=H * c, **GPT_FIELDS),
                     st.integers(5, 12), st.integers(1, 2), st.integers(1, 2), st.integers(3, 4))


def lora_fields(draw, targets=(["attn.c_attn", "attn.c_proj"], ["mlp.c_fc"], "all-linear")):
    return dict(r=draw(st.integers(1, 3)), lora_alpha=draw(st.sampled_from([2, 8])), use_rslora=draw(st.booleans()),
                lora_dropout=draw(st.sampled_from([0.0, 0.0, 0.25])), init_lora_weights=draw(st.booleans()),
                target_modules=draw(st.sampled_from(targets)))


@st.composite
def continual_cases(draw, kind):
    config = draw(gpt_configs())
    over = lora_fields(draw)
    if kind in ("er", "ilora"):
        over.update(buffer_size=draw(st.sampled_from([2, 5, 50])), replay_batch_size=draw(st.sampled_from([None, 1, 3])),
                    replay_order=draw(st.sampled_from(["sample_then_offer", "offer_then_sample"])))
    if kind == "ilora":
        over.update(gamma=draw(st.sampled_from([0.0, 0.7, 3.0])), ema_lambda=draw(st.sampled_from([0.0, 0.25, 0.9, 1.0])),
                    ema_warmup=draw(st.booleans()), ema_counter=draw(st.sampled_from(["global", "per_task"])),
                    consistency=draw(st.sampled_from(["symmetric", "one_sided"])),
                    consistency_layers=draw(st.sampled_from(["all_blocks", "last_block"])),
                    slow_mode=draw(st.sampled_from(["interpolate", "interpolate", "frozen_base"])),
                    reset_slow_at_task_end=draw(st.sampled_from([False, False, True])),
                    pad_token_id=draw(st.sampled_from([None, 0, 1])), eval_learner=draw(st.sampled_from(["slow", "fast"])))
    steps, B, T = draw(st.integers(2, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 5))
    return config, over, (steps, B, T), draw(st.integers(0, 2**32 - 1))


@pytest.mark.parametrize("kind", ["lora", "er", "ilora"])
@given(data=st.data())
def test_continual_methods_match_numpy_in_loss_every_gradient_and_every_step(kind, data):
    config, over, (steps, B, T), seed = data.draw(continual_cases(kind))
    ours, ref = twins(config, kind, over, seed)
    tasks = tiny_tasks(seed, n_tasks=2, steps=steps, B=B, T=T, config=config)  # a task boundary: Adam reset
    run_lock_step(ours, ref, tasks)
    assert_learners_agree(ours, ref, tasks[0][0][0])


@st.composite
def cola_cases(draw):
    config = draw(gpt_configs())
    m = draw(st.integers(1, 3))
    T = draw(st.integers(m + 1, 6))
    knots = sorted(draw(st.lists(st.integers(1, T - 1), min_size=m - 1, max_size=m - 1, unique=True))) \
        if m > 1 and draw(st.booleans()) else None
    ranks = sorted(draw(st.lists(st.integers(1, 3), min_size=m, max_size=m)), reverse=True) \
        if m > 1 and draw(st.booleans()) else None
    over = lora_fields(draw, targets=(["attn.c_attn"], ["c_proj"], "all-linear"))
    over.update(chain_len=m, knots=knots, ranks=ranks, alpha_mode=draw(st.sampled_from(["constant_scale", "fixed"])),
                lr_schedule=draw(st.sampled_from(["global", "restart"])),
                reset_optimizer_at_knot=True if ranks is not None else draw(st.booleans()),
                lr=draw(st.sampled_from([None, 3e-2])))
    return config, over, T, draw(st.integers(0, 2**32 - 1))


@given(case=cola_cases())
def test_cola_matches_numpy_through_its_knots_lr_schedule_and_a_second_chain(case):
    config, over, T, seed = case
    ours, ref = twins(config, "cola", over, seed)
    tasks = tiny_tasks(seed, n_tasks=2, steps=T, B=2, T=4, config=config)  # task 2 ties task 1's last link
    run_lock_step(ours, ref, tasks)
    assert ours.history == ref.history and ours.knots == ref.knots
    for name, W in ref.merged_weights().items():
        assert_close(ours.merged_weights()[name], W, f"W_final of {name}")
    assert_learners_agree(ours, ref, tasks[0][0][0])


@pytest.mark.parametrize("kind, over", [
    ("ilora", dict(r=2, buffer_size=6, gamma=0.7, ema_lambda=0.9, lora_dropout=0.25, target_modules="all-linear")),
    ("cola", dict(r=2, chain_len=3, ranks=[2, 2, 1], lr=3e-2, target_modules=["attn.c_attn", "mlp.c_proj"])),
])
def test_free_runs_on_both_engines_end_in_the_same_state(kind, over):
    """No syncing: each engine runs its own trajectory (3 tasks x 4 steps), compared at the end as whole
    tensors, ‖torch − numpy‖ ≤ 1e-8 · ‖numpy‖ (test_adapters_base.assert_trained_outputs_close's bound: a
    gradient entry near Adam's ε turns rounding into ~1e-10 moves, which compound over a trajectory)."""
    config = GPTConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=8, **GPT_FIELDS)
    ours, ref = twins(config, kind, over, seed=12)
    tasks = tiny_tasks(3, n_tasks=3, steps=4, B=2, T=5, config=config)
    for method, opt in ((ref, Adam(ref.trainable_parameters(), lr=2e-2)),
                        (ours, TorchAdam(ours.trainable_parameters(), lr=2e-2))):
        for k, batches in enumerate(tasks):
            method.before_task(k, len(batches), opt)
            for step, (x, y, mask) in enumerate(batches):
                loss = method.loss(x, y, mask)
                opt.zero_grad()
                loss.backward()
                opt.step()
                method.after_step(step, opt)
            method.after_task(k)
    (a_ours, m_ours), (a_ref, m_ref) = ours.state_dict(), ref.state_dict()
    assert sorted(a_ours) == sorted(a_ref) and m_ours["streams"] == m_ref["streams"]
    for key, value in a_ref.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert_trained_outputs_close(np.asarray(a_ours[key]), value, what=key)
        else:
            np.testing.assert_array_equal(a_ours[key], value, err_msg=key)
    assert_learners_agree(ours, ref, tasks[0][0][0], rtol=1e-8)


# ---- I-LoRA's hooks on torch -----------------------------------------------------------------------------

TINY = GPTConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=8, **GPT_FIELDS)


def test_ilora_slow_equal_to_fast_gives_zero_consistency_even_with_the_models_own_dropout():
    """The slow pass forks torch's generator, so the model's dropout masks are the fast replay pass's."""
    gpt = random_gpt(TINY, 2)
    lm = tt.from_gpt(gpt)
    lm.train()
    for block in lm.hf_model.transformer.h:  # the HF model's own dropout (tinyslim's GPT has none here)
        block.attn.resid_dropout.p = block.mlp.dropout.p = 0.3
    method = tt.make_method("ilora", buffer_size=8, gamma=1.0, lora_dropout=0.2, init_lora_weights=False)
    method.attach(lm, seed=3)
    opt = TorchAdam(method.trainable_parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    method.before_task(0, 1, opt)
    method.loss(*random_batch(rng, TINY, 3, 5))  # fills the buffer
    method.before_task(1, 1, opt)
    seen = []
    original = tt.ilora.consistency_loss
    tt.ilora.consistency_loss = lambda *a, **k: seen.append(original(*a, **k)) or seen[-1]
    try:
        torch.manual_seed(0)
        loss = method.loss(*random_batch(rng, TINY, 3, 5))
    finally:
        tt.ilora.consistency_loss = original
    assert seen[0].item() == 0.0 and seen[0].requires_grad  # slow = fast (nothing interpolated yet), in the graph
    loss.backward()
    assert all(p.grad is not None for p in method.trainable_parameters())
    assert all(not layer.lora_A_slow.requires_grad and layer.lora_A_slow.grad is None for layer in method.layers())
    assert {id(p) for p in method.trainable_parameters()}.isdisjoint(
        {id(t) for layer in method.layers() for t in (layer.lora_A_slow, layer.lora_B_slow)})


def test_ilora_learners_switch_the_active_copy_and_a_checkpoint_resumes_on_torch():
    gpt = random_gpt(TINY, 5)
    tasks = tiny_tasks(1, n_tasks=2, steps=3, B=2, T=5, config=TINY)

    def fresh():
        method = tt.make_method("ilora", buffer_size=4, gamma=0.5, ema_lambda=0.5, r=2)
        method.attach(tt.from_gpt(gpt), seed=1)
        return method, TorchAdam(method.trainable_parameters(), lr=2e-2)

    def train(method, opt, k, steps):
        if steps[0] == 0:
            method.before_task(k, len(tasks[k]), opt)
        for step in steps:
            loss = method.loss(*tasks[k][step])
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_step(step, opt)

    a, opt_a = fresh()
    train(a, opt_a, 0, [0, 1, 2])
    train(a, opt_a, 1, [0])
    arrays, meta = a.state_dict()
    assert {k.rpartition(".")[2] for k in arrays if k.startswith("adapter.")} == \
        {"lora_A", "lora_B", "lora_A_slow", "lora_B_slow"}
    assert meta["ilora"] == {"t": 4, "active": "fast"} and any(k.startswith("reservoir.") for k in arrays)
    b, opt_b = fresh()
    b.load_state_dict(arrays, meta)
    b.task_id = 1
    opt_b.load_state_dict(opt_a.state_dict())
    train(a, opt_a, 1, [1, 2])
    train(b, opt_b, 1, [1, 2])
    for key, value in a.state_dict()[0].items():
        np.testing.assert_array_equal(b.state_dict()[0][key], value, err_msg=key)

    layer = a.layers()[0]
    x = tasks[0][0][0]
    with a.learner("slow"):
        assert all(lyr.active == "slow" for lyr in a.layers())
        slow = a.model(x)[0].detach()
    assert layer.active == "fast" and not torch.equal(a.model(x)[0].detach(), slow)
    with a.evaluating() as model:  # the reported learner is slow by default
        assert layer.active == "slow" and not model.training
        assert torch.equal(model(x)[0], slow)
    assert layer.active == "fast" and a.model.training
    with pytest.raises(ValueError, match="learners"):
        a._set_learner("medium")


# ---- COLA's hooks on torch -------------------------------------------------------------------------------

def test_cola_knot_moves_W_by_the_link_resets_the_optimizer_and_keeps_the_padding_zero():
    method = tt.make_method("cola", chain_len=2, ranks=[3, 1], lr=2e-2, target_modules=["attn.c_attn", "mlp.c_proj"])
    method.attach(tt.from_gpt(random_gpt(TINY, 0)), seed=4)
    opt = TorchAdam(method.trainable_parameters(), lr=99.0)
    batches = tiny_tasks(0, n_tasks=1, steps=4, config=TINY)[0]
    method.before_task(0, 4, opt)
    assert method.knots == [2] and opt.lr == 2e-2
    x = batches[0][0]
    for t, (xb, yb, mb) in enumerate(batches):
        loss = method.loss(xb, yb, mb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        W = {n: tt.base_weight(lyr.base_layer).detach().clone() for n, lyr in zip(method.adapted, method.layers())}
        delta = {n: lyr.delta_weight().detach() for n, lyr in zip(method.adapted, method.layers())}
        with method.evaluating() as model:
            before = model(x)[0]
        method.after_step(t, opt)
        assert opt.lr == pytest.approx(2e-2 * (1 - (t + 1) / 4), abs=0, rel=1e-15)
        for n, lyr in zip(method.adapted, method.layers()):
            W_now = tt.base_weight(lyr.base_layer)
            if t + 1 == 2:  # the knot: W ← W + s_1 B_1 A_1, link 2 at rank 1 (A's other rows and B's columns 0)
                torch.testing.assert_close(W_now, W[n] + delta[n], rtol=0, atol=1e-15)
                assert not lyr.lora_B.any() and not lyr.lora_A[1:].any() and lyr.lora_A[0].any()
            else:
                assert torch.equal(W_now, W[n])
        if t + 1 == 2:
            assert len(opt.state) == 0
            with method.evaluating() as model:  # the knot keeps the function
                torch.testing.assert_close(model(x)[0], before, rtol=1e-12, atol=1e-13)
    for lyr in method.layers():  # rank 1 link: the padding got exactly zero gradient and stayed 0
        assert not lyr.lora_A[1:].any() and not lyr.lora_B[:, 1:].any()
    assert [h[1] for h in method.history] == [2]
    merged = method.merged_weights()
    for n, lyr in zip(method.adapted, method.layers()):
        np.testing.assert_allclose(merged[n], (tt.base_weight(lyr.base_layer) + lyr.delta_weight()).detach().numpy(),
                                   rtol=0, atol=0)


# ---- the verbs ----------------------------------------------------------------------------------------------

def lora_layer(r=2, scale=1.5):
    return lambda layer, streams: LoraLinear(layer, r, scale, 0.0, streams, init_lora_weights=False)


def llama():
    config = transformers.LlamaConfig(vocab_size=17, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return tt.CausalLM(transformers.LlamaForCausalLM(config).to(torch.float64))


def logits(model, x):
    with torch.no_grad():
        return model(x)[0].clone()


def test_inject_on_gpt2_conv1d_equals_the_numpy_inject_key_for_key():
    gpt = random_gpt(TINY, 1)
    lm = tt.from_gpt(gpt)
    targets = ["attn.c_attn", "mlp.c_fc"]
    names = tt.inject(lm, lora_layer(), targets, seed=7)
    ref_names = adapters.inject(gpt, adapters.LoraConfig(r=2, lora_alpha=3, target_modules=targets,
                                                         init_lora_weights=False), 7)
    assert names == ref_names == [f"transformer.h.{i}.{m}" for i in range(2) for m in targets]
    ours, ref = tt.adapter_state_dict(lm), adapters.adapter_state_dict(gpt)
    assert list(ours) == list(ref)
    for key, value in ref.items():  # the same named streams, the same draws in the same order
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    layer = lm.hf_model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (8, 24)
    assert tuple(layer.lora_A.shape) == (2, 8) and tuple(layer.lora_B.shape) == (24, 2)
    x = tiny_tasks(0, 1, 1, 2, 5, TINY)[0][0][0]
    assert_close(lm(x)[0], gpt(x)[0].data, "logits of the adapted GPT-2")  # Conv1D: ΔW's orientation is right


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_verbs_train_only_adapters_round_trip_merge_unmerge_and_disable(which):
    if which == "gpt2":
        lm, targets, expect = tt.from_gpt(random_gpt(TINY, 2)), ["c_attn", "c_proj"], 6
        x = tiny_tasks(0, 1, 1, 2, 5, TINY)[0][0][0]
    else:
        lm, targets, expect = llama(), ["q_proj", "v_proj", "down_proj"], 6
        x = np.random.default_rng(0).integers(0, 17, (2, 7))
    base = logits(lm, x)
    names = tt.inject(lm, lora_layer(), targets, seed=0)
    assert len(names) == expect and all(n.rpartition(".")[2] in targets for n in names)
    tt.mark_only_adapters_trainable(lm)
    trainable = [n for n, p in lm.hf_model.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.{k}" for n in names for k in ("lora_A", "lora_B")]
    adapted = logits(lm, x)
    assert (adapted - base).abs().max() > 1e-3  # init_lora_weights=False: the adapter is not a no-op

    state = tt.adapter_state_dict(lm)
    assert list(state) == [f"{n}.{k}" for n in names for k in ("lora_A", "lora_B")]
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in state.values())
    zeros = {k: np.zeros_like(v) for k, v in state.items()}
    tt.load_adapter_state_dict(lm, zeros)
    torch.testing.assert_close(logits(lm, x), base, rtol=0, atol=0)
    tt.load_adapter_state_dict(lm, state)
    torch.testing.assert_close(logits(lm, x), adapted, rtol=0, atol=0)

    with tt.disable_adapters(lm):
        torch.testing.assert_close(logits(lm, x), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(lm, x), adapted, rtol=0, atol=0)

    W0 = {n: tt.base_weight(m.base_layer).detach().clone() for n, m in tt.adapted_layers(lm)}
    lm.eval()
    tt.merge(lm)
    torch.testing.assert_close(logits(lm, x), adapted, rtol=1e-12, atol=1e-12)
    tt.unmerge(lm)
    for n, m in tt.adapted_layers(lm):
        torch.testing.assert_close(tt.base_weight(m.base_layer), W0[n], rtol=0, atol=1e-15)
    torch.testing.assert_close(logits(lm, x), adapted, rtol=1e-12, atol=1e-12)

    tt.merge_and_unload(lm)
    assert not tt.adapted_layers(lm)
    plain = [type(m).__name__ for n, m in lm.hf_model.named_modules() if n in names]
    assert plain == ["Conv1D" if which == "gpt2" else "Linear"] * len(names)
    torch.testing.assert_close(logits(lm, x), adapted, rtol=1e-12, atol=1e-12)


def test_a_method_runs_its_hooks_on_a_llama_built_from_a_config():
    lm = llama()
    method = tt.make_method("ilora", target_modules=["q_proj", "v_proj"], buffer_size=4, r=2)
    method.attach(lm, seed=0)
    opt = TorchAdam(method.trainable_parameters(), lr=1e-2)
    rng = np.random.default_rng(1)
    for k in range(2):
        method.before_task(k, 2, opt)
        for step in range(2):
            x, y = rng.integers(0, 17, (2, 6)), rng.integers(0, 17, (2, 6))
            loss = method.loss(x, y, np.ones((2, 6)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_step(step, opt)
    assert method.t == 4 and len(method.adapted) == 4
    layer = method.layers()[0]
    assert not torch.equal(layer.lora_B, layer.lora_B_slow) and layer.lora_B_slow.any()  # interpolated
    _, _, hidden = lm(x, return_hidden=True)
    assert len(hidden) == 2 and tuple(hidden[0].shape) == (2, 6, 16)


def test_merging_into_the_tied_lm_head_is_refused():
    lm = tt.from_gpt(random_gpt(TINY, 0))
    assert lm.hf_model.lm_head.weight is lm.hf_model.transformer.wte.weight
    tt.inject(lm, lora_layer(), ["lm_head"], seed=0)
    with pytest.raises(RuntimeError, match="tied to another module"):
        tt.merge(lm)
    with pytest.raises(RuntimeError, match="tied to another module"):
        tt.merge_and_unload(lm)
    assert not any(m.merged for _, m in tt.adapted_layers(lm))


def test_bad_input_gets_a_one_line_error_that_says_what_to_do():
    lm = tt.from_gpt(random_gpt(TINY, 0))
    messages = []

    def refused(error, match, call, *args, **kwargs):
        with pytest.raises(error, match=match) as info:
            call(*args, **kwargs)
        messages.append(str(info.value))

    refused(ValueError, r"matches no Linear or Conv1D.*The layers are: \['transformer.h.0.attn", tt.inject, lm,
            lora_layer(), ["q_proj"])
    refused(TypeError, "target_modules must be a non-empty list", tt.inject, lm, lora_layer(), [])
    refused(TypeError, "attaches to a torch model.*the NumPy GPT takes tinyslim.adapters",
            tt.make_method("lora").attach, random_gpt(TINY, 0), seed=0)
    refused(ValueError, "unknown torch method 'loar'", tt.make_method, "loar")
    refused(ValueError, "unknown config fields", tt.make_method, "cola", chain_length=3)
    refused(TypeError, "wraps an nn.Linear or a GPT-2 Conv1D", LoraLinear, torch.nn.Embedding(3, 4), 1, 1.0, 0.0,
            adapters.Streams(0))
    refused(RuntimeError, "call method.attach", tt.make_method("cola").trainable_parameters)
    tt.inject(lm, lora_layer(), ["c_fc"], seed=0)
    refused(ValueError, "already has adapters", tt.inject, lm, lora_layer(), ["c_proj"])
    state = tt.adapter_state_dict(lm)
    key = "transformer.h.0.mlp.c_fc.lora_A"
    refused(ValueError, rf"{key} has shape \(3, 8\) in the state but \(2, 8\) in the model",
            tt.load_adapter_state_dict, lm, {**state, key: np.zeros((3, 8))})
    refused(KeyError, "missing keys", tt.load_adapter_state_dict, lm, {k: v for k, v in state.items() if k != key})
    refused(RuntimeError, "not merged", tt.unmerge, lm)
    assert all("\n" not in m for m in messages), [m for m in messages if "\n" in m]
