"""Checkpoints: bit-exact round trips, atomic writes, clear errors for bad files and configs."""
import numpy as np
import pytest

from tinyslim.io import CheckpointError, load_checkpoint, load_model, save_checkpoint, save_model
from tinyslim.nn import GPT, GPTConfig

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)


def test_model_round_trip_is_bit_exact(tmp_path):
    model = GPT(TINY, seed=3)
    path = tmp_path / "m.safetensors"
    save_model(model, path, extra={"note": "hello"})
    loaded, meta = load_model(path, expect_config=TINY)
    assert meta["note"] == "hello"
    for (name, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b
        assert np.array_equal(a, b) and a.dtype == b.dtype
    idx = np.arange(8)[None] % 11
    assert np.array_equal(model(idx)[0].data, loaded(idx)[0].data)


def test_arbitrary_arrays_and_meta_round_trip(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.float64(2.5) * np.ones(3),
              "s": np.asarray(7, dtype=np.int64)}
    save_checkpoint(tmp_path / "c.safetensors", arrays, {"kind": "test", "nested": {"x": [1, 2]}})
    back, meta = load_checkpoint(tmp_path / "c.safetensors")
    assert meta == {"kind": "test", "nested": {"x": [1, 2]}}
    for k in arrays:
        assert np.array_equal(back[k], arrays[k]) and back[k].dtype == arrays[k].dtype


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(GPT(TINY), path)
    raw = path.read_bytes()
    for cut in (4, 100, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupted") as err:
            load_model(path)
        assert str(path) in str(err.value)


def test_corrupted_header_is_a_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(GPT(TINY), path)
    raw = bytearray(path.read_bytes())
    raw[10:20] = b"\xff" * 10
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_model(path)


def test_missing_file_and_foreign_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(2, dtype=np.float32)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not written by tinyslim"):
        load_model(tmp_path / "foreign.safetensors")


def test_config_mismatch_names_the_fields(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(GPT(TINY), path)
    other = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    with pytest.raises(CheckpointError, match="n_layer: checkpoint 1 vs expected 2"):
        load_model(path, expect_config=other)


def test_write_is_atomic_when_it_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_model(GPT(TINY, seed=1), path)
    before = path.read_bytes()

    import os
    def broken_fsync(fd):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_model(GPT(TINY, seed=2), path)
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
