"""Checkpoints on disk: safetensors files written atomically, read with clear errors.

A checkpoint is one ``.safetensors`` file: named arrays plus a JSON document in the header's
metadata under the key ``"tinyslim"`` (the kind of checkpoint, the model config, run state …).
Writes go to a temporary file in the same directory, are flushed to disk, then renamed over the
target, so a crash never leaves a half-written checkpoint behind. Reads check the file and the
config and name the file and the differing fields when something is wrong.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .nn import GPT, GPTConfig

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "save_model", "load_model", "atomic_write_bytes"]

_META_KEY = "tinyslim"


class CheckpointError(Exception):
    """A checkpoint file is missing, truncated, corrupted, or made for something else."""


def atomic_write_bytes(path, data: bytes) -> None:
    """Write data to path so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, tensors: dict, meta: dict) -> None:
    """Atomically write named arrays and a JSON-serialisable meta dict to a safetensors file."""
    from safetensors.numpy import save

    arrays = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.dtype == object:
            raise TypeError(f"save_checkpoint: {name} is not a numeric array")
        arrays[name] = array if array.flags.c_contiguous else array.copy(order="C")  # (keeps 0-d shapes)
    payload = save(arrays, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(path, payload)


def load_checkpoint(path) -> tuple[dict, dict]:
    """Read (arrays, meta) from a checkpoint written by save_checkpoint."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raw = path.read_bytes()
    try:
        meta_text = _read_header(raw).get("__metadata__", {}).get(_META_KEY)
        arrays = load(raw)
    except (SafetensorError, ValueError, KeyError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({err}); "
                              "delete it and re-create it") from None
    if meta_text is None:
        raise CheckpointError(f"checkpoint {path} has no tinyslim metadata: it was not written by tinyslim")
    try:
        meta = json.loads(meta_text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata ({err})") from None
    return arrays, meta


def _read_header(raw: bytes) -> dict:
    """The safetensors header: an 8-byte little-endian length, then that many bytes of JSON."""
    if len(raw) < 8:
        raise ValueError(f"file is {len(raw)} bytes, shorter than the 8-byte safetensors header length")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise ValueError(f"header claims {n} bytes but the file has {len(raw) - 8} after the length")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
    if 8 + n + end != len(raw):
        raise ValueError(f"data section should be {end} bytes but the file holds {len(raw) - 8 - n}")
    return header


def save_model(model: GPT, path, extra: dict | None = None) -> None:
    """A GPT's weights and config (plus any JSON-serialisable extra info) in one file."""
    meta = {"kind": "gpt", "config": model.config.to_dict(), **(extra or {})}
    save_checkpoint(path, model.state_dict(), meta)


def load_model(path, expect_config: GPTConfig | None = None) -> tuple[GPT, dict]:
    """Rebuild a GPT from save_model's file (or a pretraining checkpoint). With expect_config, a different config is an error
    that names the differing fields."""
    arrays, meta = load_checkpoint(path)
    if meta.get("kind") != "gpt":
        raise CheckpointError(f"checkpoint {path} holds a {meta.get('kind')!r}, not a GPT model")
    try:
        config = GPTConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid model config: {err}") from None
    if expect_config is not None and config != expect_config:
        diff = ", ".join(f"{k}: checkpoint {a!r} vs expected {b!r}" for k, (a, b) in config.diff(expect_config).items())
        raise CheckpointError(f"checkpoint {path} was made for another model config ({diff})")
    model = GPT(config)
    # a pretraining checkpoint also holds optimizer state: its weights are prefixed "model."
    weights = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")} or arrays
    try:
        model.load_state_dict(weights)
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} does not match its own config: {err}") from None
    return model, meta
