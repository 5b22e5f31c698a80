"""tinyslim's methods as PyTorch modules on Hugging Face models (an optional part: ``pip install -e '.[torch]'``).

The NumPy package (``tinyslim.adapters``) is where each method is explained and tested from first
principles; this package runs the same methods, with the same config dataclasses and field names,
on any ``transformers`` causal LM, so that a reader can take a method from the toy world to a real
model and a GPU:

    from transformers import GPT2Config, GPT2LMHeadModel
    from tinyslim.torch import CausalLM, make_method

    lm = CausalLM(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4)))
    method = make_method("slim", target_modules=["attn.c_attn"])   # the NumPy method's config fields
    method.attach(lm, seed=0)                                      # inject, freeze, adapters trainable
    loss = method.loss(x, y, mask)                                 # x, y (B, T) int, mask (B, T) 0/1
    loss.backward()

The adapted layers wrap ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored (in, out)); they draw
their random numbers from the same named NumPy streams as the NumPy layers, so one seed gives the
same initial adapter on both engines (tests/test_torch_*.py compare forward, gradients and steps).

Importing ``tinyslim`` never imports torch; importing ``tinyslim.torch`` needs it.
"""
from __future__ import annotations

import os

# torch starts its OpenMP runtime when it is imported, and tinyslim's C kernels then run on it too.
# Its threads spin at barriers by default; two thread pools spinning on a shared machine cost whole
# scheduler ticks (bench train-step --part torch-path, 2 threads: the NumPy SLIM step 110 ms spinning,
# 28 ms passive). Passive waiting, as tinyslim.kernels.cpu chooses, unless the caller set a policy;
# it takes effect only when torch is first imported here.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

try:
    import torch as _torch  # noqa: F401  (the real PyTorch: absolute imports never see this package)
except ImportError as err:  # pragma: no cover - exercised only without torch installed
    raise ImportError("tinyslim.torch needs PyTorch, which is not installed; install the extra with "
                      "pip install -e '.[torch]' (or pip install torch)") from err

from .layers import AdaptedLinear, base_weight, is_conv1d
from .lm import CausalLM, from_gpt
from .method import TorchMethod
from .registry import METHODS, make_method
from .verbs import (adapted_layers, adapter_state_dict, disable_adapters, enable_adapters, inject,
                    load_adapter_state_dict, mark_only_adapters_trainable, merge, merge_and_unload,
                    print_trainable_parameters, unmerge)

__all__ = ["AdaptedLinear", "base_weight", "is_conv1d", "CausalLM", "from_gpt", "TorchMethod", "METHODS",
           "make_method", "adapted_layers", "adapter_state_dict", "load_adapter_state_dict", "inject",
           "mark_only_adapters_trainable", "merge", "unmerge", "merge_and_unload", "disable_adapters",
           "enable_adapters", "print_trainable_parameters"]
