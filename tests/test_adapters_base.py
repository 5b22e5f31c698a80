"""The adapter infrastructure (tinyslim/adapters/base.py): RNG streams, injection by name, the PEFT-style
verbs, and the Method contract the experiment runner codes against, on every registered method.

Also holds the small helpers the other adapter test files import (random_gpt, random_batch,
relative_error, assert_trained_outputs_close, run_tasks).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tinyslim.adapters import (METHODS, AdaptedLinear, LoraConfig, Method, Streams, adapted_layers, adapter_state_dict,
                               disable_adapters, enable_adapters, inject, load_adapter_state_dict, make_method,
                               mark_only_adapters_trainable, merge, merge_and_unload, print_trainable_parameters,
                               stream, unmerge)
from tinyslim.autograd import no_grad
from tinyslim.nn import GPT, GPTConfig, Linear
from tinyslim.optim import Adam

# ---- helpers shared by the adapter tests -----------------------------------------------------------


def random_gpt(config: GPTConfig, seed: int) -> GPT:
    """A GPT whose every parameter is random (init leaves biases 0 and LayerNorms 1: too kind a test)."""
    model = GPT(config, seed=seed % 1000)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        value = 1.0 + 0.2 * rng.standard_normal(p.shape) if ".ln_" in name and name.endswith(".weight") \
            else 0.3 * rng.standard_normal(p.shape)
        p.data[...] = value
    return model


def random_batch(rng, config: GPTConfig, B: int, T: int, answer_fraction: float = 0.6):
    """x, y int (B, T) and a 0/1 float answer mask with at least one answer per row; x is never all 0."""
    x = rng.integers(0, config.vocab_size, (B, T))
    y = rng.integers(0, config.vocab_size, (B, T))
    mask = (rng.random((B, T)) < answer_fraction).astype(np.float64)
    mask[np.arange(B), rng.integers(0, T, B)] = 1.0
    if not x.any():  # all id 0, i.e. all padding with pad_token_id=0: no real token to average a statistic
        x[0, 0] = 1  # over (MoLE's balance loss is 0/0 there, inf in tinyslim and nan in torch)
    return x, y, mask


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-300))


def assert_trained_outputs_close(ours, ref, what: str = "logits", rtol: float = 1e-8):
    """Outputs of a model trained by Adam on both sides, compared as one tensor: ‖ours − ref‖ ≤ rtol·‖ref‖.

    After Adam steps the parameters agree to a relative error of 1e-8, or only to ADAM_NOISE (1e-10)
    absolute where their gradient was rounding noise (see test_slim). Such differences move single
    logits by a few 1e-10 (an ELDER stream gave 2.4e-10), so a per-entry atol of 1e-10 fails at random;
    the whole tensor still agrees to ~1e-11 of its norm, and a real bug moves it by far more than 1e-8.
    """
    err = relative_error(ours, ref)
    worst = np.unravel_index(np.argmax(np.abs(np.asarray(ours) - ref)), np.shape(ref))
    assert err <= rtol, (f"{what}: ‖ours − torch‖ / ‖torch‖ = {err:.2e} > {rtol:g}; worst entry {worst}: "
                         f"{np.asarray(ours)[worst]!r} vs {np.asarray(ref)[worst]!r}")


def run_tasks(method: Method, tasks, lr: float = 1e-2, on_step=None, rng=None):
    """The runner's loop of the Method contract over tasks = [[(x, y, mask), ...], ...]; returns (losses, opt).
    on_step(task, step, opt) is called after after_step."""
    opt = Adam(method.trainable_parameters(), lr=lr)
    losses = []
    for k, batches in enumerate(tasks):
        method.before_task(k, len(batches), opt)
        for step, (x, y, mask) in enumerate(batches):
            loss = method.loss(x, y, mask, rng)
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_step(step, opt)
            losses.append(loss.item())
            if on_step is not None:
                on_step(k, step, opt)
        method.after_task(k)
    return losses, opt


TINY = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype="float64")


def tiny_tasks(seed: int, n_tasks: int = 2, steps: int = 3, B: int = 3, T: int = 5, config: GPTConfig = TINY):
    rng = np.random.default_rng(seed)
    return [[random_batch(rng, config, B, T) for _ in range(steps)] for _ in range(n_tasks)]


# ---- RNG streams ------------------------------------------------------------------------------------


def test_stream_is_a_function_of_seed_and_name_only():
    a = stream(7, "init").random(5)
    np.testing.assert_array_equal(a, stream(7, "init").random(5))
    assert not np.array_equal(a, stream(7, "dropout").random(5))
    assert not np.array_equal(a, stream(8, "init").random(5))
    streams = Streams(7)
    streams["dropout"].random(1000)  # using one stream ...
    np.testing.assert_array_equal(streams["init"].random(5), a)  # ... never shifts another
    assert streams["init"] is streams["init"] and streams.used() == ["dropout", "init"]
    with pytest.raises(ValueError, match="non-negative"):
        stream(-1, "init")


def test_switching_dropout_on_does_not_shift_the_init_stream():
    a = make_method("lora", lora_dropout=0.0)
    b = make_method("lora", lora_dropout=0.3)
    a.attach(random_gpt(TINY, 1), seed=5)
    b.attach(random_gpt(TINY, 1), seed=5)
    for key, value in adapter_state_dict(a.model).items():
        np.testing.assert_array_equal(value, adapter_state_dict(b.model)[key])


# ---- injection --------------------------------------------------------------------------------------

ALL_LINEARS = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")]


@pytest.mark.parametrize("targets, expected", [
    (["attn.c_attn"], ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
    (["c_proj"], [n for n in ALL_LINEARS if n.endswith("c_proj")]),  # suffix match on the last part
    (["transformer.h.0.mlp.c_fc"], ["transformer.h.0.mlp.c_fc"]),  # exact name
    (r"transformer\.h\.1\.(attn|mlp)\.c_proj", ["transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]),
    ("all-linear", ALL_LINEARS),  # every Linear but lm_head
    (["lm_head"], ["lm_head"]),  # a list may name the head explicitly
])
def test_inject_matches_target_modules_like_peft(targets, expected):
    model = random_gpt(TINY, 0)
    names = inject(model, LoraConfig(r=2, target_modules=targets), seed=0)
    assert names == expected
    assert [n for n, _ in adapted_layers(model)] == expected
    for name in expected:
        layer = model.get_submodule(name)
        assert isinstance(layer, AdaptedLinear) and isinstance(layer.base_layer, Linear)


@pytest.mark.parametrize("targets, hint", [(["attention"], "The Linear layers are"),
                                           ("attn.c_attn", "regular expression matched against the full name")])
def test_inject_that_matches_nothing_lists_the_linear_names(targets, hint):
    model = random_gpt(TINY, 0)
    with pytest.raises(ValueError, match=hint) as err:
        inject(model, LoraConfig(target_modules=targets))
    assert "transformer.h.1.mlp.c_proj" in str(err.value) and "lm_head" in str(err.value)
    assert not adapted_layers(model)


def test_inject_twice_raises_and_bad_targets_are_type_errors():
    model = random_gpt(TINY, 0)
    inject(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has adapters"):
        inject(model, LoraConfig(r=2, target_modules=["mlp.c_fc"]))
    with pytest.raises(TypeError, match="target_modules"):
        inject(random_gpt(TINY, 0), LoraConfig(target_modules=[]))


def test_mark_only_adapters_trainable():
    model = random_gpt(TINY, 0)
    inject(model, LoraConfig(r=2, target_modules=["c_attn", "mlp.c_fc"]))
    mark_only_adapters_trainable(model)
    trainable = [n for n, _ in model.named_parameters(trainable_only=True)]
    assert trainable == [f"transformer.h.{i}.{m}.lora_{f}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")
                         for f in "AB"]
    assert "transformer.h.0.attn.c_attn.base_layer.weight" in dict(model.named_parameters())


# ---- adapter state dict -----------------------------------------------------------------------------


def test_adapter_state_dict_round_trip_and_clear_errors():
    model = random_gpt(TINY, 0)
    inject(model, LoraConfig(r=3, init_lora_weights=False), seed=1)
    state = adapter_state_dict(model)
    assert sorted(state) == sorted(f"transformer.h.{i}.attn.c_attn.lora_{f}" for i in range(2) for f in "AB")
    assert state["transformer.h.0.attn.c_attn.lora_A"].shape == (3, 8)
    assert state["transformer.h.0.attn.c_attn.lora_B"].shape == (24, 3)

    other = random_gpt(TINY, 0)
    inject(other, LoraConfig(r=3), seed=2)
    A_before = other.get_submodule("transformer.h.0.attn.c_attn").lora_A
    load_adapter_state_dict(other, state)
    assert other.get_submodule("transformer.h.0.attn.c_attn").lora_A is A_before  # in place
    for key, value in adapter_state_dict(other).items():
        np.testing.assert_array_equal(value, state[key])

    with pytest.raises(KeyError, match="missing keys"):
        load_adapter_state_dict(other, {k: v for k, v in state.items() if not k.endswith("lora_B")})
    with pytest.raises(KeyError, match="unexpected keys"):
        load_adapter_state_dict(other, {**state, "transformer.h.0.mlp.c_fc.lora_A": np.zeros((3, 8))})
    bad = dict(state)
    bad["transformer.h.1.attn.c_attn.lora_A"] = np.zeros((2, 8))
    with pytest.raises(ValueError, match=r"shape \(2, 8\) in the state but \(3, 8\)"):
        load_adapter_state_dict(other, bad)


# ---- merge / unmerge / unload / disable -------------------------------------------------------------


def test_merge_unmerge_and_merge_and_unload():
    model = random_gpt(TINY, 3)
    base_state = model.state_dict()
    inject(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False), seed=4)
    W0 = {n: l.base_layer.weight.data.copy() for n, l in adapted_layers(model)}
    x, y, mask = random_batch(np.random.default_rng(0), TINY, 2, 5)
    logits, _ = model(x)

    merge(model)
    with no_grad():
        merged_logits, _ = model(x)
    np.testing.assert_allclose(merged_logits.data, logits.data, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="already merged"):
        merge(model)
    with pytest.raises(RuntimeError, match="training while merged"):
        model(x, y, loss_mask=mask)
    with pytest.raises(RuntimeError, match="unmerge"):
        disable_adapters(model)
    model.eval()
    model(x)  # evaluation while merged is fine
    model.train()

    unmerge(model)
    for n, l in adapted_layers(model):
        np.testing.assert_allclose(l.base_layer.weight.data, W0[n], rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge(model)

    deltas = {n: l.scale * (l.lora_B.data @ l.lora_A.data) for n, l in adapted_layers(model)}
    dense = merge_and_unload(model)
    assert dense is model and not adapted_layers(dense)
    assert sorted(dense.state_dict()) == sorted(base_state)  # the plain GPT names again
    for n, delta in deltas.items():
        np.testing.assert_allclose(dense.get_submodule(n).weight.data, base_state[f"{n}.weight"] + delta,
                                   rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dense(x)[0].data, logits.data, rtol=1e-10, atol=1e-10)


def test_disable_adapters_gives_the_base_bit_for_bit_and_restores():
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)  # float32
    base = random_gpt(config, 5)
    model = random_gpt(config, 5)
    inject(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False), seed=1)
    x = np.random.default_rng(0).integers(0, 11, (2, 6))
    base_logits, adapted_logits = base(x)[0].data, model(x)[0].data
    assert not np.array_equal(base_logits, adapted_logits)
    with disable_adapters(model):
        np.testing.assert_array_equal(model(x)[0].data, base_logits)
    np.testing.assert_array_equal(model(x)[0].data, adapted_logits)
    disable_adapters(model)  # a plain call switches them off until enable_adapters
    np.testing.assert_array_equal(model(x)[0].data, base_logits)
    with enable_adapters(model):
        np.testing.assert_array_equal(model(x)[0].data, adapted_logits)
    np.testing.assert_array_equal(model(x)[0].data, base_logits)
    enable_adapters(model)
    np.testing.assert_array_equal(model(x)[0].data, adapted_logits)


def test_print_trainable_parameters_in_peft_format(capsys):
    model = random_gpt(TINY, 0)
    total_before = model.num_parameters()
    inject(model, LoraConfig(r=2, target_modules=["attn.c_attn", "mlp.c_fc"]))
    mark_only_adapters_trainable(model)
    line = print_trainable_parameters(model)
    trainable = 2 * (2 * (8 + 24) + 2 * (8 + 32))  # r·(D + O) per adapted layer
    total = total_before + trainable
    assert line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: " \
                   f"{100 * trainable / total:.4f}"
    assert capsys.readouterr().out.strip() == line


# ---- the registry and the Method contract -----------------------------------------------------------


def test_make_method_registry_and_errors():
    assert sorted(METHODS) == ["cola", "er", "ilora", "lora", "moe_lora", "slim"]
    with pytest.raises(ValueError, match=r"valid names are \['cola', 'er', 'ilora', 'lora', 'moe_lora', 'slim'\]"):
        make_method("lora2")
    with pytest.raises(ValueError, match="unknown config fields \\['gama'\\]"):
        make_method("ilora", gama=0.5)
    m = make_method("ilora", gamma=0.5, r=2)
    assert m.config.gamma == 0.5 and m.config.r == 2 and m.name == "ilora"
    m2 = METHODS["ilora"](m.config, gamma=0.0)
    assert m2.config.gamma == 0.0 and m.config.gamma == 0.5
    with pytest.raises(ValueError, match="ema_counter"):
        make_method("ilora", ema_counter="sometimes")
    with pytest.raises(RuntimeError, match="attach"):
        make_method("er").trainable_parameters()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_honours_the_runner_contract(name):
    method = make_method(name, r=2, **({"chain_len": 2} if name == "cola" else {}))
    model = random_gpt(TINY, 2)
    method.attach(model, seed=3)
    with pytest.raises(RuntimeError, match="already called"):
        method.attach(model, seed=3)
    params = method.trainable_parameters()
    ids = [id(p) for p in params]
    assert params and all(p.requires_grad for p in params)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{a}.{f}" for a, layer in zip(method.adapted, method.layers()) for f in layer.trainable_names}

    tasks = tiny_tasks(0, n_tasks=2, steps=3)
    losses, opt = run_tasks(method, tasks)
    assert np.all(np.isfinite(losses))
    assert [id(p) for p in method.trainable_parameters()] == ids  # stable objects (knots write in place)
    assert set(map(id, opt.params)) == set(ids)

    learners = method.learners()
    assert learners == (["slow", "fast"] if name == "ilora" else ["default"])
    x = tasks[0][0][0]
    for learner in learners + [None]:
        with method.evaluating(learner) as m:
            assert m is model and not model.training
            logits, _ = model(x)
            assert not logits.requires_grad  # gradients are off inside
        assert model.training
    with pytest.raises(ValueError, match="learners"):
        with method.evaluating("nobody"):
            pass
    info = method.describe()
    json.dumps(info)
    assert info["name"] == name and info["trainable_parameters"] == sum(p.size for p in params)
    assert info["config"]["r"] == 2 and info["adapted_modules"] == method.adapted
