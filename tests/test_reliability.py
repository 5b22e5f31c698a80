"""Reliability: nothing a user does crashes tinyslim or loses their work.

* atomic writes: a write that fails part-way leaves the previous file (or directory) as it was, and no
  temporary file behind, for every writer (model, adapter + optimizer, run state, JSON, HF, PEFT);
* damaged files: truncated, cut or bit-flipped files give a CheckpointError naming the file, for every
  reader; a config mismatch names the differing fields;
* round trips: save → load is bit-exact (adapters and optimizer state of every method, every dtype);
* resume: an interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one;
* determinism: same seed, backend and thread count → bit-identical, in one process and across processes;
* the bad-input suite: one table of wrong shapes, dtypes, non-finite values, empty data and unknown
  names, each with the error it must raise (or, for NaN arithmetic, the behaviour it must have).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_adapters_base import random_batch, run_tasks
from tinyslim import functional as F
from tinyslim import kernels
from tinyslim.adapters import METHODS, LoraConfig, adapter_state_dict, inject, make_method, merge
from tinyslim.autograd import Tensor
from tinyslim.data import CharTokenizer, PretrainData, split_documents
from tinyslim.hf import load_hf_gpt2, load_peft_adapter, save_hf_gpt2, save_peft_adapter
from tinyslim.io import (CheckpointError, atomic_write_json, load_adapter, load_checkpoint, load_model, read_json,
                         read_safetensors, save_adapter, save_checkpoint, save_model)
from tinyslim.lowrank import mixture_lowrank
from tinyslim.nn import GPT, GPTConfig, Linear
from tinyslim.optim import SGD, Adam, AdamW
from tinyslim.testing import randomize_parameters
from tinyslim.train import PretrainConfig, evaluate_loss, next_char_accuracy, pretrain

ROOT = Path(__file__).resolve().parent.parent
CFG = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
TARGETS = ["attn.c_attn", "mlp.c_fc"]


def random_model(seed: int = 1, config: GPTConfig = CFG) -> GPT:
    return randomize_parameters(GPT(config, seed=seed), seed)


def attached(name: str, seed: int = 1, **overrides):
    method = make_method(name, target_modules=TARGETS, **overrides)
    method.attach(random_model(seed), seed=seed)
    return method


def batches(seed: int, tasks: int = 2, steps: int = 3):
    rng = np.random.default_rng(seed)
    return [[random_batch(rng, CFG, 3, 6) for _ in range(steps)] for _ in range(tasks)]


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---- atomic writes -------------------------------------------------------------------------------------

def _adapter_writer(path):
    method = attached("lora")

    def write(version):
        method.model.transformer.h[0].attn.c_attn.lora_B.data[...] = version
        opt = Adam(method.trainable_parameters())
        save_adapter(method.model, path, optimizer=opt, extra={"version": version})
    return write


WRITERS = {  # name → (what to write into, a function writing version v there)
    "save_model": ("m.safetensors", lambda path: lambda v: save_model(random_model(v), path)),
    "save_checkpoint": ("state.safetensors",
                        lambda path: lambda v: save_checkpoint(path, {"step": np.int64(v)}, {"kind": "run", "v": v})),
    "save_adapter": ("a.safetensors", _adapter_writer),
    "atomic_write_json": ("run.json", lambda path: lambda v: atomic_write_json(path, {"version": v})),
    "save_hf_gpt2": ("hf", lambda path: lambda v: save_hf_gpt2(random_model(v), path)),
    "save_peft_adapter": ("peft", lambda path: lambda v: save_peft_adapter(
        attached("lora", seed=v, init_lora_weights=False).model, path)),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch, writer):
    name, make = WRITERS[writer]
    write = make(tmp_path / name)
    write(1)
    before = snapshot(tmp_path) if not (tmp_path / name).is_dir() else snapshot(tmp_path / name)

    def broken_fsync(fd):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write(2)
    after = snapshot(tmp_path) if not (tmp_path / name).is_dir() else snapshot(tmp_path / name)
    assert after == before


def test_an_interrupted_rename_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_model(random_model(1), path)
    before = path.read_bytes()

    def interrupted(src, dst):
        raise KeyboardInterrupt  # Ctrl-C between the write and the rename
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(random_model(2), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ---- damaged files --------------------------------------------------------------------------------------

def _flip_last_byte(path: Path):
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def _cut(path: Path, keep: float):
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])


def _reader_cases(tmp_path):
    """(file to damage, function that reads it) for every reader."""
    model_path = tmp_path / "m.safetensors"
    save_model(random_model(), model_path)
    method = attached("lora")
    adapter_path = tmp_path / "a.safetensors"
    save_adapter(method.model, adapter_path)
    json_path = tmp_path / "run.json"
    atomic_write_json(json_path, {"step": 3, "history": [1.0, 2.0]})
    hf_dir = save_hf_gpt2(random_model(), tmp_path / "hf")
    peft_dir = save_peft_adapter(attached("lora", init_lora_weights=False).model, tmp_path / "peft")
    return {
        "load_model": (model_path, lambda: load_model(model_path)),
        "load_checkpoint": (model_path, lambda: load_checkpoint(model_path)),
        "load_adapter": (adapter_path, lambda: load_adapter(attached("lora", seed=2).model, adapter_path)),
        "read_json": (json_path, lambda: read_json(json_path)),
        "load_hf_gpt2 (weights)": (hf_dir / "model.safetensors", lambda: load_hf_gpt2(hf_dir)),
        "load_hf_gpt2 (config)": (hf_dir / "config.json", lambda: load_hf_gpt2(hf_dir)),
        "load_peft_adapter (weights)": (peft_dir / "adapter_model.safetensors",
                                        lambda: load_peft_adapter(random_model(), peft_dir)),
        "load_peft_adapter (config)": (peft_dir / "adapter_config.json",
                                       lambda: load_peft_adapter(random_model(), peft_dir)),
    }


READERS = ["load_model", "load_checkpoint", "load_adapter", "read_json", "load_hf_gpt2 (weights)",
           "load_hf_gpt2 (config)", "load_peft_adapter (weights)", "load_peft_adapter (config)"]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("damage", ["empty", "cut to 5 bytes", "cut in half", "last byte missing"])
def test_a_truncated_file_is_an_error_naming_it(tmp_path, reader, damage):
    path, read = _reader_cases(tmp_path)[reader]
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "cut to 5 bytes": raw[:5], "cut in half": raw[:len(raw) // 2],
                      "last byte missing": raw.rstrip(b"\n")[:-1]}[damage])  # (a JSON file's newline is not content)
    with pytest.raises(CheckpointError, match="truncated or corrupted") as err:
        read()
    assert str(path) in str(err.value)


@pytest.mark.parametrize("reader", ["load_model", "load_checkpoint", "load_adapter", "load_hf_gpt2 (weights)",
                                    "load_peft_adapter (weights)"])
def test_a_flipped_bit_in_a_file_tinyslim_wrote_is_caught_by_its_checksum(tmp_path, reader):
    path, read = _reader_cases(tmp_path)[reader]
    _flip_last_byte(path)  # inside the last tensor: the header is intact, the weights are not
    with pytest.raises(CheckpointError, match="SHA-256") as err:
        read()
    assert str(path) in str(err.value)


def test_checkpoints_written_before_the_checksum_still_load(tmp_path):
    """Files from before the checksum (the shipped base model was one) load as before, unverified."""
    from safetensors.numpy import save_file
    model = random_model()
    meta = json.dumps({"kind": "gpt", "config": CFG.to_dict()})
    save_file(model.state_dict(), str(tmp_path / "old.safetensors"), metadata={"tinyslim": meta})
    assert "tinyslim.sha256" not in read_safetensors(tmp_path / "old.safetensors")[1]
    loaded, _ = load_model(tmp_path / "old.safetensors")
    assert all(np.array_equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_mismatched_configs_name_the_differing_fields(tmp_path):
    method = attached("lora")
    save_adapter(method.model, tmp_path / "a.safetensors")
    other = make_method("lora", target_modules=TARGETS)
    other.attach(randomize_parameters(GPT(GPTConfig(**{**CFG.to_dict(), "n_embd": 12, "n_head": 3})), 0), seed=0)
    with pytest.raises(CheckpointError, match="n_head: checkpoint 2 vs model 3, n_embd: checkpoint 8 vs model 12"):
        load_adapter(other.model, tmp_path / "a.safetensors")
    fewer = make_method("lora", target_modules=["attn.c_attn"])
    fewer.attach(random_model(), seed=0)
    with pytest.raises(CheckpointError, match="transformer.h.0.mlp.c_fc: checkpoint LoraLinear vs model None"):
        load_adapter(fewer.model, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_adapter(method.model, tmp_path / "a.safetensors", optimizer=Adam(method.trainable_parameters()))
    with pytest.raises(CheckpointError, match="holds a 'adapter', not a GPT"):
        load_model(tmp_path / "a.safetensors")
    path = tmp_path / "state.safetensors"
    _pretrain(3, out=path)
    with pytest.raises(ValueError, match=r"another PretrainConfig \(lr: checkpoint 0.01 vs now 0.02"):
        _pretrain(6, out=path, lr=2e-2)
    with pytest.raises(ValueError, match="another model config.*n_layer"):
        pretrain(GPTConfig(**{**PRETRAIN_MODEL.to_dict(), "n_layer": 2}), _recipe(6), out=path, progress=False,
                 log=lambda *a: None)


# ---- bit-exact round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(METHODS))
def test_adapter_and_optimizer_state_round_trip_bit_exact(tmp_path, name):
    method = attached(name, seed=3)
    _, opt = run_tasks(method, batches(4), lr=1e-2)
    save_adapter(method.model, tmp_path / "a.safetensors", optimizer=opt, extra={"task": 1})

    fresh = attached(name, seed=9)  # another init and another base; then the base (COLA's knots included) alone
    adapter_keys = set(adapter_state_dict(method.model))
    fresh.model.load_state_dict({k: v for k, v in method.model.state_dict().items() if k not in adapter_keys},
                                strict=False)
    assert not np.array_equal(adapter_state_dict(fresh.model)["transformer.h.0.attn.c_attn.lora_A"],
                              adapter_state_dict(method.model)["transformer.h.0.attn.c_attn.lora_A"])
    opt2 = Adam(fresh.trainable_parameters())
    meta = load_adapter(fresh.model, tmp_path / "a.safetensors", optimizer=opt2)
    assert meta["task"] == 1 and meta["layers"]["transformer.h.1.mlp.c_fc"].endswith("Linear")
    for key, value in adapter_state_dict(method.model).items():
        assert np.array_equal(adapter_state_dict(fresh.model)[key], value), key
    ours, theirs = opt.state_dict(), opt2.state_dict()
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    x = np.arange(6)[None] % CFG.vocab_size
    for learner in method.learners():
        with method.evaluating(learner) as a, fresh.evaluating(learner) as b:
            assert np.array_equal(a(x)[0].data, b(x)[0].data), learner


def test_every_dtype_and_shape_round_trips_through_safetensors(tmp_path):
    arrays = {"f64": np.linspace(-1, 1, 6).reshape(2, 3), "f32": np.float32([np.pi, -0.0, 1e-30]),
              "f16": np.float16([1.5, -2.25]), "i64": np.int64([-(2 ** 62), 5]), "i32": np.int32([[7]]),
              "i8": np.int8([-3]), "u8": np.uint8([255]), "bool": np.array([True, False]),
              "scalar": np.asarray(2.5), "empty": np.zeros((0, 3), np.float32),
              "strided": np.arange(12.0).reshape(3, 4)[:, ::2]}
    save_checkpoint(tmp_path / "c.safetensors", arrays, {"kind": "test"})
    back, _ = load_checkpoint(tmp_path / "c.safetensors")
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert np.array_equal(back[key], value), key
        assert back[key].flags.writeable


# ---- resume ---------------------------------------------------------------------------------------------

PRETRAIN_MODEL = GPTConfig(vocab_size=CharTokenizer().vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)


def _recipe(steps, lr=1e-2):
    return PretrainConfig(steps=steps, batch_size=4, lr=lr, warmup_steps=2, eval_every=3, eval_batches=2,
                          n_entities=10, n_cities=4)


def _pretrain(steps, out=None, stop_at=None, lr=1e-2):
    return pretrain(PRETRAIN_MODEL, _recipe(steps, lr), out=out, progress=False, log=lambda *a: None,
                    stop_at=stop_at)


def test_pretraining_interrupted_while_writing_a_checkpoint_resumes_to_the_same_model(tmp_path, monkeypatch):
    straight, _ = _pretrain(9)
    path = tmp_path / "state.safetensors"
    real_replace, calls = os.replace, []

    def crash_on_second_checkpoint(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while writing the step-6 checkpoint
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        _pretrain(9, out=path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert load_checkpoint(path)[1]["step"] == 3 and [p.name for p in tmp_path.iterdir()] == [path.name]
    resumed, summary = _pretrain(9, out=path)
    assert [h["step"] for h in summary["history"]] == [3, 6, 9]
    for (key, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert np.array_equal(a, b), key


def test_a_damaged_pretraining_checkpoint_is_not_silently_restarted(tmp_path):
    path = tmp_path / "state.safetensors"
    _pretrain(6, out=path, stop_at=3)
    _cut(path, 0.5)
    with pytest.raises(CheckpointError, match=str(path.name)):
        _pretrain(6, out=path)


def test_adapter_training_resumed_from_save_adapter_equals_an_uninterrupted_run(tmp_path):
    """Seq-LoRA (no buffer, no counters, no dropout): the adapter and Adam's state are the whole run state."""
    data = batches(5, tasks=1, steps=6)
    straight = attached("lora", seed=2)
    run_tasks(straight, data, lr=1e-2)

    first = attached("lora", seed=2)
    opt = Adam(first.trainable_parameters(), lr=1e-2)
    first.before_task(0, 6, opt)
    for x, y, mask in data[0][:3]:
        loss = first.loss(x, y, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adapter(first.model, tmp_path / "a.safetensors", optimizer=opt)

    resumed = attached("lora", seed=2)
    opt = Adam(resumed.trainable_parameters(), lr=1e-2)
    resumed.task_id = 0  # inside task 0: no before_task (it would reset Adam's state)
    load_adapter(resumed.model, tmp_path / "a.safetensors", optimizer=opt)
    for x, y, mask in data[0][3:]:
        loss = resumed.loss(x, y, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for key, value in adapter_state_dict(straight.model).items():
        assert np.array_equal(adapter_state_dict(resumed.model)[key], value), key


# ---- determinism ----------------------------------------------------------------------------------------

def _fingerprint(method, losses) -> str:
    h = hashlib.sha256(np.asarray(losses, dtype=np.float64).tobytes())
    for key, value in sorted(adapter_state_dict(method.model).items()):
        h.update(key.encode() + value.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_same_seed_gives_bit_identical_training(name):
    fields = {f.name for f in dataclasses.fields(METHODS[name].config_class)}
    dropout = {"lora_dropout": 0.1} if "lora_dropout" in fields else {}  # dropout draws from its stream too
    prints = []
    for _ in range(2):
        method = attached(name, seed=4, **dropout)
        losses, _ = run_tasks(method, batches(6), lr=1e-2, rng=np.random.default_rng(0))
        prints.append(_fingerprint(method, losses))
    assert prints[0] == prints[1]


@pytest.mark.skipif(not kernels.available_backends()["cpu"][0], reason="the cpu kernel is not built")
def test_the_cpu_kernel_gives_the_same_bits_for_every_thread_count():
    """The C kernel splits work by rows and keeps every sum in one thread: 1 and 2 threads agree bit for bit.
    (NumPy's own matmuls go through OpenBLAS, whose results may change with OPENBLAS_NUM_THREADS.)"""
    rng = np.random.default_rng(0)
    N, D, O, r, E = 257, 48, 80, 8, 3
    x, dy = rng.standard_normal((N, D)).astype(np.float32), rng.standard_normal((N, O)).astype(np.float32)
    A, B = rng.standard_normal((E, r, D)).astype(np.float32), rng.standard_normal((E, O, r)).astype(np.float32)
    G = kernels.DenseGates(rng.random((N, E)).astype(np.float32))
    before = kernels.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            kernels.set_num_threads(threads)
            results.append((kernels.forward(x, A, B, G, 0.5, backend="cpu"),
                            *kernels.backward(dy, x, A, B, G, 0.5, backend="cpu")))
    finally:
        kernels.set_num_threads(before)
    for other in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], other))


_SCRIPT = """
import hashlib, sys
import numpy as np
sys.path[:0] = [{root!r}, {tests!r}]
from test_reliability import attached, batches, _fingerprint
from test_adapters_base import run_tasks
method = attached("ilora", seed=4, lora_dropout=0.1, buffer_size=4)
losses, _ = run_tasks(method, batches(6), lr=1e-2, rng=np.random.default_rng(0))
print(_fingerprint(method, losses))
"""


def test_separate_processes_with_other_hash_seeds_give_the_same_bits():
    """Nothing depends on Python's per-process string hashing (set / dict order of names)."""
    script = _SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"))
    outs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(out.stdout.strip())
    assert outs[0] == outs[1] and len(outs[0]) == 64


# ---- the bad-input suite --------------------------------------------------------------------------------

_model = GPT(CFG)
_ids = np.zeros((1, 4), dtype=np.int64)
_lin = Linear(4, 3)


def _call(fn, *args, **kwargs):
    return lambda: fn(*args, **kwargs)


def _inject(targets):
    return lambda: inject(GPT(CFG), LoraConfig(target_modules=targets))


def _step_with_nan_gradient(opt_class):
    def run():
        model = random_model()
        params = model.parameters()
        opt = opt_class(params, lr=1e-2)
        for p in params:
            p.grad = np.zeros_like(p.data)
        params[3].grad[0] = np.nan
        before = [p.data.copy() for p in params]
        try:
            opt.step()
        finally:
            assert all(np.array_equal(b, p.data) for b, p in zip(before, params)), "a parameter changed"
            assert opt.step_count == 0
    return run


def _kernel(backend, gates, x=None):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4)).astype(np.float32) if x is None else x
    A, B = rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal((2, 6, 3)).astype(np.float32)
    return lambda: mixture_lowrank(Tensor(x), Tensor(A), Tensor(B), gates, backend=backend)


def _pretrain_tiny_block():
    return PretrainData(block_size=10 ** 9)


BACKENDS = [b for b, (ok, _) in kernels.available_backends().items() if ok and b != "cuda"]

# (case, call, exception, message): the table the README's "bad inputs" note is made from
BAD_INPUTS = [
    ("token ids 3-D", _call(_model, np.zeros((2, 2, 2), np.int64)), ValueError, r"integer array \(B, T\)"),
    ("token ids float", _call(_model, np.zeros((1, 4))), ValueError, r"integer array \(B, T\), got float64"),
    ("token ids NaN", _call(_model, np.full((1, 4), np.nan)), ValueError, "integer array"),
    ("token ids bool", _call(_model, np.zeros((1, 4), bool)), ValueError, "integer array"),
    ("token id negative", _call(_model, np.full((1, 4), -1)), ValueError, r"must lie in \[0, vocab_size = 11\)"),
    ("token id >= vocab", _call(_model, np.full((1, 4), 11)), ValueError, r"got range \[11, 11\]"),
    ("sequence empty (T = 0)", _call(_model, np.zeros((1, 0), np.int64)), ValueError, "sequence length 0"),
    ("batch empty (B = 0)", _call(_model, np.zeros((0, 4), np.int64)), ValueError, "batch of 0 sequences"),
    ("sequence > block_size", _call(_model, np.zeros((1, 9), np.int64)), ValueError, "block_size = 8"),
    ("targets other shape", _call(_model, _ids, np.zeros((1, 5), np.int64)), ValueError, "shape of idx"),
    ("targets float", _call(_model, _ids, np.zeros((1, 4))), TypeError, "integer class ids"),
    ("target id >= vocab", _call(_model, _ids, np.full((1, 4), 11)), IndexError, r"target ids must lie in \[0, 11\)"),
    ("loss mask other shape", _call(_model, _ids, _ids, loss_mask=np.ones((1, 5))), ValueError, "mask has shape"),
    ("loss mask all zero", _call(_model, _ids, _ids, loss_mask=np.zeros((1, 4))), ValueError, "mean over no tokens"),
    ("loss mask NaN", _call(_model, _ids, _ids, loss_mask=np.full((1, 4), np.nan)), ValueError, "NaN or inf"),
    ("generate max_new_tokens < 0", _call(_model.generate, _ids, -1), ValueError, "max_new_tokens"),
    ("generate temperature 0", _call(_model.generate, _ids, 2, temperature=0), ValueError, "greedy=True"),
    ("Linear: wrong in_features", _call(_lin, Tensor(np.ones((2, 5), np.float32))), ValueError, "in_features = 4"),
    ("Linear: float64 into float32", _call(_lin, Tensor(np.ones((2, 4)))), TypeError, "x is float64 but W is float32"),
    ("Linear: int input", _call(_lin, np.ones((2, 4), np.int64)), TypeError, "x is int64"),
    ("GPTConfig n_embd % n_head", _call(GPTConfig, n_embd=10, n_head=4), ValueError, "divisible by n_head"),
    ("GPTConfig dtype float16", _call(GPTConfig, dtype="float16"), ValueError, "'float32' or 'float64'"),
    ("state dict of another config",
     _call(_model.load_state_dict, GPT(GPTConfig(**{**CFG.to_dict(), "n_embd": 16})).state_dict()),
     ValueError, "another config"),
    ("backward twice", lambda: [(lambda t: (t.backward(), t.backward()))(
        (Tensor(np.ones(2), requires_grad=True) * 2).sum())], RuntimeError, "backward"),
    ("SGD step with NaN gradient", _step_with_nan_gradient(SGD), FloatingPointError, "no parameter was changed"),
    ("AdamW step with NaN gradient", _step_with_nan_gradient(AdamW), FloatingPointError, "parameter 3"),
    ("optimizer over frozen params", lambda: Adam(GPT(CFG).freeze().parameters()), ValueError, "frozen"),
    ("optimizer over nothing", lambda: Adam([]), ValueError, "empty parameter list"),
    ("evaluate_loss on no batches", _call(evaluate_loss, _model, []), ValueError, "no batches"),
    ("next_char_accuracy on no batches", _call(next_char_accuracy, _model, []), ValueError, "no batches"),
    ("split of < 2 documents", _call(split_documents, ["only one"]), ValueError, "at least 2 documents"),
    ("corpus shorter than block_size", _pretrain_tiny_block, ValueError, "fewer than"),
    ("unknown method name", _call(make_method, "dora"), ValueError, r"valid names are \['cola', 'er', .*'lora'"),
    ("unknown method config field", _call(make_method, "lora", rank=4), ValueError,
     r"unknown config fields \['rank'\]; the fields of SeqLoraConfig are \["),
    ("unknown target module", _inject(["attn.qkv"]), ValueError, r"matches no Linear.*transformer.h.0.attn.c_attn"),
    ("target_modules regex matching nothing", _inject("c_attn"), ValueError, "regular expression"),
    ("target_modules empty list", _inject([]), TypeError, "non-empty list"),
    ("LoRA r = 0", _call(LoraConfig, r=0), ValueError, "positive integer"),
    ("LoRA dropout 1", _call(LoraConfig, lora_dropout=1.0), ValueError, r"\[0, 1\)"),
    ("unknown I-LoRA learner", lambda: attached("ilora").evaluating("medium").__enter__(), ValueError,
     r"learners \['fast', 'slow'\]"),
    ("merge into the tied lm_head", lambda: merge(inject_lm_head()), RuntimeError, "tied to another parameter"),
    ("unknown kernel backend", _kernel("gpu", np.zeros(5, np.int64)), ValueError, "choose one of numpy, cpu, cuda"),
]
for _backend in BACKENDS:
    BAD_INPUTS += [
        (f"kernel {_backend}: expert index out of range", _kernel(_backend, np.array([0, 1, 2, 0, 0])), ValueError,
         "only E = 2 experts"),
        (f"kernel {_backend}: float gate indices", _kernel(_backend, np.zeros(5)), TypeError, "int array"),
        (f"kernel {_backend}: int x", _kernel(_backend, np.zeros(5, np.int64), np.ones((5, 4), np.int64)), TypeError,
         "float32 or float64"),
        (f"kernel {_backend}: x of 3 features", _kernel(_backend, np.zeros(5, np.int64), np.ones((5, 3), np.float32)),
         ValueError, "A must be"),
    ]


def inject_lm_head():
    model = random_model()
    inject(model, LoraConfig(target_modules=["lm_head"], init_lora_weights=False))
    return model


@pytest.mark.parametrize("case, call, exception, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(case, call, exception, message):
    with pytest.raises(exception, match=message):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_in_float_inputs_propagate_row_by_row(backend):
    """Documented behaviour: a NaN / inf in an activation is IEEE arithmetic, not an error (checking every
    activation would cost a pass over it): the rows of tokens that see it become non-finite, other rows stay
    exact, and a training step on the resulting gradient is refused by the optimizer (see the table)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    A, B = rng.standard_normal((1, 3, 4)).astype(np.float32), rng.standard_normal((1, 6, 3)).astype(np.float32)
    clean = mixture_lowrank(Tensor(x), Tensor(A), Tensor(B), np.zeros(5, np.int64), backend=backend).data
    x[1, 2], x[3, 0] = np.nan, np.inf
    with np.errstate(invalid="ignore"):
        dirty = mixture_lowrank(Tensor(x), Tensor(A), Tensor(B), np.zeros(5, np.int64), backend=backend).data
        linear = F.linear(Tensor(x), Tensor(A[0]), None).data
    bad = np.array([False, True, False, True, False])
    assert not np.isfinite(dirty[bad]).any() and np.array_equal(dirty[~bad], clean[~bad])
    assert not np.isfinite(linear[bad]).all(axis=1).any() and np.isfinite(linear[~bad]).all()


def test_a_nan_loss_stops_training_at_the_optimizer_before_it_poisons_the_weights():
    method = attached("lora", seed=1)
    opt = Adam(method.trainable_parameters(), lr=1e-2)
    method.model.transformer.h[0].ln_1.weight.data[0] = np.nan  # a corrupted frozen weight
    x, y, mask = random_batch(np.random.default_rng(0), CFG, 2, 5)
    loss = method.loss(x, y, mask)
    assert np.isnan(loss.item())
    opt.zero_grad()
    with np.errstate(invalid="ignore"):
        loss.backward()
    before = adapter_state_dict(method.model)
    with pytest.raises(FloatingPointError, match="NaN or inf gradient"):
        opt.step()
    after = adapter_state_dict(method.model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


# ---- the sanitizer's positive control ---------------------------------------------------------------------

_OVERFLOW = """
from tinyslim.kernels.cpu import ffi, lib
N, D, O, r, E = 64, 32, 16, 4, 2
x = ffi.new("float[]", (N - 1) * D)  # one row short of what the kernel reads
A, B, w, s, y = (ffi.new("float[]", n) for n in (E * r * D, E * O * r, N * E, E, N * O))
for i in range(N * E):
    w[i] = 1.0
for i in range(E):
    s[i] = 1.0
lib.tsl_forward_f32(N, D, O, r, E, E, x, A, B, ffi.NULL, w, s, ffi.NULL, ffi.NULL, y, 0)
"""


@pytest.mark.skipif(os.environ.get("TINYSLIM_ASAN") != "1",
                    reason="runs under `make sanitize` only (TINYSLIM_ASAN=1, an ASan build, libasan preloaded)")
def test_the_sanitizer_catches_a_kernel_reading_past_its_buffer():
    """`make sanitize` is only worth its green if AddressSanitizer is really watching the kernel: a call that
    reads one row past x must be reported."""
    out = subprocess.run([sys.executable, "-c", _OVERFLOW], capture_output=True, text=True, timeout=120,
                         cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0 and "heap-buffer-overflow" in out.stderr, out.stderr[-2000:]
