"""What every adapter method shares, gathered from the files that hold each part: the RNG streams
(streams.py), the adapted-linear layer and the PEFT-style verbs (verbs.py), and the ``Method``
contract of the experiment runner (method.py)."""
from .method import Method
from .streams import Streams, stream
from .verbs import (AdaptedLinear, AdapterSwitch, adapted_layers, adapter_state_dict, disable_adapters,
                    enable_adapters, inject, linear_names, load_adapter_state_dict, mark_only_adapters_trainable,
                    matches_target, merge, merge_and_unload, print_trainable_parameters, refuse_tied_merge,
                    token_context, trainable_parameter_counts, unmerge)

__all__ = ["stream", "Streams", "AdaptedLinear", "adapted_layers", "inject", "mark_only_adapters_trainable",
           "adapter_state_dict", "load_adapter_state_dict", "merge", "unmerge", "merge_and_unload",
           "disable_adapters", "enable_adapters", "trainable_parameter_counts", "print_trainable_parameters",
           "Method", "token_context", "AdapterSwitch", "linear_names", "matches_target", "refuse_tied_merge"]
