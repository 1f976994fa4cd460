"""One compact decoder in one file (GPT-2, OPT, Llama/Mistral/Qwen2), with a preallocated KV cache.

The families differ by options read from GPTConfig (see config.py), never by subclasses: the norm
(LayerNorm or RMSNorm, before or after each residual add), the positions (learned or rotary), the
MLP (GELU, ReLU or SwiGLU) and the number of key/value heads. Modules carry the names each family's
PEFT configs use: q_proj/k_proj/v_proj everywhere, out_proj (GPT-2, OPT) or o_proj (Llama), and
fc_in/fc_out (GPT-2), fc1/fc2 (OPT) or gate_proj/up_proj/down_proj (Llama). GPT-2's fused c_attn is
split on import (hub.py) so that LoRA targets read exactly as in PEFT tutorials.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minilora.config import GPTConfig
from minilora.errors import MiniloraError
from minilora.hub import CONFIG_FILE, read_checkpoint, read_config, read_weights, resolve, write_checkpoint
from minilora.ops import Linear, linear_cross_entropy
from minilora.quantize import is_quantized, quantize as quantize_model, quantized_layers


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


def position_offset(config):
    """OPT's learned position table keeps two unused rows in front (a fairseq heritage): position p is row p + 2."""
    return 2 if config.family == "opt" else 0


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), the Llama family's norm: no mean, no bias.

    Computed in fp32 and cast back, as the reference implementation does, so bf16 runs match it.
    """

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def norm(config):
    if config.family == "llama":
        return RMSNorm(config.n_embd, config.layer_norm_epsilon)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)


def rope_frequencies(config, device=None):
    """Rotary inverse frequencies theta^(-2i/d), i < d/2 (Su et al. 2021), with Llama 3.x's scaling."""
    d = config.head_size
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)  # (d/2,)
    s = config.rope_scaling
    if s is None or s.get("rope_type", s.get("type")) == "default":
        return inv_freq
    # Llama 3.x: wavelengths longer than the original context are stretched by `factor`, short ones are
    # kept, and the band between blends the two, so long contexts reuse what short ones learned.
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
    return (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq


def rotate(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) by each position's angles: the half-split layout HF checkpoints use."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, hs = config.n_embd, config.head_size
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, hs
        self.dropout = config.dropout
        self.family = config.family
        qkv_bias = config.bias or config.qkv_bias
        self.q_proj = Linear(C, self.n_head * hs, bias=qkv_bias)
        self.k_proj = Linear(C, self.n_kv_head * hs, bias=qkv_bias)  # grouped-query: fewer key/value heads
        self.v_proj = Linear(C, self.n_kv_head * hs, bias=qkv_bias)
        # The output projection has each family's own name, so PEFT target lists read as written.
        if self.family == "llama":
            self.o_proj = Linear(self.n_head * hs, C, bias=False)
        else:
            self.out_proj = Linear(C, C, bias=config.bias)
        self.kv_cache = None  # a KVCache while generating, see GPT.setup_kv_cache

    def forward(self, x, attn_mask=None, cache_pos=None, cache_rows=None, rope=None):
        B, T, C = x.shape
        hs, nh, nkv = self.head_size, self.n_head, self.n_kv_head
        q = self.q_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            cos, sin = (t.to(q.dtype) for t in rope)  # (B or 1, 1, T, hs)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # keys are cached rotated: positions never change
        if cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v, cache_rows)  # (B, nkv, S, hs)
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        gqa = nkv != nh  # each key/value head serves nh // nkv consecutive query heads
        if attn_mask is None:
            # Without a cache, or with one token per row and no padding, plain causal attention is right.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, nh * hs)
        return self.o_proj(y) if self.family == "llama" else self.out_proj(y)


class MLP(nn.Module):
    """GPT-2: fc_out(gelu(fc_in x)); OPT: fc2(relu(fc1 x)); Llama family (SwiGLU): down(silu(gate x) * up x)."""

    def __init__(self, config):
        super().__init__()
        C, H, bias = config.n_embd, config.mlp_width, config.bias
        self.family = config.family
        if self.family == "llama":
            self.gate_proj = Linear(C, H, bias=False)
            self.up_proj = Linear(C, H, bias=False)
            self.down_proj = Linear(H, C, bias=False)
        elif self.family == "opt":
            self.fc1 = Linear(C, H, bias=bias)
            self.fc2 = Linear(H, C, bias=bias)
        else:
            self.fc_in = Linear(C, H, bias=bias)
            self.fc_out = Linear(H, C, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.family == "llama":
            x = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # Shazeer 2020
        elif self.family == "opt":
            x = self.fc2(F.relu(self.fc1(x)))
        else:
            x = self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))  # GPT-2's "gelu_new"
        return self.dropout(x)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, cache_pos=None, cache_rows=None, rope=None):
        if self.pre_norm:
            x = x + self.resid_dropout(self.attn(self.ln_1(x), attn_mask, cache_pos, cache_rows, rope))
            return x + self.mlp(self.ln_2(x))
        # post-LN (opt-350m, as the original Transformer): normalise after each residual add
        x = self.ln_1(x + self.resid_dropout(self.attn(x, attn_mask, cache_pos, cache_rows, rope)))
        return self.ln_2(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        E = config.embed_dim
        parts = dict(wte=nn.Embedding(config.vocab_size, E))
        if config.family != "llama":  # learned positions (OPT's table has 2 extra rows)
            parts["wpe"] = nn.Embedding(config.block_size + position_offset(config), config.n_embd)
        if E != config.n_embd:  # OPT-350m: 512-wide embeddings around 1024-wide blocks
            parts["project_in"] = Linear(E, config.n_embd, bias=False)
            parts["project_out"] = Linear(config.n_embd, E, bias=False)
        parts["drop"] = nn.Dropout(config.dropout)
        parts["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        # Post-LN OPT ends on its last block's norm: there is no final one.
        parts["ln_f"] = norm(config) if config.pre_norm else nn.Identity()
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = Linear(E, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # see gradient_checkpointing_enable
        if config.tie_word_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2: counted once
        if self.lm_head.weight.is_meta:
            return  # shapes only (parameter arithmetic, or load_state_dict(assign=True) next)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): two per block add to the stream.
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "o_proj.weight", "fc_out.weight", "fc2.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def gradient_checkpointing_enable(self):
        """Recompute each block's activations in the backward pass instead of keeping them (HF's name).

        Training keeps one (B, T, C) tensor per block instead of ~20, for one more forward per
        step. torch.utils.checkpoint's non-reentrant form: the gradients are the same as without
        (the RNG is replayed, so dropout masks match), it needs no input that requires grad (so
        LoRA on a frozen embedding works), and it composes with autocast and DDP.
        """
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

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
            # a frozen head's layout for its input gradient is kept across steps, unless memory was asked for
            keep_packed = not (self.gradient_checkpointing or is_quantized(self))
            return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), None,
                                              keep_packed)
        if targets is not None:  # also a LoRA-wrapped head: the chunked loss only knows a plain weight
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
            return (None if loss_only else logits), loss
        if not all_logits:
            x = x[:, [-1], :]  # (B, 1, C): sampling needs only the last position
        return self.lm_head(x), None

    def _hidden(self, idx, pos=None, attn_mask=None, cache_pos=None, cache_rows=None):
        """The final hidden states (B, T, E), after ln_f (and OPT's project_out), ready for lm_head."""
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
        tr = self.transformer
        x = tr.wte(idx)  # (B, T, E)
        if "project_in" in tr:
            x = tr.project_in(x)  # (B, T, C)
        rope = None
        if "wpe" in tr:
            x = x + tr.wpe(pos + position_offset(self.config))
        else:
            angles = pos[..., None].float() * rope_frequencies(self.config, idx.device)  # (B or 1, T, hs/2)
            angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B or 1, 1, T, hs): both halves of each pair
            rope = angles.cos(), angles.sin()
        x = tr.drop(x)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in tr.h:
            if recompute:  # keep only each block's input; its insides are recomputed in the backward
                x = checkpoint(block, x, attn_mask, cache_pos, cache_rows, rope, use_reentrant=False)
            else:
                x = block(x, attn_mask, cache_pos, cache_rows, rope)
        x = tr.ln_f(x)
        return tr.project_out(x) if "project_out" in tr else x  # (B, T, E)

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
        c = self.config  # only the key/value heads are stored: GQA's memory saving
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, c.kv_heads, max_len, c.head_size, dtype, device or ref.device, kind)

    def keep_kv_rows(self, keep, length):
        """The batch shrank to rows `keep` ((n,) tensor): move their cache rows to the front, once."""
        for block in self.transformer.h:
            block.attn.kv_cache.keep_rows(keep, length)

    def clear_kv_cache(self):
        for block in self.transformer.h:
            block.attn.kv_cache = None

    # ---- HF-format checkpoints (the file format is hub.py's) -------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir, *, dtype=None, device=None, dropout=None, quantize=None):
        """An HF-format directory (GPT-2, OPT, Llama, Mistral, Qwen2), or a hub name downloaded once, in eval mode.

        dtype: None loads fp32 whatever the file holds; "auto" keeps the file's (bf16 stays bf16); or a dtype.
        quantize: "nf4" or "int8" quantizes each linear as it is read (minilora.quantize; as transformers'
        BitsAndBytesConfig does), so the float model is never in memory whole: a 7B base holds ~4 GB once loaded.
        The codes come from the file's own values (with dtype="bfloat16" on an fp32 file, not from their bf16
        rounding: one rounding fewer than quantize(GPT.from_pretrained(d, dtype=...)) makes).
        """
        path = resolve(name_or_dir)
        config = read_config(os.path.join(path, CONFIG_FILE), dropout)
        tensors, where = read_weights(path, config)
        try:
            with torch.device("meta"):  # shapes only: no time spent on a random init we would overwrite
                model = cls(config)
        except (RuntimeError, TypeError, ValueError, OverflowError) as e:  # sizes past int64: no real checkpoint
            raise MiniloraError(f"{where}: its config.json describes a model that cannot be built ({str(e)[:80]}); "
                                "config.json does not belong to these weights") from None
        expected, raw = model.state_dict(), ()
        if quantize:
            raw = {p + ".weight" for p, _ in quantized_layers(quantize_model(model, quantize))}
        # quantized on the CPU, a layer at a time, and then moved whole (moving the file's weights first would
        # put a float copy of the model on the device)
        state_dict = read_checkpoint(tensors, where, config, expected, dtype=dtype, device=None if raw else device,
                                     raw=raw)
        del tensors
        model.load_state_dict(state_dict, strict=True, assign=True)
        if config.tie_word_embeddings:  # assign=True gave wte and lm_head a Parameter each: re-tie
            model.transformer.wte.weight = model.lm_head.weight
        if raw:  # a quantized layer dequantizes to the dtype the rest of the model was read in (never quantized: the head)
            for _, layer in quantized_layers(model):
                layer.dtype = model.lm_head.weight.dtype
            model.to(device or "cpu")
        # transformers' name_or_path: what an adapter trained on this model records as its base
        model.name_or_path = os.path.abspath(name_or_dir) if os.path.isdir(name_or_dir) else name_or_dir
        return model.eval()

    def save_pretrained(self, save_dir, *, max_shard_size="5GB", chat_template=None):
        """Write config.json + weights in the family's HF layout (sharded above max_shard_size), in one rename;
        chat_template (Jinja source) is recorded as chat_template.jinja, else the tokenizer directory's is copied."""
        lora = next((name for name, m in self.named_modules() if hasattr(m, "base_layer")), None)
        if lora is not None:
            raise MiniloraError(f"model still has LoRA layers ({lora}); call merge_and_unload(model) "
                                "first, or save the adapter alone with save_adapter")
        with torch.device("meta"):
            plain = set(type(self)(self.config).state_dict())
        extra, missing = sorted(set(self.state_dict()) - plain), sorted(plain - set(self.state_dict()))
        if extra or missing:
            raise MiniloraError(f"model is not a plain GPT: unexpected {extra[:5]}, missing {missing[:5]}; "
                                "merge or remove extra modules first")
        write_checkpoint(self.config, self.state_dict(), save_dir, max_shard_size, chat_template)
