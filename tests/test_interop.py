"""Interop with the real Hugging Face libraries (tinyslim/hf.py): GPT-2 directories, PEFT LoRA adapters and
merged exports, checked by loading them with transformers / peft and comparing logits.

Every model here has random weights (biases, LayerNorms, both LoRA factors), the adapted layers are
non-square (c_attn C → 3C, mlp.c_fc C → 4C), so a transposed Conv1D weight or LoRA factor, a missing key
prefix or a wrong scale changes the logits. Nothing is downloaded: configs are built locally and every
from_pretrained reads a temporary directory with local_files_only=True.

The layout tests (key names, shapes, config fields, bit-exact round trips, errors) need only NumPy and
safetensors; the comparisons need transformers and peft (``make test`` installs them) and skip without.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_adapters_base import random_batch, run_tasks
from tinyslim.adapters import LoraConfig, adapter_state_dict, inject, make_method, merge
from tinyslim.hf import (gpt_config_from_hf, hf_gpt2_config, load_hf_gpt2, load_peft_adapter, merged_model,
                         save_hf_gpt2, save_merged, save_peft_adapter)
from tinyslim.io import CheckpointError, read_json, read_safetensors
from tinyslim.nn import GPT, GPTConfig
from tinyslim.testing import assert_close, randomize_parameters

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# peft calls a transformers method that transformers 5 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
ROOT = Path(__file__).resolve().parent.parent

CFG = GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=16)  # float32, GPT-2's dtype
TARGETS = ["attn.c_attn", "mlp.c_fc"]  # 16 → 48 and 16 → 64: non-square
FLOAT32 = dict(rtol=1e-4, atol=1e-5)  # float32 rounding of two summation orders (or of W0 + ΔW) on logits ~3
MISSING = ("{} is not installed: the interop tests load tinyslim's exports with the real library. Install it with "
           "`pip install transformers==5.23.0 peft==0.21.2` (without touching torch) or run `make test`.")


@pytest.fixture(scope="module")
def transformers():
    module = pytest.importorskip("transformers", reason=MISSING.format("transformers"))
    module.logging.set_verbosity_error()
    module.utils.logging.disable_progress_bar()
    return module


@pytest.fixture(scope="module")
def peft(transformers):
    return pytest.importorskip("peft", reason=MISSING.format("peft"))


def random_model(seed: int = 1, config: GPTConfig = CFG) -> GPT:
    return randomize_parameters(GPT(config, seed=seed), seed, std=0.2).eval()


def tokens(seed: int = 0, B: int = 3, T: int = CFG.block_size) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T))


def logits(model, idx) -> np.ndarray:
    model.eval()
    return np.array(model(idx)[0].data)


def hf_model(transformers, directory):
    """GPT2LMHeadModel from a local directory; fails when any tensor is missing or left over."""
    model, info = transformers.GPT2LMHeadModel.from_pretrained(directory, local_files_only=True,
                                                               output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers did not load {directory} cleanly: {problems}"
    return model.eval()


def torch_logits(module, idx) -> np.ndarray:
    import torch
    with torch.no_grad():
        return module(torch.as_tensor(idx)).logits.numpy()


def lora(model, targets=TARGETS, r=3, alpha=5.0, rslora=False, seed=2):
    """LoRA with both factors random (init_lora_weights=False gives a random B)."""
    inject(model, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                             init_lora_weights=False), seed)
    return model.eval()


# ---- GPT-2 layout: what is on disk -----------------------------------------------------------------

def test_export_writes_gpt2_config_and_transposed_conv1d_weights(tmp_path):
    model = random_model()
    save_hf_gpt2(model, tmp_path)
    config = read_json(tmp_path / "config.json")
    assert {k: config[k] for k in ("model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                                    "layer_norm_epsilon", "activation_function", "tie_word_embeddings")} == \
        dict(model_type="gpt2", vocab_size=23, n_positions=12, n_embd=16, n_layer=2, n_head=2,
             layer_norm_epsilon=1e-5, activation_function="gelu_new", tie_word_embeddings=True)
    arrays, metadata = read_safetensors(tmp_path / "model.safetensors")
    assert metadata["format"] == "pt"  # transformers refuses a safetensors file without it
    assert set(metadata) == {"format", "tinyslim.sha256"}  # (the checksum tinyslim verifies when reading it back)
    assert all(k.startswith("transformer.") for k in arrays) and "lm_head.weight" not in arrays  # tied: left out
    ours = model.state_dict()
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        key = f"transformer.h.1.{name}.weight"
        assert np.array_equal(arrays[key], ours[key].T), key  # Conv1D: (in, out)
    assert arrays["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)
    assert arrays["transformer.h.0.mlp.c_fc.weight"].shape == (16, 64)
    assert np.array_equal(arrays["transformer.wte.weight"], ours["transformer.wte.weight"])  # embeddings as they are
    assert not any(k.endswith(".attn.bias") for k in arrays)  # no causal-mask buffers: transformers makes its own


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_export_import_round_trip_is_bit_exact(tmp_path, dtype):
    config = GPTConfig(**{**CFG.to_dict(), "dtype": dtype, "dropout": 0.1})
    model = random_model(config=config)
    back = load_hf_gpt2(save_hf_gpt2(model, tmp_path))
    assert back.config == config
    for (name, a), (name_b, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert name == name_b and a.dtype == b.dtype and np.array_equal(a, b), name
    assert back.lm_head.weight is back.transformer.wte.weight
    assert np.array_equal(logits(model, tokens()), logits(back, tokens()))


def test_import_takes_the_layout_of_real_gpt2_files(tmp_path):
    """openai-community/gpt2's file: GPT2Model keys (no "transformer." prefix), the causal-mask buffers
    ``h.N.attn.bias``, and (in some copies) a tied lm_head.weight; float16 widens exactly."""
    model = random_model()
    save_hf_gpt2(model, tmp_path)
    arrays, _ = read_safetensors(tmp_path / "model.safetensors")
    real = {k[len("transformer."):]: v for k, v in arrays.items()}
    for i in range(CFG.n_layer):
        real[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 12, 12), dtype=np.float32))
    real["lm_head.weight"] = real["wte.weight"]
    real = {k: v.astype(np.float16) for k, v in real.items()}
    from safetensors.numpy import save_file
    save_file(real, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    back = load_hf_gpt2(tmp_path)
    assert back.config.dtype == "float32"
    for name, value in model.state_dict().items():
        assert np.array_equal(back.state_dict()[name], value.astype(np.float16).astype(np.float32)), name


def test_sharded_checkpoints_load_through_their_index(tmp_path):
    model = random_model()
    save_hf_gpt2(model, tmp_path)
    arrays, _ = read_safetensors(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    from safetensors.numpy import save_file
    names = sorted(arrays)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: arrays[k] for k in keys}, str(tmp_path / shard), metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    back = load_hf_gpt2(tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors does not exist"):
        load_hf_gpt2(tmp_path)


def test_bfloat16_checkpoints_widen_exactly(tmp_path, torch):
    model = random_model()
    save_hf_gpt2(model, tmp_path)
    arrays, _ = read_safetensors(tmp_path / "model.safetensors")
    from safetensors.torch import save_file
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in arrays.items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    back = load_hf_gpt2(tmp_path)
    want = torch.from_numpy(model.state_dict()["transformer.h.0.attn.c_attn.weight"]).to(torch.bfloat16).float()
    assert np.array_equal(back.state_dict()["transformer.h.0.attn.c_attn.weight"], want.numpy())


def test_a_config_tinyslim_cannot_represent_names_every_differing_field():
    d = hf_gpt2_config(CFG)
    d.update(activation_function="relu", n_inner=40, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
             scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(CheckpointError) as err:
        gpt_config_from_hf(d, source="some/config.json")
    message = str(err.value)
    assert "some/config.json" in message
    for field in ("activation_function = 'relu'", "n_inner = 40", "layer_norm_epsilon = 1e-06",
                  "tie_word_embeddings = False", "scale_attn_by_inverse_layer_idx = True"):
        assert field in message
    with pytest.raises(CheckpointError, match=r"lacks the GPT-2 fields \['n_layer', 'n_head'\]"):
        gpt_config_from_hf({"vocab_size": 5, "n_positions": 4, "n_embd": 8})
    with pytest.raises(CheckpointError, match="n_embd = 10 must be divisible by n_head = 4"):
        gpt_config_from_hf({**hf_gpt2_config(CFG), "n_embd": 10, "n_head": 4, "n_inner": None})
    # GPT-2's aliases and defaults are understood: a minimal config.json is enough
    assert gpt_config_from_hf({"vocab_size": 23, "max_position_embeddings": 12, "hidden_size": 16,
                               "num_hidden_layers": 2, "num_attention_heads": 2, "resid_pdrop": 0.0}) == CFG


def test_bad_gpt2_directories_are_clear_errors_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match="bias=False"):
        save_hf_gpt2(GPT(GPTConfig(**{**CFG.to_dict(), "bias": False})), tmp_path / "nobias")
    with pytest.raises(ValueError, match="carries adapters"):
        save_hf_gpt2(lora(random_model()), tmp_path / "adapted")
    good = save_hf_gpt2(random_model(), tmp_path / "good")
    arrays, _ = read_safetensors(good / "model.safetensors")
    from safetensors.numpy import save_file

    def variant(name, tensors=None, config=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config or read_json(good / "config.json")))
        if tensors is not None:
            save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    cases = [
        (variant("missing", {k: v for k, v in arrays.items() if "h.1.mlp.c_fc.bias" not in k}),
         r"missing tensors \['transformer.h.1.mlp.c_fc.bias'\]"),
        (variant("extra", {**arrays, "transformer.h.0.attn.q_attn.weight": np.zeros((16, 16), np.float32)}),
         r"unexpected tensors \['transformer.h.0.attn.q_attn.weight'\]"),
        (variant("shape", {**arrays, "transformer.h.0.mlp.c_fc.weight": arrays["transformer.h.0.mlp.c_fc.weight"].T}),
         r"transformer.h.0.mlp.c_fc.weight has shape \(64, 16\) but config.json implies \(16, 64\)"),
        (variant("untied", {**arrays, "lm_head.weight": arrays["transformer.wte.weight"] + 1}), "untied"),
        (variant("no_weights"), "has no model.safetensors"),
        (variant("config", arrays, {**read_json(good / "config.json"), "n_layer": 3}),
         r"missing tensors \['transformer.h.2"),
    ]
    (tmp_path / "no_weights" / "pytorch_model.bin").write_bytes(b"\0")
    for directory, message in cases:
        with pytest.raises(CheckpointError, match=message) as err:
            load_hf_gpt2(directory)
        assert str(directory) in str(err.value)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_hf_gpt2(tmp_path / "no_weights")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf_gpt2(tmp_path / "nowhere")


# ---- GPT-2 layout: what transformers makes of it ---------------------------------------------------

def test_transformers_gives_the_same_logits_as_tinyslim(tmp_path, transformers):
    model = random_model()
    hf = hf_model(transformers, save_hf_gpt2(model, tmp_path))
    assert_close(torch_logits(hf, tokens()), logits(model, tokens()), name="GPT2LMHeadModel logits", **FLOAT32)


def test_a_checkpoint_written_by_transformers_loads_with_the_same_logits(tmp_path, transformers, torch):
    """A GPT2LMHeadModel built from a local GPT2Config and saved with save_pretrained (as a user's own GPT-2
    directory would be), and the base GPT2Model's layout (keys without "transformer.")."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=23, n_positions=12, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's init leaves biases 0 and LayerNorms 1: too kind
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "lm")
    hf.transformer.save_pretrained(tmp_path / "base")
    for directory in (tmp_path / "lm", tmp_path / "base"):
        ours = load_hf_gpt2(directory)
        assert ours.config == CFG
        assert_close(logits(ours, tokens()), torch_logits(hf, tokens()), name=f"logits of {directory.name}", **FLOAT32)


# ---- PEFT adapters ---------------------------------------------------------------------------------

def test_peft_adapter_files_have_peft_names_shapes_and_config(tmp_path):
    model = lora(random_model(), r=3, alpha=5.0)
    save_peft_adapter(model, tmp_path, base_model_name_or_path="base-dir")
    config = read_json(tmp_path / "adapter_config.json")
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "fan_in_fan_out",
                                    "bias", "use_rslora", "lora_dropout", "base_model_name_or_path")} == \
        dict(peft_type="LORA", task_type="CAUSAL_LM", r=3, lora_alpha=5.0, target_modules=TARGETS,
             fan_in_fan_out=True, bias="none", use_rslora=False, lora_dropout=0.0, base_model_name_or_path="base-dir")
    arrays, _ = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert sorted(arrays) == sorted(f"base_model.model.transformer.h.{i}.{m}.lora_{f}.weight"
                                    for i in range(2) for m in TARGETS for f in "AB")
    assert arrays["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (3, 16)  # (r, in)
    assert arrays["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (48, 3)  # (out, r)
    assert arrays["base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"].shape == (64, 3)
    ours = adapter_state_dict(model)
    assert np.array_equal(arrays["base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight"],
                          ours["transformer.h.1.mlp.c_fc.lora_A"])


def test_peft_loads_the_adapter_with_the_same_logits(tmp_path, transformers, peft):
    model = random_model()
    base_dir = save_hf_gpt2(model, tmp_path / "base")
    lora(model, r=3, alpha=5.0)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    peft_model = peft.PeftModel.from_pretrained(hf_model(transformers, base_dir), tmp_path / "adapter",
                                                local_files_only=True).eval()
    ours = logits(model, tokens())
    assert_close(torch_logits(peft_model, tokens()), ours, name="PeftModel logits", **FLOAT32)
    with peft_model.disable_adapter():  # the adapter is not a no-op: a wrong factor would show
        assert np.abs(torch_logits(peft_model, tokens()) - ours).max() > 0.1


def test_rslora_methods_export_their_alpha_and_peft_agrees(tmp_path, transformers, peft):
    base = random_model()
    base_dir = save_hf_gpt2(base, tmp_path / "base")
    method = make_method("lora", r=4, lora_alpha=3.0, use_rslora=True, target_modules=TARGETS, init_lora_weights=False)
    method.attach(base, seed=3)
    save_peft_adapter(method, tmp_path / "adapter")
    config = read_json(tmp_path / "adapter" / "adapter_config.json")
    assert (config["lora_alpha"], config["use_rslora"], config["r"]) == (3.0, True, 4)
    peft_model = peft.PeftModel.from_pretrained(hf_model(transformers, base_dir), tmp_path / "adapter",
                                                local_files_only=True).eval()
    with method.evaluating() as model:
        assert_close(torch_logits(peft_model, tokens()), logits(model, tokens()), name="rsLoRA logits", **FLOAT32)


def test_a_peft_adapter_trained_in_torch_imports_with_the_same_logits(tmp_path, transformers, peft, torch):
    base_dir = save_hf_gpt2(random_model(), tmp_path / "base")
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             lora_dropout=0.0, use_rslora=True, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf_model(transformers, base_dir), config)
    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for step in range(5):  # B starts at 0: a few steps make both factors non-trivial
        x = torch.as_tensor(tokens(seed=10 + step, B=4))
        loss = peft_model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")

    model = load_hf_gpt2(base_dir)
    imported = load_peft_adapter(model, tmp_path / "adapter")
    assert (imported.r, imported.lora_alpha, imported.use_rslora) == (3, 6, True)
    B = adapter_state_dict(model)["transformer.h.1.mlp.c_fc.lora_B"]
    assert np.abs(B).max() > 1e-3  # trained: not the zero init
    assert_close(logits(model, tokens()), torch_logits(peft_model, tokens()), name="imported adapter", **FLOAT32)
    assert [p for p in model.parameters(trainable_only=True)] and all(
        ".lora_" in n for n, _ in model.named_parameters(trainable_only=True))  # only the adapter trains on

    # and back out: tinyslim's export of the imported adapter is the same adapter, bit for bit
    save_peft_adapter(model, tmp_path / "again")
    again, _ = read_safetensors(tmp_path / "again" / "adapter_model.safetensors")
    original, _ = read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(again) == sorted(original)
    assert all(np.array_equal(again[k], original[k]) for k in original)


def test_bad_peft_adapters_are_refused_before_the_model_changes(tmp_path):
    source = lora(random_model(), r=3)
    save_peft_adapter(source, tmp_path / "good")
    arrays, _ = read_safetensors(tmp_path / "good" / "adapter_model.safetensors")
    good_config = read_json(tmp_path / "good" / "adapter_config.json")
    from safetensors.numpy import save_file

    def variant(name, config=None, tensors=None):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**good_config, **(config or {})}))
        save_file(tensors if tensors is not None else arrays, str(d / "adapter_model.safetensors"))
        return d

    key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    cases = [
        (variant("ia3", {"peft_type": "IA3"}), "peft_type 'IA3'"),
        (variant("dora", {"use_dora": True, "bias": "all"}), "use_dora = True"),
        (variant("saved", {"modules_to_save": ["lm_head"]}), "modules_to_save"),
        (variant("rank", {"r": 4}), r"lora_A has shape \(3, 16\), expected \(4, 16\)"),
        (variant("targets", {"target_modules": ["attn.c_attn"]}), r"unexpected \['transformer.h.0.mlp.c_fc.lora_A'"),
        (variant("prefix", tensors={k.replace("base_model.model.", "model."): v for k, v in arrays.items()}),
         "missing"),
        (variant("transposed", tensors={**arrays, key: np.ascontiguousarray(arrays[key].T)}),
         r"lora_B has shape \(3, 48\), expected \(48, 3\)"),
    ]
    for directory, message in cases:
        model = random_model()
        before = model.state_dict()
        with pytest.raises(CheckpointError, match=message):
            load_peft_adapter(model, directory)
        assert list(model.state_dict()) == list(before)  # nothing injected
    with pytest.raises(ValueError, match="no adapters"):
        save_peft_adapter(random_model(), tmp_path / "none")
    with pytest.raises(ValueError, match="is merged"):
        save_peft_adapter(merge(lora(random_model())), tmp_path / "merged")


# ---- merged exports: LoRA, COLA, I-LoRA's slow learner ---------------------------------------------

def trained(name: str, tasks: int, steps: int = 4, **overrides):
    method = make_method(name, target_modules=TARGETS, **overrides)
    method.attach(random_model(), seed=5)
    rng = np.random.default_rng(7)
    batches = [[random_batch(rng, CFG, 3, 8) for _ in range(steps)] for _ in range(tasks)]
    run_tasks(method, batches, lr=2e-2)
    return method


@pytest.mark.parametrize("name, overrides, tasks", [
    ("lora", {}, 1),
    ("cola", {"chain_len": 2, "r": 2}, 1),  # a knot is tied at step 2 of 4: the base has moved
    ("ilora", {"r": 2, "buffer_size": 8}, 2),  # the slow learner (the one reported) is exported
])
def test_merged_exports_are_plain_gpt2_with_the_methods_logits(tmp_path, transformers, name, overrides, tasks):
    method = trained(name, tasks, **overrides)
    with method.evaluating() as model:
        want = logits(model, tokens())
        state_before = {k: v.copy() for k, v in model.state_dict().items()}
    save_merged(method, tmp_path)
    with method.evaluating() as model:  # the method is untouched
        assert all(np.array_equal(v, state_before[k]) for k, v in model.state_dict().items())
    assert_close(torch_logits(hf_model(transformers, tmp_path), tokens()), want, name=f"merged {name}", **FLOAT32)
    assert_close(logits(load_hf_gpt2(tmp_path), tokens()), want, name=f"re-imported {name}", **FLOAT32)
    if name == "cola":
        assert method.history, "the test should tie a knot"
        with pytest.raises(ValueError, match="tied 1 knot"):
            save_peft_adapter(method, tmp_path / "adapter")
    if name == "ilora":  # slow and fast differ after two tasks, and the default is the slow one
        with method.evaluating("fast") as model:
            fast = logits(model, tokens())
        assert np.abs(fast - want).max() > 1e-3
        assert_close(logits(merged_model(method, "fast"), tokens()), fast, name="fast learner", **FLOAT32)


def test_a_merge_into_the_tied_lm_head_is_refused(tmp_path):
    model = lora(random_model(), targets=["lm_head"])
    with pytest.raises(RuntimeError, match="tied to another parameter"):
        save_merged(model, tmp_path)
    with pytest.raises(RuntimeError, match="tied to another parameter"):
        merge(model)


# ---- the command line ------------------------------------------------------------------------------

def cli(*args):
    return subprocess.run([sys.executable, "-m", "tinyslim", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_export_then_import_with_a_peft_adapter_merged_in(tmp_path):
    from tinyslim.io import save_model
    model = random_model()
    save_model(model, tmp_path / "m.safetensors")
    out = cli("export", "--checkpoint", tmp_path / "m.safetensors", "--out", tmp_path / "hf")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
    lora(model)
    save_peft_adapter(model, tmp_path / "adapter")
    out = cli("import", tmp_path / "hf", "--peft-adapter", tmp_path / "adapter",
              "--out", tmp_path / "merged.safetensors")
    assert out.returncode == 0, out.stderr
    assert "with the adapter merged in" in out.stdout
    from tinyslim.io import load_model
    merged, meta = load_model(tmp_path / "merged.safetensors")
    assert meta["imported_from"] == str(tmp_path / "hf")
    assert_close(logits(merged, tokens()), logits(model, tokens()), name="merged import", **FLOAT32)
    out = cli("import", tmp_path / "adapter", "--out", tmp_path / "x.safetensors")  # not a GPT-2 directory
    assert out.returncode == 2 and "config.json" in out.stderr and "does not exist" in out.stderr
