"""Plain LoRA (tinyslim/adapters/lora.py) and Seq-LoRA, docs/methods.md §1 and §7.1.

* against an independent torch LoRA GPT (tests/torch_adapters.py) on hypothesis-drawn tiny GPTs and
  adapter configs, float64: logits, loss and every trainable gradient (relative error ≤ 1e-8),
  with adapter dropout on and off
* finite differences for A, B and x of one adapted layer (relative error < 1e-6)
* the §1.6 invariants: B = 0 is a bit-identical no-op; dA = 0 exactly at init; merge equals the
  unmerged forward and unmerge restores W0; the base is bit-identical after training; r·(D + O)
  parameters per layer; rsLoRA's scale and its equality at r = 1
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from test_adapters_base import TINY, random_batch, random_gpt, relative_error, run_tasks, tiny_tasks
from tinyslim.adapters import (LoraConfig, LoraLinear, Streams, adapted_layers, adapter_state_dict, inject,
                               lora_scale, make_method, mark_only_adapters_trainable, merge, stream, unmerge)
from tinyslim.autograd import Tensor
from tinyslim.nn import GPTConfig, Linear

seeds = st.integers(0, 2**32 - 1)
TARGETS = [["attn.c_attn"], ["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"], "all-linear",
           r"transformer\.h\.0\..*", ["c_proj", "lm_head"]]


@st.composite
def lora_cases(draw):
    n_head = draw(st.integers(1, 2))
    config = GPTConfig(vocab_size=draw(st.integers(5, 16)), block_size=draw(st.integers(2, 6)),
                       n_layer=draw(st.integers(1, 2)), n_head=n_head, n_embd=n_head * draw(st.integers(2, 5)),
                       bias=draw(st.booleans()), dtype="float64")
    lora = LoraConfig(r=draw(st.integers(1, 4)), lora_alpha=draw(st.sampled_from([1, 4, 16])),
                      use_rslora=draw(st.booleans()), lora_dropout=draw(st.sampled_from([0.0, 0.0, 0.3])),
                      target_modules=draw(st.sampled_from(TARGETS)), init_lora_weights=draw(st.booleans()))
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, config.block_size))
    return config, lora, B, T, draw(seeds)


@pytest.mark.torch
@given(case=lora_cases())
def test_lora_gpt_matches_torch_logits_loss_and_every_adapter_gradient(case):
    from torch_adapters import add_lora, forward_hidden, masked_ce, twin_gpt

    config, lora, B, T, seed = case
    model = random_gpt(config, seed)
    base_state = model.state_dict()
    names = inject(model, lora, seed=seed)
    mark_only_adapters_trainable(model)
    x, y, mask = random_batch(np.random.default_rng(seed), config, B, T)

    logits, loss = model(x, y, loss_mask=mask)
    loss.backward()

    twin = twin_gpt(config, base_state)
    state = adapter_state_dict(model)
    layers = add_lora(twin, {n: (state[f"{n}.lora_A"], state[f"{n}.lora_B"]) for n in names}, lora.scale,
                      lora.lora_dropout, stream(seed, "dropout"))  # the same dropout masks, drawn in call order
    ref_logits, _ = forward_hidden(twin, x)
    ref_loss = masked_ce(ref_logits, y, mask)
    ref_loss.backward()

    np.testing.assert_allclose(logits.data, ref_logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(loss.item(), ref_loss.item(), rtol=1e-12)
    for n in names:
        ours = model.get_submodule(n)
        for f, ref in (("A", layers[n].A.grad), ("B", layers[n].B.grad)):
            g = getattr(ours, f"lora_{f}").grad
            assert g is not None, f"{n}.lora_{f} got no gradient"
            err = relative_error(g, ref.numpy())
            assert err <= 1e-8 or np.abs(g - ref.numpy()).max() <= 1e-14, f"{n}.lora_{f}: relative error {err:.2e}"
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)


@given(seed=seeds, D=st.integers(1, 5), O=st.integers(1, 5), r=st.integers(1, 3), p=st.sampled_from([0.0, 0.4]))
def test_lora_layer_gradients_match_finite_differences(seed, D, O, r, p):
    rng = np.random.default_rng(seed)
    base = Linear(D, O, rng=rng, dtype=np.float64)
    layer = LoraLinear(base, r, scale=1.7, dropout=p, streams=Streams(seed % 1000))
    layer.lora_B.data[...] = rng.uniform(-1, 1, (O, r))
    x0 = rng.uniform(-2, 2, (4, D))
    w = rng.standard_normal((4, O))  # a random upstream gradient

    def f(x_arr):  # fixed dropout masks: every evaluation starts the stream at the same state
        layer.dropout_rng = stream(seed, "fd") if p else None
        return float(np.sum(layer(Tensor(x_arr)).data * w))

    layer.dropout_rng = stream(seed, "fd") if p else None
    x = Tensor(x0.copy(), requires_grad=True)
    (layer(x) * w).sum().backward()
    eps = 1e-6
    for name, arr, grad in (("x", x0, x.grad), ("A", layer.lora_A.data, layer.lora_A.grad),
                            ("B", layer.lora_B.data, layer.lora_B.grad)):
        num = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + eps
            up = f(x0)
            arr[i] = old - eps
            down = f(x0)
            arr[i] = old
            num[i] = (up - down) / (2 * eps)
        assert relative_error(grad, num) < 1e-6 or np.abs(grad - num).max() < 1e-9, name


def test_zero_B_is_a_bit_identical_no_op_in_float32():
    config = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)
    base = random_gpt(config, 11)
    model = random_gpt(config, 11)
    inject(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.2), seed=0)
    assert all(np.any(l.lora_A.data != 0) and not np.any(l.lora_B.data) for _, l in adapted_layers(model))
    x = np.random.default_rng(1).integers(0, 13, (3, 8))
    model.eval()
    np.testing.assert_array_equal(model(x)[0].data, base(x)[0].data)
    model.train()  # dropout on the adapter input changes nothing either: the branch is s·0·(A x̃)
    np.testing.assert_array_equal(model(x)[0].data, base(x)[0].data)


def test_at_init_dA_is_exactly_zero_and_dB_is_not():
    model = random_gpt(TINY, 4)
    inject(model, LoraConfig(r=3, target_modules="all-linear"), seed=1)
    mark_only_adapters_trainable(model)
    x, y, mask = random_batch(np.random.default_rng(2), TINY, 2, 5)
    model(x, y, loss_mask=mask)[1].backward()
    for name, layer in adapted_layers(model):
        assert np.all(layer.lora_A.grad == 0), name
        assert np.any(layer.lora_B.grad != 0), name


@given(seed=seeds, r=st.integers(1, 4), rslora=st.booleans())
def test_merged_forward_equals_unmerged_and_unmerge_restores_W0(seed, r, rslora):
    model = random_gpt(TINY, seed)
    inject(model, LoraConfig(r=r, use_rslora=rslora, target_modules="all-linear", init_lora_weights=False), seed=seed)
    W0 = {n: l.base_layer.weight.data.copy() for n, l in adapted_layers(model)}
    x = np.random.default_rng(seed).integers(0, TINY.vocab_size, (2, 6))
    model.eval()
    logits = model(x)[0].data
    merge(model)
    np.testing.assert_allclose(model(x)[0].data, logits, rtol=1e-10, atol=1e-10)
    for n, l in adapted_layers(model):
        np.testing.assert_allclose(l.base_layer.weight.data, W0[n] + l.scale * l.lora_B.data @ l.lora_A.data,
                                   rtol=1e-12, atol=1e-14)
    unmerge(model)
    for n, l in adapted_layers(model):
        np.testing.assert_allclose(l.base_layer.weight.data, W0[n], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model(x)[0].data, logits, rtol=1e-10, atol=1e-10)


def test_base_is_bit_identical_after_training_and_only_A_B_move():
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)  # float32
    method = make_method("lora", r=2, target_modules="all-linear")
    model = random_gpt(config, 6)
    before = model.state_dict()
    method.attach(model, seed=0)
    adapters_before = adapter_state_dict(model)
    run_tasks(method, tiny_tasks(1, n_tasks=2, steps=4, config=config), lr=1e-2)
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    assert all(not np.array_equal(v, adapters_before[k]) for k, v in adapter_state_dict(model).items())


def test_parameter_count_is_r_times_D_plus_O_per_layer():
    model = random_gpt(TINY, 0)
    names = inject(model, LoraConfig(r=3, target_modules="all-linear"))
    mark_only_adapters_trainable(model)
    C = TINY.n_embd
    shapes = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
    expected = 0
    for n in names:
        D, O = shapes[n.split(".", 3)[3]]
        layer = model.get_submodule(n)
        assert layer.lora_A.shape == (3, D) and layer.lora_B.shape == (O, 3)  # PEFT orientation
        expected += 3 * (D + O)
    assert model.num_parameters(trainable_only=True) == expected


def test_init_is_kaiming_uniform_from_the_init_stream():
    model = random_gpt(TINY, 0)
    names = inject(model, LoraConfig(r=2), seed=9)
    rng = stream(9, "init")
    for n in names:  # drawn layer after layer, in model order
        A = model.get_submodule(n).lora_A.data
        bound = 1 / math.sqrt(TINY.n_embd)
        np.testing.assert_array_equal(A, rng.uniform(-bound, bound, (2, TINY.n_embd)))


def test_rslora_scale_and_its_equality_at_rank_one():
    assert lora_scale(4, 16) == 4.0 and lora_scale(4, 16, use_rslora=True) == 8.0
    assert LoraConfig(r=9, lora_alpha=6, use_rslora=True).scale == 2.0
    assert lora_scale(1, 5.0) == lora_scale(1, 5.0, use_rslora=True)
    x = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 5))
    outs = []
    for rs in (False, True):
        model = random_gpt(TINY, 2)
        inject(model, LoraConfig(r=1, lora_alpha=5, use_rslora=rs, init_lora_weights=False), seed=3)
        outs.append(model(x)[0].data)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_config_errors_say_what_was_expected():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_alpha"):
        LoraConfig(lora_alpha=0)


def test_seq_lora_resets_adam_at_every_task_start():
    method = make_method("lora", r=2)
    method.attach(random_gpt(TINY, 1), seed=0)
    starts = []

    def on_step(task, step, opt):
        if step == 0:
            starts.append(opt.step_count)

    run_tasks(method, tiny_tasks(2, n_tasks=3, steps=2), on_step=on_step)
    assert starts == [1, 1, 1]  # the first step of every task is Adam's step 1
