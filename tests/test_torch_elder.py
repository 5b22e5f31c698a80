"""ELDER, FT-LoRA and the GRACE-like codebook on the torch engine (tinyslim/torch/elder.py, ft_lora.py,
grace.py) against the NumPy methods (tinyslim/adapters/elder.py, ft_lora.py, grace.py): the NumPy GPT and
its transformers twin (``from_gpt``), the same config, the same seed, float64.

* ELDER in the paper setting (ELDER_PAPER: the last prompt token, raw query, trained routers) and in the
  default one (the subject read alone or in the prompt, the centred or scaled query, frozen routers), on
  hypothesis-drawn tiny GPTs and configs (experts, k, rank, targets, the routing layer inside or before the
  adapted layers, gate bias, renormalised gates, the guided loss, init / hashed presets, soft / hard
  routing, θ, deferral on or off): the initial adapters (the same stream draws), μ, the subject queries,
  the editing loss and the gradient of every trainable tensor, a stream of edits through ``edit()`` (each
  with its own Adam: tinyslim.optim.Adam against torch.optim.Adam): every step's loss, every adapter array
  after the stream (experts, routers, the code table bit for bit, μ), the stored count and the last
  presets, then the routed / deferred prompts: z, the Hamming distances, the logits; deferred rows are the
  torch base's logits bit for bit
* FT-LoRA: the loss and gradients, then edits with the constant and the step schedule (and LoRA dropout,
  drawn from the same stream): every loss and the final factors
* GRACE: the loss and the gradient of the values, then a stream with repeated and conflicting edits (a
  reused key, a new key for another target): every loss, keys, values, radii, targets, and the hits,
  slots, distances and logits of routed prompts

Tolerances follow from float64: a forward agrees to 1e-12 of its scale, a gradient to 1e-10 of its largest
entry. After Adam steps a parameter agrees to 1e-9 of its scale plus ADAM_NOISE: Adam divides a gradient that
is rounding noise (~1e-16) by √v + ε (ε = 1e-8), which moves such an entry by up to lr·1e-8 per step at random.
Discrete decisions (experts, codes, deferral, keys, slots) must be equal exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_adapters_base import random_gpt  # noqa: E402
from test_elder import edit_batch  # noqa: E402
from tinyslim import adapters  # noqa: E402
from tinyslim import torch as tst  # noqa: E402
from tinyslim.adapters.elder import ELDER_PAPER, key_positions  # noqa: E402
from tinyslim.hf import hf_gpt2_state_dict  # noqa: E402
from tinyslim.nn import GPTConfig  # noqa: E402
from tinyslim.torch.elder import Elder  # noqa: E402
from tinyslim.torch.ft_lora import FTLoRA  # noqa: E402
from tinyslim.torch.grace import Grace  # noqa: E402

seeds = st.integers(0, 2**32 - 1)
FORWARD_RTOL = 1e-12  # of the tensor's largest entry
GRAD_RTOL = 1e-10
STEP_RTOL = 1e-9  # parameters and losses after Adam steps
ADAM_NOISE = 1e-10  # lr (1e-2) · rounding noise / ε, over a few steps


@pytest.fixture(autouse=True)
def _numpy_kernel(monkeypatch):  # the NumPy engine's reference kernel (the compiled ones are tested elsewhere)
    monkeypatch.setenv("TINYSLIM_BACKEND", "numpy")


# ---- helpers --------------------------------------------------------------------------------------------

def twin(gpt) -> "tst.CausalLM":
    """from_gpt(gpt) holding exactly the GPT's float64 weights (loaded again into the float64 model, in case
    from_gpt rounded them through a float32 model)."""
    lm = tst.from_gpt(gpt)
    state = {k: torch.as_tensor(np.asarray(v)) for k, v in hf_gpt2_state_dict(gpt).items()}
    lm.hf_model.load_state_dict(state, strict=False)
    return lm


def pair(cls_numpy, cls_torch, config, seed, run_seed, **over):
    """The NumPy method on a random GPT and the torch method on its twin, attached with the same run seed."""
    gpt = random_gpt(config, seed)
    lm = twin(gpt)
    ours, theirs = cls_numpy(**over), cls_torch(**over)
    ours.attach(gpt, run_seed)
    theirs.attach(lm, run_seed)
    assert theirs.adapted == ours.adapted
    return ours, theirs


def numpy_of(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def assert_close(ours, theirs, rtol: float, what: str, atol: float = 0.0) -> float:
    """max |ours − theirs| ≤ rtol · max |theirs| + atol; returns the max abs difference (for the report)."""
    a, b = np.asarray(numpy_of(ours), dtype=np.float64), np.asarray(numpy_of(theirs), dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    assert diff <= rtol * scale + atol, (f"{what}: max |numpy − torch| = {diff:.3e} > {rtol:g}·{scale:.3e} + "
                                         f"{atol:g}; first values numpy {a.ravel()[:4]} torch {b.ravel()[:4]}")
    return diff


def assert_arrays_close(ours, theirs, rtol: float, atol: float = 0.0, exact=()) -> None:
    """Two adapter state dicts: the same keys, every array close (those whose name ends in `exact`: equal)."""
    sa, sb = adapters.adapter_state_dict(ours.model), tst.adapter_state_dict(theirs.model)
    assert sorted(sa) == sorted(sb)
    for key in sa:
        if key.endswith(tuple(exact)):
            np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)
        else:
            assert_close(sa[key], sb[key], rtol, key, atol)


def set_factor(ours, theirs, name: str, rng, std: float = 0.3) -> None:
    """The same random values in `name` of every adapted layer on both engines."""
    for a, b in zip(ours.layers(), theirs.layers()):
        value = std * rng.standard_normal(getattr(a, name).shape)
        getattr(a, name).data[...] = value
        with torch.no_grad():
            getattr(b, name).copy_(torch.as_tensor(value))


def loss_and_grads(method, x, y, mask, key_pos=None, queries=None):
    """The editing loss of one batch (the edit's first iteration) and {layer.tensor: gradient} of every
    trainable tensor."""
    method.before_task(0, 1, method.optimizer)
    method.edit_key_pos, method.edit_queries = key_pos, queries
    try:
        loss = method.loss(x, y, mask)
    finally:
        method.edit_key_pos = method.edit_queries = None
    method.optimizer.zero_grad()
    loss.backward()
    grads = {f"{n}.{t}": numpy_of(getattr(layer, t).grad) for n, layer in zip(method.adapted, method.layers())
             for t in layer.trainable_names}
    return float(loss.item()), grads


def assert_loss_and_grads_match(ours, theirs, batch, **kw):
    kw_torch = kw.pop("torch_kw", kw)
    la, ga = loss_and_grads(ours, *batch, **kw)
    lb, gb = loss_and_grads(theirs, *batch, **kw_torch)
    assert_close(la, lb, FORWARD_RTOL, "loss")
    assert sorted(ga) == sorted(gb)
    assert all(g is not None for g in (*ga.values(), *gb.values())), "a trainable tensor got no gradient"
    # a gradient that is 0 in exact arithmetic (a router behind a single renormalised gate) is rounding noise
    # of the size of the other gradients' terms: the floor is relative to the largest gradient entry
    floor = GRAD_RTOL * max(float(np.abs(g).max()) for g in gb.values())
    for key in ga:
        assert_close(ga[key], gb[key], GRAD_RTOL, f"d loss / d {key}", floor)


# ---- ELDER -----------------------------------------------------------------------------------------------

@st.composite
def elder_cases(draw, paper: bool):
    n_head = draw(st.integers(1, 2))
    config = GPTConfig(vocab_size=draw(st.integers(5, 12)), block_size=6, n_layer=draw(st.integers(2, 3)),
                       n_head=n_head, n_embd=n_head * draw(st.integers(3, 4)),
                       dtype="float64")
    E = draw(st.integers(1, 4))
    targets = draw(st.sampled_from([None, ["mlp.c_fc"], ["attn.c_proj", "mlp.c_fc"]]))
    first = "transformer.h.0.attn.c_attn" if targets != ["attn.c_proj", "mlp.c_fc"] else None
    over = dict(ELDER_PAPER if paper else {}, n_experts=E, top_k=draw(st.integers(1, E)), r=draw(st.integers(1, 2)),
                lora_alpha=draw(st.sampled_from([1, 4])), target_modules=targets,
                routing_layer=draw(st.sampled_from([None, first])), gate_bias=draw(st.booleans()),
                renormalize_gates=draw(st.booleans()), guide_coef=draw(st.sampled_from([0.0, 1.0])),
                preset=draw(st.sampled_from(["init", "hashed"])), routing=draw(st.sampled_from(["soft", "hard"])),
                n_iter=draw(st.integers(1, 3)), theta=draw(st.sampled_from([None, 3.0])),
                deferral=draw(st.sampled_from([True, True, False])))
    if paper:
        over["key_pos"] = draw(st.sampled_from(["last_prompt", "last"]))
    else:
        over.update(key_pos=draw(st.sampled_from(["subject_alone", "subject_last"])),
                    query_norm=draw(st.sampled_from(["centred", "scaled"])))
    return config, over, draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(seeds)


def elder_keys(method, x, mask, subject_len):
    """edit()'s / route()'s keyword arguments: the paper's key from the tokens, or the subject's (the first
    subject_len[b] tokens of each row) with its alone-read queries for "subject_alone"."""
    cfg = method.config
    if cfg.key_pos in ("last_prompt", "last"):
        return dict(key_pos=key_positions(x, mask, cfg.key_pos))
    kw = dict(key_pos=np.asarray(subject_len) - 1)
    if cfg.key_pos == "subject_alone":
        kw["queries"] = method.subject_queries([row[:n] for row, n in zip(np.asarray(x), subject_len)])
    return kw


def check_elder(case):
    config, over, n_edits, B, seed = case
    rng = np.random.default_rng(seed)
    ours, theirs = pair(adapters.Elder, Elder, config, seed, seed % 997, **over)
    assert_arrays_close(ours, theirs, 0.0, exact=("",))  # A and the routers: the same draws of the same streams
    set_factor(ours, theirs, "lora_B", rng)  # B ≠ 0: routing and the guided loss reach every tensor from step 1
    if over.get("query_norm") == "centred":
        text = rng.integers(1, config.vocab_size, (4, config.block_size))
        assert_close(ours.fit_query_mean(text), theirs.fit_query_mean(text), FORWARD_RTOL, "μ")
    edits = [edit_batch(rng, config, B=B) for _ in range(n_edits)]
    subject_len = [rng.integers(1, 4, B) for _ in range(n_edits)]  # subjects open the prompts (3 prompt tokens)
    kws = [(elder_keys(ours, x, m, n), elder_keys(theirs, x, m, n)) for (x, _, m), n in zip(edits, subject_len)]
    for ka, kb in kws:
        if "queries" in ka:
            assert_close(ka["queries"], kb["queries"], FORWARD_RTOL, "subject queries")
    assert_loss_and_grads_match(ours, theirs, edits[0], **kws[0][0], torch_kw=kws[0][1])
    distinct = 0  # one code per distinct query of an edit: rows whose keys coincide share it
    for (x, y, m), (ka, kb) in zip(edits, kws):
        assert_close(ours.edit(x, y, m, **ka), theirs.edit(x, y, m, **kb), STEP_RTOL, "edit losses")
        distinct += len(np.unique(ours.routing.q, axis=0))  # the queries of the edit's last forward
    assert_arrays_close(ours, theirs, STEP_RTOL, ADAM_NOISE, exact=("edit_codes",))
    # (a routing layer's input can hold only the key token: e.g. subjects [3, 2, 4] and [4, 4, 4] read at
    # their last token before layer 0's c_attn give one query, so fewer than n_edits·B codes)
    assert ours.n_edits == theirs.n_edits == distinct and n_edits <= distinct <= n_edits * B
    np.testing.assert_array_equal(ours.last_presets, theirs.last_presets)
    # evaluation: the last edit's prompts (routed) beside unrelated ones (deferred, mostly)
    probe = np.concatenate([edits[-1][0], rng.integers(1, config.vocab_size, (2, 5))])
    probe_mask = np.concatenate([edits[-1][2], np.tile(edits[-1][2][:1], (2, 1))])
    probe_len = np.concatenate([subject_len[-1], rng.integers(1, 4, 2)])
    out_a = ours.route(probe, **elder_keys(ours, probe, probe_mask, probe_len))
    out_b = theirs.route(probe, **elder_keys(theirs, probe, probe_mask, probe_len))
    np.testing.assert_array_equal(out_a["z"], out_b["z"])
    np.testing.assert_array_equal(out_a["min_hamming"], out_b["min_hamming"])
    assert out_b["z"][:B].all()  # an edit is routed right after it
    assert_close(out_a["logits"], out_b["logits"], STEP_RTOL, "logits", ADAM_NOISE)
    with torch.no_grad():
        base = twin(random_gpt(config, seed))(probe)[0].numpy()
    for b in np.flatnonzero(~out_b["z"]):
        np.testing.assert_array_equal(out_b["logits"][b], base[b])  # a deferred row is the base, bit for bit


@given(case=elder_cases(paper=True))
def test_elder_paper_setting_matches_numpy(case):
    check_elder(case)


@given(case=elder_cases(paper=False))
def test_elder_default_setting_matches_numpy(case):
    check_elder(case)


# ---- FT-LoRA ----------------------------------------------------------------------------------------------

@settings(max_examples=6)
@given(seed=seeds, schedule=st.sampled_from(["constant", "step"]), dropout=st.sampled_from([0.0, 0.3]),
       r=st.integers(1, 3))
def test_ft_lora_matches_numpy(seed, schedule, dropout, r):
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype="float64")
    over = dict(r=r, lora_alpha=2 * r, n_iter=22, lr_schedule=schedule, lr=5e-3, lora_dropout=dropout,
                init_lora_weights=False)  # B ≠ 0 from the start; 22 steps cross the step schedule's halving
    ours, theirs = pair(adapters.FTLoRA, FTLoRA, config, seed, seed % 997, **over)
    assert_arrays_close(ours, theirs, 0.0, exact=("",))
    rng = np.random.default_rng(seed)
    edits = [edit_batch(rng, config, B=2) for _ in range(2)]
    assert_loss_and_grads_match(ours, theirs, edits[0])
    for x, y, m in edits:
        assert_close(ours.edit(x, y, m), theirs.edit(x, y, m), STEP_RTOL, "edit losses")
    assert_arrays_close(ours, theirs, STEP_RTOL, ADAM_NOISE)
    assert theirs.optimizer.step_count == ours.optimizer.step_count == 22  # Adam was reset at the edit


# ---- GRACE ------------------------------------------------------------------------------------------------

@st.composite
def grace_cases(draw):
    n_layer = draw(st.integers(2, 3))
    config = GPTConfig(vocab_size=draw(st.integers(5, 12)), block_size=6, n_layer=n_layer, n_head=2,
                       n_embd=2 * draw(st.integers(3, 4)), dtype="float64")
    over = dict(layer=draw(st.sampled_from([None, "transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn",
                                            "transformer.h.0.mlp.c_proj"])),
                epsilon=draw(st.sampled_from([0.5, 2.0, 100.0])), n_iter=draw(st.integers(1, 3)),
                key_pos=draw(st.sampled_from(["last_prompt", "last", "subject_alone"])), max_edits=8)
    return config, over, draw(st.integers(1, 2)), draw(seeds)


@given(case=grace_cases())
def test_grace_matches_numpy(case):
    config, over, B, seed = case
    rng = np.random.default_rng(seed)
    ours, theirs = pair(adapters.Grace, Grace, config, seed, seed % 997, **over)
    first, other = edit_batch(rng, config, B=B), edit_batch(rng, config, B=B)
    conflict = (first[0], (first[1] + 1) % config.vocab_size, first[2])  # the same prompts, other targets
    edits = [first, other, first, conflict]  # a reuse (ε permitting) and a new key for another target

    def keys(method, x, mask):
        if method.config.key_pos != "subject_alone":
            return dict(key_pos=key_positions(x, mask, method.config.key_pos))
        return dict(key_pos=np.full(len(x), 1), queries=method.subject_queries([row[:2] for row in x]))

    assert_loss_and_grads_match(ours, theirs, first, **keys(ours, first[0], first[2]),
                                torch_kw=keys(theirs, first[0], first[2]))
    ours, theirs = pair(adapters.Grace, Grace, config, seed, seed % 997, **over)  # fresh codebooks for the stream
    for x, y, m in edits:
        assert_close(ours.edit(x, y, m, **keys(ours, x, m)), theirs.edit(x, y, m, **keys(theirs, x, m)), STEP_RTOL,
                     "edit losses")
        assert ours.n_keys == theirs.n_keys and ours.key_targets == theirs.key_targets
    assert_arrays_close(ours, theirs, STEP_RTOL, ADAM_NOISE, exact=("radii",))
    probe = np.concatenate([first[0], other[0], rng.integers(1, config.vocab_size, (2, 5))])
    mask = np.concatenate([first[2], other[2], first[2][:1], first[2][:1]])
    out_a, out_b = ours.route(probe, **keys(ours, probe, mask)), theirs.route(probe, **keys(theirs, probe, mask))
    for key in ("hit", "slot"):
        np.testing.assert_array_equal(out_a[key], out_b[key], err_msg=key)
    assert_close(out_a["distance"], out_b["distance"], FORWARD_RTOL, "distances")
    assert_close(out_a["logits"], out_b["logits"], STEP_RTOL, "logits", ADAM_NOISE)


# ---- checkpoints, the registry and the engine's hooks ----------------------------------------------------

def test_a_numpy_checkpoint_restored_on_torch_routes_the_same():
    """ELDER and GRACE edited on NumPy, their state_dict loaded into fresh torch methods: the same codes, keys
    and decisions (z, Hamming distances, hits, slots), the logits to float64 rounding."""
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype="float64")
    rng = np.random.default_rng(0)
    edits = [edit_batch(rng, config, B=2) for _ in range(2)]
    probe = np.concatenate([edits[0][0], rng.integers(1, config.vocab_size, (2, 5))])
    key = key_positions(probe, np.concatenate([edits[0][2]] * 2))
    for cls_numpy, cls_torch, over in ((adapters.Elder, Elder, dict(ELDER_PAPER, n_experts=3, n_iter=2)),
                                       (adapters.Grace, Grace, dict(n_iter=2, max_edits=8))):
        ours, theirs = pair(cls_numpy, cls_torch, config, 1, 0, **over)
        for x, y, m in edits:
            ours.edit(x, y, m)
        theirs.load_state_dict(*ours.state_dict())
        a, b = ours.route(probe, key), theirs.route(probe, key)
        for name in a:
            if name in ("logits", "distance"):
                assert_close(a[name], b[name], FORWARD_RTOL, name)
            else:
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert a.get("z", a.get("hit"))[:2].all()  # the edited prompts are routed



def test_editing_methods_are_registered_and_use_torch_adam():
    for name, cls in (("elder", Elder), ("ft_lora", FTLoRA), ("grace", Grace)):
        assert tst.METHODS[name] is cls
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype="float64")
    method = tst.make_method("elder", **ELDER_PAPER)
    method.attach(twin(random_gpt(config, 0)), 0)
    assert isinstance(method.optimizer, torch.optim.Adam) and method.optimizer.defaults["foreach"] is False
    assert [g.get("lr_scale", 1.0) for g in method.optimizer.param_groups] == [1.0]  # the paper's single Adam
    frozen = tst.make_method("elder", n_experts=3)  # the default: frozen routers, in their own group
    frozen.attach(twin(random_gpt(config, 0)), 0)
    assert [g.get("lr_scale", 1.0) for g in frozen.optimizer.param_groups] == [1.0, 0.0]
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        tst.merge(method.model)
