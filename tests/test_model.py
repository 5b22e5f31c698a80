"""The tiny GPT against an independent plain-torch GPT-2 (tests/torch_gpt.py), and the Module API.

On hypothesis-drawn tiny configs in float64: the same logits, the same loss (with and without a loss
mask) and every parameter gradient — the tied embedding included — to a relative error ≤ 1e-8 (of
the gradient, or of 1e-4 of the whole gradient where a gradient is smaller than that: see ILL_CONDITIONED).
The comparison is tinyslim.testing's assert_module_matches_torch (weights copied by name).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tinyslim import functional as F
from tinyslim.nn import GPT, GPTConfig
from tinyslim.testing import CheckError, assert_module_matches_torch
from tinyslim.testing import randomize_parameters as randomize  # init is too kind a test: random weights
from tinyslim.testing import strategies as ts

seeds = ts.seeds()


def gpt_case(config, seed, B, T, masked):
    """(config, seed, idx, targets, mask): a batch drawn from the seed, with a loss mask or without."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    mask = None
    if masked:
        mask = (rng.random((B, T)) < 0.6).astype(np.int64)
        mask[rng.integers(B), rng.integers(T)] = 1
    return config, seed, idx, targets, mask


@st.composite
def gpt_cases(draw):
    config = draw(ts.gpt_configs(dtype="float64"))  # 1-2 layers and heads, vocabulary 5-20, context 4-8
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, config.block_size))
    return gpt_case(config, draw(seeds), B, T, draw(st.booleans()))


# Ill-conditioned: LayerNorm over 2 channels maps its input to ±1 whatever the input's size, so the gradient
# of ln_1.weight is 2.1e-11 of the whole gradient, left over from cancellation; its relative error was 2.6e-7
# (rounding, ~7e-18 of the whole). A per-gradient rtol of 1e-8 failed here, at random, in a fresh `make test`.
ILL_CONDITIONED = gpt_case(GPTConfig(vocab_size=13, block_size=6, n_layer=1, n_head=1, n_embd=2, bias=True,
                                     dtype="float64"), 3682627486, 3, 1, False)


@pytest.mark.torch
@given(case=gpt_cases())
@example(case=ILL_CONDITIONED)
def test_gpt_matches_torch_logits_loss_and_every_gradient(case):
    from torch_gpt import TorchGPT

    config, seed, idx, targets, mask = case
    ours = randomize(GPT(config, seed=seed % 1000), seed)
    # every torch parameter gets a value by name; logits within rtol 1e-10 / atol 1e-12; loss.backward() alone
    # (upstream 1 on the loss, none on the logits); every parameter gradient (the tied wte sums both uses) is
    # present and within ‖ours − torch‖ ≤ 1e-8 max(‖torch‖, 1e-4 ‖whole gradient‖) (the floor: see
    # assert_module_matches_torch and ILL_CONDITIONED)
    got = assert_module_matches_torch(ours, TorchGPT.like(config), (idx, targets, mask), upstream=[None, 1.0],
                                      rtol=1e-10, atol=1e-12, grad_rtol=1e-8)
    (logits, _), (loss, ref_loss) = got["outputs"]
    assert logits.shape == (*idx.shape, config.vocab_size) and logits.dtype == np.float64
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    assert set(got["grads"]) == {name for name, _ in ours.named_parameters()}


@pytest.mark.torch
def test_the_ill_conditioned_case_fails_a_per_gradient_rtol_by_rounding_alone():
    from torch_gpt import TorchGPT

    config, seed, idx, targets, mask = ILL_CONDITIONED
    ours = randomize(GPT(config, seed=seed % 1000), seed)
    with pytest.raises(CheckError, match=r"d/d transformer\.h\.0\.ln_1\.weight: relative error"):
        assert_module_matches_torch(ours, TorchGPT.like(config), (idx, targets, mask), upstream=[None, 1.0],
                                    grad_rtol=1e-8, grad_floor=0.0)


@pytest.mark.torch
def test_inference_logits_match_torch_without_targets():
    from torch_gpt import TorchGPT

    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype="float64")
    ours = randomize(GPT(config), 1)
    idx = np.random.default_rng(0).integers(0, 11, (2, 6))
    # logits within rtol 1e-10 / atol 1e-12, no loss on either side, and (from a random upstream on the
    # logits) every parameter gradient within 1e-8
    got = assert_module_matches_torch(ours, TorchGPT.like(config), (idx,), rtol=1e-10, atol=1e-12)
    assert got["outputs"][1] == (None, None)


# ---- Module API ---------------------------------------------------------------------------------

HF_BLOCK = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
            "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
            "mlp.c_proj.weight", "mlp.c_proj.bias"]


def tiny(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8), **overrides})


def test_parameter_names_are_hugging_face_gpt2_names():
    model = GPT(tiny())
    names = [name for name, _ in model.named_parameters()]
    expected = (["transformer.wte.weight", "transformer.wpe.weight"]
                + [f"transformer.h.{i}.{n}" for i in range(2) for n in HF_BLOCK]
                + ["transformer.ln_f.weight", "transformer.ln_f.bias"])
    assert names == expected
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: listed once, as wte
    assert model.num_parameters() == sum(p.size for _, p in model.named_parameters())
    assert list(model.state_dict()) == expected


def test_parameter_names_without_linear_biases():
    names = [name for name, _ in GPT(tiny(bias=False)).named_parameters()]
    block = [n for n in HF_BLOCK if not (n.endswith(".bias") and not n.startswith("ln_"))]
    assert names == (["transformer.wte.weight", "transformer.wpe.weight"]
                     + [f"transformer.h.{i}.{n}" for i in range(2) for n in block]
                     + ["transformer.ln_f.weight", "transformer.ln_f.bias"])


def test_linear_weights_are_stored_out_by_in():
    model = GPT(tiny())
    attn, mlp = model.transformer.h[0].attn, model.transformer.h[0].mlp
    assert attn.c_attn.weight.shape == (24, 8) and attn.c_proj.weight.shape == (8, 8)
    assert mlp.c_fc.weight.shape == (32, 8) and mlp.c_proj.weight.shape == (8, 32)


def test_state_dict_round_trip_is_bit_exact():
    config = tiny()
    a = randomize(GPT(config, seed=0), 3)
    state = a.state_dict()
    b = GPT(config, seed=1)
    arrays_before = [p.data for p in b.parameters()]
    b.load_state_dict(state)
    assert all(p.data is q for p, q in zip(b.parameters(), arrays_before)), "load must copy in place"
    assert b.lm_head.weight is b.transformer.wte.weight
    for name, value in b.state_dict().items():
        assert value.dtype == state[name].dtype and np.array_equal(value, state[name]), name
    idx = np.arange(8)[None] % config.vocab_size
    assert np.array_equal(a(idx)[0].data, b(idx)[0].data)
    # a saved state is a copy: training the model later does not change it
    a.transformer.wte.weight.data += 1.0
    assert np.array_equal(state["transformer.wte.weight"], b.transformer.wte.weight.data)


def test_loading_a_state_for_another_config_names_the_key_and_shapes():
    state = GPT(tiny(n_embd=4)).state_dict()
    with pytest.raises(ValueError, match=r"transformer\.wte\.weight.*\(13, 4\).*\(13, 8\)"):
        GPT(tiny()).load_state_dict(state)
    with pytest.raises(KeyError, match=r"transformer\.h\.1\.ln_1\.weight"):
        GPT(tiny()).load_state_dict(GPT(tiny(n_layer=1)).state_dict())
    with pytest.raises(KeyError, match=r"unexpected keys \['extra'\]"):
        GPT(tiny()).load_state_dict({**GPT(tiny()).state_dict(), "extra": np.zeros(1)})
    with pytest.raises(TypeError, match="float64.*float32"):
        GPT(tiny()).load_state_dict(GPT(tiny(dtype="float64")).state_dict())


def test_freeze_unfreeze_and_trainable_parameters():
    model = GPT(tiny())
    idx = np.zeros((1, 4), dtype=np.int64)
    model.freeze()
    assert model.parameters(trainable_only=True) == []
    logits, loss = model(idx, idx)
    assert not loss.requires_grad
    model.unfreeze()
    model.transformer.h[0].freeze()
    trainable = [n for n, _ in model.named_parameters(trainable_only=True)]
    assert trainable and not any(n.startswith("transformer.h.0.") for n in trainable)
    model(idx, idx)[1].backward()
    assert all(p.grad is None for p in model.transformer.h[0].parameters())
    assert all(p.grad is not None for p in model.transformer.h[1].parameters())


def test_train_and_eval_reach_every_module_and_switch_dropout():
    model = GPT(tiny(dropout=0.5, dtype="float64"))
    idx = np.arange(6)[None]
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="rng"):
        model(idx)  # training with dropout needs an explicit rng, for reproducibility
    train_a = model(idx, rng=np.random.default_rng(0))[0].data
    train_b = model(idx, rng=np.random.default_rng(0))[0].data
    assert np.array_equal(train_a, train_b)
    model.eval()
    assert not any(m.training for m in model.modules())
    no_dropout = GPT(tiny(dropout=0.0, dtype="float64"))
    no_dropout.load_state_dict(model.state_dict())
    evaluated = model(idx)[0].data
    assert np.array_equal(evaluated, no_dropout(idx)[0].data)
    assert not np.allclose(evaluated, train_a)
    model.train()
    assert all(m.training for m in model.modules())


# ---- generate ----------------------------------------------------------------------------------


def greedy_by_hand(model, idx, n):
    block = model.config.block_size
    for _ in range(n):
        logits, _ = model(idx[:, -block:])
        idx = np.concatenate([idx, logits.data[:, -1].argmax(-1)[:, None]], axis=1)
    return idx


def record_inputs(model):
    """Make the model remember the token ids of every forward call (to check the context windows)."""
    seen, forward = [], model.forward

    def recording(idx, *args, **kwargs):
        seen.append(np.array(idx))
        return forward(idx, *args, **kwargs)

    model.forward = recording
    return seen


def test_generate_greedy_is_deterministic_with_the_right_length():
    model = randomize(GPT(tiny(block_size=6)), 5)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    out = model.generate(prompt, 7, greedy=True)
    assert out.shape == (2, 3 + 7) and np.array_equal(out[:, :3], prompt)
    assert np.array_equal(out, model.generate(prompt, 7, greedy=True))
    assert np.array_equal(out, greedy_by_hand(model, prompt, 7))
    assert model.training, "generate must restore training mode"


@pytest.mark.parametrize("T, block_size", [(3, 6), (7, 4)])  # grows past block_size / starts past it
def test_generate_crops_the_context_to_the_last_block_size_tokens(T, block_size):
    model = randomize(GPT(tiny(block_size=block_size)), 6)
    prompt = np.arange(1, T + 1)[None] % 13
    seen = record_inputs(model)
    out = model.generate(prompt, 5, greedy=True)
    assert out.shape == (1, T + 5) and np.array_equal(out[:, :T], prompt)
    assert len(seen) == 5
    for step, idx in enumerate(seen):  # step s sees the last block_size of the first T + s tokens
        end = T + step
        assert np.array_equal(idx, out[:, max(0, end - block_size):end]), f"step {step}"


def test_generate_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = randomize(GPT(tiny()), 7)
    prompt = np.array([3, 1, 4])  # a 1-D prompt is one sequence
    a = model.generate(prompt, 5, rng=np.random.default_rng(1))
    b = model.generate(prompt, 5, rng=np.random.default_rng(1))
    assert a.shape == (1, 8) and np.array_equal(a, b)
    assert np.array_equal(model.generate(prompt, 5, top_k=1, rng=np.random.default_rng(2)),
                          model.generate(prompt, 5, greedy=True))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=0.0)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("idx, message", [
    (np.array([[0.0, 1.0]]), "integer array"),
    (np.array([[0, 13]]), r"\[0, vocab_size = 13\)"),
    (np.array([[-1, 2]]), r"\[0, vocab_size = 13\)"),
    (np.zeros((1, 9), dtype=np.int64), "block_size = 8"),
    (np.zeros((1, 0), dtype=np.int64), "block_size = 8"),
    (np.zeros((1, 2, 3), dtype=np.int64), r"\(B, T\)"),
])
def test_bad_token_ids_raise_value_error(idx, message):
    with pytest.raises(ValueError, match=message):
        GPT(tiny())(idx)


def test_targets_of_the_wrong_shape_raise_value_error():
    with pytest.raises(ValueError, match=r"targets must have the shape of idx \(2, 3\), got \(2, 2\)"):
        GPT(tiny())(np.zeros((2, 3), dtype=np.int64), np.zeros((2, 2), dtype=np.int64))


def test_loss_is_the_mean_cross_entropy_over_unmasked_positions():
    model = randomize(GPT(tiny(dtype="float64")), 8)
    idx = np.array([[1, 2, 3, 4]])
    targets = np.array([[2, 3, 4, 5]])
    mask = np.array([[0, 1, 1, 0]])
    logits, loss = model(idx, targets, loss_mask=mask)
    expected = F.cross_entropy(logits.data[:, 1:3], targets[:, 1:3]).item()
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-13)


# ---- GPTConfig ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=10, n_head=3), "n_embd = 10 must be divisible by n_head = 3"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
    (dict(dropout=1.0), r"dropout must lie in \[0, 1\)"),
    (dict(dtype="float16"), "dtype must be"),
])
def test_gpt_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_gpt_config_dict_round_trip():
    config = tiny(bias=False)
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fields"):
        GPTConfig.from_dict({**config.to_dict(), "n_ctx": 8})
    assert config.diff(tiny()) == {"bias": (False, True)}
