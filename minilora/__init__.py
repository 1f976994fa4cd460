"""minilora: LoRA from scratch in pure PyTorch.

The package's face: every public name is importable from here, whichever module holds it
(the README's Layout section says which one does).
"""

import importlib

from minilora.chat import ChatTemplate, chat_tokens, load_chat_template
from minilora.config import GPTConfig
from minilora.errors import MiniloraError
from minilora.model import GPT
from minilora.quantize import QuantizedLinear, dequantize_model  # quantize() itself: minilora.quantize.quantize
from minilora.lora import (BASE_ADAPTER, LoraConfig, LoRALinear, apply_lora, count_parameters, lora_layers, merge,
                           merge_and_unload, print_trainable_parameters, unmerge)
from minilora.adapters import (adapter_rows, add_weighted_adapter, delete_adapter, disable_adapter, row_adapters,
                               set_adapter)
from minilora.adapter_files import load_adapter, read_adapter, save_adapter
from minilora.analysis import amplification_factor, spectrum, subspace_similarity
from minilora.convert import convert_adapter
from minilora.generation import generate, stream_generate
from minilora.chat_session import ChatSession
from minilora.tokenizer import get_tokenizer

__all__ = ["BASE_ADAPTER", "ChatSession", "ChatTemplate", "GPT", "GPTConfig", "LoRALinear", "LoraConfig",
           "MiniloraError", "PeftModel", "QuantizedLinear", "SFTTrainer", "TrainingArguments", "adapter_rows",
           "add_weighted_adapter", "amplification_factor", "apply_lora", "chat_tokens", "convert_adapter",
           "count_parameters", "delete_adapter", "dequantize_model", "disable_adapter", "generate", "generate_ids",
           "get_peft_model", "get_tokenizer", "load_adapter", "load_chat_template", "lora_layers", "merge",
           "merge_and_unload", "print_trainable_parameters", "read_adapter", "row_adapters", "save_adapter",
           "set_adapter", "spectrum", "stream_generate", "subspace_similarity", "unmerge"]

# PEFT/TRL's names (minilora.peft_api) bring the whole training stack (trainer, data, params); loaded on first
# use so `import minilora` stays light and `python -m minilora.params` is not imported twice (runpy warns).
_PEFT_API = ("PeftModel", "SFTTrainer", "TrainingArguments", "generate_ids", "get_peft_model")


def __getattr__(name):
    if name in _PEFT_API:
        return getattr(importlib.import_module("minilora.peft_api"), name)
    raise AttributeError(f"module 'minilora' has no attribute {name!r}")
