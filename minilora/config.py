"""GPTConfig: the shape of a model, with published shapes (GPT-2, GPT-3, OPT, Llama family) as presets.

One decoder, three families of options (model.py reads them):

    gpt2                      learned positions, LayerNorm, GELU MLP fc_in/fc_out, tied head
    opt                       learned positions offset by 2, LayerNorm before or after (pre_norm),
                              ReLU MLP fc1/fc2, optional narrower embeddings (word_embed_proj_dim)
    llama, mistral, qwen2     rotary positions, RMSNorm, SwiGLU MLP gate_proj/up_proj/down_proj,
                              grouped-query attention (n_kv_head), no biases but Qwen2's q/k/v ones

`model_type` is the HF config.json name, so a checkpoint is written back in its own layout.
"""

import dataclasses
from dataclasses import dataclass

from minilora.errors import MiniloraError

MODEL_TYPES = ("gpt2", "opt", "llama", "mistral", "qwen2")
LLAMA_FAMILY = ("llama", "mistral", "qwen2")  # the same block; only their config.json files differ
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (max_position_embeddings)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in every Linear and LayerNorm (GPT-2, OPT); the Llama family has none
    layer_norm_epsilon: float = 1e-5  # LayerNorm's or RMSNorm's eps
    tokenizer: str = "gpt2"  # travels with every checkpoint so loading never guesses
    model_type: str = "gpt2"  # one of MODEL_TYPES
    n_kv_head: int | None = None  # grouped-query attention: heads of keys/values (None: n_head)
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # MLP width (None: 4 * n_embd)
    tie_word_embeddings: bool = True  # lm_head shares the token embedding matrix
    rope_theta: float = 10000.0  # rotary base (Llama family)
    rope_scaling: dict | None = None  # Llama 3.x: {"rope_type": "llama3", "factor": 8.0, ...}
    qkv_bias: bool = False  # Qwen2: biases on q/k/v only
    pre_norm: bool = True  # OPT's do_layer_norm_before: opt-350m normalises after each residual add
    word_embed_proj_dim: int | None = None  # OPT: embedding width when it differs from n_embd

    def __post_init__(self):
        for field in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise MiniloraError(f"GPTConfig.{field} must be a positive int, got {getattr(self, field)!r}")
        for field in ("n_kv_head", "head_dim", "intermediate_size", "word_embed_proj_dim"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise MiniloraError(f"GPTConfig.{field} must be a positive int or None, got {value!r}")
        if self.model_type not in MODEL_TYPES:
            raise MiniloraError(f"GPTConfig.model_type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise MiniloraError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise MiniloraError(f"GPTConfig: n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise MiniloraError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        llama_options = self.kv_heads != self.n_head or self.head_size * self.n_head != self.n_embd or self.qkv_bias
        opt_options = not self.pre_norm or self.embed_dim != self.n_embd
        if (llama_options and self.family != "llama") or (opt_options and self.family != "opt"):
            raise MiniloraError(f"GPTConfig: model_type {self.model_type!r} has no such option (n_kv_head, head_dim and "
                                "qkv_bias are Llama-family options; pre_norm and word_embed_proj_dim OPT ones)")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)

    @property
    def family(self):
        """"gpt2", "opt" or "llama" (Llama, Mistral and Qwen2 share one block)."""
        return "llama" if self.model_type in LLAMA_FAMILY else self.model_type

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def head_size(self):
        return self.head_dim or self.n_embd // self.n_head

    @property
    def mlp_width(self):
        return self.intermediate_size or 4 * self.n_embd

    @property
    def embed_dim(self):
        return self.word_embed_proj_dim or self.n_embd

    @classmethod
    def from_name(cls, name, **overrides):
        """A named preset, e.g. GPTConfig.from_name("gpt2") or ("tiny", vocab_size=257)."""
        if name not in PRESETS:
            raise MiniloraError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self):
        return dataclasses.asdict(self)


def check_rope_scaling(scaling, name="rope_scaling"):
    """Only Llama 3.x's frequency-dependent scaling is implemented; anything else would silently differ.

    `name`: the config.json field it came from (transformers 5 writes "rope_parameters")."""
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    if kind == "default":
        return
    if kind != "llama3":
        raise MiniloraError(f"{name} {scaling!r:.80} is not supported; minilora implements rope_type 'llama3' only")
    bad = [k for k in ROPE_SCALING_KEYS if isinstance(scaling.get(k), bool) or not isinstance(scaling.get(k), (int, float))
           or scaling[k] <= 0]
    if bad or scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        raise MiniloraError(f"{name} of type llama3 needs positive numbers {', '.join(ROPE_SCALING_KEYS)} "
                            f"with low_freq_factor < high_freq_factor, got {scaling!r:.120}")


# The hub checkpoint whose shape each published preset copies (its weights: --init_from the hub name).
HUB_NAMES = {"opt-125m": "facebook/opt-125m", "opt-350m": "facebook/opt-350m", "llama2-7b": "meta-llama/Llama-2-7b-hf",
             "llama3-8b": "meta-llama/Meta-Llama-3-8B", "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.2",
             "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
             "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"}

_LLAMA = dict(model_type="llama", bias=False, tie_word_embeddings=False)
PRESETS = {
    # The published GPT-2 shapes (Radford et al. 2019): context 1024, BPE vocabulary 50257.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # GPT-3 175B's shape (Brown et al. 2020, Table 2.1), for parameter arithmetic on the meta device.
    "gpt3-175b": dict(n_layer=96, n_head=96, n_embd=12288, block_size=2048),
    # The published configs of the guide's models and today's open ones (their config.json on the hub).
    # Presets whose vocabulary is smaller than GPT-2's train from scratch with the byte tokenizer.
    "opt-125m": dict(model_type="opt", n_layer=12, n_head=12, n_embd=768, intermediate_size=3072,
                     vocab_size=50272, block_size=2048),
    "opt-350m": dict(model_type="opt", n_layer=24, n_head=16, n_embd=1024, intermediate_size=4096,
                     vocab_size=50272, block_size=2048, pre_norm=False, word_embed_proj_dim=512),
    "llama2-7b": dict(**_LLAMA, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, vocab_size=32000,
                      block_size=4096, tokenizer="byte"),
    "llama3-8b": dict(**_LLAMA, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
                      vocab_size=128256, block_size=8192, rope_theta=500000.0),
    "mistral-7b": dict(_LLAMA, model_type="mistral", n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                       intermediate_size=14336, vocab_size=32000, block_size=32768, rope_theta=1e6, tokenizer="byte"),
    "qwen2.5-0.5b": dict(_LLAMA, model_type="qwen2", n_layer=24, n_head=14, n_kv_head=2, n_embd=896,
                         intermediate_size=4864, vocab_size=151936, block_size=32768, rope_theta=1e6,
                         layer_norm_epsilon=1e-6, qkv_bias=True, tie_word_embeddings=True),
    "smollm2-135m": dict(_LLAMA, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                         vocab_size=49152, block_size=8192, rope_theta=100000.0, tie_word_embeddings=True,
                         tokenizer="byte"),
    # LLaMA 65B (Touvron et al. 2023, Table 2): the QLoRA paper's headline model, for memory arithmetic.
    "llama-65b": dict(**_LLAMA, n_layer=80, n_head=64, n_embd=8192, intermediate_size=22016, vocab_size=32000,
                      block_size=2048, tokenizer="byte"),
    "tinyllama-1.1b": dict(**_LLAMA, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048, intermediate_size=5632,
                           vocab_size=32000, block_size=2048, tokenizer="byte"),
    # Tiny CPU sizes for tests and demos; byte-level vocabulary so they train from scratch.
    "tiny": dict(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=257, tokenizer="byte"),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=257, tokenizer="byte"),
    # The same, Llama-shaped: RoPE, RMSNorm, SwiGLU (width ~8/3 C, as Llama), 2 KV heads for 4 query heads.
    "tiny-llama": dict(**_LLAMA, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=88, block_size=64,
                       vocab_size=257, tokenizer="byte"),
    "small-llama": dict(**_LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=344,
                        block_size=256, vocab_size=257, tokenizer="byte"),
}
