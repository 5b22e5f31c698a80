"""MoLE, NLA and the sum on the torch engine (tinyslim/torch/mole.py, merging.py) against the NumPy methods
(tinyslim/adapters/mole.py, merging.py): the NumPy GPT and its transformers twin (``from_gpt``), the same
source LoRAs (trained on either engine), the same seed, float64.

* MoLE on hypothesis-drawn tiny GPTs, source LoRAs of mixed ranks and scales and every variant (per-token
  / per-block gates, token / sequence / prefix pooling, inference masks, padding, τ, the balance term):
  the loss, the logits, the gradient of every trainable tensor (each gate e and ρ), and four Adam steps
  (tinyslim.optim.Adam against torch.optim.Adam): the loss of every step and the gates after it
* NLA and the sum: logits, ΔW, merged equals unmerged on both engines, nothing trains
* the hooks: the prefix pool's gate at training equals the gate of greedy decoding (the sequence pool's
  does not), masking one LoRA in is that LoRA alone, gate_means, the per-block gate owners, the
  checkpoint across engines, sources from torch LoRA methods equal to the NumPy ones

Tolerances follow from float64: a forward agrees to 1e-12 of its largest entry; a gradient to 1e-9 of its
largest entry plus GRAD_ATOL (rounding noise of unit-scale terms, for a tensor whose exact gradient is tiny
or 0); a parameter after Adam steps to 1e-9 of its scale plus what the measured gradient differences Δg
allow: Adam's update m̂/(√v̂ + eps) moves by at most 2·Σ_s |Δg_s| / eps, entry by entry (for these few
steps its derivative in each g_s is below 1.5/eps), which matters where a gradient is rounding noise, e.g.
a gate that a one-LoRA mask makes constant, and Adam divides it by eps = 1e-8.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_adapters_base import random_batch, random_gpt  # noqa: E402
from tinyslim import adapters  # noqa: E402
from tinyslim import torch as tst  # noqa: E402
from tinyslim.nn import GPTConfig  # noqa: E402
from tinyslim.optim import Adam  # noqa: E402
from tinyslim.torch.merging import NLA, LoraSum  # noqa: E402
from tinyslim.torch.mole import Mole  # noqa: E402

seeds = st.integers(0, 2**32 - 1)
F64 = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype="float64")
FORWARD_RTOL = 1e-12  # of the tensor's largest entry
GRAD_RTOL, GRAD_ATOL = 1e-9, 1e-13
LR, EPS, STEPS = 1e-2, 1e-8, 4


@pytest.fixture(autouse=True)
def _numpy_kernel(monkeypatch):  # the NumPy engine's reference kernel (the compiled ones are tested elsewhere)
    monkeypatch.setenv("TINYSLIM_BACKEND", "numpy")


def source_loras(config, targets, ranks, seed, engine="numpy"):
    """Plain-LoRA methods with random (non-zero) factors, one per rank, on the NumPy or the torch engine
    (the same streams, so the same factors)."""
    methods = []
    for i, r in enumerate(ranks):
        kw = dict(r=r, lora_alpha=2 * r + i, target_modules=targets, init_lora_weights=False)
        if engine == "numpy":
            m, model = adapters.make_method("lora", **kw), random_gpt(config, 0)
        else:
            m, model = tst.make_method("lora", **kw), tst.from_gpt(random_gpt(config, 0))
        m.attach(model, seed=(seed + i) % 1000)
        methods.append(m)
    return methods


def both(cls_numpy, cls_torch, config, sources, model_seed, seed, **over):
    """The NumPy method on a random GPT and the torch method on its twin, built from the same sources."""
    states, scales = adapters.sources_from_methods(sources)
    gpt = random_gpt(config, model_seed)
    lm = tst.from_gpt(gpt)
    ours = cls_numpy(lora_sources=states, lora_scales=scales, **over)
    ours.attach(gpt, seed)
    theirs = cls_torch(lora_sources=states, lora_scales=scales, **over)
    theirs.attach(lm, seed)
    return ours, theirs


def numpy_of(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(getattr(t, "data", t))


def max_diff(a, b) -> float:
    return float(np.abs(numpy_of(a) - numpy_of(b)).max())


def assert_close(ours, ref, what: str, rtol: float, atol=0.0) -> float:
    """|ours − ref| ≤ rtol · max |ref| + atol entry by entry (atol a number or an array); returns max |ours − ref|."""
    ours, ref = numpy_of(ours), numpy_of(ref)
    assert ours.shape == ref.shape, f"{what}: shapes {ours.shape} vs {ref.shape}"
    diff, scale = np.abs(ours - ref), float(np.abs(ref).max(initial=0.0))
    bound = rtol * scale + np.asarray(atol)
    worst = np.unravel_index(np.argmax(diff - bound), diff.shape) if diff.ndim else ()
    assert np.all(diff <= bound), (f"{what}: |numpy − torch| = {diff[worst]:.3e} at {worst} > {rtol:g} · {scale:.3e} "
                                   f"+ {np.broadcast_to(atol, diff.shape)[worst]:.3e}")
    return float(diff.max(initial=0.0))


def trainables(method) -> dict:
    """{"<module>.<name>": tensor} of every trainable adapter tensor, by the layers' trainable_names."""
    return {f"{n}.{k}": getattr(layer, k) for n, layer in zip(method.adapted, method.layers())
            for k in layer.trainable_names}


# ---- MoLE: loss, every gradient, Adam steps ---------------------------------------------------------

@st.composite
def mole_cases(draw):
    n_head = draw(st.integers(1, 2))
    config = GPTConfig(vocab_size=draw(st.integers(5, 12)), block_size=6, n_layer=draw(st.integers(1, 2)),
                       n_head=n_head, n_embd=n_head * draw(st.integers(3, 4)),  # bias=True: GPT-2 has biases
                       dtype="float64")
    E = draw(st.integers(1, 3))
    ranks = [draw(st.integers(1, 3)) for _ in range(E)]
    targets = draw(st.sampled_from([["attn.c_attn", "mlp.c_fc"], ["mlp.c_fc", "mlp.c_proj"], "all-linear"]))
    mask = draw(st.one_of(st.none(), st.sets(st.integers(0, E - 1), min_size=1).map(sorted)))
    over = dict(gate_granularity=draw(st.sampled_from(["token", "layer"])),
                gate_pool=draw(st.sampled_from(["token", "sequence", "prefix"])), mask=mask,
                gate_init_std=draw(st.sampled_from([0.01, 1.0])), tau_init=draw(st.sampled_from([1.0, 0.3])),
                balance_coef=draw(st.sampled_from([0.0, 0.5])), pad_token_id=draw(st.sampled_from([None, 0])))
    engine = draw(st.sampled_from(["numpy", "torch"]))  # where the source LoRAs were trained
    return config, ranks, targets, over, engine, draw(st.integers(1, 3)), draw(st.integers(2, 5)), draw(seeds)


@given(case=mole_cases())
def test_mole_loss_every_gate_gradient_and_adam_steps_match_numpy(case):
    config, ranks, targets, over, engine, B, T, seed = case
    sources = source_loras(config, targets, ranks, seed, engine)
    ours, theirs = both(adapters.Mole, Mole, config, sources, seed, seed % 997, **over)
    rng = np.random.default_rng(seed)
    batches = [random_batch(rng, config, B, T) for _ in range(STEPS)]

    # the forward in evaluation (no gradients) and the training loss
    x = batches[0][0]
    with ours.evaluating() as gpt, theirs.evaluating() as lm:
        assert_close(lm(x)[0], gpt(x)[0].data, "eval logits", FORWARD_RTOL)

    ps_ours, ps_theirs = trainables(ours), trainables(theirs)
    assert sorted(ps_ours) == sorted(ps_theirs) and ps_ours  # the same gates, by name (e, ρ of every owner)
    assert {id(p) for p in theirs.trainable_parameters()} == {id(p) for p in ps_theirs.values()}
    opt_ours = Adam(ours.trainable_parameters(), lr=LR, eps=EPS)
    opt_theirs = torch.optim.Adam(theirs.trainable_parameters(), lr=LR, betas=(0.9, 0.999), eps=EPS)
    dg = {name: 0.0 for name in ps_ours}  # Σ_s |Δg_s| per entry
    slack = {name: 0.0 for name in ps_ours}  # what Adam's update may move by, from dg
    for step, (x, y, mask) in enumerate(batches):
        loss_ours, loss_theirs = ours.loss(x, y, mask), theirs.loss(x, y, mask)
        assert_close(loss_theirs, loss_ours.data, f"step {step}: loss", FORWARD_RTOL if step == 0 else GRAD_RTOL)
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
        loss_ours.backward()
        loss_theirs.backward()
        for name, p in ps_ours.items():  # every trainable gradient
            assert ps_theirs[name].grad is not None, f"{name}: no gradient on torch"
            assert_close(ps_theirs[name].grad, p.grad, f"step {step}: {name}.grad", GRAD_RTOL, GRAD_ATOL)
            dg[name] = dg[name] + np.abs(numpy_of(ps_theirs[name].grad) - p.grad)
            slack[name] = slack[name] + 2 * LR * dg[name] / EPS
        for layer in theirs.layers():  # the sources stay frozen
            assert layer.lora_A.grad is None and layer.lora_B.grad is None
        opt_ours.step()
        opt_theirs.step()
        for name, p in ps_ours.items():
            assert_close(ps_theirs[name], p.data, f"after step {step}: {name}", GRAD_RTOL, slack[name])
    arrays = ours.state_dict()[0]
    for key, value in theirs.state_dict()[0].items():  # the checkpoint: the frozen sources are unchanged
        if key.endswith(("lora_A", "lora_B")):
            np.testing.assert_array_equal(value, arrays[key])


# ---- NLA and the sum --------------------------------------------------------------------------------

@settings(max_examples=6)
@given(seed=seeds, combine=st.sampled_from(["mean", "sum"]), engine=st.sampled_from(["numpy", "torch"]))
def test_nla_and_sum_match_numpy_and_merge(seed, combine, engine):
    sources = source_loras(F64, ["attn.c_attn", "mlp.c_proj"], [1, 3, 2], seed, engine)
    pair = (adapters.NLA, NLA) if combine == "mean" else (adapters.LoraSum, LoraSum)
    ours, theirs = both(*pair, F64, sources, seed, 0)
    assert theirs.config.combine == combine and theirs.trainable_parameters() == []
    x, y, mask = random_batch(np.random.default_rng(seed), F64, 2, 5)
    loss = theirs.loss(x, y, mask)  # train mode: the same forward
    assert not loss.requires_grad  # nothing trains
    assert_close(loss, ours.loss(x, y, mask).data, "loss", FORWARD_RTOL)
    for (name, a), b in zip(zip(ours.adapted, ours.layers()), theirs.layers()):
        assert_close(b.delta_weight(), a.delta_weight(), f"{name}: ΔW", FORWARD_RTOL)
    with ours.evaluating() as gpt, theirs.evaluating() as lm:
        ref = gpt(x)[0].data
        logits = lm(x)[0]
        assert_close(logits, ref, "logits", FORWARD_RTOL)
        tst.merge(lm)
        assert_close(lm(x)[0], ref, "merged logits", 1e-10)  # W0 + ΔW rounds once more than W0 x + ΔW x
        tst.unmerge(lm)
        assert_close(lm(x)[0], logits, "unmerged logits", 1e-10)
    assert theirs.describe()["trainable_parameters"] == 0 == ours.describe()["trainable_parameters"]


# ---- MoLE's hooks -----------------------------------------------------------------------------------

@settings(max_examples=6)
@given(seed=seeds, granularity=st.sampled_from(["token", "layer"]))
def test_prefix_gate_at_training_is_the_gate_of_greedy_decoding(seed, granularity):
    """gate_pool="prefix": the gate of token t in a teacher-forced training line equals the gate of the last
    token when tokens 0..t are fed to greedy generation, on torch, and both equal the NumPy gates. The
    "sequence" pool's gates change as the line grows (the leak the prefix pool removes)."""
    sources = source_loras(F64, ["attn.c_attn", "mlp.c_fc"], [2, 2, 2], seed)
    x, y, mask = random_batch(np.random.default_rng(seed), F64, 2, 6)
    x = np.where(x == 0, 1, x)  # no padding: generation sees every token
    worst = {}
    for pool in ("prefix", "sequence"):
        ours, theirs = both(adapters.Mole, Mole, F64, sources, 7, 3, gate_pool=pool, gate_init_std=1.0,
                            gate_granularity=granularity, pad_token_id=0)
        ours.loss(x, y, mask)
        theirs.loss(x, y, mask).backward()  # training mode, gradients on
        trained = [layer.gate_array().reshape(2, 6, -1) for layer in theirs.gate_layers()]
        for a, b in zip(ours.gate_layers(), theirs.gate_layers()):
            assert_close(b.gate_array(), a.gate_array(), f"{pool}: training gates", FORWARD_RTOL)
        worst[pool] = 0.0
        with theirs.evaluating() as lm:
            for t in range(1, 7):
                lm.generate(x[:, :t], 1)  # one greedy step: its forward reads tokens 0..t-1
                for layer, g in zip(theirs.gate_layers(), trained):
                    decoded = layer.gate_array().reshape(2, t, -1)[:, -1]
                    worst[pool] = max(worst[pool], max_diff(decoded, g[:, t - 1]))
    assert worst["prefix"] < 1e-12
    assert worst["sequence"] > 1e-3


@settings(max_examples=6)
@given(seed=seeds, j=st.integers(0, 2), granularity=st.sampled_from(["token", "layer"]))
def test_masking_all_but_one_lora_is_that_lora_alone_on_both_engines(seed, j, granularity):
    targets = ["attn.c_attn", "mlp.c_fc"]
    sources = source_loras(F64, targets, [2, 1, 2], seed, engine="torch")
    ours, theirs = both(adapters.Mole, Mole, F64, sources, 7, 0, gate_init_std=1.0, gate_granularity=granularity)
    lora = tst.make_method("lora", r=sources[j].config.r, lora_alpha=sources[j].config.lora_alpha,
                           target_modules=targets)
    lora.attach(tst.from_gpt(random_gpt(F64, 7)), 0)
    tst.load_adapter_state_dict(lora.model, tst.adapter_state_dict(sources[j].model))
    x = np.random.default_rng(seed).integers(0, 11, (3, 6))
    with ours.masked([j]), theirs.masked([j]) as lm, ours.evaluating() as gpt, theirs.evaluating():
        masked = lm(x)[0]
        for layer in theirs.gate_layers():
            G = numpy_of(layer.masked(layer.current_gate))
            np.testing.assert_array_equal(G[:, j], 1.0)  # exactly 1.0
            np.testing.assert_array_equal(np.delete(G, j, axis=1), 0.0)
        assert_close(masked, gpt(x)[0].data, "masked logits", FORWARD_RTOL)
    with lora.evaluating() as alone:
        assert_close(masked, alone(x)[0], f"MoLE masked to LoRA {j} vs LoRA {j}", FORWARD_RTOL)
    assert all(layer.keep is None for layer in theirs.layers())  # the context restored "no mask"
    with theirs.evaluating() as lm:
        assert max_diff(lm(x)[0], masked) > 1e-6  # and the other LoRAs are back
    masked_cfg = Mole(lora_sources=theirs.config.lora_sources, lora_scales=theirs.config.lora_scales,
                      mask=[j], gate_init_std=1.0, gate_granularity=granularity)
    masked_cfg.attach(tst.from_gpt(random_gpt(F64, 7)), 0)  # MoleConfig.mask: the same subset from the start
    with masked_cfg.evaluating() as lm:
        assert_close(lm(x)[0], masked, "config mask", FORWARD_RTOL)


def test_hooks_gate_means_owners_describe_and_checkpoint_across_engines():
    sources = source_loras(F64, "all-linear", [1, 2], 0)
    ours, theirs = both(adapters.Mole, Mole, F64, sources, 7, 0, gate_granularity="layer", gate_init_std=0.5)
    owners = [n for n, layer in zip(theirs.adapted, theirs.layers()) if layer.owns_gate]
    assert owners == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert sorted(trainables(theirs)) == sorted(f"{o}.{k}" for o in owners for k in ("gate_e", "log_tau"))
    assert theirs.learners() == ours.learners() == ["default"]
    d_ours, d_theirs = ours.describe(), theirs.describe()
    assert d_theirs == d_ours and d_theirs["trainable_parameters"] == 2 * (2 * 24 * 2 + 1)
    x = np.random.default_rng(0).integers(0, 11, (2, 5))
    means = theirs.gate_means(x)
    assert sorted(means) == owners
    for name, m in ours.gate_means(x).items():
        assert isinstance(means[name], np.ndarray)
        assert_close(means[name], m, f"gate_means {name}", FORWARD_RTOL)
    # a checkpoint of either engine loads into the other (the same keys, NumPy arrays)
    arrays, meta = ours.state_dict()
    assert sorted(arrays) == sorted(theirs.state_dict()[0])
    rng = np.random.default_rng(1)
    moved = {k: v + 0.1 * rng.standard_normal(v.shape) if k.endswith(("gate_e", "log_tau")) else v
             for k, v in arrays.items()}
    ours.load_state_dict(moved, meta)
    theirs.load_state_dict(moved, {**meta})
    with ours.evaluating() as gpt, theirs.evaluating() as lm:
        assert_close(lm(x)[0], gpt(x)[0].data, "logits after loading one checkpoint", FORWARD_RTOL)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        tst.merge(theirs.model)


@settings(max_examples=4)
@given(seed=seeds)
def test_sources_from_torch_lora_methods_equal_the_numpy_ones(seed):
    targets = ["attn.c_attn", "mlp.c_proj"]
    ranks = [1, 3]
    numpy_states, numpy_scales = adapters.sources_from_methods(source_loras(F64, targets, ranks, seed))
    torch_states, torch_scales = adapters.sources_from_methods(source_loras(F64, targets, ranks, seed, "torch"))
    assert torch_scales == numpy_scales
    for a, b in zip(numpy_states, torch_states):
        assert sorted(a) == sorted(b)
        for k in a:
            assert isinstance(b[k], np.ndarray)
            np.testing.assert_array_equal(b[k], a[k])  # the same streams, the same draws
    from_methods = Mole.from_methods(source_loras(F64, targets, ranks, seed, "torch"))
    assert from_methods.config.sources.E == 2 and from_methods.config.lora_scales == numpy_scales
