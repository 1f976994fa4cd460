"""The GPT-2 architecture in one file, with a preallocated KV cache.

Attention has separate q_proj/k_proj/v_proj/out_proj linears (GPT-2's fused c_attn is split on
import, see hub.py) so that LoRA targets read exactly as in PEFT tutorials.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilora.config import GPTConfig
from minilora.errors import MiniloraError
from minilora.hub import read_checkpoint, write_checkpoint
from minilora.ops import Linear, LinearCrossEntropy


class KVCache(nn.Module):
    """Preallocated keys/values for one layer, written in place (no torch.cat growth).

    Two kinds, chosen in GPT.setup_kv_cache:
    "static"  attention sees the slots up to the last one written (generate(): less work per step)
    "rows"    attention always sees all max_len slots, so its shapes never depend on the other rows
              (the serving engine: a request's greedy output is the same alone or batched)
    """

    def __init__(self, batch_size, n_head, max_len, head_dim, dtype, device, kind="static"):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.kind = kind
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos, k, v, rows=None):
        """Store k, v (B, nh, T, hs) and return the keys/values attention sees (B, nh, S, hs).

        cache_pos is an int (all rows write slots [cache_pos, cache_pos+T)) or a (B,) tensor of
        per-row start slots (rows at different lengths, as in continuous batching). `rows`
        picks which cache rows the batch uses (default: the first B).
        """
        B, _, T, _ = k.shape
        if isinstance(cache_pos, int) and rows is None and self.kind == "static":
            end = cache_pos + T
            self.k[:B, :, cache_pos:end] = k
            self.v[:B, :, cache_pos:end] = v
            return self.k[:B, :, :end], self.v[:B, :, :end]  # views: (B, nh, end, hs)
        full = rows is None and B == self.k.size(0)
        rows = torch.arange(B, device=k.device) if rows is None else rows
        starts = torch.as_tensor(cache_pos, device=k.device).expand(B)
        slots = starts[:, None] + torch.arange(T, device=k.device)  # (B, T)
        # advanced indices around a slice put their dims first: target is (B, T, nh, hs)
        self.k[rows[:, None], :, slots] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows[:, None], :, slots] = v.transpose(1, 2).to(self.v.dtype)
        if self.kind == "rows":
            return (self.k, self.v) if full else (self.k[rows], self.v[rows])  # (B, nh, max_len, hs)
        end = int(slots.max()) + 1
        return self.k[rows, :, :end], self.v[rows, :, :end]  # (B, nh, end, hs)

    def keep_rows(self, keep, length):
        """Move rows `keep` ((n,) indices) to the front, first `length` slots: a batch that shrank."""
        n = len(keep)
        self.k[:n, :, :length] = self.k[keep, :, :length]  # (n, nh, length, hs); the gather copies first
        self.v[:n, :, :length] = self.v[keep, :, :length]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.q_proj = Linear(C, C, bias=config.bias)
        self.k_proj = Linear(C, C, bias=config.bias)
        self.v_proj = Linear(C, C, bias=config.bias)
        self.out_proj = Linear(C, C, bias=config.bias)
        self.kv_cache = None  # a KVCache while generating, see GPT.setup_kv_cache

    def forward(self, x, attn_mask=None, cache_pos=None, cache_rows=None):
        B, T, C = x.shape
        hs = C // self.n_head
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v, cache_rows)  # (B, nh, S, hs)
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:
            # Without a cache, or with one token per row and no padding, plain causal attention is right.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc_in = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.fc_out = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.fc_out(self.gelu(self.fc_in(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, cache_pos=None, cache_rows=None):
        x = x + self.resid_dropout(self.attn(self.ln_1(x), attn_mask, cache_pos, cache_rows))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2: counted once
        if self.lm_head.weight.is_meta:
            return  # shapes only (parameter arithmetic, or load_state_dict(assign=True) next)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): two per block add to the stream.
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self):
        """All parameters, tied ones counted once (parameters() already deduplicates)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, *, loss_only=False, all_logits=False, pos=None, attn_mask=None,
                cache_pos=None, cache_rows=None):
        """idx (B, T) token ids -> (logits, loss).

        Training: targets (B, T) are next-token ids, -100 where no loss is wanted, and logits are
        (B, T, V); loss_only=True returns (None, loss) without ever materialising those logits
        (ops.LinearCrossEntropy: faster and far smaller; a keyword of forward, not a method of
        its own, so DDP and torch.compile, which wrap forward, see the training step).
        Inference: without targets only the last position's logits are computed, (B, 1, V),
        unless all_logits=True. pos: (B, T) position ids for left-padded rows (default cache_pos
        + 0..T-1); attn_mask: (B, 1, T, S) bool, True where a query may see a key;
        cache_pos / cache_rows: where these tokens go in the KV cache (KVCache.update).
        """
        x = self._hidden(idx, pos, attn_mask, cache_pos, cache_rows)
        if targets is not None and loss_only and not hasattr(self.lm_head, "base_layer"):
            return None, LinearCrossEntropy.apply(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1))
        if targets is not None:  # also a LoRA-wrapped head: the chunked loss only knows a plain weight
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
            return (None if loss_only else logits), loss
        if not all_logits:
            x = x[:, [-1], :]  # (B, 1, C): sampling needs only the last position
        return self.lm_head(x), None

    def _hidden(self, idx, pos=None, attn_mask=None, cache_pos=None, cache_rows=None):
        """The final hidden states (B, T, C), after ln_f."""
        B, T = idx.shape
        if pos is None:
            start = 0 if cache_pos is None else torch.as_tensor(cache_pos, device=idx.device).view(-1, 1)
            pos = start + torch.arange(T, device=idx.device).view(1, T)  # (B or 1, T)
        if T > 0 and int(pos.max()) >= self.config.block_size:
            raise MiniloraError(
                f"sequence of {int(pos.max()) + 1} tokens exceeds the model's context "
                f"(block_size={self.config.block_size}); shorten the input or max_new_tokens")
        if cache_pos is not None:
            if self.kv_cache_kind is None:
                raise MiniloraError("cache_pos given but no KV cache is set up; call model.setup_kv_cache(...) first")
            if attn_mask is None and not (isinstance(cache_pos, int) and cache_rows is None and (cache_pos == 0 or T == 1)):
                raise MiniloraError("attn_mask is required for chunked or per-row KV-cache writes")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask, cache_pos, cache_rows)
        return self.transformer.ln_f(x)

    # ---- KV cache: created and released only here ---------------------------------------------

    @property
    def kv_cache_kind(self):
        """None, or the kind of the KV cache set up now ("static" or "rows")."""
        cache = self.transformer.h[0].attn.kv_cache
        return None if cache is None else cache.kind

    def setup_kv_cache(self, batch_size, max_len, *, dtype=None, device=None, kind="static"):
        """Allocate a cache for `batch_size` rows of up to `max_len` tokens (see KVCache for `kind`).

        One cache at a time: a model whose cache is in use (by a serving engine, or another
        generation) refuses a second one rather than silently replacing the first.
        """
        if kind not in ("static", "rows"):
            raise MiniloraError(f"KV cache kind must be 'static' or 'rows', got {kind!r}")
        if self.kv_cache_kind is not None:
            raise MiniloraError(f"this model's KV cache is in use ({self.kv_cache_kind!r} kind: a serving engine or "
                                "another generation owns it); generate through that owner, or on a copy of the model")
        if max_len > self.config.block_size:
            raise MiniloraError(
                f"KV cache of {max_len} tokens exceeds the model's context (block_size={self.config.block_size})")
        ref = self.lm_head.weight
        dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.float32)
        hs = self.config.n_embd // self.config.n_head
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_head, max_len, hs, dtype, device or ref.device, kind)

    def keep_kv_rows(self, keep, length):
        """The batch shrank to rows `keep` ((n,) tensor): move their cache rows to the front, once."""
        for block in self.transformer.h:
            block.attn.kv_cache.keep_rows(keep, length)

    def clear_kv_cache(self):
        for block in self.transformer.h:
            block.attn.kv_cache = None

    # ---- HF-format checkpoints (the file format is hub.py's) -------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir, *, dtype=None, device=None, dropout=None):
        """An HF-format GPT-2 directory, or a hub name downloaded once, as a GPT in eval mode."""
        config, state_dict = read_checkpoint(name_or_dir, dtype=dtype, device=device, dropout=dropout)
        with torch.device("meta"):  # shapes only: no time spent on a random init we would overwrite
            model = cls(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        # assign=True gives each module its own new Parameter, so wte and lm_head are two again: re-tie.
        model.transformer.wte.weight = model.lm_head.weight
        return model.eval()

    def save_pretrained(self, save_dir):
        """Write config.json + model.safetensors in the HF GPT-2 layout, replacing save_dir in one rename."""
        lora = next((name for name, m in self.named_modules() if hasattr(m, "base_layer")), None)
        if lora is not None:
            raise MiniloraError(f"model still has LoRA layers ({lora}); call merge_and_unload(model) "
                                "first, or save the adapter alone with save_adapter")
        write_checkpoint(self.config, self.state_dict(), save_dir)
