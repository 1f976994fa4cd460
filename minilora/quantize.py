"""A frozen base stored in 4-bit NormalFloat or 8-bit integers (QLoRA, Dettmers et al. 2023), in plain PyTorch.

    quantize(model, "nf4")            # every linear but lm_head: 4.127 bits per weight instead of 32
    quantize(model, "int8")           # per-output-channel absmax: 8 bits + one fp32 scale per row
    apply_lora(model, LoraConfig())   # unchanged: adapters train in fp32 on top of the frozen codes
    merge_and_unload(model)           # dequantizes to fp32, merges, returns a plain float model

NF4 (the paper's section 3). Each weight matrix is read as one flat row-major vector cut into
blocks of 64. A block is divided by its absmax, so it lies in [-1, 1], and each value becomes
the index of the nearest of 16 levels: the quantiles of N(0, 1) scaled to [-1, 1], 8 positive
and 7 negative plus an exact zero (so zero padding and zero weights stay exact). Pretrained
weights are close to normal, so every level is used about equally often: less error than 16
evenly spaced levels (bench.py measures both). Two 4-bit codes share a byte, the first in the
high nibble (bitsandbytes' order).

Double quantization. One fp32 absmax per 64 weights costs 32/64 = 0.5 bits per weight. The
absmax values are themselves quantized: their mean is subtracted (bitsandbytes does the same:
the values are all positive, so centring doubles the resolution) and they are stored as int8
with one fp32 scale per 256 of them: 8/64 + 32/(64*256) = 0.127 bits per weight, the paper's
figure. (bitsandbytes uses its 8-bit "dynamic" float map there; a linear int8 code is simpler
to read and has a hard error bound: |absmax error| <= scale / 2 = max|centred absmax| / 254.)

Computing with it. The forward dequantizes the weight into a scratch buffer that every layer
reuses (one per thread and dtype, the size of the largest chunk), multiplies in the activation's
dtype (bf16 under autocast), and keeps no float copy: the backward dequantizes again to get
grad_x = grad_y @ W. So a training step never holds more than one layer's float weight, which
is the whole memory point. A layer larger than MAX_CHUNK weights is done in row chunks.

What the state_dict holds is the packed storage (uint8 codes, int8 absmax + fp32 scales), so
`quantize(fresh_model); load_state_dict(saved)` restores a quantized model exactly.
"""

import math
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilora.errors import MiniloraError
from minilora.ops import Linear, linear

METHODS = ("nf4", "int8")
DQ_BLOCK = 256  # absmax values per fp32 scale in double quantization (the paper's choice)
MAX_CHUNK = 1 << 24  # weights dequantized at once (64 MiB in fp32); larger layers go in row chunks


def nf4_levels():
    """The 16 NF4 levels derived as bitsandbytes' create_normal_map does (offset 0.9677083), in fp64.

    The outermost quantile 1 - offset sits halfway between the ends of a 15- and a 16-level
    grid (the paper's "estimate the 2^k + 1 quantiles"); 8 positive quantiles of
    [0.5, offset], 7 negative ones, and 0, then all divided by the largest so they span [-1, 1].
    Agrees with NF4 (the published table) to 6e-8; NF4 is what the codes mean.
    """
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 values > 0
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 values < 0
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return levels / levels.abs().max()


# The published table (QLoRA paper appendix E; bitsandbytes' kernels), ascending, NF4[7] == 0: the
# same bits as bitsandbytes, so a code means the same number here and there.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
_PAIRS = torch.stack([NF4[torch.arange(256) >> 4], NF4[torch.arange(256) & 15]], 1)  # (256, 2): a byte -> its 2 values


def _blocks(w, block_size):
    """A new fp32 tensor of w's values, row-major, zero-padded to whole blocks: (n_blocks, block_size).

    One copy, whatever w's layout (a transposed view of a file, another dtype): nf4_quantize scales it in place."""
    n = w.numel()
    out = torch.empty(n + (-n % block_size), dtype=torch.float32, device=w.device)
    out[:n].view(w.shape).copy_(w.detach())
    out[n:] = 0
    return out.view(-1, block_size)


def nf4_quantize(w, block_size=64):
    """w -> (packed uint8 (ceil(n / bs) * bs / 2,), absmax fp32 (n_blocks,)): nearest level per value."""
    blocks = _blocks(w, block_size)  # (nb, bs), a copy of w's values: scaled in place below
    absmax = blocks.abs().amax(1)  # (nb,)
    scaled = blocks.div_(absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None])  # in [-1, 1]; a zero block stays 0
    mids = (NF4[1:] + NF4[:-1]) / 2  # (15,) decision boundaries: nearest level, a tie goes to the lower one
    # int32 codes, not bucketize's default int64: a layer loaded from a file is quantized with the least scratch
    codes = torch.bucketize(scaled, mids, out_int32=True).to(torch.uint8).view(-1)  # (nb * bs,) in 0..15
    return (codes[0::2] << 4) | codes[1::2], absmax


def double_quantize(absmax, block=DQ_BLOCK):
    """absmax (nb,) fp32 -> (int8 codes (nb,), fp32 scale per `block` values, fp32 offset): see the module doc."""
    offset = absmax.mean()
    centred = F.pad(absmax - offset, (0, -absmax.numel() % block)).view(-1, block)  # (nb2, block)
    scale = centred.abs().amax(1) / 127  # (nb2,)
    q = torch.round(centred / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).to(torch.int8)
    return q.view(-1)[:absmax.numel()].clone(), scale, offset  # a tensor of its own, not a view of the padding


def double_dequantize(q, scale, offset, block=DQ_BLOCK):
    """The absmax values back: q * its block's scale + offset, (nb,) fp32."""
    return q.float() * scale.repeat_interleave(block)[:q.numel()] + offset


def int8_quantize(w):
    """Per-output-channel absmax: w (out, in) -> (int8 (out, in), fp32 scale (out,)), w ~ q * scale."""
    scale = w.detach().float().abs().amax(1) / 127  # (out,)
    q = torch.round(w.detach().float() / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None])
    return q.clamp(-127, 127).to(torch.int8), scale


def quantized_nbytes(out_features, in_features, method, double_quant=True, block_size=64):
    """Bytes of one quantized weight's storage (what its state_dict holds, bias excluded), from its shape."""
    if method == "int8":
        return out_features * in_features + 4 * out_features
    n_blocks = math.ceil(out_features * in_features / block_size)
    codes = n_blocks * block_size // 2
    if not double_quant:
        return codes + 4 * n_blocks
    return codes + n_blocks + 4 * math.ceil(n_blocks / DQ_BLOCK) + 4


# ---- the scratch buffer every quantized layer dequantizes into ---------------------------------

_scratch = threading.local()  # the serving engine's thread and the caller's each get their own


def _buffer(numel, dtype, device, slot=0):
    """A flat tensor of at least `numel` elements, reused across layers and calls (grown when too small)."""
    bufs = _scratch.__dict__.setdefault("bufs", {})
    # A buffer made under torch.inference_mode() can never be written outside it (generation, then training,
    # as the quickstart does): one per mode.
    key = (dtype, str(device), slot, torch.is_inference_mode_enabled())
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


class _QuantMatmul(torch.autograd.Function):
    """y = x @ W.T + bias with W dequantized on the fly, forward and backward; nothing float is saved."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return layer.matmul(x, bias=bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = ctx.layer.matmul(grad, transpose=True) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None  # bias="all"
        return grad_x, None, grad_bias


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 codes or int8; apply_lora wraps it like nn.Linear.

    Buffers (the state_dict): nf4: `weight_nf4` (uint8, two codes a byte) and either `absmax` (fp32)
    or, with double quantization, `absmax_q` (int8), `absmax_scale` (fp32), `absmax_offset` (fp32);
    int8: `weight_int8` (out, in) and `weight_scale` (out,). The bias, if any, stays a float Parameter.
    `dtype` is the float type dequantize() returns by default (the weight's before quantization);
    model.to(dtype) changes it but never casts the stored scales. load_state_dict also takes a float
    `weight` in place of the buffers and quantizes it (GPT.from_pretrained(quantize=...) loads that way).
    """

    def __init__(self, in_features, out_features, bias=True, method="nf4", double_quant=True, block_size=64,
                 dtype=torch.float32, device=None):
        super().__init__()
        if method not in METHODS:
            raise MiniloraError(f"quantization method must be one of {', '.join(METHODS)}, got {method!r}")
        if method == "nf4" and (not isinstance(block_size, int) or block_size < 2 or block_size % 2):
            raise MiniloraError(f"block_size must be an even int >= 2 (two codes share a byte), got {block_size!r}")
        self.in_features, self.out_features = in_features, out_features
        self.method, self.double_quant, self.block_size, self.dtype = method, double_quant, block_size, dtype
        empty = dict(device=device)
        if method == "int8":
            self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, **empty))
            self.register_buffer("weight_scale", torch.empty(out_features, **empty))
        else:
            n_blocks = math.ceil(out_features * in_features / block_size)
            self.register_buffer("weight_nf4", torch.empty(n_blocks * block_size // 2, dtype=torch.uint8, **empty))
            if double_quant:
                self.register_buffer("absmax_q", torch.empty(n_blocks, dtype=torch.int8, **empty))
                self.register_buffer("absmax_scale", torch.empty(math.ceil(n_blocks / DQ_BLOCK), **empty))
                self.register_buffer("absmax_offset", torch.empty((), **empty))
            else:
                self.register_buffer("absmax", torch.empty(n_blocks, **empty))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, **empty), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, layer, method="nf4", double_quant=True, block_size=64):
        w = layer.weight
        q = cls(layer.in_features, layer.out_features, layer.bias is not None, method, double_quant, block_size,
                dtype=w.dtype, device=w.device)
        if layer.bias is not None:
            q.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
        if w.is_meta:
            return q  # shapes only (the memory planner, or from_pretrained(quantize=...) before it loads)
        for name, t in q._encode(w).items():
            setattr(q, name, t)
        return q

    def _encode(self, w):
        """{buffer name: tensor}: float weight w (out, in) in this layer's format."""
        if self.method == "int8":
            return dict(zip(("weight_int8", "weight_scale"), int8_quantize(w)))
        codes, absmax = nf4_quantize(w, self.block_size)
        if not self.double_quant:
            return dict(weight_nf4=codes, absmax=absmax)
        return dict(weight_nf4=codes, **dict(zip(("absmax_q", "absmax_scale", "absmax_offset"), double_quantize(absmax))))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A float `weight` (GPT.from_pretrained(quantize=...) passes the file's) is quantized here, as this
        # layer loads: the model is read one layer at a time and a float copy of it never exists.
        # (load_state_dict hands each module its own copy of the dict, so replacing entries is safe.)
        weight = state_dict.pop(prefix + "weight", None)
        if weight is not None:
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {prefix}weight: copying a param with shape "
                                  f"{tuple(weight.shape)}, the layer is {(self.out_features, self.in_features)}")
                return
            self.dtype = weight.dtype
            state_dict.update({prefix + k: t for k, t in self._encode(weight).items()})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def device(self):
        return self.storage.device

    @property
    def storage(self):
        return self.weight_int8 if self.method == "int8" else self.weight_nf4

    def extra_repr(self):
        dq = ", double_quant" if self.method == "nf4" and self.double_quant else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"method={self.method}{dq}, block_size={self.block_size}, dtype={self.dtype}"

    def nbytes(self):
        """Bytes of the quantized weight's storage (the buffers; the bias excluded)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would cast the fp32 absmax/scales too, and casting them back never
        # restores what bf16 rounded away: move them to fn's device, keep them fp32, note the new dtype.
        probe = fn(torch.zeros((), dtype=self.dtype, device=self.storage.device))
        keep = {k: self._buffers.pop(k) for k in list(self._buffers) if self._buffers[k].is_floating_point()}
        super()._apply(fn, recurse)
        for k, t in keep.items():
            self._buffers[k] = t.to(probe.device)
        self.dtype = probe.dtype
        return self

    # ---- dequantization ---------------------------------------------------------------------------

    def _absmax(self, b0, b1):
        """fp32 absmax of blocks [b0, b1)."""
        if not self.double_quant:
            return self.absmax[b0:b1]
        s0 = b0 // DQ_BLOCK  # the double-quant blocks covering [b0, b1)
        scale = self.absmax_scale[s0:(b1 + DQ_BLOCK - 1) // DQ_BLOCK].repeat_interleave(DQ_BLOCK)
        return self.absmax_q[b0:b1].float() * scale[b0 - s0 * DQ_BLOCK:b1 - s0 * DQ_BLOCK] + self.absmax_offset

    def _rows(self, r0, r1, dtype):
        """Rows [r0, r1) of the float weight, (r1 - r0, in), written into the shared scratch buffer."""
        n_in = self.in_features
        start, end = r0 * n_in, r1 * n_in
        if self.method == "int8":
            out = _buffer(end - start, dtype, self.device).view(r1 - r0, n_in)
            return out.copy_(self.weight_int8[r0:r1]).mul_(self.weight_scale[r0:r1, None].to(dtype))
        bs = self.block_size  # chunks start on a block boundary (see matmul), so whole blocks are decoded
        b0, b1 = start // bs, -(-end // bs)
        w = _buffer((b1 - b0) * bs, torch.float32, self.device)
        packed = self.weight_nf4[b0 * bs // 2:b1 * bs // 2]  # (bytes,)
        index = _buffer(packed.numel(), torch.int32, self.device, slot=2).copy_(packed)  # index_select wants ints
        torch.index_select(_PAIRS.to(self.device), 0, index, out=w.view(-1, 2))  # a byte -> its two levels
        w.view(-1, bs).mul_(self._absmax(b0, b1)[:, None])  # (blocks, bs) * (blocks, 1)
        w = w[:end - start]
        if dtype != torch.float32:  # levels * absmax in fp32, rounded once to the compute dtype
            w = _buffer(end - start, dtype, self.device, slot=1).copy_(w)
        return w.view(r1 - r0, n_in)

    def dequantize(self, dtype=None):
        """The float weight (out, in), a new tensor (default dtype: the layer's `dtype`)."""
        return self._rows(0, self.out_features, torch.float32).to(dtype or self.dtype, copy=True)

    def _chunk_rows(self):
        """Rows per chunk: at most MAX_CHUNK weights, and a multiple of whole NF4 blocks."""
        step = 1 if self.method == "int8" else self.block_size // math.gcd(self.in_features, self.block_size)
        return max(step, MAX_CHUNK // self.in_features // step * step)

    def matmul(self, x, transpose=False, bias=None):
        """x @ W.T + bias ((..., in) -> (..., out)), or with transpose x @ W ((..., out) -> (..., in)), in x's dtype."""
        rows = self._chunk_rows()
        if rows >= self.out_features:
            w = self._rows(0, self.out_features, x.dtype)
            return x @ w if transpose else linear(x, w, bias)
        out = None
        for r0 in range(0, self.out_features, rows):
            r1 = min(r0 + rows, self.out_features)
            w = self._rows(r0, r1, x.dtype)
            if transpose:
                part = x[..., r0:r1] @ w
                out = part if out is None else out.add_(part)
            else:
                out = x.new_empty(*x.shape[:-1], self.out_features) if out is None else out
                out[..., r0:r1] = linear(x, w, None if bias is None else bias[r0:r1])
        return out

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):  # compute in autocast's dtype, as nn.Linear would
            x = x.to(torch.get_autocast_dtype(x.device.type))
        # The bias goes into the product (as nn.Linear's addmm does): added after the product is rounded
        # to bf16 it would be a second rounding that nn.Linear under autocast does not make (the frozen
        # bias usually needs no gradient; with LoRA's bias="all" _QuantMatmul's backward gives it one).
        bias = None if self.bias is None else self.bias.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _QuantMatmul.apply(x, self, bias)


# ---- whole models -------------------------------------------------------------------------------

def quantize(model, method="nf4", double_quant=True, block_size=64, skip_modules=("lm_head",)):
    """Replace every nn.Linear (but those named in skip_modules) by a QuantizedLinear, in place; returns model.

    Before or after apply_lora (its adapters stay as they are). These are the layers apply_lora can target; embeddings and norms stay as they are. The output
    head is skipped by default, as transformers' BitsAndBytesConfig does: GPT-2 ties it to the
    token embedding, and the logits are where 4-bit error would cost the most.
    """
    if method not in METHODS:
        raise MiniloraError(f"quantization method must be one of {', '.join(METHODS)}, got {method!r}")
    merged = [p for p, m in model.named_modules() if getattr(m, "merged_adapters", None)]
    if merged:
        raise MiniloraError(f"{merged[0]} has a merged adapter; unmerge(model) before quantizing the base")
    found = False
    for path, layer in list(model.named_modules()):
        # inside a LoRA layer the linear is "<name>.base_layer": skip_modules names <name>
        name = path.removesuffix(".base_layer").rsplit(".", 1)[-1]
        adapter = ".lora_A." in path or ".lora_B." in path  # LoRA's own A and B are trained: never quantized
        if isinstance(layer, nn.Linear) and name not in skip_modules and not adapter:
            _set(model, path, QuantizedLinear.from_linear(layer, method, double_quant, block_size))
            found = True
    if not found:
        raise MiniloraError("quantize found no nn.Linear to quantize (is the model quantized already?)")
    return model


def dequantize_model(model, dtype=None):
    """Replace every QuantizedLinear by a plain float linear (ops.Linear), in place; returns model."""
    from_q = [(p, m) for p, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for path, q in from_q:
        _set(model, path, plain_linear(q, dtype))
    return model


def plain_linear(q, dtype=None):
    """A frozen ops.Linear holding q's dequantized weight (and its bias)."""
    dtype = dtype or q.dtype
    with torch.device("meta"):
        layer = Linear(q.in_features, q.out_features, bias=q.bias is not None)
    layer.weight = nn.Parameter(q.dequantize(dtype), requires_grad=False)
    if q.bias is not None:
        layer.bias = nn.Parameter(q.bias.detach().to(dtype), requires_grad=False)
    return layer


def quantized_layers(model):
    return [(p, m) for p, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def is_quantized(model):
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def _set(model, path, module):
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)
