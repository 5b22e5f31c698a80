"""The MixLoRA-style MoE-LoRA baseline (tinyslim/adapters/moe_lora.py), docs/methods.md §7.3.

* against an independent torch top-K MoE over LoRA experts (tests/torch_adapters.py, SLIM's twin with no
  identity experts, no masks, no yielding), float64: the loss and every gradient (router and factors,
  through top-K and the renormalised softmax), with and without the Switch balance loss, and a short
  training run (every step's loss and the final factors)
* the baseline's definition (SLIM with E_I = 0, p = 0, λ_L1 = 0, γ = 0), ties to the lower index, the
  registry and the runner contract. The bit-identity with SLIM under those settings is test_slim.py's
  invariant 4.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from test_adapters_base import random_batch, random_gpt, relative_error, run_tasks, tiny_tasks
from test_slim import ADAM_NOISE, TWIN_NAMES, build_twin, randomize_B
from tinyslim.adapters import METHODS, MoELoRA, MoeLoraConfig, SlimConfig, Streams, make_method
from tinyslim.adapters.slim import SlimLinear
from tinyslim.autograd import Tensor
from tinyslim.nn import GPTConfig, Linear
from tinyslim.testing import check_adapter_invariants

seeds = st.integers(0, 2**32 - 1)


@pytest.fixture(autouse=True)
def _numpy_kernel(monkeypatch):
    monkeypatch.setenv("TINYSLIM_BACKEND", "numpy")


@st.composite
def moe_cases(draw):
    n_head = draw(st.integers(1, 2))
    config = GPTConfig(vocab_size=draw(st.integers(5, 12)), block_size=6, n_layer=draw(st.integers(1, 2)),
                       n_head=n_head, n_embd=n_head * draw(st.integers(3, 4)), bias=draw(st.booleans()),
                       dtype="float64")
    E = draw(st.integers(1, 4))
    over = dict(n_lora_experts=E, top_k=draw(st.integers(1, E)), r=draw(st.integers(1, 3)),
                router_init_std=draw(st.sampled_from([0.02, 0.5])), balance_coef=draw(st.sampled_from([0.0, 0.01])),
                target_modules=draw(st.sampled_from([["mlp.c_fc", "mlp.c_proj"], "all-linear"])),
                pad_token_id=draw(st.sampled_from([None, 0])))
    return config, over, draw(st.integers(1, 3)), draw(st.integers(2, 5)), draw(seeds), draw(st.integers(1, 3))


@pytest.mark.torch
@given(case=moe_cases())
def test_moe_lora_gradients_and_training_run_match_torch(case):
    from torch_adapters import run_slim, slim_loss

    config, over, B, T, seed, steps = case
    run_seed = seed % 997
    model = random_gpt(config, seed)
    base_state = model.state_dict()
    method = make_method("moe_lora", **over)
    method.attach(model, run_seed)
    randomize_B(method, seed, 0.3)
    twin, layers = build_twin(method, config, base_state, run_seed)
    x, y, mask = random_batch(np.random.default_rng(seed), config, B, T)
    loss = method.loss(x, y, mask)
    loss.backward()
    ref = slim_loss(twin, layers, x, y, mask, 0.0, method.config.balance_coef, over["pad_token_id"])
    ref.backward()
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-10)
    for n, ours in zip(method.adapted, method.layers()):
        for key in ours.trainable_names:
            g, r = getattr(ours, key).grad, getattr(layers[n], TWIN_NAMES[key]).grad.numpy()
            assert relative_error(g, r) <= 1e-8 or np.abs(g - r).max() <= 1e-13, f"{n}.{key}"
    # a short run from here (the step above only seeded the unused clusters)
    for layer in layers.values():
        for p in layer.parameters():
            p.grad = None
    tasks = tiny_tasks(seed, n_tasks=1, steps=steps, B=B, T=T, config=config)
    losses, _ = run_tasks(method, tasks, lr=1e-2)
    np.testing.assert_allclose(losses, run_slim(twin, layers, tasks, lr=1e-2, l1_coef=0.0,
                                                balance_coef=method.config.balance_coef,
                                                pad_id=over["pad_token_id"]), rtol=1e-9)
    for n, ours in zip(method.adapted, method.layers()):
        for key in ours.trainable_names:
            a, b = getattr(ours, key).data, getattr(layers[n], TWIN_NAMES[key]).detach().numpy()
            assert relative_error(a, b) <= 1e-8 or np.abs(a - b).max() <= ADAM_NOISE, f"{n}.{key}"


def test_the_baseline_is_slim_without_its_components():
    cfg = MoeLoraConfig()
    assert isinstance(cfg, SlimConfig)
    assert (cfg.n_identity_experts, cfg.drop_p, cfg.l1_coef, cfg.gamma, cfg.balance_coef) == (0, 0.0, 0.0, 0.0, 0.0)
    assert (cfg.n_lora_experts, cfg.top_k, cfg.r, cfg.lora_alpha, cfg.target_modules) == \
        (4, 2, 4, 8, ["mlp.c_fc", "mlp.c_proj"])
    assert METHODS["moe_lora"] is MoELoRA and make_method("moe_lora").name == "moe_lora"
    method = make_method("moe_lora", r=2)
    method.attach(random_gpt(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8), 0), seed=0)
    x, y, mask = random_batch(np.random.default_rng(0), method.model.config, 2, 5)
    method.loss(x, y, mask)
    assert "mask" not in method.streams.used()  # no dynamic merging: the mask stream is never drawn from
    assert all(layer.in_mask is None for layer in method.layers())


def test_ties_go_to_the_lower_index_and_every_token_gets_k_lora_experts():
    cfg = MoeLoraConfig(n_lora_experts=4, top_k=2, r=2)
    layer = SlimLinear(Linear(3, 2, dtype=np.float64), cfg, Streams(0))
    logits = Tensor(np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, 1.0]]))
    w, idx, _ = layer.route(logits, np.zeros(2))
    np.testing.assert_array_equal(idx, [[0, 1], [1, 2]])
    np.testing.assert_array_equal(w.data, 0.5)


@pytest.mark.parametrize("over", [dict(), dict(balance_coef=0.01, top_k=1)])
def test_moe_lora_honours_the_adapter_invariants(over):
    check_adapter_invariants(make_method("moe_lora", r=2, **over))
