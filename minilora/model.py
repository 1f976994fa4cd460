"""The GPT-2 architecture in one file, with hooks for a static KV cache.

Attention has separate q_proj/k_proj/v_proj/out_proj linears (GPT-2's fused c_attn is split on
import, see hub.py) so that LoRA targets read exactly as in PEFT tutorials.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilora.config import GPTConfig
from minilora.errors import MiniloraError


class LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ weight.T, targets) without ever holding the (N, V) logits.

    The loss is a scalar, so its gradients can be computed during the forward pass, a chunk of
    rows at a time: logits -> softmax - one_hot -> dx (and dweight). Only one chunk's logits
    exist at a time, in buffers allocated once per call, instead of fp32 logits, log-probs and
    their gradient for every token (3 x 412 MB at gpt2 8x256): -1.2 GB peak RSS there.
    Reusing the buffers matters for speed too: a fresh 100 MB tensor per chunk costs ~25k page
    faults on the CPU, which made the head + loss ~40% slower in bf16 (measured on the bench machine).
    The vocabulary is padded to a multiple of 64 (MKL's fp32 GEMM ran ~45% faster at 50304 columns
    than at 50257 there); the padded columns get -inf logits, so no probability and no gradient.
    Ignored targets (-100) get zero loss and zero gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk=None):
        # x (N, C), weight (V, C), targets (N,)
        (N, C), V, dev = x.shape, weight.shape[0], x.device
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
        fp32 = dtype == torch.float32
        chunk = min(N, chunk or (128 if fp32 else 512))  # the faster size for each on the bench machine
        w = torch.empty(V + -V % 64, C, dtype=dtype, device=dev)  # (Vp, C), zero rows appended
        w[:V] = weight.detach()
        w[V:] = 0
        bias = torch.zeros(w.shape[0], dtype=dtype, device=dev)
        bias[V:] = float("-inf")
        valid = targets != -100
        count = valid.sum().clamp(min=1)
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx = torch.empty_like(x) if need_dx else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_dw else None
        logits = torch.empty(chunk, w.shape[0], dtype=dtype, device=dev)  # the chunk's buffers
        probs = logits if fp32 else torch.empty(logits.shape, dtype=torch.float32, device=dev)
        dw_chunk = torch.empty(w.shape, dtype=dtype, device=dev) if need_dw and not fp32 else None
        w_t = w.t().contiguous() if need_dx and fp32 else None  # dx = grad @ w as a linear() over w.T
        loss = torch.zeros((), dtype=torch.float32, device=dev)
        for i in range(0, N, chunk):
            n = min(chunk, N - i)
            xc, yc = x[i:i + n].to(dtype), targets[i:i + n].clamp(min=0)[:, None]
            scale = valid[i:i + n, None] / count  # (n, 1): d(mean loss) / d(this row's loss)
            z, p = logits[:n], probs[:n]
            if fp32:
                z.copy_(linear(xc, w, bias))  # oneDNN; its output (25 MB) stays below malloc's mmap threshold
            else:
                torch.addmm(bias, xc, w.t(), out=z)
            z_target = z.gather(1, yc).float()
            if p is not z:
                p.copy_(z)
            m = p.amax(1, keepdim=True)
            total = p.sub_(m).exp_().sum(1, keepdim=True)  # p = exp(z - max)
            loss += ((m + total.log() - z_target) * scale).sum()  # log-sum-exp - target logit
            if need_dx or need_dw:
                p.mul_(scale / total).scatter_add_(1, yc, -scale)  # (softmax - one_hot) * scale
                grad = p if p is z else z.copy_(p)
                if need_dx:
                    dx[i:i + n] = linear(grad, w_t) if fp32 else grad @ w
                if need_dw and fp32:
                    dw.addmm_(grad.t(), xc)
                elif need_dw:
                    dw.add_(torch.mm(grad.t(), xc, out=dw_chunk))  # bf16 product, fp32 sum
        ctx.save_for_backward(dx, None if dw is None else dw[:V])
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return (None if dx is None else dx * grad_loss, None if dw is None else dw * grad_loss, None, None)


# oneDNN's fp32 kernel, where this torch build has it (CPU builds for x86 and arm64 do)
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _use_onednn(x, weight):
    # Under torch.compile, inductor picks its own kernels (and cannot lower this op).
    return (_ONEDNN_LINEAR and x.is_cpu and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def linear(x, weight, bias=None):
    """F.linear for use without autograd; fp32 on the CPU goes to oneDNN rather than MKL.

    MKL's fp32 matrix-vector product ran at ~40% of the memory bandwidth on the bench machine
    (an AMD EPYC), and its GEMM at ~80% of oneDNN's speed; oneDNN streams the weights at 65-95%
    of the bandwidth, which is what batch-1 decoding is bound by. Same results to fp32 rounding.
    """
    if _use_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear that uses linear() above when no gradient is wanted (generation, serving, eval).

    Training keeps F.linear and its autograd: a oneDNN autograd function measured no faster for
    a LoRA step (fp32, gpt2 8x256). bf16/fp16 run on oneDNN through F.linear already.
    """

    def forward(self, x):
        return super().forward(x) if torch.is_grad_enabled() else linear(x, self.weight, self.bias)


class KVCache(nn.Module):
    """Preallocated keys/values for one layer, written in place (no torch.cat growth)."""

    def __init__(self, batch_size, n_head, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos, k, v, rows=None):
        """Store k, v (B, nh, T, hs) and return every key/value up to the last one written.

        cache_pos is an int (all rows write slots [cache_pos, cache_pos+T)) or a (B,) tensor of
        per-row start slots (rows at different lengths, as in continuous batching). `rows`
        picks which cache rows the batch uses (default: the first B).
        """
        B, _, T, _ = k.shape
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if isinstance(cache_pos, int) and rows is None:
            end = cache_pos + T
            self.k[:B, :, cache_pos:end] = k
            self.v[:B, :, cache_pos:end] = v
            return self.k[:B, :, :end], self.v[:B, :, :end]  # views: (B, nh, end, hs)
        rows, slots = self.write_rows(cache_pos, k, v, rows)
        end = int(slots.max()) + 1
        return self.k[rows, :, :end], self.v[rows, :, :end]  # (B, nh, end, hs)

    def write_rows(self, cache_pos, k, v, rows=None):
        """Write k, v (B, nh, T, hs) at per-row start slots; returns (rows (B,), slots (B, T))."""
        B, _, T, _ = k.shape
        if rows is None:
            rows = torch.arange(B, device=k.device)
        starts = torch.as_tensor(cache_pos, device=k.device).expand(B)
        slots = starts[:, None] + torch.arange(T, device=k.device)  # (B, T)
        # advanced indices around a slice put their dims first: target is (B, T, nh, hs)
        self.k[rows[:, None], :, slots] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows[:, None], :, slots] = v.transpose(1, 2).to(self.v.dtype)
        return rows, slots


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

    def forward(self, idx, targets=None, *, pos=None, attn_mask=None, cache_pos=None, cache_rows=None,
                all_logits=False, loss_only=False):
        """idx (B, T) token ids -> (logits, loss).

        targets: (B, T) next-token ids, -100 where no loss is wanted. Without targets only the
        last position's logits are computed (all that sampling needs) unless all_logits=True.
        pos: (B, T) position ids for left-padded rows; default cache_pos + 0..T-1.
        attn_mask: (B, 1, T, S) bool, True where a query may attend to a key (S = keys seen).
        cache_pos / cache_rows: where these tokens go in the KV cache, see KVCache.update.
        loss_only: with targets, return (None, loss) and never materialise the (B, T, V) logits
        (see LinearCrossEntropy: faster and far smaller; what a training step needs).
        """
        B, T = idx.shape
        if pos is None:
            start = 0 if cache_pos is None else torch.as_tensor(cache_pos, device=idx.device).view(-1, 1)
            pos = start + torch.arange(T, device=idx.device).view(1, T)  # (B or 1, T)
        if T > 0 and int(pos.max()) >= self.config.block_size:
            raise MiniloraError(
                f"sequence of {int(pos.max()) + 1} tokens exceeds the model's context "
                f"(block_size={self.config.block_size}); shorten the input or max_new_tokens")
        if cache_pos is not None:
            if self.transformer.h[0].attn.kv_cache is None:
                raise MiniloraError("cache_pos given but no KV cache is set up; call model.setup_kv_cache(...) first")
            if attn_mask is None and not (isinstance(cache_pos, int) and cache_rows is None and (cache_pos == 0 or T == 1)):
                raise MiniloraError("attn_mask is required for chunked or per-row KV-cache writes")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask, cache_pos, cache_rows)
        x = self.transformer.ln_f(x)
        if targets is not None and loss_only:
            return None, LinearCrossEntropy.apply(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1))
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
            return logits, loss
        if not all_logits:
            x = x[:, [-1], :]  # (B, 1, C): sampling needs only the last position
        return self.lm_head(x), None

    # ---- KV cache ----------------------------------------------------------------------------

    def setup_kv_cache(self, batch_size, max_len, dtype=None, device=None):
        """Allocate a static cache for `batch_size` rows of up to `max_len` tokens."""
        if max_len > self.config.block_size:
            raise MiniloraError(
                f"KV cache of {max_len} tokens exceeds the model's context (block_size={self.config.block_size})")
        ref = self.lm_head.weight
        dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.float32)
        hs = self.config.n_embd // self.config.n_head
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_head, max_len, hs, dtype, device or ref.device)

    def clear_kv_cache(self):
        for block in self.transformer.h:
            block.attn.kv_cache = None

    # ---- HF-format checkpoints (see hub.py) -----------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir, **kwargs):
        from minilora.hub import load_pretrained
        return load_pretrained(name_or_dir, **kwargs)

    def save_pretrained(self, save_dir, **kwargs):
        from minilora.hub import save_pretrained
        save_pretrained(self, save_dir, **kwargs)
