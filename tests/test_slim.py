"""SLIM (tinyslim/adapters/slim.py), docs/methods.md §2, and its ablation rows.

* against an independent torch SLIM (tests/torch_adapters.py) on hypothesis-drawn tiny GPTs and SLIM
  configs (every variant), float64: the loss and every trainable gradient (router, residual-MLP router,
  factors) through top-K, softmax, yielding, masks, L1 and the balance loss (relative error ≤ 1e-8);
  a short training run: every step's loss, the factors and cluster statistics after it, and the
  evaluation logits
* the §2.10 invariants, numbered as there (1–11), and the runner contract (check_adapter_invariants)
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_adapters_base import (assert_trained_outputs_close, random_batch, random_gpt, relative_error, run_tasks,
                               tiny_tasks)
from tinyslim.adapters import (SLIM, SLIM_ABLATIONS, SlimConfig, Streams, adapter_state_dict, make_method,
                               make_slim_ablation, stream)
from tinyslim.adapters.slim import SlimLinear, abs_sum, drop_probabilities, l1_penalty
from tinyslim.autograd import Tensor
from tinyslim.nn import GPTConfig, Linear
from tinyslim.testing import check_adapter_invariants, gradcheck

seeds = st.integers(0, 2**32 - 1)
# parameters after Adam steps: a gradient that is 0 up to rounding (~1e-16) still moves a parameter by up to
# lr·1e-16/ε = 1e-10 (Adam divides by √v + ε), so noise-level parameters are compared absolutely at that size
ADAM_NOISE = 1e-10
F32 = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)  # float32, for bit-identity
F64 = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype="float64")


@pytest.fixture(autouse=True)
def _numpy_kernel(monkeypatch):
    monkeypatch.setenv("TINYSLIM_BACKEND", "numpy")  # tiny problems: no thread start-up of the compiled kernel


def randomize_B(method, seed, scale=0.5):
    rng = np.random.default_rng([seed, 99])
    for layer in method.layers():
        layer.lora_B.data[...] = scale * rng.standard_normal(layer.lora_B.shape)


# ---- against torch -------------------------------------------------------------------------------

TWIN_NAMES = {"lora_A": "A", "lora_B": "B", "router_weight": "W", "router_bias": "b", "router_fc_weight": "W1",
              "router_fc_bias": "b1", "router_proj_weight": "W2"}


def twin_cfg(c: SlimConfig) -> dict:
    return dict(E_L=c.n_lora_experts, E_I=c.n_identity_experts, K=c.top_k, s=c.scale, gamma=c.gamma,
                yield_mode=c.yield_mode, logit_norm=c.logit_norm, p=c.drop_p, rescale=c.mask_rescale,
                eval_masks=c.eval_masks, momentum=c.cluster_momentum, floor=c.sigma_floor,
                cluster_init=c.cluster_init, mlp=c.router == "residual_mlp")


def build_twin(method, config, base_state, seed):
    from torch_adapters import TorchSlimLinear, replace_linears, twin_gpt

    twin = twin_gpt(config, base_state)
    state = adapter_state_dict(method.model)
    mask_rng, cluster_rng, eval_rng = stream(seed, "mask"), stream(seed, "cluster"), stream(seed, "eval_mask")
    cfg = twin_cfg(method.config)
    make = {n: (lambda base, n=n: TorchSlimLinear(base, {k.rpartition(".")[2]: v for k, v in state.items()
                                                        if k.rpartition(".")[0] == n}, cfg, mask_rng, cluster_rng,
                                                  eval_rng)) for n in method.adapted}
    return twin, replace_linears(twin, make)


@st.composite
def slim_cases(draw):
    n_head = draw(st.integers(1, 2))
    config = GPTConfig(vocab_size=draw(st.integers(5, 12)), block_size=6, n_layer=draw(st.integers(1, 2)),
                       n_head=n_head, n_embd=n_head * draw(st.integers(3, 4)), bias=draw(st.booleans()),
                       dtype="float64")
    E_L, E_I = draw(st.integers(1, 3)), draw(st.integers(0, 2))
    over = dict(n_lora_experts=E_L, n_identity_experts=E_I, top_k=draw(st.integers(1, E_L + E_I)),
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
                eval_masks=draw(st.sampled_from(["expected", "sampled"])),
                l1_coef=draw(st.sampled_from([0.0, 1e-3, 0.3])), balance_coef=draw(st.sampled_from([0.0, 0.01, 1.0])),
                pad_token_id=draw(st.sampled_from([None, 0])))
    return config, over, draw(st.integers(1, 3)), draw(st.integers(3, 5)), draw(seeds)


@pytest.mark.torch
@given(case=slim_cases())
def test_slim_loss_and_every_trainable_gradient_match_torch(case):
    config, over, B, T, seed = case
    run_seed = seed % 997
    model = random_gpt(config, seed)
    base_state = model.state_dict()
    method = make_method("slim", **over)
    method.attach(model, run_seed)
    randomize_B(method, seed)  # B = 0 would leave A and the routers without gradient
    twin, layers = build_twin(method, config, base_state, run_seed)
    x, y, mask = random_batch(np.random.default_rng(seed), config, B, T)

    from torch_adapters import slim_loss
    loss = method.loss(x, y, mask)  # first batch: seeds the clusters, draws the masks
    loss.backward()
    ref = slim_loss(twin, layers, x, y, mask, method.config.l1_coef, method.config.balance_coef, over["pad_token_id"])
    ref.backward()
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-10)
    for n, ours in zip(method.adapted, method.layers()):
        for key in ours.trainable_names:
            g, r = getattr(ours, key).grad, getattr(layers[n], TWIN_NAMES[key]).grad
            assert g is not None, f"{n}.{key} got no gradient"
            err = relative_error(g, r.numpy())
            assert err <= 1e-8 or np.abs(g - r.numpy()).max() <= 1e-13, f"{n}.{key}: relative error {err:.2e}"
        np.testing.assert_allclose(ours.cluster_mu.data, layers[n].mu, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ours.cluster_sigma.data, layers[n].sigma, rtol=1e-12, atol=1e-14)


@pytest.mark.torch
@settings(max_examples=8)
@given(case=slim_cases(), steps=st.integers(1, 3))
def test_slim_training_run_matches_torch_steps_clusters_and_evaluation(case, steps):
    from torch_adapters import run_slim

    config, over, B, T, seed = case
    run_seed = seed % 997
    model = random_gpt(config, seed)
    base_state = model.state_dict()
    method = make_method("slim", **over)
    method.attach(model, run_seed)
    randomize_B(method, seed, 0.1)
    twin, layers = build_twin(method, config, base_state, run_seed)
    tasks = tiny_tasks(seed, n_tasks=2, steps=steps, B=B, T=T, config=config)
    losses, _ = run_tasks(method, tasks, lr=1e-2)
    ref = run_slim(twin, layers, tasks, lr=1e-2, l1_coef=method.config.l1_coef,
                   balance_coef=method.config.balance_coef, pad_id=over["pad_token_id"])
    np.testing.assert_allclose(losses, ref, rtol=1e-9)
    for n, ours in zip(method.adapted, method.layers()):
        for key in ours.trainable_names:
            a, b = getattr(ours, key).data, getattr(layers[n], TWIN_NAMES[key]).detach().numpy()
            assert relative_error(a, b) <= 1e-8 or np.abs(a - b).max() <= ADAM_NOISE, f"{n}.{key}"
        np.testing.assert_allclose(ours.cluster_mu.data, layers[n].mu, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ours.cluster_sigma.data, layers[n].sigma, rtol=1e-10, atol=1e-12)
    x = tasks[0][0][0]
    from torch_adapters import forward_hidden
    twin.eval()
    with method.evaluating():
        logits = model(x)[0].data
    with __import__("torch").no_grad():
        ref_logits = forward_hidden(twin, x)[0].numpy()
    assert_trained_outputs_close(logits, ref_logits)


# ---- §2.10 invariants ------------------------------------------------------------------------------

def slim_model(config=F32, seed=0, **over):
    model = random_gpt(config, seed)
    method = make_method("slim", **over)
    method.attach(model, seed)
    return method, model


def base_logits(config, seed, x):
    base = random_gpt(config, seed)
    base.eval()
    return base(x)[0].data


@given(seed=seeds, K=st.integers(1, 2), train=st.booleans())
def test_1_identity_only_routing_is_the_base_bit_for_bit(seed, K, train):
    method, model = slim_model(F32, seed % 1000, n_identity_experts=2, top_k=K, target_modules="all-linear")
    randomize_B(method, seed)
    x, y, mask = random_batch(np.random.default_rng(seed), F32, 3, 6)
    method.loss(x, y, mask)  # seed the clusters: d is live
    for layer in method.layers():
        layer.logit_bias = np.r_[np.zeros(layer.E_L), np.full(layer.E_I, 1e30)]  # the test hook: +∞ on 𝓘
    if not train:
        model.eval()
    np.testing.assert_array_equal(model(x)[0].data, base_logits(F32, seed % 1000, x))
    assert all(np.all(layer.last_identity_mass == 1) for layer in method.layers())


@given(seed=seeds, train=st.booleans())
def test_2_zero_B_is_the_base_bit_for_bit_whatever_the_routing(seed, train):
    method, model = slim_model(F32, seed % 1000, router_init_std=3.0, target_modules="all-linear")
    x, y, mask = random_batch(np.random.default_rng(seed), F32, 3, 6)
    method.loss(x, y, mask)
    if not train:
        model.eval()
    np.testing.assert_array_equal(model(x)[0].data, base_logits(F32, seed % 1000, x))


@given(seed=seeds, r=st.integers(1, 3))
def test_3_one_expert_no_identity_k1_p0_is_plain_lora(seed, r):
    x, y, mask = random_batch(np.random.default_rng(seed), F64, 2, 5)
    outs = []
    for kind in ("slim", "lora"):
        model = random_gpt(F64, seed % 1000)
        if kind == "slim":
            m = make_method("slim", n_lora_experts=1, n_identity_experts=0, top_k=1, drop_p=0.0, l1_coef=0.0, r=r,
                            lora_alpha=4)
        else:
            m = make_method("lora", r=r, lora_alpha=4, target_modules=["mlp.c_fc", "mlp.c_proj"])
        m.attach(model, seed % 1000)  # E_L = 1 draws LoRA's A from the same `init` stream
        rng = np.random.default_rng(seed)
        for layer in m.layers():
            layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape).reshape(layer.lora_B.shape)
        loss = m.loss(x, y, mask)
        loss.backward()
        outs.append((loss.item(), [(l.lora_A.data.reshape(-1), l.lora_A.grad.reshape(-1), l.lora_B.grad.reshape(-1))
                                   for l in m.layers()], m))
    (ls, gs, slim), (ll, gl, _) = outs
    np.testing.assert_allclose(ls, ll, rtol=1e-12)
    for (a1, dA1, dB1), (a2, dA2, dB2) in zip(gs, gl):
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_allclose(dA1, dA2, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(dB1, dB2, rtol=1e-10, atol=1e-13)
    layer = slim.layers()[0]
    w, idx, _ = layer.route(layer.router_logits(Tensor(np.ones((3, layer.in_features)))), np.zeros(3))
    assert np.all(w.data == 1.0) and np.all(idx == 0)  # the single gate weight is exactly 1.0


@given(seed=seeds, E_L=st.integers(1, 4), K=st.integers(1, 2), gamma=st.sampled_from([0.0, 1.0]))
def test_4_no_identity_no_masks_no_l1_is_the_moe_lora_baseline_bit_for_bit(seed, E_L, K, gamma):
    K = min(K, E_L)
    tasks = tiny_tasks(seed, n_tasks=2, steps=2, config=F32)
    runs = []
    for method in (make_method("slim", n_lora_experts=E_L, n_identity_experts=0, top_k=K, drop_p=0.0, l1_coef=0.0,
                               gamma=gamma),
                   make_method("moe_lora", n_lora_experts=E_L, top_k=K)):
        model = random_gpt(F32, seed % 1000)
        method.attach(model, seed % 1000)
        losses, _ = run_tasks(method, tasks, lr=1e-2)
        with method.evaluating():
            logits = model(tasks[0][0][0])[0].data
        runs.append((losses, {k: v for k, v in adapter_state_dict(model).items() if "cluster" not in k}, logits))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        np.testing.assert_array_equal(v, runs[1][1][k], err_msg=k)
    np.testing.assert_array_equal(runs[0][2], runs[1][2])


def lone_layer(D=5, O=4, seed=0, dtype=np.float64, **over):
    rng = np.random.default_rng(seed)
    cfg = SlimConfig(**{"r": 2, **over})
    layer = SlimLinear(Linear(D, O, rng=rng, dtype=dtype), cfg, Streams(seed))
    layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape)
    return layer, rng


@given(seed=seeds, K=st.integers(1, 6), shift=st.floats(-50, 50), yield_mode=st.sampled_from(["additive",
                                                                                             "multiplicative"]))
def test_5_gates_are_a_renormalised_softmax_on_the_top_k_and_ignore_a_common_shift(seed, K, shift, yield_mode):
    layer, rng = lone_layer(seed=seed % 1000, top_k=K, yield_mode=yield_mode, gamma=0.0)
    logits = Tensor(rng.standard_normal((7, layer.E)))
    d = rng.standard_normal(7)
    w, idx, _ = layer.route(logits, d)
    w2, idx2, _ = layer.route(Tensor(logits.data + shift), d)
    assert np.all(w.data >= 0) and np.allclose(w.data.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert all(len(set(row)) == K for row in idx.tolist())  # K distinct experts; every other one has weight 0
    expected = np.argsort(-logits.data, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_allclose(w.data, w2.data, rtol=1e-12, atol=1e-14)


@given(seed=seeds, K=st.integers(1, 6), mode=st.sampled_from(["additive", "multiplicative"]))
def test_6_yielding_is_monotone_in_gamma_d(seed, K, mode):
    layer, rng = lone_layer(seed=seed % 1000, top_k=K, yield_mode=mode)
    logits = Tensor(np.repeat(rng.standard_normal((1, layer.E)), 41, axis=0))
    d = np.linspace(-3, 8, 41)  # γ = 1: γ·d increasing along the rows
    w, idx, _ = layer.route(logits, d)
    if mode == "additive":
        identity_mass = np.where(idx >= layer.E_L, w.data, 0).sum(axis=1)
        assert np.all(np.diff(identity_mass) >= -1e-12)
    else:  # the LoRA weights only shrink as d grows past 0
        lora_mass = np.where(idx < layer.E_L, w.data, 0).sum(axis=1)
        assert np.all(np.diff(lora_mass) <= 1e-12)


@given(seed=seeds, k=st.integers(0, 3), c=st.integers(0, 4))
def test_7_d_is_minus_one_at_a_centre_and_one_at_two_sigma(seed, k, c):
    layer, rng = lone_layer(seed=seed % 1000, n_clusters=4)
    mu = 100.0 * np.eye(4, 5) + rng.standard_normal((4, 5))  # well separated centres
    layer.cluster_mu.data[...] = mu
    layer.cluster_sigma.data[...] = rng.uniform(0.5, 2.0, (4, 5))
    _, d = layer.ood_score(mu)
    np.testing.assert_array_equal(d, -1.0)
    x = mu[k].copy()
    x[c] += 2 * layer.cluster_sigma.data[k, c]
    k_star, d = layer.ood_score(x[None])
    assert k_star[0] == k and d[0] == pytest.approx(1.0, abs=1e-12)


def test_8_masks_factor_masking_p0_monte_carlo_and_expected_evaluation():
    assert drop_probabilities(0.3)[0] == pytest.approx(1 - math.sqrt(0.7)) and drop_probabilities(0.3)[0] == \
        pytest.approx(0.1633, abs=1e-4)
    layer, rng = lone_layer(D=6, O=5, seed=3, n_identity_experts=0, n_lora_experts=2, top_k=2, drop_p=0.3)
    x = rng.standard_normal((4, 6))
    s = layer.scale
    w, idx, _ = layer.route(layer.router_logits(Tensor(x)), np.zeros(4))
    G = np.zeros((4, 2))
    np.put_along_axis(G, idx, w.data, axis=1)
    dense = [s * layer.lora_B.data[e] @ layer.lora_A.data[e] for e in range(2)]  # s·B_e A_e (O, D)
    # factor masking equals diag(m_out)·BA·diag(m_in)
    layer.draw_masks()
    y = layer.adapter_delta(Tensor(x)).data
    ref = sum(G[:, e:e + 1] * (x @ (layer.out_mask[e][:, None] * dense[e] * layer.in_mask[e][None, :]).T)
              for e in range(2))
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-14)
    # "expected" evaluation: no masks, exactly (1 − p) times the unmasked delta (equal)
    layer.eval()
    unmasked = sum(G[:, e:e + 1] * (x @ dense[e].T) for e in range(2))
    np.testing.assert_allclose(layer.adapter_delta(Tensor(x)).data, 0.7 * unmasked, rtol=1e-12, atol=1e-14)
    # Monte-Carlo mean of the training delta → (1 − p)·unmasked (each entry survives with probability 1 − p)
    layer.train()
    n = 4000
    total = np.zeros_like(unmasked)
    for _ in range(n):
        layer.draw_masks()
        total += layer.adapter_delta(Tensor(x)).data
    err = np.abs(total / n - 0.7 * unmasked).max() / np.abs(unmasked).max()
    assert err < 0.05, f"Monte-Carlo mean off by {err:.3f} of the delta's scale"
    # p = 0: no draws, all-ones masks (the kernel gets none)
    layer0, _ = lone_layer(seed=3, drop_p=0.0)
    layer0.draw_masks()
    assert layer0.in_mask is None and layer0.out_mask is None and layer0.delta_masks() == (None, None, 1.0)
    assert "mask" not in layer0.streams.used()


def test_8b_masks_per_expert_per_layer_once_per_step_from_the_mask_stream():
    method, model = slim_model(F64, 1, drop_p=0.5)
    x, y, mask = random_batch(np.random.default_rng(0), F64, 2, 5)
    method.loss(x, y, mask)
    rng = stream(1, "mask")
    q = drop_probabilities(0.5)[0]
    for layer in method.layers():  # model order: m_out (E_L, O), then m_in (E_L, D)
        np.testing.assert_array_equal(layer.out_mask, rng.random((4, layer.out_features)) >= q)
        np.testing.assert_array_equal(layer.in_mask, rng.random((4, layer.in_features)) >= q)
    first = [layer.in_mask.copy() for layer in method.layers()]
    method.loss(x, y, mask)
    assert any(not np.array_equal(a, l.in_mask) for a, l in zip(first, method.layers()))  # redrawn every step
    with method.evaluating():  # "expected" evaluation draws nothing
        state = method.streams["mask"].bit_generator.state
        model(x)
        assert method.streams["mask"].bit_generator.state == state and "eval_mask" not in method.streams.used()


@pytest.mark.parametrize("split", ["rows", "columns"])
def test_8c_mask_split_drops_one_side_only_and_keeps_the_expectation(split):
    p = 0.3
    assert drop_probabilities(p, split) == ((p, 0.0) if split == "rows" else (0.0, p))
    assert drop_probabilities(p, "both") == drop_probabilities(p)
    layer, rng = lone_layer(D=6, O=5, seed=4, n_identity_experts=0, n_lora_experts=2, top_k=2, drop_p=p,
                            mask_split=split)
    x = rng.standard_normal((4, 6))
    layer.draw_masks()
    kept, dropped = (layer.in_mask, layer.out_mask) if split == "rows" else (layer.out_mask, layer.in_mask)
    assert kept.all() and not dropped.all()  # one side is never dropped; the other is
    layer.eval()
    expected = layer.adapter_delta(Tensor(x)).data  # (1 − p)·unmasked
    layer.train()
    n, total = 4000, 0.0
    for _ in range(n):
        layer.draw_masks()
        total = total + layer.adapter_delta(Tensor(x)).data
    err = np.abs(total / n - expected).max() / np.abs(expected).max()
    assert err < 0.05, f"Monte-Carlo mean off by {err:.3f} of the delta's scale"


def test_8d_update_masks_leave_the_forward_unmasked_and_freeze_the_masked_factor_entries_for_the_step():
    x, y, mask = random_batch(np.random.default_rng(0), F64, 2, 5)
    method, model = slim_model(F64, 1, drop_p=0.5, mask_mode="update", gamma=0.0)
    randomize_B(method, 1)
    twin, _ = slim_model(F64, 1, drop_p=0.0, gamma=0.0)
    randomize_B(twin, 1)
    # the forward pass is the unmasked one, in training (c = 1) and at evaluation (c = 1, no masks)
    loss = method.loss(x, y, mask)
    np.testing.assert_allclose(loss.item(), twin.loss(x, y, mask).item(), rtol=1e-12)
    with method.evaluating() as m, twin.evaluating() as t:
        np.testing.assert_array_equal(m(x)[0].data, t(x)[0].data)
    # the masks come from the `mask` stream exactly as in "forward" mode
    forward, _ = slim_model(F64, 1, drop_p=0.5, gamma=0.0)
    forward.loss(x, y, mask)
    for a, b in zip(method.layers(), forward.layers()):
        np.testing.assert_array_equal(a.in_mask, b.in_mask)
        np.testing.assert_array_equal(a.out_mask, b.out_mask)
    # one Adam step: a masked column of A_e and a masked row of B_e keep their values, the others move
    before = [(layer.lora_A.data.copy(), layer.lora_B.data.copy()) for layer in method.layers()]
    losses, _ = run_tasks(method, [[(x, y, mask)]], lr=1e-2)
    layer = method.layers()[0]
    for layer, (A0, B0) in zip(method.layers(), before):
        drop_in, drop_out = layer.in_mask == 0, layer.out_mask == 0
        assert drop_in.any() and drop_out.any() and (~drop_in).any()
        np.testing.assert_array_equal(layer.lora_A.data.transpose(0, 2, 1)[drop_in], A0.transpose(0, 2, 1)[drop_in])
        np.testing.assert_array_equal(layer.lora_B.data[drop_out], B0[drop_out])
        assert np.all(np.any(layer.lora_A.data.transpose(0, 2, 1)[~drop_in] != A0.transpose(0, 2, 1)[~drop_in],
                             axis=-1))


def test_9_clusters_seeding_eval_freeze_momentum_zero_floor_and_empty_clusters():
    x, y, mask = random_batch(np.random.default_rng(0), F64, 3, 5)
    x[0, 3:] = 0  # padding: left out of the statistics
    seeded = []
    for _ in range(2):  # deterministic under the seed
        method, model = slim_model(F64, 2, n_clusters=3, sigma_floor=0.2, pad_token_id=0)
        method.loss(x, y, mask)
        seeded.append([(l.cluster_mu.data.copy(), l.cluster_sigma.data.copy()) for l in method.layers()])
    for (m1, s1), (m2, s2) in zip(*seeded):
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_array_equal(s1, s2)
        assert np.all(s1 >= 0.2)
    layer = method.layers()[0]
    real_inputs = layer._cache[0]
    assert len(real_inputs) == int((x != 0).sum())
    assert all(any(np.array_equal(mu, r) for r in real_inputs) for mu in layer.cluster_mu.data)  # centres are tokens
    # an update moves only clusters that got tokens, and keeps σ ≥ σ_min
    before = [(l.cluster_mu.data.copy(), l.cluster_sigma.data.copy()) for l in method.layers()]
    X, k_star = layer._cache
    method.after_step(0, None)
    for (mu0, s0), l in zip(before, method.layers()):
        assert np.all(l.cluster_sigma.data >= 0.2)
    empty = [k for k in range(3) if not np.any(k_star == k)]
    for k in empty:
        np.testing.assert_array_equal(layer.cluster_mu.data[k], before[0][0][k])
    # evaluation never touches the statistics
    state = adapter_state_dict(model)
    with method.evaluating():
        model(x)
    method.after_step(1, None)
    for k, v in adapter_state_dict(model).items():
        np.testing.assert_array_equal(v, state[k])
    # m = 0: training leaves them bit-identical after seeding
    method, model = slim_model(F64, 2, cluster_momentum=0.0)
    method.loss(x, y, mask)
    seeded_state = {k: v for k, v in adapter_state_dict(model).items() if "cluster" in k}
    for _ in range(2):
        method.loss(x, y, mask)
        method.after_step(0, None)
    for k, v in seeded_state.items():
        np.testing.assert_array_equal(adapter_state_dict(model)[k], v)


def test_9b_empty_cluster_is_left_unchanged_and_updates_follow_the_formula():
    layer, rng = lone_layer(D=3, O=2, seed=5, n_clusters=2, cluster_momentum=0.25, sigma_floor=0.1)
    layer.cluster_mu.data[...] = [[0, 0, 0], [50, 50, 50]]
    layer.cluster_sigma.data[...] = 1.0
    X = rng.standard_normal((6, 3))  # all nearest to cluster 0
    layer.adapter_delta(Tensor(X))
    layer.update_clusters()
    mu0 = 0.75 * 0 + 0.25 * X.mean(0)
    np.testing.assert_allclose(layer.cluster_mu.data[0], mu0, rtol=1e-14)
    np.testing.assert_allclose(layer.cluster_sigma.data[0],
                               np.maximum(np.sqrt(0.75 + 0.25 * ((X - mu0) ** 2).mean(0)), 0.1), rtol=1e-14)
    np.testing.assert_array_equal(layer.cluster_mu.data[1], 50.0)
    np.testing.assert_array_equal(layer.cluster_sigma.data[1], 1.0)


def test_10_l1_value_and_gradient_sign_over_numel_with_zero_at_zero():
    method, model = slim_model(F64, 0, r=2)
    layers = method.layers()
    layers[0].lora_A.data[0, 0, :3] = 0.0
    value = l1_penalty(layers)
    expected = sum(np.abs(l.lora_A.data).sum() / (2 * l.in_features) + np.abs(l.lora_B.data).sum()
                   / (l.out_features * 2) for l in layers)
    assert value.item() == pytest.approx(expected, rel=1e-14)
    value.backward()
    for l in layers:
        np.testing.assert_array_equal(l.lora_A.grad, np.sign(l.lora_A.data) / (2 * l.in_features))
        np.testing.assert_array_equal(l.lora_B.grad, np.zeros_like(l.lora_B.data))  # B = 0: sign(0) = 0
    assert np.all(layers[0].lora_A.grad[0, 0, :3] == 0)
    gradcheck(lambda a: abs_sum(a), np.random.default_rng(1).uniform(0.1, 2, (3, 4)) * np.sign(
        np.random.default_rng(2).standard_normal((3, 4))))


@given(seed=seeds, K=st.integers(1, 3), p=st.sampled_from([0.0, 0.4]), mode=st.sampled_from(["additive",
                                                                                           "multiplicative"]),
       router=st.sampled_from(["linear", "residual_mlp"]))
def test_11_gradcheck_router_factors_and_x_with_masks_and_clusters_fixed(seed, K, p, mode, router):
    layer, rng = lone_layer(D=4, O=3, seed=seed % 1000, top_k=K, drop_p=p, yield_mode=mode, router=router,
                            router_init_std=0.7, n_identity_experts=1, n_lora_experts=2)
    if router == "residual_mlp":
        layer.router_proj_weight.data[...] = rng.standard_normal(layer.router_proj_weight.shape)
    layer.cluster_mu.data[...] = rng.standard_normal(layer.cluster_mu.shape)
    layer.cluster_sigma.data[...] = 0.5
    layer.draw_masks()
    x0 = rng.standard_normal((5, 4))
    logits = layer.router_logits(Tensor(x0)).data
    _, d = layer.ood_score(x0)
    shifted = logits + (layer.config.gamma * d)[:, None] * (np.arange(layer.E) >= layer.E_L)
    srt = np.sort(shifted if mode == "additive" else logits, axis=1)
    if K < layer.E and np.min(srt[:, -K] - srt[:, -K - 1]) < 1e-3:
        return  # a near-tie in the top-K: the selection would flip under finite differences
    fixed = layer.ood_score(x0)
    layer.ood_score = lambda X: fixed  # d(x) carries no gradient: hold it (and the clusters, the masks) fixed
    names = layer.trainable_names
    gradcheck(lambda x, *ps: _with_params(layer, names, ps, x), x0, *[getattr(layer, n).data.copy() for n in names])


def _with_params(layer, names, params, x):
    """adapter_delta with the layer's trainable arrays replaced by the given Tensors (for gradcheck)."""
    saved = {n: getattr(layer, n) for n in names}
    for n, p in zip(names, params):
        setattr(layer, n, p)
    try:
        return layer.adapter_delta(x)
    finally:
        for n, p in saved.items():
            setattr(layer, n, p)


# ---- the runner contract, ablations, config ---------------------------------------------------------

@pytest.mark.parametrize("over", [dict(), dict(n_identity_experts=0, drop_p=0.0), dict(router="residual_mlp"),
                                  dict(yield_mode="multiplicative", logit_norm="layernorm", balance_coef=0.01),
                                  dict(mask_rescale=True, cluster_init="random", pad_token_id=0)])
def test_slim_honours_the_adapter_invariants(over):
    results = check_adapter_invariants(make_method("slim", r=2, **over))
    assert results["merge"].startswith("skipped")


def test_ablation_rows_and_the_ladder_differs_in_the_intended_component_only():
    assert set(SLIM_ABLATIONS) >= {"moe_lora", "+identity", "+yielding", "+merging", "slim", "slim-no-identity",
                                   "slim-no-yielding", "slim-no-masks"}
    m = make_slim_ablation("slim-no-masks", r=2)
    assert isinstance(m, SLIM) and m.name == "slim-no-masks" and m.config.drop_p == 0.0 and m.config.r == 2
    with pytest.raises(ValueError, match="unknown SLIM ablation"):
        make_slim_ablation("slim-no-router")
    states = {}
    for row in ("moe_lora", "+identity"):
        method = make_slim_ablation(row)
        method.attach(random_gpt(F32, 0), seed=4)
        states[row] = adapter_state_dict(method.model)
    for k, v in states["moe_lora"].items():  # adding identity experts appends router rows and changes nothing else
        w = states["+identity"][k]
        np.testing.assert_array_equal(w[:len(v)] if k.endswith(("router_weight", "router_bias")) else w, v)


def test_the_residual_router_starts_as_the_linear_one():
    method, model = slim_model(F64, 0, router="residual_mlp")
    other, _ = slim_model(F64, 0)
    for a, b in zip(method.layers(), other.layers()):
        np.testing.assert_array_equal(a.router_weight.data, b.router_weight.data)
        X = Tensor(np.random.default_rng(1).standard_normal((3, a.in_features)))
        np.testing.assert_array_equal(a.router_logits(X).data, b.router_logits(X).data)


def test_config_errors_say_what_was_expected():
    with pytest.raises(ValueError, match="top_k = 7 exceeds the 6 experts"):
        SlimConfig(top_k=7)
    with pytest.raises(ValueError, match="yield_mode"):
        SlimConfig(yield_mode="subtractive")
    with pytest.raises(ValueError, match="drop_p"):
        SlimConfig(drop_p=1.0)
    with pytest.raises(ValueError, match="n_identity_experts"):
        SlimConfig(n_identity_experts=-1)
    with pytest.raises(ValueError, match="mask_split"):
        SlimConfig(mask_split="diagonal")
    with pytest.raises(ValueError, match="mask_mode"):
        SlimConfig(mask_mode="gradient")
    assert SlimConfig().scale == 2.0 and SlimConfig().target_modules == ["mlp.c_fc", "mlp.c_proj"]
    layer, _ = lone_layer()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        layer.delta_weight()
