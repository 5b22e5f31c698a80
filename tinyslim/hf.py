"""Hugging Face interop: the GPT in GPT-2's layout, LoRA adapters in PEFT's layout, merged exports.

    save_hf_gpt2(model, "out/gpt2")             config.json + model.safetensors (GPT2LMHeadModel reads them)
    model = load_hf_gpt2("out/gpt2")            a GPT from a GPT-2-layout directory (real GPT-2 weights too)
    save_peft_adapter(model, "out/adapter")     adapter_config.json + adapter_model.safetensors (PeftModel reads them)
    load_peft_adapter(model, "out/adapter")     inject PEFT's LoRA into a plain GPT and load its factors
    save_merged(model_or_method, "out/merged")  W0 + ΔW as a plain GPT-2 (LoRA, COLA, I-LoRA's slow learner)

Orientation (docs/methods.md §1.2): tinyslim stores every Linear weight (out, in); GPT-2's Conv1D
(``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) stores (in, out), so those weights are
transposed on the way out and back on the way in. LoRA factors are not: PEFT keeps ``lora_A`` (r, in)
and ``lora_B`` (out, r) for Conv1D too, and says so with ``fan_in_fan_out: true`` (its merge adds ΔWᵀ).

The architecture must match exactly (learned positions, pre-LN blocks, biases, tanh GELU, LayerNorm ε
= 1e-5, 4·C MLP, tied LM head): a config that differs is refused with every differing field named.
The vocabulary is whatever the checkpoint has (tinyslim's own tokenizer is a 97-character one).
Every file is written atomically (io.atomic_write_bytes), the JSON config last, so a directory with a
config always has complete weights beside it; the safetensors header carries the SHA-256 of the data (an
extra metadata key that transformers and peft ignore), so tinyslim notices a damaged file when it reads one
back. Nothing here downloads: directories are local.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .io import CheckpointError, atomic_write_json, atomic_write_bytes, read_json, read_safetensors, safetensors_bytes
from .nn import GPT, GPTConfig

__all__ = ["CONV1D_SUFFIXES", "hf_gpt2_config", "gpt_config_from_hf", "hf_gpt2_state_dict", "save_hf_gpt2",
           "load_hf_gpt2", "merged_model", "save_merged", "peft_adapter_config", "save_peft_adapter",
           "load_peft_adapter", "check_lora_layers", "lora_adapter_config", "refuse_tied_knots", "method_lora_alpha",
           "write_peft_adapter", "read_peft_adapter"]

CONV1D_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # stored (in, out) by GPT-2
_CAUSAL_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # older transformers saved the mask; not weights
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # the same tanh-form GELU (tinyslim's F.gelu)
_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
            "num_hidden_layers": "n_layer"}
PEFT_PREFIX = "base_model.model."


def _is_conv1d(name: str) -> bool:
    return name.endswith(".weight") and name[:-len(".weight")].endswith(CONV1D_SUFFIXES) and ".h." in f".{name}"


# ---- config ------------------------------------------------------------------------------------

def hf_gpt2_config(config: GPTConfig) -> dict:
    """The config.json of GPT2LMHeadModel for a tinyslim GPTConfig (dropout → resid/embd_pdrop; tinyslim
    has no dropout on attention probabilities, so attn_pdrop is 0)."""
    if not config.bias:
        raise ValueError("GPT-2's layout has a bias in every Conv1D layer, but this model has bias=False; "
                         "export a model built with GPTConfig(bias=True) (a bias-free model has no GPT-2 twin)")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0,
            "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": True,
            "use_cache": True, "bos_token_id": None, "eos_token_id": None, "dtype": config.dtype}


# fields whose value fixes tinyslim's architecture: name → (GPT-2's default when absent, is it tinyslim's?)
def _architecture_mismatches(d: dict) -> list:
    n_embd = d.get("n_embd")
    checks = {
        "model_type": (d.get("model_type", "gpt2"), lambda v: v == "gpt2", "'gpt2'"),
        "n_inner": (d.get("n_inner"), lambda v: v is None or v == 4 * n_embd, f"null or 4·n_embd = {4 * n_embd}"),
        "activation_function": (d.get("activation_function", "gelu_new"), lambda v: v in _GELU_TANH,
                                f"one of {list(_GELU_TANH)} (tanh GELU)"),
        "layer_norm_epsilon": (d.get("layer_norm_epsilon", 1e-5), lambda v: v == 1e-5, "1e-05"),
        "scale_attn_weights": (d.get("scale_attn_weights", True), lambda v: v is True, "true"),
        "scale_attn_by_inverse_layer_idx": (d.get("scale_attn_by_inverse_layer_idx", False), lambda v: v is False,
                                            "false"),
        "add_cross_attention": (d.get("add_cross_attention", False), lambda v: v is False, "false"),
        "tie_word_embeddings": (d.get("tie_word_embeddings", True), lambda v: v is True, "true (tied LM head)"),
    }
    return [f"{name} = {value!r} (tinyslim needs {want})"
            for name, (value, ok, want) in checks.items() if not ok(value)]


def gpt_config_from_hf(d: dict, dtype: str = "float32", dropout: float | None = None,
                       source: str = "config") -> GPTConfig:
    """A GPTConfig from a GPT-2 config.json dict. Raises CheckpointError naming every missing field and
    every field whose value tinyslim's architecture cannot represent. dropout: None takes resid_pdrop."""
    d = {_ALIASES.get(k, k): v for k, v in d.items()}
    missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if k not in d]
    if missing:
        raise CheckpointError(f"{source} lacks the GPT-2 fields {missing} (is it a GPT-2 config.json?)")
    problems = _architecture_mismatches(d)
    if problems:
        raise CheckpointError(f"{source} describes an architecture tinyslim's GPT does not have: "
                              + "; ".join(problems))
    try:
        return GPTConfig(vocab_size=d["vocab_size"], block_size=d["n_positions"], n_layer=d["n_layer"],
                         n_head=d["n_head"], n_embd=d["n_embd"], bias=True, dtype=dtype,
                         dropout=float(d.get("resid_pdrop", 0.1)) if dropout is None else dropout)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None


# ---- weights -------------------------------------------------------------------------------------

def hf_gpt2_state_dict(model: GPT) -> dict:
    """GPT2LMHeadModel's state dict (``transformer.*``, Conv1D weights (in, out)); the tied lm_head is
    left out, as save_pretrained does. The model must be plain (no adapters attached)."""
    from .adapters.base import adapted_layers

    attached = [name for name, _ in adapted_layers(model)]
    if attached:
        raise ValueError(f"the model carries adapters at {attached[:3]}{'…' if len(attached) > 3 else ''}: "
                         "save_merged(model, dir) writes W0 + ΔW as a plain GPT-2, save_peft_adapter(model, dir) "
                         "the adapter alone")
    return {name: np.ascontiguousarray(a.T) if _is_conv1d(name) else a
            for name, a in model.state_dict().items() if name != "lm_head.weight"}


def save_hf_gpt2(model: GPT, directory) -> Path:
    """Write config.json and model.safetensors as GPT2LMHeadModel.save_pretrained would; returns the directory."""
    directory = Path(directory)
    config = hf_gpt2_config(model.config)
    weights = safetensors_bytes(hf_gpt2_state_dict(model), {"format": "pt"}, checksum=True)
    atomic_write_bytes(directory / "model.safetensors", weights)
    atomic_write_json(directory / "config.json", config)  # last: a config means complete weights
    return directory


def _read_hf_weights(directory: Path) -> tuple[dict, str]:
    """All tensors of model.safetensors (or of the shards its index names) and the file name for errors."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)[0], str(single)
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map", {})
        arrays = {}
        for shard in sorted(set(weight_map.values())):
            arrays.update(read_safetensors(directory / shard)[0])
        return arrays, str(index)
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = (f"; it has {others}: tinyslim reads safetensors only (convert with transformers: "
            "GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True))") if others else ""
    raise CheckpointError(f"{directory} has no model.safetensors{hint}")


def load_hf_gpt2(directory, dtype: str | None = None, dropout: float | None = None) -> GPT:
    """A GPT from a GPT-2-layout directory (config.json + model.safetensors, with or without the
    ``transformer.`` prefix, sharded or not; causal-mask buffers are ignored). dtype: None keeps the file's
    float32 / float64 (float16 and bfloat16 widen exactly to float32). dropout: None takes resid_pdrop.
    Missing, unexpected or misshapen tensors and an untied lm_head are a CheckpointError naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (expected config.json + model.safetensors)")
    raw_config = read_json(directory / "config.json", "GPT-2 config")
    arrays, source = _read_hf_weights(directory)
    if dtype is None:
        floats = {a.dtype for a in arrays.values() if a.dtype.kind == "f"}
        dtype = "float64" if floats == {np.dtype(np.float64)} else "float32"
    config = gpt_config_from_hf(raw_config, dtype=dtype, dropout=dropout, source=str(directory / "config.json"))

    model = GPT(config)
    expected = {name: p.shape for name, p in model.named_parameters() if name != "lm_head.weight"}
    state, unexpected = {}, []
    for key, value in arrays.items():
        name = key if key.startswith("transformer.") or key == "lm_head.weight" else f"transformer.{key}"
        if name.endswith(_CAUSAL_MASK_BUFFERS):
            continue
        if name == "lm_head.weight":
            state["lm_head.weight"] = value
        elif name in expected:
            state[name] = value.T if _is_conv1d(name) else value
        else:
            unexpected.append(key)
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not hold a GPT-2 of its config.json: missing tensors {missing[:6]}"
                              f"{'…' if len(missing) > 6 else ''}, unexpected tensors {sorted(unexpected)[:6]}"
                              f"{'…' if len(unexpected) > 6 else ''}")
    head = state.pop("lm_head.weight", None)
    for name, value in state.items():
        if value.shape != expected[name]:
            stored = value.T.shape if _is_conv1d(name) else value.shape
            want = expected[name][::-1] if _is_conv1d(name) else expected[name]
            raise CheckpointError(f"{source}: {name} has shape {stored} but config.json implies {want}"
                                  + (" (Conv1D weights are stored (in, out))" if _is_conv1d(name) else ""))
        if value.dtype.kind != "f":
            raise CheckpointError(f"{source}: {name} is {value.dtype}, expected floating point")
        state[name] = value.astype(config.np_dtype)
    if head is not None and not np.array_equal(head.astype(config.np_dtype), state["transformer.wte.weight"]):
        raise CheckpointError(f"{source} has an lm_head.weight that differs from transformer.wte.weight; tinyslim's "
                              "GPT ties them (GPT-2 does too), so an untied head cannot be loaded")
    model.load_state_dict(state)  # (lm_head is wte, tied: not a parameter of its own)
    return model


# ---- merged exports ------------------------------------------------------------------------------

def merged_model(model_or_method, learner: str | None = None) -> GPT:
    """A new plain GPT holding W0 + ΔW in every adapted layer; the source is not changed.

    A Method gives its reported learner (``learners()[0]``: I-LoRA's slow one by default) or ``learner``;
    COLA's base already holds the tied knots, so W0 + ΔW is its W_final. A layer whose ΔW is not one dense
    matrix (routed mixtures) cannot be merged: NotImplementedError names it."""
    from .adapters.base import Method, adapted_layers, refuse_tied_merge

    if isinstance(model_or_method, Method):
        with model_or_method.evaluating(learner) as model:
            return merged_model(model)
    if learner is not None:
        raise ValueError("learner= needs a Method (a bare model has one set of adapter weights)")
    model = model_or_method
    refuse_tied_merge(model, [(n, layer) for n, layer in adapted_layers(model) if not layer.merged])
    state = model.state_dict()
    for name, layer in adapted_layers(model):
        W = layer.base_layer.weight.data
        try:
            merged = W if layer.merged else W + layer.delta_weight().astype(W.dtype, copy=False)
        except NotImplementedError:
            raise NotImplementedError(f"{name} is a {type(layer).__name__}, whose update is not one dense matrix: "
                                      "it cannot be merged into a plain model") from None
        for key in [k for k in state if k.startswith(f"{name}.")]:
            del state[key]
        state[f"{name}.weight"] = merged
        if layer.base_layer.bias is not None:
            state[f"{name}.bias"] = layer.base_layer.bias.data.copy()
    plain = GPT(model.config)
    plain.load_state_dict(state)
    return plain


def save_merged(model_or_method, directory, learner: str | None = None) -> Path:
    """merged_model(...) written in GPT-2's layout (save_hf_gpt2)."""
    return save_hf_gpt2(merged_model(model_or_method, learner), directory)


# ---- PEFT LoRA adapters --------------------------------------------------------------------------

def _lora_layers(model):
    """The adapted layers as PEFT's LoRA sees them; anything else is refused with the reason."""
    from .adapters.base import adapted_layers
    from .adapters.lora import LoraLinear

    return check_lora_layers(adapted_layers(model), LoraLinear)


def check_lora_layers(layers: list, lora_class) -> list:
    """(name, layer) pairs that one PEFT LORA adapter can hold: plain `lora_class` layers, unmerged, with one
    (r, scale, dropout); else ValueError with the reason (either engine's layers)."""
    if not layers:
        raise ValueError("the model carries no adapters to export (inject or attach a LoRA method first)")
    for name, layer in layers:
        if not isinstance(layer, lora_class):
            raise ValueError(f"{name} is a {type(layer).__name__}: PEFT's LORA format holds plain LoRA layers only "
                             "(save_merged(...) writes any mergeable method as a plain GPT-2)")
        if layer.merged:
            raise ValueError(f"{name} is merged (ΔW is inside W0): unmerge(model) before exporting the adapter, "
                             "or export the merged model with save_hf_gpt2")
    first = layers[0][1]
    for name, layer in layers:
        if (layer.r, layer.scale, layer.dropout) != (first.r, first.scale, first.dropout):
            raise ValueError(f"{name} has (r, scale, dropout) = {(layer.r, layer.scale, layer.dropout)} but "
                             f"{layers[0][0]} has {(first.r, first.scale, first.dropout)}; one adapter_config.json "
                             "describes one setting")
    return layers


def _target_suffixes(candidates: list, names: list) -> list:
    """Suffixes that select exactly `names` among `candidates` (every wrappable layer's name) by PEFT's rule:
    GPT-2's path inside a block ("attn.c_attn"), else the last part ("q_proj"), else the full names. (The last
    part selects a superset of what the block path selects, so it is tried only where the names have no ".h.")"""
    from .adapters.verbs import matches_target

    if any(".h." in n for n in names):
        suffixes = sorted({n.split(".h.", 1)[1].split(".", 1)[1] if ".h." in n else n for n in names})
    else:
        suffixes = sorted({n.rpartition(".")[2] for n in names})
    return suffixes if [n for n in candidates if matches_target(n, suffixes)] == names else list(names)


def peft_adapter_config(model, lora_alpha: float | None = None, use_rslora: bool = False,
                        base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json for the model's LoRA layers. PEFT's scale is lora_alpha / r (/ √r with rsLoRA);
    without lora_alpha it is s·r, so that PEFT's scale is the layers' s."""
    from .adapters.verbs import AdaptedLinear
    from .nn import Linear

    candidates = [n for n, m in model.named_modules()
                  if isinstance(m, (Linear, AdaptedLinear)) and not n.endswith("base_layer")]
    return lora_adapter_config(_lora_layers(model), candidates, lora_alpha, use_rslora, base_model_name_or_path)


def lora_adapter_config(layers: list, candidates: list, lora_alpha: float | None = None, use_rslora: bool = False,
                        base_model_name_or_path: str | None = None, fan_in_fan_out: bool = True) -> dict:
    """adapter_config.json for checked LoRA layers (check_lora_layers) among the wrappable `candidates`
    (either engine's). fan_in_fan_out: the base layers store W (in, out) (GPT-2's Conv1D)."""
    first = layers[0][1]
    if lora_alpha is None:
        lora_alpha, use_rslora = first.scale * first.r, False
    elif not math.isclose(lora_alpha / (math.sqrt(first.r) if use_rslora else first.r), first.scale, rel_tol=1e-12):
        raise ValueError(f"lora_alpha = {lora_alpha} (use_rslora={use_rslora}) gives PEFT another scale than the "
                         f"layers' s = {first.scale} at r = {first.r}")
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": first.r, "lora_alpha": lora_alpha, "lora_dropout": first.dropout, "use_rslora": use_rslora,
            "target_modules": _target_suffixes(candidates, [n for n, _ in layers]), "fan_in_fan_out": fan_in_fan_out,
            "bias": "none", "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}


def refuse_tied_knots(method) -> None:
    """A COLA chain that has tied knots moved its base weights: its adapter alone no longer gives the model."""
    if getattr(method, "history", None):
        raise ValueError(f"{method.name} has tied {len(method.history)} knot(s) into the base weights: the "
                         "adapter alone no longer reproduces the model; use save_merged(method, dir)")


def method_lora_alpha(config, layer) -> tuple:
    """(lora_alpha, use_rslora) of a Method's config when its layer is at the config's r and scale, else
    (None, False) (a COLA step-down link: PEFT's config then carries its scale as s·r)."""
    if layer.r == config.r and math.isclose(layer.scale, config.scale, rel_tol=1e-12):
        return config.lora_alpha, config.use_rslora
    return None, False


def write_peft_adapter(directory, tensors: dict, config: dict) -> Path:
    """adapter_model.safetensors (NumPy `tensors`), then adapter_config.json, each atomically."""
    directory = Path(directory)
    atomic_write_bytes(directory / "adapter_model.safetensors",
                       safetensors_bytes(tensors, {"format": "pt"}, checksum=True))
    atomic_write_json(directory / "adapter_config.json", config)
    return directory


def save_peft_adapter(model_or_method, directory, base_model_name_or_path: str | None = None,
                      learner: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (``base_model.model.<path>.lora_A.weight`` (r, in),
    ``.lora_B.weight`` (out, r)), which ``PeftModel.from_pretrained(GPT2LMHeadModel, dir)`` loads.

    A Method exports its reported learner (or ``learner``) with its config's lora_alpha / use_rslora. The
    factors are relative to the model's current base weights: a COLA chain that has tied knots is refused
    (its base moved; save_merged writes its W_final)."""
    from .adapters.base import Method

    if isinstance(model_or_method, Method):
        method = model_or_method
        refuse_tied_knots(method)
        with method.evaluating(learner) as model:
            alpha, rslora = method_lora_alpha(method.config, _lora_layers(model)[0][1])
            config = peft_adapter_config(model, alpha, rslora, base_model_name_or_path)
            tensors = _peft_tensors(model)
    else:
        config = peft_adapter_config(model_or_method, None, False, base_model_name_or_path)
        tensors = _peft_tensors(model_or_method)
    return write_peft_adapter(directory, tensors, config)


def _peft_tensors(model) -> dict:
    out = {}
    for name, layer in _lora_layers(model):
        A, B = layer.factors()  # the active learner's copy (I-LoRA)
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.data.copy()  # (r, D)
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.data.copy()  # (O, r)
    return out


_PEFT_UNSUPPORTED = {"bias": "none", "modules_to_save": None, "use_dora": False, "lora_bias": False,
                     "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,
                     "target_parameters": None, "trainable_token_indices": None}


def load_peft_adapter(model: GPT, directory, seed: int = 0):
    """Inject PEFT's LoRA (from adapter_config.json) into a plain GPT and load adapter_model.safetensors into
    it; only the adapters train afterwards. Returns the LoraConfig. The file is checked against the model
    (every key, every shape) before anything is injected, so a failed load leaves the model as it was."""
    from .adapters.verbs import inject, linear_names, mark_only_adapters_trainable

    features = {name: (model.get_submodule(name).in_features, model.get_submodule(name).out_features)
                for name in linear_names(model)}
    config, state = read_peft_adapter(directory, features)
    inject(model, config, seed)
    mark_only_adapters_trainable(model)
    for key, value in state.items():
        module_name, _, factor = key.rpartition(".")
        target = getattr(model.get_submodule(module_name), factor)
        target.data[...] = value.astype(target.dtype)
    return config


def read_peft_adapter(directory, features: dict) -> tuple:
    """(LoraConfig, {"<module>.lora_A": (r, in) array, "<module>.lora_B": (out, r), ...}) of a PEFT LORA
    directory, checked against a model's wrappable layers `features` {name: (in, out)} (either engine's):
    every key and every shape, so that the caller can inject knowing the load will succeed."""
    from .adapters.lora import LoraConfig
    from .adapters.verbs import matches_target

    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    d = read_json(config_path, "PEFT adapter config")
    if d.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path} has peft_type {d.get('peft_type')!r}; tinyslim imports 'LORA' only")
    unsupported = [f"{k} = {d[k]!r}" for k, plain in _PEFT_UNSUPPORTED.items() if d.get(k) not in (plain, None, {}, [])]
    if unsupported:
        raise CheckpointError(f"{config_path} uses PEFT features tinyslim's LoRA does not have: "
                              f"{', '.join(unsupported)}")
    if d.get("layer_replication"):
        raise CheckpointError(f"{config_path} uses layer_replication, which tinyslim's LoRA does not have")
    try:
        config = LoraConfig(r=d["r"], lora_alpha=d["lora_alpha"], lora_dropout=d.get("lora_dropout", 0.0),
                            target_modules=d["target_modules"], use_rslora=bool(d.get("use_rslora", False)))
    except KeyError as err:
        raise CheckpointError(f"{config_path} lacks the field {err}") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: {err}") from None

    arrays, _ = read_safetensors(weights_path)
    expected = {}
    for name, (D, O) in features.items():
        if matches_target(name, config.target_modules):
            expected[f"{name}.lora_A"] = (config.r, D)
            expected[f"{name}.lora_B"] = (O, config.r)
    state = {}
    for key, value in arrays.items():
        inner = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part in (".lora_A", ".lora_B"):  # "<path>.lora_A.weight", or "<path>.lora_A.<adapter name>.weight"
            head, sep, tail = inner.partition(part + ".")
            if sep and tail.endswith("weight"):
                inner = head + part
        state[inner] = value
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights_path} does not fit target_modules={config.target_modules!r} on this model: "
                              f"missing {missing[:4]}{'…' if len(missing) > 4 else ''}, unexpected "
                              f"{unexpected[:4]}{'…' if len(unexpected) > 4 else ''} (keys are "
                              f"'{PEFT_PREFIX}<module>.lora_A.weight')")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(f"{weights_path}: {key} has shape {state[key].shape}, expected {shape} "
                                  "(lora_A is (r, in), lora_B is (out, r), for Conv1D layers too)")
    return config, state
