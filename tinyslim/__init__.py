"""tinyslim: LoRA-family fine-tuning and catastrophic forgetting, from first principles in NumPy.

Layers (bottom to top): autograd → functional (ops) → kernels (low-rank mixture backends) →
nn (modules, the tiny GPT) → optim → data → train / io / cli. Importing tinyslim is cheap: the
compiled extension and torch are never imported here.

``load_base()`` returns the pretrained tiny base model every experiment and tutorial starts from.
"""
from .autograd import Function, Tensor, no_grad
from .nn import GPT, GPTConfig
from .pretrained import load_base

__version__ = "0.1.0"
__all__ = ["Tensor", "Function", "no_grad", "GPT", "GPTConfig", "load_base", "__version__"]
