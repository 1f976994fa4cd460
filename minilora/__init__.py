"""minilora: LoRA from scratch in pure PyTorch.

The package's face: every public name is importable from here, whichever module holds it
(the README's Layout section says which one does).
"""

from minilora.config import GPTConfig
from minilora.errors import MiniloraError
from minilora.model import GPT
from minilora.lora import (BASE_ADAPTER, LoraConfig, LoRALinear, apply_lora, count_parameters, lora_layers, merge,
                           merge_and_unload, print_trainable_parameters, unmerge)
from minilora.adapters import (adapter_rows, add_weighted_adapter, delete_adapter, disable_adapter, row_adapters,
                               set_adapter)
from minilora.adapter_files import load_adapter, read_adapter, save_adapter
from minilora.analysis import amplification_factor, spectrum, subspace_similarity
from minilora.generation import generate, stream_generate
from minilora.tokenizer import get_tokenizer

__all__ = ["BASE_ADAPTER", "GPT", "GPTConfig", "LoRALinear", "LoraConfig", "MiniloraError", "adapter_rows",
           "add_weighted_adapter", "amplification_factor", "apply_lora", "count_parameters", "delete_adapter", "disable_adapter", "generate",
           "get_tokenizer", "load_adapter", "lora_layers", "merge", "merge_and_unload", "print_trainable_parameters",
           "read_adapter", "row_adapters", "save_adapter", "set_adapter", "spectrum", "stream_generate", "subspace_similarity", "unmerge"]
