"""What fits: the memory of a training step for full fine-tuning, LoRA and QLoRA, before you start.

    python -m minilora.params --memory --model llama2-7b --lora_r 8 --batch_size 1 --seq_len 512
    python -m minilora.params --memory --model llama-65b --lora_r 8 --gradient_checkpointing

Every byte but the activations is counted on the meta device from the model itself (shapes, no
storage): the base weights (fp32 master weights for full fine-tuning, --base_dtype for a frozen
base, the packed NF4/int8 buffers of minilora.quantize for QLoRA), the LoRA weights, their fp32
gradients and AdamW's two fp32 moments. Activations are what autograd keeps for the backward
pass. They are measured, not guessed: the same family's block is run for real at a few tiny
widths with saved-tensor hooks, the bytes it saves per token are fitted as a linear function of
the widths (C, MLP width, key/value width, heads, LoRA columns: everything saved is (B, T, one of
these)), and that function is evaluated at the real shape. With gradient checkpointing a block
keeps only its input, and one block's activations exist again while it is recomputed.

Short-lived buffers are counted at their largest (the chunked loss's copy of the head and its
logit chunk, the dequantization buffer). Not counted: the framework itself (CUDA context
~0.5-1 GB, or ~230 MB of Python + PyTorch on a CPU), allocator slack and fragmentation. README, "Memory", says how close the total came to the
measured peak.
"""

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from minilora.config import GPTConfig
from minilora.lora import LoraConfig, apply_lora, count_parameters
from minilora.model import GPT
from minilora.ops import LinearCrossEntropy
from minilora.quantize import MAX_CHUNK, QuantizedLinear, quantize

METHODS = ("full", "lora", "qlora")
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _build(config, method, lora_config, quant, base_dtype, device="meta"):
    """The model a method trains, on `device`: quantized (qlora), LoRA-wrapped (lora, qlora), frozen where it should be."""
    with torch.device(device):
        model = GPT(config)
    if method != "full":
        model.to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[base_dtype]))
    if method == "qlora":
        quantize(model, quant)
    if method != "full":
        apply_lora(model, lora_config)
    return model


def _saved_activation_bytes(model, batch_size, seq_len, dtype):
    """Bytes autograd keeps for the backward pass of one training forward (weights and buffers excluded).

    Counted once the forward is done, over the storages still alive: a tensor saved by a graph
    that was then dropped (a detached side computation) is gone by then, and since every storage
    counted is alive at once, no two share an address.
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = []

    def pack(t):
        storage = t.untyped_storage()
        saved.append((StorageWeakRef(storage), storage.data_ptr(), storage.nbytes()))
        return t
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(x, x, loss_only=True)
    alive = {ptr: nbytes for ref, ptr, nbytes in saved if not ref.expired() and ptr not in own}
    del loss  # (its graph kept the saved tensors alive until they were counted)
    return sum(alive.values())


def _features(config, r_cols):
    """Per token of one block: [C, MLP width, key/value width, heads, LoRA columns], the widths of what it saves."""
    return [config.n_embd, config.mlp_width, config.kv_heads * config.head_size, config.n_head, r_cols]


def lora_columns(model):
    """Sum of the LoRA ranks inside block 0: the (B, T, r) tensors LoRA adds per block."""
    return sum(sum(m.r.values()) for p, m in model.named_modules() if hasattr(m, "lora_A") and ".h.0." in p + ".")


def _calibration_configs(config):
    """Tiny configs of the same family whose widths vary independently (n_head, kv heads, head size, MLP)."""
    out = []
    for n_head, kv_div, hs, mlp in ((2, 1, 8, 48), (4, 2, 8, 40), (4, 1, 16, 72), (2, 2, 16, 32), (8, 4, 8, 96)):
        kw = dict(n_head=n_head, n_embd=n_head * hs, block_size=64, vocab_size=64, tokenizer="byte",
                  intermediate_size=mlp)
        if config.family == "llama":
            kw.update(n_kv_head=n_head // kv_div, head_dim=None)
        elif config.family == "opt":
            kw.update(word_embed_proj_dim=None)
        out.append(GPTConfig(**{**config.to_dict(), **kw}))
    return out


def activation_bytes(config, method, lora_config, quant="nf4", dtype="fp32", batch_size=1, seq_len=512,
                     gradient_checkpointing=False, r_cols=None):
    """Saved-activation bytes of one training step at the real shape, from a fit on tiny real blocks.

    Each tiny model is run at two lengths and with one and two blocks: the differences give the
    bytes per token of one block and of everything outside the blocks, free of what does not grow
    with the tokens (under autocast, the bf16 copies of frozen weights; memory_plan counts those).
    """
    lc = LoraConfig(**{**lora_config.__dict__, "r": min(lora_config.r, 4)})
    rows, per_layer, outside = [], [], []
    for small in _calibration_configs(config):
        slope = []
        for n_layer in (1, 2):
            torch.manual_seed(0)
            cfg = GPTConfig(**{**small.to_dict(), "n_layer": n_layer, "dropout": config.dropout})
            model = _build(cfg, method, lc, quant, "fp32", device="cpu").train()
            s8, s16 = (_saved_activation_bytes(model, 1, T, dtype) for T in (8, 16))
            slope.append((s16 - s8) / 8)
        rows.append(_features(small, lora_columns(model)))
        per_layer.append(slope[1] - slope[0])
        outside.append((slope[0] - per_layer[-1]) / small.n_embd)
    # Some widths move together in a family (GPT-2's key/value width is C; full fine-tuning has no LoRA
    # columns), so the system is rank-deficient: the minimum-norm solution (SVD, small singular values cut)
    # is the one well-defined answer, and the real shape has the same dependencies, so it is exact there.
    coef = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64), torch.tensor(per_layer, dtype=torch.float64)[:, None],
                              rcond=1e-9, driver="gelsd").solution[:, 0]
    if r_cols is None:
        r_cols = lora_columns(_build(GPTConfig(**{**config.to_dict(), "n_layer": 1}), method, lora_config, quant, "fp32"))
    layer = float(torch.tensor(_features(config, r_cols), dtype=torch.float64) @ coef)
    out = max(outside) * config.n_embd  # embeddings, final norm, the loss's dx: a few (B, T, C)
    tokens = batch_size * seq_len
    if gradient_checkpointing:  # each block's input (B, T, C) kept, plus one block recomputed at a time
        return tokens * (config.n_layer * config.n_embd * _BYTES[dtype] + layer + out)
    return tokens * (config.n_layer * layer + out)


def autocast_weight_copies(model, dtype):
    """Under bf16 autocast, the bf16 copy of each float linear weight that autograd keeps for grad_x.

    (The output head is cast inside the chunked loss and not kept; quantized layers save nothing.)
    """
    if dtype == "fp32":
        return 0
    return sum(m.weight.numel() * 2 for p, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 and not p.endswith("lm_head")
               and ".lora_" not in p + ".")


def transient_bytes(config, model, dtype, tokens, method, gradient_checkpointing):
    """The largest short-lived buffers of a step: the chunked loss's logit chunk and head copy
    (ops.LinearCrossEntropy in fp32: padded from PAD_MIN_ROWS tokens on where MKL runs the head's forward;
    where oneDNN runs it, a frozen float head's layout for the input gradient, kept between steps unless
    gradient checkpointing is on, or a training head's weight-gradient product: one head-sized buffer either
    way. Under autocast the head's bf16 copy),
    and the dequantization buffer."""
    padded = tokens >= LinearCrossEntropy.PAD_MIN_ROWS
    kept_layout = method == "lora" and not gradient_checkpointing
    trains_head = method == "full"  # its weight gradient on oneDNN: one (V, C) product per 512-row chunk
    Vp, E = config.vocab_size + (-config.vocab_size % 64 if padded else 0), config.embed_dim
    if dtype == "fp32":
        loss = (Vp * E * 4 if padded or kept_layout or trains_head else 0) + min(tokens, 512 if trains_head else 128) * Vp * 4
    else:
        loss = Vp * E * 2 + min(tokens, 512) * Vp * (2 + 4)
    # a layer is dequantized in row chunks of at most MAX_CHUNK weights: fp32 levels (+ their bf16 copy), and for
    # NF4 the int32 index of its packed bytes (2 bytes a weight)
    per_weight = 4 + (0 if dtype == "fp32" else 2)
    quantized = [min(m.in_features * m.out_features, MAX_CHUNK + m.in_features) * (per_weight + 2 * (m.method == "nf4"))
                 for m in model.modules() if isinstance(m, QuantizedLinear)]
    return loss + max(quantized, default=0)


def memory_plan(config, method, lora_config, quant="nf4", dtype="fp32", base_dtype="fp32", batch_size=1, seq_len=512,
                gradient_checkpointing=False):
    """Bytes of one training step's state for a method ("full", "lora" or "qlora"), as a dict."""
    model = _build(config, method, lora_config, quant, base_dtype)
    trainable, total = count_parameters(model)
    frozen = _nbytes(p for p in model.parameters() if not p.requires_grad) + _nbytes(model.buffers())
    master = 4 * trainable  # trainable weights are fp32 (master weights under autocast)
    plan = dict(method=method, trainable=trainable, total=total,
                weights=frozen + (master if method == "full" else 0),
                lora=0 if method == "full" else master, grads=4 * trainable, optimizer=8 * trainable,
                quantized=_nbytes(b for m in model.modules() if isinstance(m, QuantizedLinear) for b in m.buffers()),
                activations=int(activation_bytes(config, method, lora_config, quant, dtype, batch_size, seq_len,
                                                 gradient_checkpointing, lora_columns(model))),
                weight_copies=autocast_weight_copies(model, dtype),
                transient=transient_bytes(config, model, dtype, batch_size * seq_len, method, gradient_checkpointing))
    plan["total_bytes"] = sum(plan[k] for k in ("weights", "lora", "grads", "optimizer", "activations", "weight_copies",
                                                   "transient"))
    return plan


def _gb(n):
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def format_plan(plans, title):
    """A markdown table: one column per method."""
    names = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}
    head = "| " + title + " | " + " | ".join(names[p["method"]] + (f" ({p['quant']})" if p["method"] == "qlora" else "")
                                             for p in plans) + " |"
    lines = [head, "|---|" + "---:|" * len(plans)]
    for key, label in (("weights", "weights (frozen base, or fp32 master weights)"), ("lora", "LoRA weights (fp32)"),
                       ("grads", "gradients (fp32)"), ("optimizer", "AdamW state (2 x fp32)"),
                       ("activations", "activations (estimate)"),
                       ("weight_copies", "bf16 copies of fp32 weights kept by autocast"),
                       ("transient", "loss chunk + dequantization buffers"), ("total_bytes", "**total**")):
        lines.append(f"| {label} | " + " | ".join(_gb(p[key]) for p in plans) + " |")
    return "\n".join(lines)


def plan_table(config, lora_config, quant="nf4", dtype="fp32", base_dtype="fp32", batch_size=1, seq_len=512,
               gradient_checkpointing=False, title="bytes"):
    plans = []
    for method in METHODS:
        plan = memory_plan(config, method, lora_config, quant, dtype, base_dtype, batch_size, seq_len,
                           gradient_checkpointing)
        plan["quant"] = quant
        plans.append(plan)
    return plans, format_plan(plans, title)
