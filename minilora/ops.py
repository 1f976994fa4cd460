"""CPU kernels that buy measured speed; the model and the trainer call them, nothing here knows the model.

    linear(x, w, b)                 F.linear without autograd; fp32 on the CPU runs on oneDNN, not MKL
    Linear                          nn.Linear that takes linear() when no gradient is wanted
    LinearCrossEntropy.apply(...)   the head + cross-entropy in chunks, never holding (N, V) logits
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


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
