"""tinyslim.torch's LoRA through PEFT, both ways (tinyslim/torch/peft.py), on GPT-2 (Conv1D) and Llama
(nn.Linear) built from configs, in float64:

* export: a tinyslim.torch LoRA (a Method, or a bare model) written as adapter_config.json +
  adapter_model.safetensors loads with ``PeftModel.from_pretrained(base, dir, local_files_only=True)``
  and gives the tinyslim.torch model's logits to 1e-12 of their scale (both compute W0 x + s·B(A x) in
  float64, in other orders); the files equal the NumPy path's export of the same adapter.
* import: an adapter PEFT initialises at random (B too) and saves loads into a plain tinyslim.torch
  model with PEFT's logits, and exports again bit for bit.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import tinyslim.torch as tt  # noqa: E402
from test_adapters_base import random_gpt  # noqa: E402
from tinyslim import adapters, hf  # noqa: E402
from tinyslim.io import read_json, read_safetensors  # noqa: E402
from tinyslim.nn import GPTConfig  # noqa: E402
from tinyslim.torch.peft import load_peft_adapter, save_peft_adapter  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# peft calls a transformers method that transformers 5 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
transformers.logging.set_verbosity_error()

CFG = GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=16, dtype="float64")
TARGETS = ["attn.c_attn", "mlp.c_fc"]  # 16 → 48 and 16 → 64: non-square
RTOL = 1e-12  # of the logits' scale: two float64 summation orders


def tokens(V: int, seed: int = 0, B: int = 3, T: int = 10) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).integers(0, V, (B, T)))


def hf_logits(module, x) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        out = module(input_ids=x) if not isinstance(module, tt.CausalLM) else None
        return (module(x)[0] if out is None else out.logits).numpy()


def assert_logits_equal(ours, ref, what):
    scale = np.abs(ref).max()
    diff = np.abs(ours - ref).max()
    assert diff <= RTOL * scale, f"{what}: max |ours − peft| = {diff:.2e} > {RTOL:g} · {scale:.2f}"


def gpt2_base():
    """A plain float64 GPT2LMHeadModel (from_gpt of a random tinyslim GPT) and the GPT."""
    gpt = random_gpt(CFG, 3)
    return tt.from_gpt(gpt), gpt


def llama_base():
    config = transformers.LlamaConfig(vocab_size=29, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return tt.CausalLM(transformers.LlamaForCausalLM(config).to(torch.float64))


def peft_model(base_hf, directory):
    return peft.PeftModel.from_pretrained(base_hf, directory, local_files_only=True).eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_a_gpt2_lora_method_exports_to_peft_with_the_same_logits_and_the_numpy_files(tmp_path, rslora):
    lm, gpt = gpt2_base()
    base_hf = copy.deepcopy(lm.hf_model)
    over = dict(r=3, lora_alpha=5.0, use_rslora=rslora, target_modules=TARGETS, init_lora_weights=False)
    method = tt.make_method("lora", **over)
    method.attach(lm, seed=2)
    save_peft_adapter(method, tmp_path / "torch")
    config = read_json(tmp_path / "torch" / "adapter_config.json")
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["fan_in_fan_out"]) == (3, 5.0, rslora, True)
    assert config["target_modules"] == sorted(TARGETS)

    x = tokens(CFG.vocab_size)
    with method.evaluating() as model:
        ours = hf_logits(model, x)
    loaded = peft_model(base_hf, tmp_path / "torch")
    assert_logits_equal(ours, hf_logits(loaded, x), "PeftModel of the exported adapter")
    with loaded.disable_adapter():  # the adapter is not a no-op: a wrong factor would show
        assert np.abs(hf_logits(loaded, x) - ours).max() > 0.1

    twin = adapters.make_method("lora", **over)  # the NumPy path writes the same files
    twin.attach(gpt, seed=2)
    hf.save_peft_adapter(twin, tmp_path / "numpy")
    assert read_json(tmp_path / "numpy" / "adapter_config.json") == config
    ours_t, _ = read_safetensors(tmp_path / "torch" / "adapter_model.safetensors")
    numpy_t, _ = read_safetensors(tmp_path / "numpy" / "adapter_model.safetensors")
    assert sorted(ours_t) == sorted(numpy_t)
    for key, value in numpy_t.items():
        np.testing.assert_array_equal(ours_t[key], value, err_msg=key)


def test_a_bare_llama_model_with_lora_exports_to_peft_with_the_same_logits(tmp_path):
    lm = llama_base()
    base_hf = copy.deepcopy(lm.hf_model)
    tt.inject(lm, lambda layer, streams: tt.lora.LoraLinear(layer, 2, 1.5, 0.0, streams, init_lora_weights=False),
              ["q_proj", "v_proj", "down_proj"], seed=0)
    save_peft_adapter(lm, tmp_path / "adapter")
    config = read_json(tmp_path / "adapter" / "adapter_config.json")
    assert config["fan_in_fan_out"] is False and config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"]) == (2, 3.0)  # s·r: PEFT's α/r is the layers' s
    x = tokens(29)
    ours = hf_logits(lm, x)
    assert_logits_equal(ours, hf_logits(peft_model(base_hf, tmp_path / "adapter"), x), "PeftModel (Llama)")


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_an_adapter_peft_made_imports_with_peft_logits_and_exports_again_bit_for_bit(tmp_path, which):
    if which == "gpt2":
        lm, V = gpt2_base()[0], CFG.vocab_size
        targets, fan_in_fan_out = ["c_attn", "c_fc"], True
    else:
        lm, V = llama_base(), 29
        targets, fan_in_fan_out = ["q_proj", "up_proj"], False
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                             lora_dropout=0.0, use_rslora=True, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    made = peft.get_peft_model(copy.deepcopy(lm.hf_model), config).eval()  # A and B random
    made.save_pretrained(tmp_path / "adapter")
    x = tokens(V)
    theirs = hf_logits(made, x)

    imported = load_peft_adapter(lm, tmp_path / "adapter")
    assert (imported.r, imported.lora_alpha, imported.use_rslora) == (3, 6, True)
    assert_logits_equal(hf_logits(lm, x), theirs, f"imported PEFT adapter ({which})")
    trainable = [n for n, p in lm.hf_model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[1] in ("lora_A", "lora_B") for n in trainable)

    save_peft_adapter(lm, tmp_path / "again")
    again, _ = read_safetensors(tmp_path / "again" / "adapter_model.safetensors")
    original, _ = read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(again) == sorted(original)
    assert all(np.array_equal(again[k], original[k]) for k in original)


def test_bad_exports_and_imports_are_refused_with_the_reason(tmp_path):
    lm, gpt = gpt2_base()
    with pytest.raises(ValueError, match="carries no adapters"):
        save_peft_adapter(lm, tmp_path / "none")
    with pytest.raises(TypeError, match="a NumPy GPT exports with tinyslim.hf.save_peft_adapter"):
        save_peft_adapter(gpt, tmp_path / "numpy")
    cola = tt.make_method("cola", chain_len=2, knots=[1], lr=1e-2)
    cola.attach(lm, seed=0)
    cola.history.append((0, 1, 0))  # as if a knot had been tied
    with pytest.raises(ValueError, match="tied 1 knot"):
        save_peft_adapter(cola, tmp_path / "cola")
    cola.history.clear()
    tt.merge(lm)
    with pytest.raises(ValueError, match="is merged"):
        save_peft_adapter(lm, tmp_path / "merged")
    tt.unmerge(lm)
    save_peft_adapter(lm, tmp_path / "good")
    llama = llama_base()
    with pytest.raises(hf.CheckpointError, match="does not fit target_modules"):  # GPT-2 names on a Llama
        load_peft_adapter(llama, tmp_path / "good")
    assert not tt.adapted_layers(llama)  # refused before anything was injected
