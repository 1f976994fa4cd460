"""CPU kernels that buy measured speed; the model and the trainer call them, nothing here knows the model.

    linear(x, w, b)                 F.linear without autograd; fp32 on the CPU runs on oneDNN, not MKL
    train_linear(x, w, b)           F.linear with autograd; fp32 on the CPU runs on whichever of MKL and
                                    oneDNN measured faster here, per product (forward, input and weight gradient)
    forced_library()                the library MINILORA_FP32_KERNEL forces, validated, or ""
    forced_kernel(kernel)           a block in which every fp32 training product runs on one library
    Linear                          nn.Linear that takes linear() when no gradient is wanted, train_linear() otherwise
    LinearCrossEntropy.apply(...)   the head + cross-entropy in chunks, never holding (N, V) logits
    linear_cross_entropy(...)       the same, left out of torch.compile's graph
    packed_transpose(w, rows)       a frozen weight's transpose in oneDNN's own layout, kept across steps
    matmul_speedup(dtype, m, k, n)  how much faster a matmul of this shape runs in dtype than in fp32, here
"""

import contextlib
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from minilora.errors import MiniloraError


class LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ weight.T, targets) without ever holding the (N, V) logits.

    The loss is a scalar, so its gradients can be computed during the forward pass, a chunk of
    rows at a time: logits -> softmax - one_hot -> dx (and dweight). Only one chunk's logits
    exist at a time, in buffers allocated once per call, instead of fp32 logits, log-probs and
    their gradient for every token (3 x 412 MB at gpt2 8x256): -1.2 GB peak RSS there.
    Reusing the buffers matters for speed too: a fresh 100 MB tensor per chunk costs ~25k page
    faults on the CPU, which made the head + loss ~40% slower in bf16 (measured on the bench machine).
    With many rows and MKL's forward the vocabulary is padded to a multiple of 64 (MKL's fp32 GEMM ran
    ~45% faster at 50304 columns than at 50257 on a Zen 4); the padded columns get -inf logits, so no
    probability and no gradient. That copy of the head costs 154 MB at gpt2 and is only worth it over
    many chunks, so fewer than PAD_MIN_ROWS rows use the weight as it is. oneDNN ran as fast unpadded
    and gets the weight itself (on a Zen 5 the padded copy and a transposed one for the input
    gradient cost 300 MB of the LoRA step's peak and ~7% of the head's time).
    fp32 products run on the library fp32_kernels() measured faster here. The weight gradient on MKL is
    addmm_, in place; on oneDNN each chunk's (V, C) product is made anew and added (one more head-sized
    buffer), so a head that trains takes 512-row chunks: its weight gradient ran at 361 GFLOP/s that way,
    254 at 128 rows and 217 on MKL's addmm_ (gpt2 head, AMD Zen 5).
    keep_packed=True lets a frozen head's input gradient run on packed_transpose(): one more copy of
    the head, kept between steps, for a 2-4% faster LoRA step (GPT.forward passes False when the
    model was set up to save memory). Ignored targets (-100) get zero loss and zero gradient.
    """

    PAD_MIN_ROWS = 1024

    @staticmethod
    def forward(ctx, x, weight, targets, chunk=None, keep_packed=False):
        # x (N, C), weight (V, C), targets (N,)
        (N, C), V, dev = x.shape, weight.shape[0], x.device
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
        fp32 = dtype == torch.float32
        need_dx, need_dw = ctx.needs_input_grad[:2]
        # the faster sizes on the bench machine; a head that trains takes 512 rows in fp32 for its weight gradient
        chunk = min(N, chunk or (512 if need_dw or not fp32 else 128))
        # first (once per process, on the first step): the timing's (chunk, V) temporaries are gone before the
        # chunk's own buffers exist, so they do not add up at the step's peak
        kernels = fp32_kernels(x[:chunk], weight.detach(), products=PRODUCTS if need_dw else PRODUCTS[:2]) if fp32 else {}
        # padding is for MKL's forward; oneDNN's ran as fast at 50257 rows as at 50304 (AMD Zen 5)
        pad = -V % 64 if N >= LinearCrossEntropy.PAD_MIN_ROWS and kernels.get("forward") != "onednn" else 0
        if pad or weight.dtype != dtype:
            w = torch.empty(V + pad, C, dtype=dtype, device=dev)  # (Vp, C), zero rows appended
            w[:V] = weight.detach()
            w[V:] = 0
        else:
            w = weight.detach()
        bias = None
        if pad:
            bias = torch.zeros(w.shape[0], dtype=dtype, device=dev)
            bias[V:] = float("-inf")
        valid = targets != -100
        count = valid.sum().clamp(min=1)
        dx = torch.empty_like(x) if need_dx else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_dw else None
        logits = torch.empty(chunk, w.shape[0], dtype=dtype, device=dev)  # the chunk's buffers
        probs = logits if fp32 else torch.empty(logits.shape, dtype=torch.float32, device=dev)
        dw_chunk = torch.empty(w.shape, dtype=dtype, device=dev) if need_dw and not fp32 else None
        # dx = grad @ w is a linear() over the strided view w.T, as fp32_kernels timed it: oneDNN copies its blocks
        # at every chunk (+5 ms of 33 at gpt2, Zen 5), a contiguous copy per step cost more (42-245 ms, 154 MB);
        # a frozen head's transpose can be laid out once for the whole run instead
        w_t = w.t()
        if (keep_packed and need_dx and fp32 and kernels.get("input_grad") == "onednn" and not weight.requires_grad
                and not pad and weight.dtype == dtype and _ONEDNN_PACK):  # w is the head itself, not a copy
            w_t = packed_transpose(weight, chunk)
        loss = torch.zeros((), dtype=torch.float32, device=dev)
        for i in range(0, N, chunk):
            n = min(chunk, N - i)
            xc, yc = x[i:i + n].to(dtype), targets[i:i + n].clamp(min=0)[:, None]
            scale = valid[i:i + n, None] / count  # (n, 1): d(mean loss) / d(this row's loss)
            z, p = logits[:n], probs[:n]
            if kernels.get("forward") == "onednn":
                z.copy_(_onednn_linear(xc, w, bias))  # its output (25 MB) stays below malloc's mmap threshold
            elif bias is not None:
                torch.addmm(bias, xc, w.t(), out=z)
            else:
                torch.mm(xc, w.t(), out=z)
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
                    dx[i:i + n] = kernel_linear(kernels.get("input_grad"), grad, w_t)
                if need_dw and fp32 and kernels["weight_grad"] == "onednn":
                    dw.add_(_onednn_linear(grad.t(), xc.t()))  # a (V, C) product to add: no in-place form
                elif need_dw and fp32:
                    dw.addmm_(grad.t(), xc)
                elif need_dw:
                    dw.add_(torch.mm(grad.t(), xc, out=dw_chunk))  # bf16 product, fp32 sum
        ctx.save_for_backward(dx, None if dw is None else dw[:V])
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return (None if dx is None else dx * grad_loss, None if dw is None else dw * grad_loss, None, None, None)


@torch.compiler.disable  # run eagerly inside a compiled model: inductor cannot lower oneDNN's linear, and
def linear_cross_entropy(x, weight, targets, chunk=None, keep_packed=False):  # dynamo fails on this loop's shapes
    """LinearCrossEntropy.apply(...), left out of torch.compile's graph (a graph break, at full speed)."""
    return LinearCrossEntropy.apply(x, weight, targets, chunk, keep_packed)


# oneDNN keeps every kernel it makes, one per product shape at ~1-2 MB each, in two caches of 1024 (its own and
# ideep's, torch's wrapper). Padded batches of varying length make new shapes at every step: a LoRA step on a
# 4-layer gpt2 with lengths 64-256 grew from 1.4 to 2.7 GB of RSS in 120 steps (MKL: 1.4 GB), still growing.
# A fixed-shape training step uses ~20 kernels, so 64 of each keep a step's and bound the rest (the same step:
# 1.4-1.8 GB, at the same speed). Both are read when oneDNN is first used, so here, before it; a user's value wins.
CACHE_CAPACITY = 64
for _name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_name, str(CACHE_CAPACITY))

# oneDNN's fp32 kernel, where this torch build has it (CPU builds for x86 and arm64 do)
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_PACK = _ONEDNN_LINEAR and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")  # its weight layouts
_packed = WeakIdKeyDictionary()  # weight -> ((its data_ptr, its version), its transpose in oneDNN's layout)


def packed_transpose(weight, rows):
    """weight.T in oneDNN's own blocked layout, for the input gradient g @ W of a weight that does not train:
    made on first use and kept until the weight is changed in place (merge, load_state_dict) or freed.

    On the gpt2 head's 128-row chunks oneDNN ran g @ W at 318-327 GFLOP/s on the strided view W.T and at
    417-427 on this layout (AMD Zen 5); laying it out costs ~160 ms, more than one step's chunks gain, so
    it pays only when kept across steps: a frozen weight allows that, for the weight's size in memory.
    rows: the batch size oneDNN lays it out for (any number of rows can use it)."""
    key = (weight.data_ptr(), weight._version)
    entry = _packed.get(weight)
    if entry is None or entry[0] != key:
        _packed.pop(weight, None)  # the stale layout goes before the new one is made
        entry = _packed[weight] = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach().t(), rows))
    return entry[1]


def forget_packed():
    """Drop every kept layout: train() does when its loop ends (inference does not use them; 154 MB at gpt2)."""
    _packed.clear()


def _use_onednn(x, weight):
    # Under torch.compile, inductor picks its own kernels (and cannot lower this op).
    return (_ONEDNN_LINEAR and x.is_cpu and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _onednn_linear(x, weight, bias=None):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x, weight, bias=None):
    """F.linear for use without autograd; fp32 on the CPU goes to oneDNN rather than MKL.

    MKL's fp32 matrix-vector product ran at ~40% of the memory bandwidth on the bench machine
    (an AMD EPYC), and its GEMM at ~80% of oneDNN's speed; oneDNN streams the weights at 65-95%
    of the bandwidth, which is what batch-1 decoding is bound by. Same results to fp32 rounding.
    """
    if _use_onednn(x, weight):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


# ---- fp32 training products: MKL or oneDNN, whichever this CPU runs faster -------------------------
#
# A training linear is three products: forward y = x W^T, input gradient dx = g W, and (when W
# trains) weight gradient dW = g^T x. torch sends all three to MKL in fp32. Which library is
# faster depends on the CPU: on an AMD EPYC Zen 2, oneDNN ran these shapes 1.2-1.45x faster than
# MKL; on a Zen 4 oneDNN for all three made the LoRA step no faster; on a Sapphire Rapids Xeon MKL
# won every gradient (oneDNN 0.4-0.9x) and oneDNN a few forwards (up to 1.17x). So
# the first training call for each weight shape times both libraries on that call's own tensors
# and keeps the choice for the process. Each product is a linear() of some operands, so one
# function runs all three on either library: dx = linear(g, W^T), dW = linear(g^T, x^T).

KERNEL_ENV = "MINILORA_FP32_KERNEL"  # "mkl" or "onednn" forces one library for every product; unset: measure
PRODUCTS = ("forward", "input_grad", "weight_grad")
# Below this many FLOPs a product takes well under a millisecond: one call is too short to time (the
# noise would make the choice, and so the last bits of the results, vary by run), so a smaller one is
# timed over as many calls as add up to it; below a sixteenth of it the product is not worth timing.
# (LoRA's rank-8 products at gpt2 8x256 are 2^24.6 FLOPs: on a Zen 5 oneDNN ran them 2-4x faster, 1.5%
# of the step.)
MIN_TIMED_FLOPS = 2 ** 26
MARGIN = 1.05  # oneDNN must beat MKL (torch's own choice) by 5% to be taken: ties keep torch's default

_choices = {}  # (product, weight shape) -> {"kernel": "mkl" | "onednn", "mkl_s": ..., "onednn_s": ...}


def kernel_linear(kernel, x, weight, bias=None):
    """x @ weight.T (+ bias) on one library: "mkl" (torch's F.linear) or "onednn". Strided views are fine."""
    return _onednn_linear(x, weight, bias) if kernel == "onednn" else F.linear(x, weight, bias)


def _seconds(fn, repeats=2):
    fn()  # warm-up: first calls pay for page faults and oneDNN's kernel creation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def forced_library():
    """The library MINILORA_FP32_KERNEL forces ("mkl" or "onednn"), or "" when it is unset."""
    forced = os.environ.get(KERNEL_ENV, "")
    if forced not in ("", "mkl", "onednn"):
        raise MiniloraError(f"{KERNEL_ENV}={forced!r}: set it to mkl or onednn, or unset it to measure")
    return forced


def _choose(product, operands, flops):
    """operands() -> the tensors to time, called only when the product is timed."""
    forced = forced_library()
    if forced:
        return dict(kernel=forced if _ONEDNN_LINEAR else "mkl", reason=f"{KERNEL_ENV}={forced}")
    if not _ONEDNN_LINEAR or flops < MIN_TIMED_FLOPS // 16:
        return dict(kernel="mkl", reason="not timed: too small" if _ONEDNN_LINEAR else "no oneDNN in this torch")
    args, calls = operands(), -(-MIN_TIMED_FLOPS // flops)
    t = {k: _seconds(lambda: [kernel_linear(k, *args) for _ in range(calls)]) for k in ("mkl", "onednn")}
    return dict(kernel="onednn" if t["onednn"] * MARGIN < t["mkl"] else "mkl", mkl_s=t["mkl"], onednn_s=t["onednn"],
                reason=f"measured: oneDNN {t['mkl'] / t['onednn']:.2f}x MKL's speed")


def fp32_kernels(x, weight, bias=None, products=None):
    """{product: "mkl" | "onednn"} for a weight of this shape, each measured on its first use (rows capped
    at 1024). By default the products autograd will run: the weight gradient only for a weight that trains."""
    key = tuple(weight.shape)
    products = products or (PRODUCTS if weight.requires_grad else PRODUCTS[:2])
    if any((p, key) not in _choices for p in products):
        with torch.no_grad():
            x2 = x.detach().reshape(-1, x.shape[-1])[:1024]  # (M, K)
            flops = 2 * x2.shape[0] * weight.shape[0] * weight.shape[1]  # the product's own size decides if it is timed
            # (N, K), timed on at most 8192 output rows: the head's 50k would make oneDNN reorder (copy) all of it,
            # a one-off spike of the head's size at the first step, for a choice its first rows decide as well
            w = weight.detach()[:8192].to(x2.dtype)  # the head's weight may be stored in another dtype
            b = None if bias is None else bias.detach()[:8192].to(x2.dtype)
            g = []  # the gradient operand, made once and only if a gradient product is timed (the head's: 26 MB)

            def grad():
                if not g:  # (M, N): any values, only the time matters; from a generator of its own, as drawing
                    # from the global one would change every later dropout mask (and break --resume's exactness)
                    g.append(torch.randn(x2.shape[0], w.shape[0], generator=torch.Generator().manual_seed(0)))
                return g[0]
            operands = {"forward": lambda: (x2, w, b), "input_grad": lambda: (grad(), w.t()),
                        "weight_grad": lambda: (grad().t(), x2.t())}
            for p in products:
                if (p, key) not in _choices:
                    _choices[p, key] = _choose(p, operands[p], flops)
    return {p: _choices[p, key]["kernel"] for p in products}


@contextlib.contextmanager
def forced_kernel(kernel):
    """Every fp32 training product on one library inside the block, as MINILORA_FP32_KERNEL=kernel would;
    the choices made so far and the environment are as they were afterwards (to time one library against
    the other in a process that goes on training)."""
    global _choices
    saved_choices, saved_env = _choices, os.environ.get(KERNEL_ENV)
    _choices, os.environ[KERNEL_ENV] = {}, kernel
    try:
        yield
    finally:
        _choices = saved_choices
        if saved_env is None:
            os.environ.pop(KERNEL_ENV, None)
        else:
            os.environ[KERNEL_ENV] = saved_env


def kernel_choices():
    """The choices made so far, [[product, shape, kernel], ...]: a training checkpoint carries them."""
    return [[p, list(shape), c["kernel"]] for (p, shape), c in _choices.items()]


def use_kernel_choices(choices):
    """Take a checkpoint's choices, so a resumed run computes exactly as the interrupted one did
    (a new measurement could choose the other library, which rounds differently)."""
    for p, shape, kernel in choices:
        _choices[p, tuple(shape)] = dict(kernel=kernel, reason="as the checkpoint's run measured")


def kernel_report():
    """One line per (product, weight shape) chosen so far in this process (bench.py prints them)."""
    return [f"{p:11s} {'x'.join(map(str, shape)):>11s}: {c['kernel']:6s} ({c['reason']})"
            for (p, shape), c in sorted(_choices.items(), key=lambda kv: (kv[0][1], PRODUCTS.index(kv[0][0])))]


def kernel_summary():
    """"fp32 matmul products by measurement: oneDNN for 4, MKL for 9 (...)" or "" when nothing was timed."""
    timed = [c for c in _choices.values() if "onednn_s" in c]
    if not timed:
        return ""
    dnn = sum(c["kernel"] == "onednn" for c in timed)
    return (f"fp32 matmul products, timed at the start: oneDNN for {dnn}, MKL for {len(timed) - dnn} "
            f"of {len(timed)} ({KERNEL_ENV}=mkl|onednn forces one)")


class KernelLinear(torch.autograd.Function):
    """F.linear whose three products each run on the library chosen for them; same values to fp32 rounding."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernels):
        ctx.kernels = kernels
        ctx.save_for_backward(x if weight.requires_grad else None, weight)  # x only when dW is wanted
        return kernel_linear(kernels["forward"], x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        g = grad.reshape(-1, grad.shape[-1])  # (M, N)
        dx = kernel_linear(ctx.kernels["input_grad"], g, weight.t()).view(*grad.shape[:-1], -1) if need_dx else None
        dw = (kernel_linear(ctx.kernels["weight_grad"], g.t(), x.reshape(-1, x.shape[-1]).t()) if need_dw else None)
        return dx, dw, g.sum(0) if need_db else None, None


def train_linear(x, weight, bias=None):
    """F.linear with autograd; in fp32 on the CPU each product runs on the library measured faster here."""
    if not _use_onednn(x, weight):
        return F.linear(x, weight, bias)  # bf16/fp16 (oneDNN already), CUDA, or under torch.compile
    kernels = fp32_kernels(x, weight, bias)
    if all(k == "mkl" for k in kernels.values()):
        return F.linear(x, weight, bias)  # torch's own path: nothing to gain from a Python autograd function
    return KernelLinear.apply(x, weight, bias, kernels)


class Linear(nn.Linear):
    """nn.Linear that runs linear() when no gradient is wanted (generation, serving, eval), train_linear() otherwise."""

    def forward(self, x):
        return train_linear(x, self.weight, self.bias) if torch.is_grad_enabled() else linear(x, self.weight, self.bias)


# ---- dtype by measurement ------------------------------------------------------------------------

_speedups = {}


def matmul_speedup(dtype, m, k, n):
    """fp32 time / dtype time of an (m, k) x (k, n) CPU matmul, measured once per shape in this process.

    bf16 is 2-6x faster than fp32 where the CPU has bf16 instructions (AVX512-BF16, AMX) and slower
    where it is emulated (AVX2-only CPUs such as AMD Zen 2); at small widths (128) it was no faster
    even with AMX. The caller compares this against its own margin."""
    key = (dtype, m, k, n)
    if key not in _speedups:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        fp32 = _seconds(lambda: F.linear(a, b), repeats=3)
        a, b = a.to(dtype), b.to(dtype)
        _speedups[key] = fp32 / _seconds(lambda: F.linear(a, b), repeats=3)
    return _speedups[key]
