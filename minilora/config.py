"""GPTConfig: the shape of a model, with the published GPT-2/GPT-3 shapes as named presets."""

import dataclasses
from dataclasses import dataclass

from minilora.errors import MiniloraError


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (learned position embeddings)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2 has
    layer_norm_epsilon: float = 1e-5
    tokenizer: str = "gpt2"  # travels with every checkpoint so loading never guesses

    def __post_init__(self):
        for field in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise MiniloraError(f"GPTConfig.{field} must be a positive int, got {getattr(self, field)!r}")
        if self.n_embd % self.n_head:
            raise MiniloraError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise MiniloraError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_name(cls, name, **overrides):
        """A named preset, e.g. GPTConfig.from_name("gpt2") or ("tiny", vocab_size=257)."""
        if name not in PRESETS:
            raise MiniloraError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self):
        return dataclasses.asdict(self)


PRESETS = {
    # The published GPT-2 shapes (Radford et al. 2019): context 1024, BPE vocabulary 50257.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # GPT-3 175B's shape (Brown et al. 2020, Table 2.1), for parameter arithmetic on the meta device.
    "gpt3-175b": dict(n_layer=96, n_head=96, n_embd=12288, block_size=2048),
    # Tiny CPU sizes for tests and demos; byte-level vocabulary so they train from scratch.
    "tiny": dict(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=257, tokenizer="byte"),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=257, tokenizer="byte"),
}
