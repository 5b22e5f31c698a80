"""ELDER (tinyslim/adapters/elder.py), docs/methods.md §5, and the FT-LoRA editing baseline
(tinyslim/adapters/ft_lora.py), §7.5.

* against an independent torch ELDER (tests/torch_adapters.py) on hypothesis-drawn tiny GPTs and ELDER
  configs (presets init / hashed, soft / hard routing, raw / renormalised gates, with or without the
  gate bias and the guided loss, a routing layer inside or before the adapted layers, both key
  positions), float64, over a stream of edits: every step's loss, the experts and routers after the
  stream, the stored codes, and the evaluation logits and deferral flags on edited and unrelated prompts
* FT-LoRA's edit loop against a torch LoRA with a fresh Adam per edit (and the "step" schedule)
* the §5.9 invariants, numbered as there (1–10)
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_adapters_base import assert_trained_outputs_close, random_gpt, relative_error
from test_slim import ADAM_NOISE
from tinyslim.adapters import EDIT_METHODS, Elder, ElderConfig, FTLoRA, adapter_state_dict, stream
from tinyslim.adapters.elder import ELDER_PAPER, key_positions, subject_positions, top_k
from tinyslim.autograd import Tensor, no_grad
from tinyslim.lowrank import mixture_lowrank
from tinyslim.nn import GPTConfig
from tinyslim.testing import check_adapter_invariants, gradcheck

seeds = st.integers(0, 2**32 - 1)
F32 = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
F64 = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype="float64")


@pytest.fixture(autouse=True)
def _numpy_kernel(monkeypatch):
    monkeypatch.setenv("TINYSLIM_BACKEND", "numpy")


def edit_batch(rng, config, B=1, T=5, n_target=2):
    """x, y (B, T) and a mask on the last n_target positions (the prompt is the rest)."""
    x = rng.integers(1, config.vocab_size, (B, T))
    for t in (0, T - n_target, T - 1):  # distinct rows, also at the key positions (a query may see its token only)
        x[:, t] = 1 + (rng.integers(0, config.vocab_size - 1) + np.arange(B)) % (config.vocab_size - 1)
    y = rng.integers(1, config.vocab_size, (B, T))
    mask = np.zeros((B, T))
    mask[:, T - n_target:] = 1
    return x, y, mask


def twin_key_positions(x, mask, mode):
    """The last prompt token (the position before the first target) or the last token (no padding here)."""
    B, T = np.shape(x)
    if mode == "last":
        return np.full(B, T - 1)
    return np.array([int(np.flatnonzero(row)[0]) if row.any() else T - 1 for row in np.asarray(mask) != 0])


def build_twin(method, config, base_state):
    from torch_adapters import TorchElderLinear, TorchQueryTap, replace_linears, twin_gpt

    cfg = method.config
    twin = twin_gpt(config, base_state)
    state = adapter_state_dict(method.model)
    routing_name = cfg.routing_layer or method.adapted[0]
    ctx = dict(q=None, z=None, editing=False, hard=cfg.routing == "hard", deferral=cfg.deferral, table=[],
               theta=method.theta, k=cfg.top_k, key_pos=None, preset={})
    make = {}
    for n in method.adapted:
        params = {k.rpartition(".")[2]: v for k, v in state.items() if k.rpartition(".")[0] == n}
        make[n] = lambda base, n=n, params=params: TorchElderLinear(base, n, params, cfg.top_k, cfg.scale, ctx,
                                                                   cfg.renormalize_gates, n == routing_name)
    if routing_name not in method.adapted:
        make[routing_name] = lambda base: TorchQueryTap(base, ctx)
    layers = replace_linears(twin, make)
    ctx["layers"] = [layers[n] for n in method.adapted]
    ctx["routing_module"] = layers[routing_name]
    return twin, ctx


@st.composite
def elder_cases(draw):
    n_head = draw(st.integers(1, 2))
    n_layer = draw(st.integers(2, 3))
    config = GPTConfig(vocab_size=draw(st.integers(5, 12)), block_size=6, n_layer=n_layer, n_head=n_head,
                       n_embd=n_head * draw(st.integers(3, 4)), bias=draw(st.booleans()), dtype="float64")
    E = draw(st.integers(1, 4))
    targets = draw(st.sampled_from([None, ["mlp.c_fc"], ["attn.c_proj", "mlp.c_fc"]]))
    first = "transformer.h.0.attn.c_attn" if targets != ["attn.c_proj", "mlp.c_fc"] else None
    over = dict(ELDER_PAPER, n_experts=E, top_k=draw(st.integers(1, E)), r=draw(st.integers(1, 2)),
                lora_alpha=draw(st.sampled_from([1, 4])), target_modules=targets,
                routing_layer=draw(st.sampled_from([None, first])), key_pos=draw(st.sampled_from(["last_prompt",
                                                                                                   "last"])),
                gate_bias=draw(st.booleans()), renormalize_gates=draw(st.booleans()),
                guide_coef=draw(st.sampled_from([0.0, 1.0])), preset=draw(st.sampled_from(["init", "hashed"])),
                routing=draw(st.sampled_from(["soft", "hard"])), n_iter=draw(st.integers(1, 3)),
                theta=draw(st.sampled_from([None, 3.0])), deferral=draw(st.sampled_from([True, True, False])))
    return config, over, draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(seeds)


@pytest.mark.torch
@given(case=elder_cases())
def test_elder_edit_stream_matches_torch(case):
    import torch

    from torch_adapters import forward_hidden, run_elder

    config, over, n_edits, B, seed = case
    run_seed = seed % 997
    model = random_gpt(config, seed)
    base_state = model.state_dict()
    method = Elder(**over)
    method.attach(model, run_seed)
    rng = np.random.default_rng(seed)
    for layer in method.layers():  # non-zero B: the guided loss and the routing reach everything from step 1
        layer.lora_B.data[...] = 0.3 * rng.standard_normal(layer.lora_B.shape)
    twin, ctx = build_twin(method, config, base_state)
    edits = [edit_batch(rng, config, B=B) for _ in range(n_edits)]
    losses = [l for x, y, m in edits for l in method.edit(x, y, m)]
    ref = run_elder(twin, ctx["layers"], ctx, edits, n_iter=method.config.n_iter, lr=method.config.lr,
                    guide_coef=method.config.guide_coef, preset=method.config.preset,
                    key_pos_fn=lambda x, m: twin_key_positions(x, m, method.config.key_pos),
                    hash_rng=stream(run_seed, "hash"))
    np.testing.assert_allclose(losses, ref, rtol=1e-9)
    for n, ours in zip(method.adapted, method.layers()):
        theirs = ctx["layers"][method.adapted.index(n)]
        for key, twin_param in (("lora_A", theirs.A), ("lora_B", theirs.B), ("router_weight", theirs.W),
                                ("router_bias", theirs.b)):
            if twin_param is None:
                assert getattr(ours, key) is None
                continue
            a, b = getattr(ours, key).data, twin_param.detach().numpy()
            assert relative_error(a, b) <= 1e-8 or np.abs(a - b).max() <= ADAM_NOISE, f"{n}.{key}"
    table = np.concatenate([l.edit_codes.data[:method.n_edits] for l in method.layers()], axis=1)
    np.testing.assert_array_equal(table, np.stack(ctx["table"]))
    # evaluation with deferral: the edited prompts and unrelated ones, routed from their last prompt token
    probe_x = np.concatenate([edits[0][0], rng.integers(1, config.vocab_size, (2, 5))])
    probe_mask = np.concatenate([edits[0][2], np.tile(edits[0][2][:1], (2, 1))])
    key_pos = twin_key_positions(probe_x, probe_mask, method.config.key_pos)
    out = method.route(probe_x, key_pos)
    ctx["key_pos"] = key_pos
    twin.eval()
    with torch.no_grad():
        ref_logits = forward_hidden(twin, probe_x)[0].numpy()
    np.testing.assert_array_equal(out["z"], ctx["z"])
    assert_trained_outputs_close(out["logits"], ref_logits)


# ---- §5.9 invariants -------------------------------------------------------------------------------

def elder_on(config=F32, seed=0, **over):
    model = random_gpt(config, 5)
    method = Elder(**{**ELDER_PAPER, "n_iter": 3, **over})  # the paper's mechanics (the defaults: below)
    method.attach(model, seed)
    return method, model


def base_logits(config, x):
    base = random_gpt(config, 5)
    base.eval()
    return base(x)[0].data


@given(seed=seeds, theta=st.sampled_from([None, 1.0, 6.0]))
def test_1_deferred_rows_are_the_base_bit_for_bit_next_to_routed_rows(seed, theta):
    rng = np.random.default_rng(seed)
    method, model = elder_on(F32, seed % 1000, theta=theta, n_experts=4)
    x, y, mask = edit_batch(rng, F32)
    method.edit(x, y, mask)
    probe = np.concatenate([x, rng.integers(1, 11, (4, 5))])
    key_pos = key_positions(probe, np.concatenate([mask] * 5))
    out = method.route(probe, key_pos)
    assert out["z"][0]  # invariant 7: the edit's own prompt
    base = base_logits(F32, probe)
    for b in np.flatnonzero(~out["z"]):
        np.testing.assert_array_equal(out["logits"][b], base[b])
    assert not np.array_equal(out["logits"][0], base[0])


def test_deferral_is_strictly_below_theta_and_hamming_distances_are_even():
    import dataclasses

    rng = np.random.default_rng(1)
    method, model = elder_on(F32, 1, n_experts=6, top_k=2, n_iter=2)
    for _ in range(3):
        method.edit(*edit_batch(rng, F32))
    probe = rng.integers(1, 11, (12, 5))
    dist = method.route(probe)["min_hamming"]
    assert np.all(dist % 2 == 0)  # each mismatched expert costs 2
    far = dist[dist > 0]
    assert far.size, "every probe matched a stored code exactly; pick another seed"
    d = far.min()
    method.config = dataclasses.replace(method.config, theta=float(d))
    z = method.route(probe)["z"]
    assert not z[dist == d].any() and z[dist < d].all()
    method.config = dataclasses.replace(method.config, theta=float(d) + 0.5)
    assert method.route(probe)["z"][dist == d].all()


def test_2_an_empty_code_table_defers_everything_and_3_zero_B_is_the_base_even_when_routed():
    rng = np.random.default_rng(0)
    x, y, mask = edit_batch(rng, F32, B=3)
    method, model = elder_on(F32)
    method.before_task(0, 3, method.optimizer)
    for _ in range(3):  # train without storing a code
        loss = method.loss(x, y, mask)
        method.optimizer.zero_grad()
        loss.backward()
        method.optimizer.step()
    assert method.n_edits == 0
    out = method.route(x, key_positions(x, mask))
    assert not out["z"].any() and np.isinf(out["min_hamming"]).all()
    np.testing.assert_array_equal(out["logits"], base_logits(F32, x))
    method, model = elder_on(F32, deferral=False)  # z ≡ 1, but every B is still 0
    out = method.route(x, key_positions(x, mask))
    assert out["z"].all()
    np.testing.assert_array_equal(out["logits"], base_logits(F32, x))


@given(seed=seeds, routing_layer=st.sampled_from([None, "transformer.h.0.mlp.c_fc"]))
def test_4_the_query_does_not_depend_on_router_or_expert_parameters(seed, routing_layer):
    rng = np.random.default_rng(seed)
    method, model = elder_on(F64, seed % 1000, routing_layer=routing_layer, deferral=False)
    x = rng.integers(1, 11, (2, 5))
    method.route(x)
    q = method.routing.q.copy()
    for layer in method.layers():
        for p in (layer.lora_A, layer.lora_B, layer.router_weight, layer.router_bias):
            p.data[...] = rng.standard_normal(p.shape)
    method.route(x)
    np.testing.assert_array_equal(method.routing.q, q)


@given(seed=seeds, renormalize=st.booleans(), k=st.integers(1, 3))
def test_5_one_gate_vector_per_sequence_raw_probabilities_on_the_top_k(seed, renormalize, k):
    rng = np.random.default_rng(seed)
    method, model = elder_on(F64, seed % 1000, n_experts=4, top_k=k, renormalize_gates=renormalize, deferral=False)
    layer = method.layers()[0]
    layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape)
    x = rng.integers(1, 11, (2, 5))
    method.route(x)
    q = method.routing.q
    X = Tensor(rng.standard_normal((10, layer.in_features)))
    delta = layer.adapter_delta(X).data  # 2 sequences × 5 tokens
    logits = q @ layer.router_weight.data.T + layer.router_bias.data
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    G = np.zeros_like(p)
    S = top_k(logits, k)
    np.put_along_axis(G, S, np.take_along_axis(p, S, 1), axis=1)
    if renormalize:
        G /= G.sum(1, keepdims=True)
        np.testing.assert_allclose(G.sum(1), 1.0)
    elif k < 4:
        assert np.all(G.sum(1) < 1)
    dense = mixture_lowrank(X, layer.lora_A, layer.lora_B, np.repeat(G, 5, axis=0), scale=layer.scale).data
    np.testing.assert_allclose(delta, dense, rtol=1e-12, atol=1e-14)  # 9: top-k sparse = dense zero-padded


@given(seed=seeds, k=st.integers(1, 3))
def test_6_codes_have_k_ones_per_layer_block_and_7_an_edit_is_routed_right_after(seed, k):
    rng = np.random.default_rng(seed)
    method, model = elder_on(F32, seed % 1000, n_experts=5, top_k=k, theta=0.5)
    edits = [edit_batch(rng, F32) for _ in range(3)]
    for t, (x, y, mask) in enumerate(edits):
        method.edit(x, y, mask)
        assert method.n_edits == t + 1
        assert method.route(x, key_positions(x, mask))["z"][0]  # its own prompt, any θ > 0
    for layer in method.layers():
        codes = layer.edit_codes.data[:3]
        np.testing.assert_array_equal(codes.sum(axis=1), k)
        assert set(np.unique(codes)) <= {0.0, 1.0}
    q = method.routing.q
    assert method.min_hamming(q)[0] == 0 and method.codes(q)[0].sum() == k
    assert method.theta == 0.5 and Elder(top_k=2).config.theta is None
    method2, _ = elder_on(F32, top_k=2)
    assert method2.theta == 2.0  # k·L_a/2 with L_a = 2


@given(seed=seeds, r=st.integers(1, 3))
def test_8_one_expert_k1_no_guide_no_deferral_is_ft_lora(seed, r):
    rng = np.random.default_rng(seed)
    edits = [edit_batch(rng, F64) for _ in range(2)]
    runs = []
    for method in (Elder(**{**ELDER_PAPER, "n_experts": 1, "top_k": 1, "guide_coef": 0.0, "deferral": False, "r": r,
                            "lora_alpha": 2, "n_iter": 3}),
                   FTLoRA(r=r, lora_alpha=2, n_iter=3)):
        model = random_gpt(F64, 5)
        method.attach(model, seed % 1000)  # the same `init` draws: ELDER's (1, r, D) is LoRA's (r, D)
        losses = [l for x, y, m in edits for l in method.edit(x, y, m)]
        runs.append((losses, [(l.lora_A.data.reshape(-1), l.lora_B.data.reshape(-1)) for l in method.layers()],
                     method))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-12)
    for (a1, b1), (a2, b2) in zip(runs[0][1], runs[1][1]):
        np.testing.assert_allclose(a1, a2, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(b1, b2, rtol=1e-10, atol=1e-13)
    elder = runs[0][2]
    with no_grad():
        p = np.exp(elder.layers()[0].router_logits(elder.routing.q).data)
    assert np.all(p / p.sum(1, keepdims=True) == 1.0)  # the gate is exactly 1.0


@given(seed=seeds, preset=st.sampled_from(["init", "hashed"]), routing=st.sampled_from(["soft", "hard"]))
def test_10_gradcheck_of_routers_and_experts_with_the_guided_loss(seed, preset, routing):
    rng = np.random.default_rng(seed)
    method, model = elder_on(F64, seed % 1000, n_experts=3, top_k=2, preset=preset, routing=routing)
    for layer in method.layers():
        layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape)
    x, y, mask = edit_batch(rng, F64, B=2)
    method.before_task(0, 1, method.optimizer)
    method.loss(x, y, mask)  # fixes the presets
    for layer in method.layers():
        lg = layer.router_logits(method.routing.q).data
        srt = np.sort(lg, axis=1)
        if np.min(srt[:, -2] - srt[:, -3]) < 1e-3:
            return  # a near-tie would flip the selection under finite differences
    layer = method.layers()[1]
    names = ("router_weight", "router_bias", "lora_A", "lora_B")

    def f(*params):
        saved = [getattr(layer, n) for n in names]
        for n, p in zip(names, params):
            setattr(layer, n, p)
        try:
            return method.loss(x, y, mask)
        finally:
            for n, p in zip(names, saved):
                setattr(layer, n, p)

    gradcheck(f, *(getattr(layer, n).data.copy() for n in names))


# ---- FT-LoRA and the edit loop --------------------------------------------------------------------

@pytest.mark.torch
@settings(max_examples=5)
@given(seed=seeds, schedule=st.sampled_from(["constant", "step"]))
def test_ft_lora_edit_loop_matches_torch(seed, schedule):
    from torch_adapters import add_lora, adam_loop, forward_hidden, masked_ce, twin_gpt

    rng = np.random.default_rng(seed)
    model = random_gpt(F64, seed)
    base_state = model.state_dict()
    method = FTLoRA(r=3, lora_alpha=6, n_iter=22, lr_schedule=schedule, lr=5e-3)
    method.attach(model, seed % 997)
    state = adapter_state_dict(model)
    twin = twin_gpt(F64, base_state)
    layers = add_lora(twin, {n: (state[f"{n}.lora_A"], state[f"{n}.lora_B"]) for n in method.adapted}, 2.0)
    edits = [edit_batch(rng, F64) for _ in range(2)]
    ours = [l for x, y, m in edits for l in method.edit(x, y, m)]
    ref = []
    params = [p for layer in layers.values() for p in (layer.A, layer.B)]
    for x, y, m in edits:
        ref += adam_loop(params, 22, 5e-3, lambda i, x=x, y=y, m=m: masked_ce(forward_hidden(twin, x)[0], y, m),
                         (lambda i: 5e-3 * 0.5 ** (i // 20)) if schedule == "step" else None)
    np.testing.assert_allclose(ours, ref, rtol=1e-9)
    for n, l in zip(method.adapted, method.layers()):
        assert relative_error(l.lora_B.data, layers[n].B.detach().numpy()) <= 1e-8
    assert method.optimizer.step_count == 22  # Adam was reset at the start of the edit


def test_defaults_registry_and_errors():
    cfg = ElderConfig()
    assert (cfg.n_experts, cfg.top_k, cfg.r, cfg.lora_alpha, cfg.scale, cfg.guide_coef, cfg.n_iter, cfg.lr) == \
        (32, 2, 1, 1, 1.0, 1.0, 30, 1e-2)
    assert (cfg.preset, cfg.routing, cfg.key_pos, cfg.query_norm, cfg.router_lr_scale, cfg.renormalize_gates,
            cfg.lr_schedule) == ("init", "soft", "subject_alone", "centred", 0.0, False, "constant")
    paper = ElderConfig(**ELDER_PAPER)  # the paper's routing, scenario C's row elder_paper
    assert (paper.n_experts, paper.r, paper.key_pos, paper.query_norm, paper.router_lr_scale) == \
        (8, 4, "last_prompt", "none", 1.0)
    assert paper.n_experts * paper.r == cfg.n_experts * cfg.r  # the same parameter count
    ft = FTLoRA()
    ft.attach(random_gpt(GPTConfig(vocab_size=11, block_size=6, n_layer=3, n_head=2, n_embd=8), 0), 0)
    assert ft.adapted == ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_fc"]  # the last two blocks
    assert ft.config.r == 32 and ft.config.scale == 1.0  # E·r: parameter parity with ELDER's pool
    assert set(EDIT_METHODS) == {"elder", "ft_lora", "grace"}
    with pytest.raises(ValueError, match="comes after the first adapted layer"):
        Elder(routing_layer="transformer.h.1.mlp.c_proj").attach(random_gpt(F32, 0), 0)
    with pytest.raises(ValueError, match="not a Linear"):
        Elder(routing_layer="transformer.h.0.ln_1").attach(random_gpt(F32, 0), 0)
    with pytest.raises(ValueError, match="top_k = 3 exceeds n_experts = 2"):
        ElderConfig(n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="preset"):
        ElderConfig(preset="random")
    method, _ = elder_on(F32, max_edits=1, n_iter=1)
    x, y, mask = edit_batch(np.random.default_rng(0), F32)
    method.edit(x, y, mask)
    with pytest.raises(RuntimeError, match="code table is full"):
        method.edit(x, y, mask)
    assert key_positions(np.array([[3, 4, 5, 0]]), None, "last", pad_token_id=0).tolist() == [2]
    assert key_positions(np.array([[3, 4, 5, 0]]), np.array([[0, 1, 1, 0]])).tolist() == [1]


def test_hashed_presets_come_from_the_hash_stream_edit_by_edit():
    method, _ = elder_on(F64, seed=3, n_experts=5, top_k=2, preset="hashed", guide_coef=1.0, n_iter=2)
    rng = np.random.default_rng(0)
    x, y, mask = edit_batch(rng, F64, B=2)
    method.before_task(0, 2, method.optimizer)
    method.loss(x, y, mask)
    expected = stream(3, "hash")
    draws = [[np.sort(expected.choice(5, 2, replace=False)) for _ in range(2)] for _ in range(2)]  # row, layer
    for l, layer in enumerate(method.layers()):
        np.testing.assert_array_equal(method.routing.preset[layer], [draws[0][l], draws[1][l]])


@pytest.mark.parametrize("over", [dict(), dict(routing_layer="transformer.h.0.attn.c_attn", preset="hashed",
                                               routing="hard", gate_bias=False)])
def test_elder_and_ft_lora_honour_the_adapter_invariants(over):
    check_adapter_invariants(Elder(**{**ELDER_PAPER, "n_experts": 3, **over}))
    assert check_adapter_invariants(FTLoRA(r=4, lora_alpha=4))["merge"] == "ok"


def test_router_lr_scale_slows_or_freezes_the_routers_only():
    """router_lr_scale (the per-edit optimiser, where the paper is silent): the routers step at lr · scale,
    the experts at lr; 0 keeps the routers at their init, 1 is the spec's single Adam on everything."""
    rng = np.random.default_rng(0)
    x, y, mask = edit_batch(rng, F64)
    runs = {}
    for scale in (1.0, 0.5, 0.0):
        method, _ = elder_on(F64, seed=1, n_experts=3, n_iter=3, router_lr_scale=scale)
        before = [(l.router_weight.data.copy(), l.router_bias.data.copy()) for l in method.layers()]
        method.edit(x, y, mask)
        moved = [np.abs(l.router_weight.data - w).max() + np.abs(l.router_bias.data - b).max()
                 for l, (w, b) in zip(method.layers(), before)]
        runs[scale] = (method, moved)
        assert all(np.abs(l.lora_B.data).max() > 0 for l in method.layers())  # the experts train at every scale
    assert max(runs[0.0][1]) == 0.0
    assert min(runs[1.0][1]) > 0 and min(runs[0.5][1]) > 0
    # Adam's step is lr · m̂/√v̂ per group: the first step of the routers is exactly scaled
    m1, _ = elder_on(F64, seed=1, n_experts=3, n_iter=1)
    m2, _ = elder_on(F64, seed=1, n_experts=3, n_iter=1, router_lr_scale=0.5)
    w0 = m1.layers()[0].router_weight.data.copy()
    m1.edit(x, y, mask)
    m2.edit(x, y, mask)
    np.testing.assert_allclose(m2.layers()[0].router_weight.data - w0, 0.5 * (m1.layers()[0].router_weight.data - w0),
                               rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="router_lr_scale"):
        ElderConfig(router_lr_scale=-1.0)


def test_subject_positions_name_the_subjects_last_character():
    prompts = ["Zorbin lives in ", "The home city of Zorbin is ", "Where does Al live? ", "plain text"]
    pos = subject_positions(prompts, ["Zorbin", "Zorbin", "Al", None])
    assert [p[i] for p, i in zip(prompts[:3], pos[:3])] == ["n", "n", "l"]
    assert pos.tolist() == [5, 22, 12, 9]  # no subject: the last character
    assert subject_positions(["Al met Al "], ["Al"]).tolist() == [8]  # the last occurrence
    with pytest.raises(ValueError, match="does not occur"):
        subject_positions(["Zorbin lives in "], ["Quell"])
    with pytest.raises(ValueError, match="2 prompts but 1 subjects"):
        subject_positions(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="subject_positions"):
        key_positions(np.array([[3, 4, 5]]), None, "subject_last")


def test_subject_key_routes_from_the_given_position_and_is_required_while_editing():
    method, _ = elder_on(F64, seed=2, n_experts=3, n_iter=2, key_pos="subject_last")
    rng = np.random.default_rng(0)
    x, y, mask = edit_batch(rng, F64, B=2)
    with pytest.raises(ValueError, match="subject_last"):
        method.edit(x, y, mask)
    key = np.array([0, 1])
    method.edit(x, y, mask, key_pos=key)
    assert method.n_edits == 2 and method.edit_key_pos is None
    x_in = None

    def spy(layer_input):
        nonlocal x_in
        x_in = layer_input

    layer = method.layers()[0]  # the routing layer (the first adapted one): q is its input at the key
    original = layer.routing.capture
    layer.routing.capture = lambda x: (spy(np.asarray(x.data)), original(x))
    out = method.route(x, key)
    np.testing.assert_array_equal(method.routing.q, x_in[np.arange(2), key])
    assert out["z"].all()  # the edits' own prompts, keyed as they were edited


def test_the_centred_query_is_the_query_minus_the_text_mean_at_norm_sqrt_d():
    rng = np.random.default_rng(1)
    x, y, mask = edit_batch(rng, F64, B=3)
    text = rng.integers(1, F64.vocab_size, (4, 6))
    raw, _ = elder_on(F64, seed=4, n_experts=3)
    centred, _ = elder_on(F64, seed=4, n_experts=3, query_norm="centred")
    scaled, _ = elder_on(F64, seed=4, n_experts=3, query_norm="scaled")
    with pytest.raises(RuntimeError, match="fit_query_mean"):
        centred.route(x)
    collected = []
    original = raw.routing.capture
    raw.routing.capture = lambda h: (collected.append(np.asarray(h.data).copy()), original(h))
    raw.route(text[:, :4])
    mu = collected[0].mean(axis=0)  # (4, d): the mean at every position over the rows of the text
    fitted = centred.fit_query_mean(text[:, :4])
    np.testing.assert_allclose(fitted[:4], mu, rtol=1e-12)
    np.testing.assert_allclose(fitted[4:], np.broadcast_to(mu[2:].mean(axis=0), (2, mu.shape[1])), rtol=1e-12)
    assert all(np.array_equal(layer.query_mean.data, fitted) for layer in centred.layers())
    assert "query_mean" in "".join(adapter_state_dict(centred.model))  # saved with the experts
    key = np.array([2, 3, 4])  # position 4: past the fitted text, the pooled mean
    raw.route(x, key)
    q = raw.routing.q
    centred.route(x, key)
    scaled.route(x, key)
    d = q.shape[1]
    c = q - fitted[key]
    np.testing.assert_allclose(centred.routing.q, c * np.sqrt(d) / np.linalg.norm(c, axis=1)[:, None], rtol=1e-12)
    np.testing.assert_allclose(scaled.routing.q, q * np.sqrt(d) / np.linalg.norm(q, axis=1)[:, None], rtol=1e-12)
    with pytest.raises(ValueError, match="block_size"):
        centred.fit_query_mean(np.zeros((2, 7), dtype=np.int64))
    with pytest.raises(ValueError, match="query_norm"):
        ElderConfig(query_norm="whitened")


def test_subject_alone_routes_from_the_subject_read_without_its_prompt():
    method, _ = elder_on(F64, seed=5, n_experts=3, n_iter=2, key_pos="subject_alone")
    rng = np.random.default_rng(2)
    x, y, mask = edit_batch(rng, F64, B=2)
    subjects = [x[0, :2], x[1, :3]]  # the subjects open the prompts: read alone or in the prompt, the same state
    key = np.array([1, 2])
    with pytest.raises(ValueError, match="subject_alone"):
        method.edit(x, y, mask, key_pos=key)
    q = method.subject_queries(subjects)
    method.route(x, key)  # read in the prompt at the subject's last token
    np.testing.assert_allclose(q, method.routing.q, rtol=1e-12)
    method.edit(x, y, mask, key_pos=key, queries=q)
    assert method.n_edits == 2 and method.edit_queries is None
    other = q + 1.0
    given = np.stack([other[0], np.full(q.shape[1], np.nan)])  # row 1 has no subject: read at its key
    method.route(x, key, given)
    np.testing.assert_array_equal(method.routing.q, np.stack([other[0], q[1]]))
    assert method.route(x, key, q)["z"].all()  # the edits' own queries hit their stored codes
    with pytest.raises(ValueError, match="non-empty"):
        method.subject_queries([[]])


def test_grace_keys_from_given_subject_queries_too():
    from tinyslim.adapters import Grace

    grace = Grace(n_iter=2, key_pos="subject_alone", max_edits=4)
    grace.attach(random_gpt(F64, 5), 0)
    rng = np.random.default_rng(3)
    x, y, mask = edit_batch(rng, F64, B=2)
    key = np.array([1, 2])
    with pytest.raises(ValueError, match="subject_alone"):
        grace.edit(x, y, mask, key_pos=key)
    q = grace.subject_queries([x[0, :2], x[1, :3]])
    grace.route(x, key)
    np.testing.assert_allclose(q, grace.layer.q, rtol=1e-12)  # subjects opening the prompt: the same state
    grace.edit(x, y, mask, key_pos=key, queries=q)
    assert grace.n_keys == 2 and grace.route(x, key, q)["hit"].all()
    assert not grace.route(x, key, q + 100.0)["hit"].any()  # far queries miss every key: the base
