"""Checkpoints on disk: safetensors files written atomically, read with clear errors.

A checkpoint is one ``.safetensors`` file: named arrays plus a JSON document in the header's
metadata under the key ``"tinyslim"`` (the kind of checkpoint, the model config, run state …).
Writes go to a temporary file in the same directory, are flushed to disk, then renamed over the
target, so a crash never leaves a half-written checkpoint behind. The header also records the SHA-256
of the data section (``"tinyslim.sha256"``), so a flipped byte in the weights is caught too, not only
a truncated file or a broken header. Reads check the file and the config and name the file and the
differing fields when something is wrong.

    save_model / load_model          a GPT (weights + config)
    save_adapter / load_adapter      a model's adapter arrays (+ optionally an optimizer's state)
    save_checkpoint / load_checkpoint  any named arrays + a JSON meta dict (pretraining's run state)
    atomic_write_json / read_json    small JSON files (run state, configs) with the same guarantees
    read_safetensors                 any safetensors file (Hugging Face's too), every error naming it

Hugging Face / PEFT layouts (GPT-2 directories, PEFT adapters) live in ``tinyslim.hf``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .nn import GPT, GPTConfig

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "save_model", "load_model", "save_adapter",
           "load_adapter", "atomic_write_bytes", "atomic_write_json", "jsonable", "read_json", "read_safetensors",
           "safetensors_bytes"]

_META_KEY = "tinyslim"
_SUM_KEY = "tinyslim.sha256"  # of the data section (every byte after the header); absent in older files


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


def atomic_write_json(path, obj) -> None:
    """Write a JSON document atomically (sorted keys, indented, a trailing newline)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def jsonable(value):
    """Config dicts as JSON: tuples → lists, numpy scalars → numbers, dataclasses → dicts, other objects → str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if dataclasses.is_dataclass(value):
        return jsonable(dataclasses.asdict(value))
    return str(value)


def read_json(path, what: str = "JSON file") -> dict:
    """Read a JSON object; a missing, unreadable or non-object file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{what} {path} is truncated or corrupted ({err}); delete it and re-create it") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} {path} holds a JSON {type(value).__name__}, expected an object")
    return value


def safetensors_bytes(tensors: dict, metadata: dict | None = None, checksum: bool = False) -> bytes:
    """A safetensors file's bytes from named arrays (each made C-contiguous; 0-d shapes kept). checksum:
    also record the SHA-256 of the data section in the metadata (read_safetensors verifies it)."""
    from safetensors.numpy import save

    arrays = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.dtype == object:
            raise TypeError(f"save_checkpoint: {name} is not a numeric array")
        arrays[name] = array if array.flags.c_contiguous else array.copy(order="C")
    payload = save(arrays, metadata=metadata)
    if checksum:  # the data section does not depend on the metadata: hash it, then write the header again
        digest = hashlib.sha256(memoryview(payload)[8 + int.from_bytes(payload[:8], "little"):]).hexdigest()
        payload = save(arrays, metadata={**(metadata or {}), _SUM_KEY: digest})
    return payload


def save_checkpoint(path, tensors: dict, meta: dict) -> None:
    """Atomically write named arrays and a JSON-serialisable meta dict to a safetensors file."""
    atomic_write_bytes(path, safetensors_bytes(tensors, {_META_KEY: json.dumps(meta, sort_keys=True)}, checksum=True))


def load_checkpoint(path) -> tuple[dict, dict]:
    """Read (arrays, meta) from a checkpoint written by save_checkpoint."""
    arrays, metadata = read_safetensors(path)
    meta_text = metadata.get(_META_KEY)
    if meta_text is None:
        raise CheckpointError(f"checkpoint {path} has no tinyslim metadata: it was not written by tinyslim")
    try:
        meta = json.loads(meta_text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata ({err})") from None
    return arrays, meta


# safetensors dtype codes → NumPy (little-endian); BF16 is widened to float32 exactly (its 16 bits are the
# top half of a float32), since NumPy has no bfloat16
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(path) -> tuple[dict, dict]:
    """(arrays, header metadata) of any safetensors file. A missing, truncated or corrupted file is a
    CheckpointError naming it; every tensor's offsets and size are checked against the header."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raw = path.read_bytes()
    try:
        header = _read_header(raw)
        start = 8 + int.from_bytes(raw[:8], "little")
        arrays = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if code not in _DTYPES:
                raise ValueError(f"tensor {name} has dtype {code}; tinyslim reads {sorted(_DTYPES)}")
            dtype = np.dtype(_DTYPES[code])
            if not 0 <= begin <= end or end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise ValueError(f"tensor {name} ({code} {list(shape)}) has data offsets [{begin}, {end})")
            array = (np.frombuffer(raw, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
                     if end > begin else np.zeros(0, dtype=dtype)).reshape(shape)
            if code == "BF16":
                array = (array.astype(np.uint32) << 16).view(np.float32)
            arrays[name] = array.astype(array.dtype.newbyteorder("="))  # a writable, native-order copy
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not an object")
        if _SUM_KEY in metadata and hashlib.sha256(memoryview(raw)[start:]).hexdigest() != metadata[_SUM_KEY]:
            raise ValueError("the SHA-256 of the data section differs from the one recorded when it was written")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({type(err).__name__}: {err}); "
                              "delete it and re-create it") from None
    return arrays, metadata


def _read_header(raw: bytes) -> dict:
    """The safetensors header: an 8-byte little-endian length, then that many bytes of JSON."""
    if len(raw) < 8:
        raise ValueError(f"file is {len(raw)} bytes, shorter than the 8-byte safetensors header length")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise ValueError(f"header claims {n} bytes but the file has {len(raw) - 8} after the length")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
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


# ---- adapters (+ optimizer state) ------------------------------------------------------------------

def save_adapter(model, path, optimizer=None, extra: dict | None = None) -> None:
    """A model's adapter arrays (adapter_state_dict), optionally an optimizer's state, the base model's
    config and the adapted layers' types, in one atomic file. ``extra``: any JSON-serialisable run state."""
    from .adapters.base import adapted_layers, adapter_state_dict

    layers = {name: type(layer).__name__ for name, layer in adapted_layers(model)}
    if not layers:
        raise ValueError("save_adapter: the model has no adapters (inject a method first, or use save_model)")
    tensors = {f"adapter.{k}": v for k, v in adapter_state_dict(model).items()}
    if optimizer is not None:
        tensors.update({f"optim.{k}": v for k, v in optimizer.state_dict().items()})
    meta = {"kind": "adapter", "config": model.config.to_dict(), "layers": layers,
            "optimizer": optimizer is not None, **(extra or {})}
    save_checkpoint(path, tensors, meta)


def load_adapter(model, path, optimizer=None) -> dict:
    """Load save_adapter's file into a model that carries the same adapters (and the optimizer's state
    into ``optimizer``); returns the meta dict. Another base config, other adapted layers or other shapes
    are a CheckpointError naming the file and what differs, raised before any array is changed."""
    from .adapters.base import adapted_layers, load_adapter_state_dict

    arrays, meta = load_checkpoint(path)
    if meta.get("kind") != "adapter":
        raise CheckpointError(f"checkpoint {path} holds a {meta.get('kind')!r}, not an adapter")
    saved = GPTConfig.from_dict(meta["config"])
    if saved != model.config:
        diff = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in saved.diff(model.config).items())
        raise CheckpointError(f"adapter {path} was made for another base model config ({diff})")
    layers = {name: type(layer).__name__ for name, layer in adapted_layers(model)}
    if layers != meta["layers"]:
        theirs = meta["layers"]
        differ = sorted(k for k in set(layers) | set(theirs) if layers.get(k) != theirs.get(k))
        raise CheckpointError(f"adapter {path} was saved from other adapted layers: "
                              + ", ".join(f"{k}: checkpoint {theirs.get(k)} vs model {layers.get(k)}"
                                          for k in differ[:6]))
    if optimizer is not None and not meta.get("optimizer"):
        raise CheckpointError(f"adapter {path} holds no optimizer state, but an optimizer was given to load it into")
    try:
        load_adapter_state_dict(model, {k[len("adapter."):]: v for k, v in arrays.items() if k.startswith("adapter.")})
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"adapter {path} does not fit the model: {err}") from None
    if optimizer is not None:
        try:
            optimizer.load_state_dict({k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")})
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"adapter {path}: its optimizer state does not fit the optimizer: {err}") from None
    return meta
