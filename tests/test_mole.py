"""MoLE (tinyslim/adapters/mole.py), docs/methods.md §4, and its baselines NLA and the unnormalised sum
(tinyslim/adapters/merging.py), §7.4.

* against an independent torch MoLE (tests/torch_adapters.py) on hypothesis-drawn tiny GPTs, source
  LoRAs of mixed ranks and scales, and every variant (per-token / per-block gates, token / sequence /
  prefix pooling, inference masks, padding), float64: the loss (CE + the balance loss) and the
  gradients of every gate e and ρ, which include the gate path of the later layers through x
  (relative error ≤ 1e-8)
* NLA and the sum against the torch twin's constant gates; merged equals unmerged
* the §4.8 invariants, numbered as there (1–8)
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from test_adapters_base import random_batch, random_gpt, relative_error, run_tasks, tiny_tasks
from tinyslim.adapters import (COMPOSITION_METHODS, NLA, LoraSum, Mole, MoleConfig, adapter_state_dict,
                               load_adapter_state_dict, make_method, merge, sources_from_methods, unmerge)
from tinyslim.adapters.mole import MoleLinear, balance_loss
from tinyslim.autograd import Tensor
from tinyslim.nn import GPTConfig, Linear
from tinyslim.testing import gradcheck

seeds = st.integers(0, 2**32 - 1)
F32 = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
F64 = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype="float64")


@pytest.fixture(autouse=True)
def _numpy_kernel(monkeypatch):
    monkeypatch.setenv("TINYSLIM_BACKEND", "numpy")


def trained_loras(config, targets, ranks, seed, alphas=None):
    """Source LoRA Methods with random (non-zero) factors, one per rank in `ranks`."""
    methods = []
    for i, r in enumerate(ranks):
        m = make_method("lora", r=r, lora_alpha=(alphas or [2 * r] * len(ranks))[i], target_modules=targets,
                        init_lora_weights=False)
        m.attach(random_gpt(config, 0), seed=(seed + i) % 1000)
        methods.append(m)
    return methods


# ---- against torch -------------------------------------------------------------------------------

def build_twin(method, config, base_state):
    from torch_adapters import TorchMoleLinear, replace_linears, twin_gpt

    twin = twin_gpt(config, base_state)
    src = method.config.sources
    shares, make = {}, {}
    for name, layer in zip(method.adapted, method.layers()):
        block = name.rsplit(".", 2)[0]
        share = shares.setdefault(block, {}) if getattr(method.config, "gate_granularity", "") == "layer" else None
        if isinstance(layer, MoleLinear):
            owner = layer.owns_gate
            keep = None if layer.keep is None else layer.keep.tolist()
            kw = dict(e=layer.gate_e.data if owner else None, rho=layer.log_tau.data if owner else None,
                      pool=method.config.gate_pool, share=share, owner=owner, keep=keep)
        else:
            kw = dict(weights=layer.weights)
        make[name] = lambda base, name=name, kw=kw: TorchMoleLinear(base, src.factors[name], src.scales, **kw)
    return twin, replace_linears(twin, make)


@st.composite
def mole_cases(draw):
    n_head = draw(st.integers(1, 2))
    config = GPTConfig(vocab_size=draw(st.integers(5, 12)), block_size=6, n_layer=draw(st.integers(1, 2)),
                       n_head=n_head, n_embd=n_head * draw(st.integers(3, 4)), bias=draw(st.booleans()),
                       dtype="float64")
    E = draw(st.integers(1, 3))
    ranks = [draw(st.integers(1, 3)) for _ in range(E)]
    targets = draw(st.sampled_from([["attn.c_attn", "mlp.c_fc"], ["mlp.c_fc", "mlp.c_proj"], "all-linear"]))
    mask = draw(st.one_of(st.none(), st.sets(st.integers(0, E - 1), min_size=1).map(sorted)))
    over = dict(gate_granularity=draw(st.sampled_from(["token", "layer"])),
                gate_pool=draw(st.sampled_from(["token", "sequence", "prefix"])), mask=mask,
                gate_init_std=draw(st.sampled_from([0.01, 1.0])), tau_init=draw(st.sampled_from([1.0, 0.3])),
                balance_coef=draw(st.sampled_from([0.0, 0.5])), pad_token_id=draw(st.sampled_from([None, 0])))
    return config, ranks, targets, over, draw(st.integers(1, 3)), draw(st.integers(2, 5)), draw(seeds)


# a batch drawn as all padding (vocabulary 5, one row of 2 tokens): random_batch now keeps one real token
ALL_PAD_DRAW = (GPTConfig(vocab_size=5, block_size=6, n_layer=1, n_head=1, n_embd=3, bias=False, dtype="float64"),
                [1], ["attn.c_attn", "mlp.c_fc"],
                dict(gate_granularity="token", gate_pool="token", mask=None, gate_init_std=0.01, tau_init=1.0,
                     balance_coef=0.5, pad_token_id=0), 1, 2, 571215)


@pytest.mark.torch
@given(case=mole_cases())
@example(case=ALL_PAD_DRAW)
def test_mole_loss_and_every_gate_gradient_match_torch(case):
    import torch

    from torch_adapters import forward_hidden, masked_ce, mole_balance

    config, ranks, targets, over, B, T, seed = case
    sources = trained_loras(config, targets, ranks, seed)
    model = random_gpt(config, seed)
    base_state = model.state_dict()
    method = Mole.from_methods(sources, **over)
    method.attach(model, seed % 997)
    twin, layers = build_twin(method, config, base_state)
    x, y, mask = random_batch(np.random.default_rng(seed), config, B, T)
    loss = method.loss(x, y, mask)
    loss.backward()

    real = np.ones((B, T), bool) if over["pad_token_id"] is None else x != over["pad_token_id"]
    for layer in layers.values():
        layer.token_mask = real
    logits, _ = forward_hidden(twin, x)
    ref = masked_ce(logits, y, mask)
    if over["balance_coef"]:
        ref = ref + over["balance_coef"] * mole_balance([l.G for l in layers.values() if l.owner], real)
    ref.backward()
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-10)
    for n, ours in zip(method.adapted, method.layers()):
        assert ours.lora_A.grad is None and ours.lora_B.grad is None  # the sources are frozen
        if not ours.owns_gate:
            continue
        for key, twin_param in (("gate_e", layers[n].e), ("log_tau", layers[n].rho)):
            g, r = getattr(ours, key).grad, twin_param.grad.numpy()
            err = relative_error(g, r)
            assert err <= 1e-8 or np.abs(g - r).max() <= 1e-13, f"{n}.{key}: relative error {err:.2e}"
    with torch.no_grad():
        twin.eval()
        for layer in layers.values():
            layer.token_mask = None
        ref_logits = forward_hidden(twin, x)[0].numpy()
    with method.evaluating():
        np.testing.assert_allclose(model(x)[0].data, ref_logits, rtol=1e-10, atol=1e-12)


@pytest.mark.torch
@settings(max_examples=6)
@given(seed=seeds, combine=st.sampled_from(["mean", "sum"]))
def test_nla_and_sum_match_torch_and_merge(seed, combine):
    import torch

    from torch_adapters import forward_hidden

    sources = trained_loras(F64, ["attn.c_attn", "mlp.c_proj"], [1, 3, 2], seed, alphas=[1, 4, 8])
    states, scales = sources_from_methods(sources)
    model = random_gpt(F64, seed)
    base_state = model.state_dict()
    method = (NLA if combine == "mean" else LoraSum)(lora_sources=states, lora_scales=scales)
    assert method.config.combine == combine
    method.attach(model, 0)
    twin, _ = build_twin(method, F64, base_state)
    x = np.random.default_rng(seed).integers(0, 11, (2, 5))
    with method.evaluating():
        logits = model(x)[0].data
        merge(model)
        merged = model(x)[0].data
        unmerge(model)
    with torch.no_grad():
        ref = forward_hidden(twin, x)[0].numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(merged, logits, rtol=1e-10, atol=1e-10)
    layer = method.layers()[0]
    w = 1 / 3 if combine == "mean" else 1.0
    expected = sum(w * s * B @ A for (A, B), s in zip(method.config.sources.factors[method.adapted[0]], scales))
    np.testing.assert_allclose(layer.delta_weight(), expected, rtol=1e-12, atol=1e-14)
    assert method.trainable_parameters() == []


# ---- §4.8 invariants --------------------------------------------------------------------------------

def mole_on(config, sources, seed=0, **over):
    model = random_gpt(config, 7)
    method = Mole.from_methods(sources, **over)
    method.attach(model, seed)
    return method, model


@given(seed=seeds, j=st.integers(0, 2), granularity=st.sampled_from(["token", "layer"]))
def test_1_masking_all_but_one_lora_is_that_lora_alone(seed, j, granularity):
    targets = ["attn.c_attn", "mlp.c_fc"]
    sources = trained_loras(F32, targets, [2, 2, 2], seed)
    method, model = mole_on(F32, sources, gate_init_std=1.0, gate_granularity=granularity)
    x = np.random.default_rng(seed).integers(0, 11, (3, 6))
    lora = make_method("lora", r=2, lora_alpha=4, target_modules=targets)
    lora_model = random_gpt(F32, 7)
    lora.attach(lora_model, 0)
    load_adapter_state_dict(lora_model, adapter_state_dict(sources[j].model))
    with method.masked([j]), method.evaluating():
        ours = model(x)[0].data
        G = [l.masked(l.current_gate).data for l in method.layers() if l.owns_gate]
    for g in G:
        np.testing.assert_array_equal(g[:, j], 1.0)  # exactly 1.0
        np.testing.assert_array_equal(np.delete(g, j, axis=1), 0.0)
    with lora.evaluating():
        ref = lora_model(x)[0].data
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours, ref)  # the same kernel path (numpy backend): bit for bit
    assert method.layers()[0].keep is None  # the context restored "no mask"


@given(seed=seeds, pool=st.sampled_from(["token", "sequence", "prefix"]))
def test_2_zero_gate_matrix_gives_uniform_gates_and_equals_nla(seed, pool):
    sources = trained_loras(F64, "all-linear", [1, 2, 3], seed)
    method, model = mole_on(F64, sources, gate_pool=pool)
    for layer in method.layers():
        layer.gate_e.data[...] = 0
    states, scales = sources_from_methods(sources)
    nla = NLA(lora_sources=states, lora_scales=scales)
    nla_model = random_gpt(F64, 7)
    nla.attach(nla_model, 0)
    x = np.random.default_rng(seed).integers(0, 11, (2, 5))
    with method.evaluating():
        ours = model(x)[0].data
        for layer in method.layers():
            np.testing.assert_allclose(layer.current_gate.data, 1 / 3, rtol=1e-14)
    with nla.evaluating():
        np.testing.assert_allclose(ours, nla_model(x)[0].data, rtol=1e-10, atol=1e-10)


@given(seed=seeds)
def test_3_identical_loras_equal_that_lora_for_any_gates(seed):
    one = trained_loras(F64, ["mlp.c_fc"], [2], seed)[0]
    method, model = mole_on(F64, [one, one, one], gate_init_std=3.0)
    x = np.random.default_rng(seed).integers(0, 11, (2, 5))
    with method.evaluating():
        ours = model(x)[0].data
    lora_model = random_gpt(F64, 7)
    lora = make_method("lora", r=2, lora_alpha=4, target_modules=["mlp.c_fc"])
    lora.attach(lora_model, 0)
    load_adapter_state_dict(lora_model, adapter_state_dict(one.model))
    np.testing.assert_allclose(ours, lora_model(x)[0].data, rtol=1e-10, atol=1e-10)


@given(seed=seeds, log_tau=st.floats(-30, 5))
def test_4_gates_are_positive_and_sum_to_one_and_tau_is_positive(seed, log_tau):
    sources = trained_loras(F64, ["mlp.c_fc"], [1, 2], seed)
    method, model = mole_on(F64, sources, gate_init_std=0.3)
    for layer in method.layers():
        layer.log_tau.data[...] = log_tau
        assert np.exp(layer.log_tau.data) > 0
    with method.evaluating():
        model(np.random.default_rng(seed).integers(0, 11, (2, 5)))
    for layer in method.layers():
        G = layer.current_gate.data
        assert np.all(G >= 0) and np.allclose(G.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        if log_tau >= 0:  # (a tiny τ can underflow the smaller gates to 0.0: softmax in floating point)
            assert np.all(G > 0)


@given(seed=seeds, E=st.integers(1, 5))
def test_5_balance_loss_is_at_least_E_log_E_with_equality_for_uniform_q(seed, E):
    rng = np.random.default_rng(seed)
    gates = [Tensor(rng.dirichlet(np.ones(E), size=6)) for _ in range(2)]
    assert balance_loss(gates).item() >= E * math.log(E) - 1e-12
    uniform = [Tensor(np.full((6, E), 1 / E)) for _ in range(2)]
    assert balance_loss(uniform).item() == pytest.approx(E * math.log(E), abs=1e-12)
    real = np.array([1, 1, 0, 1, 0, 1])  # padding is left out of q
    q = sum((g.data * real[:, None]).sum(0) for g in gates) / (2 * 4)
    assert balance_loss(gates, real).item() == pytest.approx(-np.log(q).sum(), rel=1e-12)


def test_6_training_moves_only_e_and_rho():
    sources = trained_loras(F32, ["attn.c_attn", "mlp.c_fc"], [2, 2, 2], 1)
    model = random_gpt(F32, 7)
    before = model.state_dict()
    method = Mole.from_methods(sources, gate_init_std=0.5)
    method.attach(model, 0)
    adapters = adapter_state_dict(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{a}.{k}" for a in method.adapted for k in ("gate_e", "log_tau")}
    run_tasks(method, tiny_tasks(0, n_tasks=1, steps=3, config=F32), lr=1e-2)
    after = adapter_state_dict(model)
    for k, v in adapters.items():
        if k.endswith(("lora_A", "lora_B")):
            np.testing.assert_array_equal(after[k], v)
        else:
            assert not np.array_equal(after[k], v), k
    for k, v in model.state_dict().items():
        if "lora_" not in k and "gate_e" not in k and "log_tau" not in k:
            np.testing.assert_array_equal(v, before[k.replace(".base_layer", "")])


@given(seed=seeds, pool=st.sampled_from(["token", "sequence", "prefix"]))
def test_7_gradcheck_of_e_rho_and_x_across_two_gated_layers(seed, pool):
    rng = np.random.default_rng(seed)
    D = 3
    cfg_sources = [{"l.lora_A": rng.standard_normal((r, D)), "l.lora_B": rng.standard_normal((D, r))} for r in (1, 2)]
    cfg = MoleConfig(lora_sources=cfg_sources, lora_scales=[0.7, 1.3], gate_init_std=0.8, tau_init=0.6,
                     gate_pool=pool)
    from tinyslim.adapters import Streams
    layers = []
    for i in range(2):
        layer = MoleLinear(Linear(D, D, rng=rng, dtype=np.float64), 2, 2, cfg.sources.scales, cfg, Streams(i))
        layer.set_sources(cfg.sources.factors["l"])
        layers.append(layer)

    def f(x, e1, r1, e2, r2):
        saved = [(l.gate_e, l.log_tau) for l in layers]
        (layers[0].gate_e, layers[0].log_tau), (layers[1].gate_e, layers[1].log_tau) = (e1, r1), (e2, r2)
        try:
            return layers[1](layers[0](x))  # the second gate reads U of the first layer's output
        finally:
            for l, (e, r) in zip(layers, saved):
                l.gate_e, l.log_tau = e, r

    x0 = rng.standard_normal((2, 3, D))
    h = layers[0](Tensor(x0)).data
    for layer, inp in ((layers[0], x0), (layers[1], h)):  # LayerNorm of a nearly constant U is too curved for
        U = layer.branch_outputs(Tensor(inp.reshape(-1, D))).data  # finite differences: stay away from it
        assume(U.var(axis=1).min() > 1e-2)
    gradcheck(f, x0, *(a.data.copy() for l in layers for a in (l.gate_e, l.log_tau)))


@given(seed=seeds)
def test_8_the_layer_variant_equals_the_token_variant_with_one_adapted_linear_per_block(seed):
    sources = trained_loras(F64, ["mlp.c_fc"], [2, 1], seed)
    x, y, mask = random_batch(np.random.default_rng(seed), F64, 2, 5)
    out = []
    for granularity in ("token", "layer"):
        method, model = mole_on(F64, sources, seed=3, gate_init_std=1.0, gate_granularity=granularity)
        loss = method.loss(x, y, mask)
        loss.backward()
        out.append((loss.item(), [l.gate_e.grad for l in method.layers()]))
    assert out[0][0] == out[1][0]
    for a, b in zip(out[0][1], out[1][1]):
        np.testing.assert_array_equal(a, b)


@given(seed=seeds)
def test_prefix_pooling_sees_only_the_past_so_the_trained_gate_is_the_generated_one(seed):
    """gate_pool="prefix": the gate at token t of a full line (teacher forcing, training) equals the gate
    of the last token when only tokens 0..t are fed (greedy generation). "sequence" pools the whole
    line, answer included, so its gates change as the line grows: what training saw, decoding does not."""
    sources = trained_loras(F64, ["attn.c_attn", "mlp.c_fc"], [2, 2, 2], seed)
    x = np.random.default_rng(seed).integers(1, 11, (2, 6))
    worst = {}
    for pool in ("prefix", "sequence"):
        method, model = mole_on(F64, sources, gate_init_std=1.0, gate_pool=pool)
        with method.evaluating():
            model(x)
            full = [layer.current_gate.data.reshape(2, 6, -1) for layer in method.gate_layers()]
            worst[pool] = 0.0
            for t in range(6):
                model(x[:, :t + 1])
                for layer, g in zip(method.gate_layers(), full):
                    grown = layer.current_gate.data.reshape(2, t + 1, -1)[:, -1]
                    worst[pool] = max(worst[pool], float(np.abs(grown - g[:, t]).max()))
    assert worst["prefix"] < 1e-12
    assert worst["sequence"] > 1e-3  # the leak the prefix pool removes


# ---- the rest of the API --------------------------------------------------------------------------

def test_layer_variant_shares_the_first_gate_of_each_block():
    sources = trained_loras(F32, "all-linear", [1, 1], 0)
    method, model = mole_on(F32, sources, gate_granularity="layer")
    owners = [n for n, l in zip(method.adapted, method.layers()) if l.owns_gate]
    assert owners == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{o}.{k}" for o in owners for k in ("gate_e", "log_tau"))
    means = method.gate_means(np.random.default_rng(0).integers(0, 11, (2, 5)))
    assert sorted(means) == owners and all(np.isclose(v.sum(), 1) for v in means.values())


def test_sources_are_validated_and_described():
    a = trained_loras(F32, ["mlp.c_fc"], [2], 0)[0]
    b = trained_loras(F32, ["attn.c_attn"], [2], 0)[0]
    with pytest.raises(ValueError, match="must share target_modules"):
        Mole.from_methods([a, b])
    state = adapter_state_dict(a.model)
    with pytest.raises(ValueError, match="no transformer.h.0.mlp.c_fc.lora_B"):
        Mole(lora_sources=[{k: v for k, v in state.items() if not k.endswith("lora_B")}])
    with pytest.raises(ValueError, match="lora_scales"):
        Mole(lora_sources=[state, state], lora_scales=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="non-empty list"):
        Mole()
    with pytest.raises(ValueError, match="subset of distinct source indices"):
        Mole(lora_sources=[state, state], mask=[2])
    with pytest.raises(ValueError, match="gate_pool"):
        Mole(lora_sources=[state], gate_pool="batch")
    m = Mole.from_methods([a, a])
    m.attach(random_gpt(F32, 0), 0)
    info = json.dumps(m.describe())
    assert '"n_sources": 2' in info and "array" not in info
    assert set(COMPOSITION_METHODS) == {"mole", "nla", "lora_sum"}
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        merge(m.model)
