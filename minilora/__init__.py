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
from minilora.generation import generate, stream_generate
from minilora.tokenizer import get_tokenizer
from minilora.peft_api import PeftModel, SFTTrainer, TrainingArguments, generate_ids, get_peft_model

__all__ = ["BASE_ADAPTER", "GPT", "GPTConfig", "LoRALinear", "LoraConfig", "MiniloraError", "PeftModel",
           "SFTTrainer", "TrainingArguments", "adapter_rows", "add_weighted_adapter", "apply_lora",
           "count_parameters", "delete_adapter", "disable_adapter", "generate", "generate_ids", "get_peft_model",
           "get_tokenizer", "load_adapter", "lora_layers", "merge", "merge_and_unload",
           "print_trainable_parameters", "read_adapter", "row_adapters", "save_adapter", "set_adapter",
           "stream_generate", "unmerge"]
