"""The GRACE-like codebook (tinyslim/adapters/grace.py), docs/methods.md §7.5.

* the replacement op: gradcheck of y and the values, rows without a key untouched
* against an independent torch codebook (tests/torch_adapters.py) on hypothesis-drawn tiny GPTs, layers,
  radii and edit streams with repeated and conflicting edits, float64: every step's loss, the keys,
  radii, targets and values after the stream, and the evaluation logits and hits on edited and unrelated
  prompts
* invariants: no key → the base bit for bit; rows out of every radius → the base bit for bit next to
  rows that hit; an edited prompt's layer output at its key position is the stored value; a same-target
  key within ε is reused (no new key), a conflicting or far edit adds one and the newest key wins ties;
  the state_dict round trip; the adapter contract; clear errors
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from test_adapters_base import assert_trained_outputs_close, random_gpt, relative_error
from test_elder import edit_batch, twin_key_positions
from test_slim import ADAM_NOISE
from tinyslim.adapters import EDIT_METHODS, Grace, GraceConfig, key_positions
from tinyslim.adapters.grace import replace_at
from tinyslim.nn import GPTConfig
from tinyslim.testing import check_adapter_invariants, gradcheck

seeds = st.integers(0, 2**32 - 1)
F32 = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
F64 = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype="float64")


def grace_on(config=F64, seed=0, **over):
    model = random_gpt(config, 5)
    method = Grace(**{"n_iter": 3, "lr": 0.1, **over})
    method.attach(model, seed)
    return method


def base_logits(config, x):
    base = random_gpt(config, 5)
    base.eval()
    return base(x)[0].data


def with_target(x, y, mask, target):
    """The same prompt with another target on the masked positions."""
    y = y.copy()
    y[mask != 0] = target
    return x, y, mask


# ---- the replacement op ---------------------------------------------------------------------------

@given(seed=seeds, B=st.integers(1, 4), T=st.integers(1, 5), n=st.integers(1, 3))
def test_replace_at_gradcheck_and_untouched_rows(seed, B, T, n):
    rng = np.random.default_rng(seed)
    y, values = rng.standard_normal((B, T, 3)), rng.standard_normal((n, 3))
    pos, slot = rng.integers(0, T, B), rng.integers(-1, n, B)  # −1: the row keeps y; repeated slots add up
    out = replace_at(y, values, pos, slot).data
    for b in range(B):
        expected = y[b].copy()
        if slot[b] >= 0:
            expected[pos[b]] = values[slot[b]]
        np.testing.assert_array_equal(out[b], expected)
    if (slot >= 0).any():
        gradcheck(lambda y, v: replace_at(y, v, pos, slot), y, values)
    with pytest.raises(ValueError, match="pos and slot must be"):
        replace_at(y, values, pos[:-1] if B > 1 else np.zeros(2, int), slot)


# ---- the torch twin ---------------------------------------------------------------------------------

@st.composite
def grace_cases(draw):
    n_head = draw(st.integers(1, 2))
    config = GPTConfig(vocab_size=draw(st.integers(5, 12)), block_size=6, n_layer=draw(st.integers(2, 3)),
                       n_head=n_head, n_embd=n_head * draw(st.integers(3, 4)), bias=draw(st.booleans()),
                       dtype="float64")
    over = dict(layer=draw(st.sampled_from([None, "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"])),
                epsilon=draw(st.sampled_from([0.5, 2.0, 100.0])),
                key_pos=draw(st.sampled_from(["last_prompt", "last"])),
                n_iter=draw(st.integers(1, 3)), lr=draw(st.sampled_from([0.1, 1.0])))
    # the stream: fresh edits, a repeat (reuse), the same prompt with another target (a conflict)
    kinds = draw(st.lists(st.sampled_from(["new", "new", "repeat", "conflict"]), min_size=1, max_size=4))
    return config, over, kinds, draw(st.integers(1, 2)), draw(seeds)


@pytest.mark.torch
@given(case=grace_cases())
def test_grace_edit_stream_matches_torch(case):
    import torch

    from torch_adapters import TorchGraceLinear, forward_hidden, replace_linears, run_grace, twin_gpt

    config, over, kinds, B, seed = case
    rng = np.random.default_rng(seed)
    model = random_gpt(config, seed)
    base_state = model.state_dict()
    method = Grace(**over)
    method.attach(model, seed % 997)
    edits = []
    for kind in kinds:
        if kind == "new" or not edits:
            edits.append(edit_batch(rng, config, B=B))
        elif kind == "repeat":
            edits.append(edits[-1])
        else:
            edits.append(with_target(*edits[-1], 1 + (edits[-1][1][0, -1] % (config.vocab_size - 1))))
    losses = [l for x, y, m in edits for l in method.edit(x, y, m)]

    twin = twin_gpt(config, base_state)
    ctx = dict(keys=[], values=[], radii=[], targets=[], key_pos=None, train_slots=None)
    layers = replace_linears(twin, {method.config.layer: lambda base: TorchGraceLinear(base, ctx)})
    ctx["routing_module"] = layers[method.config.layer]
    ref = run_grace(twin, ctx, edits, n_iter=method.config.n_iter, lr=method.config.lr, eps=method.config.epsilon,
                    key_pos_fn=lambda x, m: twin_key_positions(x, m, method.config.key_pos))
    np.testing.assert_allclose(losses, ref, rtol=1e-9)
    layer, n = method.layer, method.n_keys
    assert n == len(ctx["keys"])
    np.testing.assert_allclose(layer.keys.data[:n], torch.stack(ctx["keys"]).numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(layer.radii.data[:n], ctx["radii"])
    assert [method.key_targets[j] for j in range(n)] == ctx["targets"]
    theirs = torch.stack([v.detach() for v in ctx["values"]]).numpy()
    ours = layer.values.data[:n]
    assert relative_error(ours, theirs) <= 1e-8 or np.abs(ours - theirs).max() <= ADAM_NOISE
    # evaluation: the edited prompts and unrelated ones, keyed at their last prompt token
    probe_x = np.concatenate([edits[0][0], rng.integers(1, config.vocab_size, (3, 5))])
    probe_mask = np.concatenate([edits[0][2], np.tile(edits[0][2][:1], (3, 1))])
    key_pos = twin_key_positions(probe_x, probe_mask, method.config.key_pos)
    out = method.route(probe_x, key_pos)
    ctx["key_pos"] = key_pos
    twin.eval()
    with torch.no_grad():
        ref_logits = forward_hidden(twin, probe_x)[0].numpy()
    np.testing.assert_array_equal(out["slot"], ctx["slots"])
    assert_trained_outputs_close(out["logits"], ref_logits)
    assert out["hit"][:B].all()  # the edit's own prompts are at distance 0 of their keys


# ---- invariants ------------------------------------------------------------------------------------

@given(seed=seeds, config=st.sampled_from([F32, F64]))
def test_no_key_is_the_base_and_rows_out_of_range_are_the_base_bit_for_bit(seed, config):
    rng = np.random.default_rng(seed)
    method = grace_on(config, seed % 1000, epsilon=0.5)
    probe = rng.integers(1, 11, (5, 5))
    out = method.route(probe)
    assert not out["hit"].any() and np.isinf(out["distance"]).all()
    np.testing.assert_array_equal(out["logits"], base_logits(config, probe))
    x, y, mask = edit_batch(rng, config)
    method.edit(x, y, mask)
    probe = np.concatenate([x, probe])
    key_pos = key_positions(probe, np.concatenate([mask] * 6))
    out = method.route(probe, key_pos)
    assert out["hit"][0] and out["distance"][0] < 1e-5  # its own prompt (float32 rounds q by batch shape)
    assert (~out["hit"]).any(), "every probe fell within ε = 0.5 of the key; pick another seed"
    base = base_logits(config, probe)
    for b in np.flatnonzero(~out["hit"]):
        np.testing.assert_array_equal(out["logits"][b], base[b])
    assert np.all(out["hit"] == (out["distance"] <= 0.5))


def tap(method, x, key_pos=None):
    """One evaluation forward with the codebook layer's input and output recorded: (route's dict, x_l, y_l)."""
    layer, seen = method.layer, []
    forward = layer.forward
    layer.forward = lambda inp: seen.append((inp, forward(inp))) or seen[-1][1]
    try:
        out = method.route(x, key_pos)
    finally:
        del layer.forward  # back to the class's forward
    return out, seen[0][0].data, seen[0][1].data


@given(seed=seeds)
def test_an_edited_prompt_gets_the_stored_value_at_its_key_position_only(seed):
    rng = np.random.default_rng(seed)
    method = grace_on(F64, seed % 1000)
    x, y, mask = edit_batch(rng, F64)
    losses = method.edit(x, y, mask)
    assert losses[-1] < losses[0]  # the value trains
    layer, p = method.layer, int(key_positions(x, mask)[0])
    out, x_l, y_l = tap(method, x, [p])
    assert out["slot"].tolist() == [0]
    np.testing.assert_array_equal(y_l[0, p], layer.values.data[0])
    others = np.arange(x.shape[1]) != p
    np.testing.assert_array_equal(y_l[0, others], layer.base_layer(x_l).data[0, others])
    # the value decides the prediction from p on; positions before p cannot see it (causal)
    layer.values.data[0] += 1.0
    after = method.route(x, [p])["logits"]
    np.testing.assert_array_equal(after[0, :p], out["logits"][0, :p])
    assert not np.allclose(after[0, p], out["logits"][0, p])


def test_same_target_within_eps_reuses_the_key_conflicts_and_far_edits_add_one():
    rng = np.random.default_rng(0)
    method = grace_on(F64, 0, epsilon=0.5)
    x, y, mask = edit_batch(rng, F64)
    method.edit(x, y, mask)
    v0 = method.layer.values.data[0].copy()
    method.edit(x, y, mask)  # the same fact again: distance 0, same target
    assert method.n_keys == 1 and not np.array_equal(method.layer.values.data[0], v0)  # its value trained on
    x2, y2, m2 = with_target(x, y, mask, 1 + y[0, -1] % 10)
    method.edit(x2, y2, m2)  # the same prompt, another target: a new key at distance 0
    assert method.n_keys == 2 and method.key_targets[1] != method.key_targets[0]
    assert method.route(x, key_positions(x, mask))["slot"].tolist() == [1]  # the newest key wins the tie
    far = None
    for _ in range(50):  # a prompt whose q is farther than ε from the key, with the first fact's target
        xf = edit_batch(rng, F64)[0]
        if method.route(xf, key_positions(xf, mask))["distance"][0] > 0.5:
            far = xf
            break
    assert far is not None
    method.edit(far, y, mask)
    assert method.n_keys == 3 and method.key_targets[2] == method.key_targets[0]


def test_a_new_value_starts_at_the_layers_current_output():
    rng = np.random.default_rng(1)
    method = grace_on(F64, 0, epsilon=100.0, n_iter=1, lr=1e-12)  # every query within reach; values barely move
    x, y, mask = edit_batch(rng, F64)
    p = key_positions(x, mask)
    _, x_l, _ = tap(method, x, p)
    base_out = method.layer.base_layer(x_l).data[0, p[0]]
    method.edit(x, y, mask)
    np.testing.assert_allclose(method.layer.values.data[0], base_out, rtol=0, atol=1e-10)  # the base output
    x2, y2, m2 = with_target(x, y, mask, 1 + y[0, -1] % 10)
    method.edit(x2, y2, m2)  # key 0 is in reach: the layer's current output is its value
    np.testing.assert_allclose(method.layer.values.data[1], method.layer.values.data[0], rtol=0, atol=1e-10)


def test_state_dict_round_trip():
    rng = np.random.default_rng(2)
    method = grace_on(F32, 0, epsilon=1.0)
    edits = [edit_batch(rng, F32, B=2) for _ in range(3)]
    for e in edits:
        method.edit(*e)
    arrays, meta = method.state_dict()
    assert {"adapter.transformer.h.0.mlp.c_fc.keys", "adapter.transformer.h.0.mlp.c_fc.values",
            "adapter.transformer.h.0.mlp.c_fc.radii"} <= set(arrays)
    fresh = grace_on(F32, 7, epsilon=1.0)
    fresh.load_state_dict(copy.deepcopy(arrays), meta)
    assert fresh.key_targets == method.key_targets and fresh.n_keys == method.n_keys
    probe = np.concatenate([edits[0][0], rng.integers(1, 11, (3, 5))])
    np.testing.assert_array_equal(fresh.route(probe)["logits"], method.route(probe)["logits"])
    for m in (method, fresh):  # and editing goes on alike: a repeat reuses its key
        m.edit(*edits[1])
    assert fresh.n_keys == method.n_keys == 6
    np.testing.assert_array_equal(fresh.layer.values.data, method.layer.values.data)


def test_the_adapter_contract_registry_and_defaults():
    assert check_adapter_invariants(Grace(n_iter=2))["merge"].startswith("skipped")
    assert EDIT_METHODS["grace"] is Grace
    cfg = GraceConfig()
    assert (cfg.epsilon, cfg.n_iter, cfg.lr, cfg.key_pos, cfg.layer) == (1.0, 30, 1e-2, "last_prompt", None)
    method = grace_on(GPTConfig(vocab_size=11, block_size=6, n_layer=4, n_head=2, n_embd=8))
    assert method.adapted == ["transformer.h.2.mlp.c_fc"]  # ELDER's routing layer: h.{L−2}.mlp.c_fc
    assert method.layer.values.shape == (1024, 32) and method.n_keys == 0


@pytest.mark.parametrize("over, match", [
    (dict(epsilon=0.0), "epsilon must be a finite number > 0"), (dict(epsilon=-1.0), "epsilon"),
    (dict(epsilon=float("nan")), "epsilon"), (dict(epsilon=float("inf")), "epsilon"), (dict(epsilon="1"), "epsilon"),
    (dict(n_iter=0), "n_iter must be a positive integer"), (dict(max_edits=0), "max_edits"),
    (dict(key_pos="first"), "key_pos must be one of"), (dict(lr_schedule="cosine"), "lr_schedule"),
    (dict(lr=0.0), "lr must be > 0"), (dict(layer=3), "layer must be a Linear's full name"),
    (dict(radius=1.0), "unknown config fields"),
])
def test_bad_config_values_raise(over, match):
    with pytest.raises(ValueError, match=match):
        Grace(**over)


def test_bad_layers_and_a_full_codebook_raise():
    with pytest.raises(ValueError, match="is not a Linear of the model"):
        grace_on(F32, layer="transformer.h.0.ln_1")
    with pytest.raises(ValueError, match="is not a Linear of the model"):
        grace_on(F32, layer="mlp.c_fc")  # a suffix would match every block: a full name is needed
    method = grace_on(F32, max_edits=1, n_iter=1)
    rng = np.random.default_rng(0)
    method.edit(*edit_batch(rng, F32))
    with pytest.raises(RuntimeError, match="codebook is full"):
        method.edit(*edit_batch(rng, F32))
