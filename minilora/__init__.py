"""minilora: LoRA from scratch in pure PyTorch."""

from minilora.config import GPTConfig
from minilora.errors import MiniloraError
from minilora.lora import LoraConfig
from minilora.model import GPT

__all__ = ["GPT", "GPTConfig", "LoraConfig", "MiniloraError"]
