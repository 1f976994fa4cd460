"""The training loop: LoRA or full fine-tuning (or pretraining) of the GPT, on one process or many.

train.py is these calls in a straight line; the quickstart makes the same ones:

    cfg = TrainConfig(init_from="out/base", data="train.jsonl", lora_r=8, max_iters=200)
    with start_run(cfg) as run:                   # runtime (device, dtype, DDP), model + LoRA, data
        result = train(run.model, run.dataset, cfg, run.rt, eval_fn=run.eval_fn)   # TrainResult
        save_output(run.model, cfg, run.info, run.rt, result)   # adapter (PEFT) or model + minilora.json

Exactness is the design goal: a checkpoint holds everything the next step depends on (trainable
weights, optimizer, GradScaler, every RNG, the data loader's position, the step), so `--resume`
reproduces an uninterrupted run loss for loss (bit for bit in fp32 on a CPU), and the loss is
normalised by the step's total target-token count, so k micro-batches of B rows, or N ranks of
B rows, give the same gradient as one batch of k*B or N*B rows.
"""

import dataclasses
import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from minilora.adapter_files import save_adapter
from minilora.adapters import set_adapter
from minilora.checkpoint import find_checkpoint, load_checkpoint, prune_step_checkpoints, restore_step_checkpoint, \
    rng_state, save_checkpoint, save_step_checkpoint, seed_everything, set_rng_state, step_checkpoint_path
from minilora.cli import opt
from minilora.config import PRESETS
from minilora.chat import TEMPLATE_FILE, load_chat_template, write_template
from minilora.data import is_conversational, load_dataset
from minilora.errors import MiniloraError
from minilora.fileio import atomic_open
from minilora.loading import RUN_FILE, RunInfo, load_model, model_config, template_dirs
from minilora.lora import LoraConfig, apply_lora, count_parameters, merge_and_unload, trainable_line
from minilora.targets import split_list, target_modules_arg
from minilora.model import GPT
from minilora.ops import forget_packed, kernel_summary
from minilora.params import format_report, parameter_report
from minilora.progress import Progress, fmt_time, peak_memory_mb
from minilora.runtime import autocast_context, cleanup, keep_freed_memory, resolve_dtype, setup_runtime
from minilora.tasks import exact_match_accuracy
from minilora.tokenizer import get_tokenizer


@dataclass
class TrainConfig:
    """Fine-tune the GPT with LoRA (or in full), or pretrain it from scratch."""
    # ---- model and output ----
    init_from: str = opt("scratch", "'scratch' (a --model preset), an HF model name or dir (GPT-2, OPT, Llama, Mistral, Qwen2), or a minilora output dir")
    model: str = opt("tiny", f"preset for --init_from scratch: {', '.join(PRESETS)}")
    out_dir: str = opt("out", "where the adapter (or full model), minilora.json, log.jsonl and checkpoint/ go")
    resume: bool = opt(False, "continue exactly from out_dir/checkpoint (weights, optimizer, RNG, data position)")
    dry_run: bool = opt(False, "build on the meta device, print the trainable-parameter report and exit")
    # ---- LoRA (lora_r 0 trains every weight) ----
    lora_r: int = opt(8, "LoRA rank; 0 = full fine-tuning")
    lora_alpha: float = opt(16.0, "LoRA alpha; updates are scaled by alpha/r (alpha/sqrt(r) with --use_rslora)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA branch's input")
    target_modules: list[str] = opt(["q_proj", "v_proj"], "module names to adapt (q_proj v_proj, or q_proj,v_proj), "
                                                          "all-linear, or one regex over module paths ('.*attn\\.(q|v)_proj')")
    use_rslora: bool = opt(False, "rank-stabilised scaling alpha/sqrt(r)")
    bias: str = opt("none", "biases that train too (and are saved with the adapter)", choices=["none", "all", "lora_only"])
    modules_to_save: list[str] = opt([], "modules trained in full and saved with the adapter, e.g. lm_head")
    layers_to_transform: list[str] = opt([], "block indices to adapt (0 1, or 0,1); default: every block")
    init_lora_weights: str = opt("true", "true: kaiming A, zero B; gaussian: A ~ N(0, 1/r^2); false: both random",
                                 choices=["true", "false", "gaussian"])
    task_type: str = opt("CAUSAL_LM", "PEFT's task_type, written to adapter_config.json", choices=["CAUSAL_LM"])
    use_dora: bool = opt(False, "DoRA: LoRA on each weight row's direction plus a trained magnitude (Liu et al. 2024)")
    loraplus_lr_ratio: Optional[float] = opt(None, "LoRA+ (Hayou et al. 2024): lora_B (and 1-D parameters) learn "
                                                   "this many times faster than lora_A, as PEFT's "
                                                   "create_loraplus_optimizer; the paper suggests 16")
    full_finetune: bool = opt(False, "train all weights (same as --lora_r 0)")
    quantize: Optional[str] = opt(None, "store the frozen base in 4-bit NF4 (QLoRA, with double quantization) or int8; "
                                        "LoRA only", choices=["nf4", "int8"])
    # ---- data ----
    data: Optional[str] = opt(None, "training data: a .txt file, a directory of .txt files, or records in a .jsonl, "
                                    ".json (an array) or .csv file")
    val_data: Optional[str] = opt(None, "held-out data (same format); default: the last --val_fraction of --data")
    val_fraction: float = opt(0.1, "share of --data held out for validation")
    text_field: Optional[str] = opt(None, "records: train on the whole text of this field (instead of prompt/completion)")
    prompt_field: str = opt("prompt", "JSONL: field holding the prompt (masked out of the loss)")
    completion_field: str = opt("completion", "JSONL: field holding the completion (the loss covers it)")
    template: Optional[str] = opt(None, "JSONL: build the prompt from the line's fields, e.g. 'Q: {question} A: '")
    packing: bool = opt(False, "JSONL: pack examples into full rows instead of padding each to the batch's longest")
    on_too_long: str = opt("truncate", "JSONL examples longer than the context", choices=["truncate", "error"])
    chat_template: Optional[str] = opt(None, "conversational JSONL ({\"messages\": [...]}): a built-in (chatml, llama2, "
                                             "llama3, plain), a .jinja file or a tokenizer_config.json; default: the "
                                             "model's own, else the built-in its tokens suggest")
    block_size: Optional[int] = opt(None, "tokens per row (default: the model's context)")
    # ---- length and batch ----
    max_iters: int = opt(200, "optimizer steps (ignored when --epochs is set)")
    epochs: Optional[float] = opt(None, "train for this many passes over the data instead of --max_iters")
    batch_size: int = opt(8, "rows per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step (effective batch = batch_size*grad_accum*processes)")
    # ---- optimizer and schedule ----
    learning_rate: float = opt(1e-3, "peak learning rate")
    min_lr: Optional[float] = opt(None, "learning rate at the end of the cosine decay (default learning_rate/10)")
    warmup_iters: int = opt(10, "linear warm-up steps")
    lr_decay_iters: Optional[int] = opt(None, "steps of cosine decay (default: the run's length)")
    decay_lr: bool = opt(True, "cosine decay after warm-up; off = constant learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices (never on biases and norms)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the gradient norm to this; 0 = off")
    dropout: Optional[float] = opt(None, "override the model's dropout")
    # ---- evaluation, logging, checkpoints ----
    eval_interval: int = opt(50, "evaluate every N steps (and at the end); 0 = only at the end")
    eval_iters: int = opt(20, "validation batches per evaluation")
    eval_examples: int = opt(100, "JSONL prompt/completion data: held-out examples scored by greedy exact match "
                                  "at each evaluation (0 = off)")
    log_interval: int = opt(1, "log every N steps")
    checkpoint_interval: int = opt(50, "write out_dir/checkpoint every N steps (and at the end)")
    save_steps: int = opt(0, "write out_dir/checkpoint-N, a complete adapter (or model) directory, every N steps "
                             "(and at the end); 0 = off")
    save_total_limit: Optional[int] = opt(None, "keep only the newest K checkpoint-N directories (and the best one "
                                                "with --load_best_model_at_end); default: keep all")
    load_best_model_at_end: bool = opt(False, "the run's output is the checkpoint-N with the lowest validation loss "
                                              "(needs --save_steps a multiple of --eval_interval)")
    early_stopping_patience: Optional[int] = opt(None, "stop when the validation loss has not improved for P "
                                                       "evaluations in a row; default: never")
    # ---- system ----
    device: str = opt("auto", "auto (cuda, mps, cpu), or e.g. cpu, cuda, cuda:1")
    dtype: str = opt("auto", "fp32, bf16 (CPU and CUDA), fp16 (CUDA, with GradScaler); auto = bf16 where it is faster (a CUDA "
                     "GPU with bf16; a CPU where the model's forward + backward measures 1.2x fp32's speed in bf16), "
                     "else fp32",
                     choices=["auto", "fp32", "bf16", "fp16"])
    compile: bool = opt(False, "torch.compile the model")
    gradient_checkpointing: bool = opt(False, "recompute each block's activations in the backward pass: far less "
                                              "activation memory for one more forward per step")
    seed: int = opt(1337, "random seed (model init, LoRA init, data order, dropout)")

    def __post_init__(self):
        for name in ("max_iters", "batch_size", "grad_accum", "eval_iters", "log_interval", "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise MiniloraError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_interval < 0:
            raise MiniloraError(f"--eval_interval must be >= 0 (0 = only at the end), got {self.eval_interval}")
        if self.lora_r < 0:
            raise MiniloraError(f"--lora_r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")
        if self.epochs is not None and self.epochs <= 0:
            raise MiniloraError(f"--epochs must be positive, got {self.epochs}")
        # Bad optimizer values otherwise fail late and obscurely (AdamW's own ValueError, or NaN weights
        # many steps in); `not (lo <= x ...)` also catches NaN, which compares false with everything.
        if not 0 < self.learning_rate < math.inf:
            raise MiniloraError(f"--learning_rate must be positive and finite, got {self.learning_rate}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.learning_rate:
            raise MiniloraError(f"--min_lr must be between 0 and --learning_rate ({self.learning_rate}), got {self.min_lr}")
        for name in ("warmup_iters", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise MiniloraError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lora_alpha < math.inf:
            raise MiniloraError(f"--lora_alpha must be positive and finite, got {self.lora_alpha}")
        for name in ("beta1", "beta2", "lora_dropout", "dropout", "val_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise MiniloraError(f"--{name} must be in [0, 1), got {value}")
        if self.loraplus_lr_ratio is not None and not 0 < self.loraplus_lr_ratio < math.inf:
            raise MiniloraError(f"--loraplus_lr_ratio must be positive and finite, got {self.loraplus_lr_ratio}")
        if self.loraplus_lr_ratio is not None and not self.lora:
            raise MiniloraError("--loraplus_lr_ratio sets lora_B's learning rate, so it needs LoRA (--lora_r > 0)")
        self._check_checkpoint_options()
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise MiniloraError(f"--lr_decay_iters must be at least 1, got {self.lr_decay_iters}")
        if self.lora:
            lora_config(self)  # --target_modules, --layers_to_transform, ... refused now, not after the model loads
        if self.quantize and not self.lora:
            raise MiniloraError(f"--quantize {self.quantize} freezes the base in low precision, so it cannot be trained "
                                "in full; use LoRA (--lora_r > 0) on it, or drop --quantize")

    def _check_checkpoint_options(self):
        if self.save_steps < 0:
            raise MiniloraError(f"--save_steps must be >= 0 (0 = off), got {self.save_steps}")
        for name in ("save_total_limit", "early_stopping_patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise MiniloraError(f"--{name} must be at least 1, got {getattr(self, name)}")
        no_val = self.val_data is None and self.val_fraction == 0
        for name, on in (("load_best_model_at_end", self.load_best_model_at_end),
                         ("early_stopping_patience", self.early_stopping_patience is not None)):
            if on and (self.eval_interval == 0 or no_val):
                why = "--eval_interval is 0 (only at the end)" if self.eval_interval == 0 else "there is no validation split"
                raise MiniloraError(f"--{name} compares validation losses, but {why}; set --eval_interval N and "
                                    f"--val_fraction (or --val_data)")
        if self.load_best_model_at_end and (self.save_steps == 0 or self.save_steps % self.eval_interval):
            raise MiniloraError(f"--load_best_model_at_end picks among checkpoint-N directories by their validation loss: "
                                f"set --save_steps to a multiple of --eval_interval ({self.eval_interval}), "
                                f"got {self.save_steps}")

    @property
    def lora(self):
        return self.lora_r > 0 and not self.full_finetune


# ---- model ----------------------------------------------------------------------------------------

def lora_config(cfg, base_model=None):
    """The LoraConfig the --lora_* / PEFT-named options describe (list options by targets' one rule)."""
    layers = split_list(cfg.layers_to_transform)
    bad = [x for x in layers if not x.isdigit()]
    if bad:
        raise MiniloraError(f"--layers_to_transform takes block indices (0 1, or 0,1), got {bad[0]!r}")
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=target_modules_arg(cfg.target_modules),
                      lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, bias=cfg.bias,
                      modules_to_save=split_list(cfg.modules_to_save) or None,
                      layers_to_transform=[int(x) for x in layers] or None,
                      init_lora_weights={"true": True, "false": False}.get(cfg.init_lora_weights, cfg.init_lora_weights),
                      task_type=cfg.task_type, base_model_name_or_path=base_model)


def build_model(cfg, rt):
    """-> (model on rt.device in fp32 with only the weights to train requiring grad, RunInfo)."""
    if cfg.lora and cfg.init_from == "scratch":
        raise MiniloraError("LoRA needs a pretrained base, and --init_from scratch has none to save the adapter "
                            "against; pretrain with --lora_r 0 first, then --init_from that out_dir")
    # QLoRA: the frozen base in 4 (or 8) bits, quantized layer by layer as it is read; the adapter in fp32
    model, base = load_model(cfg.init_from, preset=cfg.model, dropout=cfg.dropout, trainable=True, quantize=cfg.quantize)
    adapters = list(getattr(model, "peft_config", {}))
    if cfg.lora and adapters:
        if rt.master:
            print(f"continuing the adapter from {cfg.init_from} (its own LoRA config; --lora_* options are ignored)")
        set_adapter(model, adapters)  # active and trainable again (a loaded adapter may arrive frozen)
    elif cfg.lora:
        apply_lora(model, lora_config(cfg, base))
    else:
        if adapters:
            model = merge_and_unload(model)  # full training continues from base + adapter folded in
        model.requires_grad_(True)
    model.to(device=rt.device, dtype=torch.float32)  # master weights stay fp32; autocast does the rest
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model, RunInfo("lora" if cfg.lora else "full", base, model.config.tokenizer)


def dry_run(cfg):
    """Build on the meta device (no weights, no download), apply LoRA; returns the report's text."""
    config = model_config(cfg.init_from, preset=cfg.model)
    if cfg.lora:
        return format_report(parameter_report(config, lora_config(cfg)))
    with torch.device("meta"):
        total = count_parameters(GPT(config))[1]
    return trainable_line(total, total) + "  (full fine-tuning: every weight trains)"


@dataclass
class Run:
    """What a training run works on: its runtime, model, data and evaluation (see start_run)."""
    cfg: "TrainConfig"
    rt: object
    model: torch.nn.Module
    info: RunInfo
    dataset: object
    eval_fn: object

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        cleanup(self.rt, completed=exc_type is None)  # after an error, no barrier: peers may never reach it


def start_run(cfg):
    """The runtime, the model to train and the data, as train.py and the quickstart use them."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise MiniloraError(f"--out_dir {cfg.out_dir} is a file; pass a directory (new or one train.py wrote)")
    rt = setup_runtime(cfg)
    try:
        model, info = build_model(cfg, rt)
        tokenizer = get_tokenizer(info.tokenizer)
        if tokenizer.n_vocab > model.config.vocab_size:  # its ids would index past the embedding
            raise MiniloraError(f"the model's tokenizer {info.tokenizer!r} has {tokenizer.n_vocab} ids but its config.json "
                                f"says vocab_size {model.config.vocab_size}; fix config.json (or its minilora.tokenizer)")
        if cfg.chat_template or (cfg.data and is_conversational(cfg.data)):  # recorded in out_dir by save_output
            info.chat_template = load_chat_template(cfg.chat_template, template_dirs(cfg.init_from, tokenizer=info.tokenizer),
                                                    tokenizer)
        dataset = load_data(cfg, tokenizer, model.config.block_size, rt, info.chat_template)
        eval_fn = task_eval_fn(dataset, info.tokenizer, cfg.eval_examples, cfg.block_size or model.config.block_size)
    except BaseException:
        cleanup(rt, completed=False)
        raise
    return Run(cfg, rt, model, info, dataset, eval_fn)


# ---- data --------------------------------------------------------------------------------------

def load_data(cfg, tokenizer, block_size, rt, chat_template=None):
    """The dataset for `cfg.data`; each rank takes its own rows of every global batch."""
    if cfg.data is None:
        raise MiniloraError("no training data: pass --data FILE (.txt, a directory of .txt files, .jsonl, .json or .csv)")
    if cfg.block_size is not None and cfg.block_size > block_size:
        raise MiniloraError(f"--block_size {cfg.block_size} exceeds the model's context ({block_size})")
    return load_dataset(
        cfg.data, get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer, cfg.block_size or block_size,
        text_field=cfg.text_field, prompt_field=cfg.prompt_field, completion_field=cfg.completion_field,
        template=cfg.template, val_fraction=cfg.val_fraction, val_path=cfg.val_data, packing=cfg.packing,
        seed=cfg.seed, cache_dir=os.path.join(cfg.out_dir, ".cache"), on_too_long=cfg.on_too_long,
        rank=rt.rank, world_size=rt.world_size, chat_template=chat_template)


def task_eval_fn(dataset, tokenizer, n_examples, block_size):
    """Exact-match accuracy on held-out prompt/completion pairs, when the data has them (else None).

    Of the first n_examples held-out pairs, scores those that fit the context whole (prompt +
    completion + end-of-text): a truncated reference could never be matched.
    """
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    pairs = [(len(tok.encode(p)), len(tok.encode(c)) + 1, p, c)  # + 1: the end-of-text token
             for p, c in (getattr(dataset, "val_examples", None) or [])[:n_examples]]
    pairs = [pair for pair in pairs if pair[0] + pair[1] <= block_size]
    if not pairs:
        return None
    # one generation length for all: each prompt plus it must fit the context
    max_new = min(max(n for _, n, _, _ in pairs), block_size - max(n for n, _, _, _ in pairs))
    examples = [{"prompt": p, "completion": c} for _, n, p, c in pairs if n <= max_new]
    if not examples:
        return None

    def eval_fn(model):
        return {"accuracy": exact_match_accuracy(model, tok, examples, max_new_tokens=max_new)}
    return eval_fn


# ---- optimization pieces -----------------------------------------------------------------------

def get_lr(it, cfg):
    """Linear warm-up to learning_rate over warmup_iters, then cosine decay to min_lr."""
    min_lr = cfg.learning_rate / 10 if cfg.min_lr is None else cfg.min_lr
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if not cfg.decay_lr:
        return cfg.learning_rate
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it >= decay_iters:
        return min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - min_lr)


def configure_optimizer(model, weight_decay, lr, betas, device_type, loraplus_lr_ratio=None):
    """AdamW over the trainable parameters; matrices decay, biases and norm gains (1-D) do not.

    loraplus_lr_ratio (LoRA+, PEFT's create_loraplus_optimizer): lora_B and every 1-D parameter (biases,
    norms, DoRA's magnitude) get lr * ratio, lora_A and other matrices lr. Each group's "lr_scale" is
    what the schedule's lr is multiplied by (train() sets group["lr"] every step).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise MiniloraError("the model has no trainable parameters; check --lora_r and --target_modules")
    if loraplus_lr_ratio is None:
        groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
                  {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    else:
        is_b = [".lora_B." in n for n, _ in named]
        groups = [{"params": [p for (_, p), b in zip(named, is_b) if p.dim() >= 2 and not b], "weight_decay": weight_decay,
                   "lr_scale": 1.0},
                  {"params": [p for (_, p), b in zip(named, is_b) if b], "weight_decay": weight_decay,
                   "lr_scale": loraplus_lr_ratio},
                  {"params": [p for (_, p), b in zip(named, is_b) if p.dim() < 2 and not b], "weight_decay": 0.0,
                   "lr_scale": loraplus_lr_ratio}]
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    # one kernel for the whole update: on the CPU 5.6x faster than torch's default per-tensor path at gpt2's
    # 124M parameters (55 vs 310 ms, AMD Zen 5), which makes temporaries the size of each weight
    fused = True if device_type in ("cpu", "cuda") else None  # None: torch's default elsewhere (mps)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=fused)


def forward_backward(model, batches, rt, scaler=None):
    """Accumulate one optimizer step's gradients over `batches` [(x, y), ...]; return its mean loss.

    Each micro-batch contributes (sum of its token losses) / (target tokens in the whole step,
    over every rank), so the result is exactly one big batch's mean, even when -100 masks make
    micro-batches hold different numbers of target tokens. DDP averages gradients over ranks,
    hence the world_size factor; no_sync skips the all-reduce on all but the last micro-batch.
    """
    n_tokens = torch.stack([(y != -100).sum() for _, y in batches]).sum().float()
    if rt.ddp:
        dist.all_reduce(n_tokens)
    n_tokens = n_tokens.clamp(min=1)
    step_loss = torch.zeros((), device=rt.device)
    for i, (x, y) in enumerate(batches):
        sync = not rt.ddp or i == len(batches) - 1
        with nullcontext() if sync else model.no_sync():
            with autocast_context(rt.device_type, rt.dtype):
                _, mean_loss = model(x, y, loss_only=True)  # never materialises the (B, T, V) logits
            loss = mean_loss * (y != -100).sum() / n_tokens  # this micro-batch's token-loss sum, over the step's
            (scaler.scale(loss * rt.world_size) if scaler else loss * rt.world_size).backward()
        step_loss += loss.detach()
    if rt.ddp:
        dist.all_reduce(step_loss)  # every rank sees the global loss, so all stop together on NaN
    return step_loss.item()


def optimizer_step(optimizer, scaler, grad_clip):
    """Unscale (fp16), clip, step, zero; returns the gradient norm before clipping.

    The norm is computed even with clipping off: a non-finite one means this step would write
    inf/NaN (or, through Adam's overflowing second moment, silently nothing) into the weights, so
    the step is skipped and the caller stops. Under fp16 the GradScaler owns that case: it skips
    the step itself and lowers its scale, as loss scaling is meant to.
    """
    scaler.unscale_(optimizer)  # a no-op when the scaler is disabled (fp32, and bf16's wide range)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
    else:  # one fused reduction; the gradients stay as they are
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
    if math.isfinite(norm) or scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


@torch.no_grad()
def estimate_val_loss(model, dataset, cfg, rt):
    """Mean token loss over up to eval_iters validation batches (None if there is no split)."""
    model.eval()
    total, count = 0.0, 0
    # the global batch size, so the same rows are scored whatever the number of processes
    for x, y in dataset.val_batches(cfg.batch_size * rt.world_size, rt.device, max_batches=cfg.eval_iters):
        with autocast_context(rt.device_type, rt.dtype):
            logits, _ = model(x, all_logits=True)  # (B, T, V)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    model.train()
    return total / count if count else None


# ---- the loop ----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    iter_num: int                 # optimizer steps done in total (including any before a resume)
    losses: dict                  # step -> training loss, for the steps this call ran
    val_loss: Optional[float]     # at the last evaluation
    best_val_loss: Optional[float]
    metrics: dict                 # eval_fn's output at the last evaluation, e.g. {"accuracy": 0.93}
    elapsed: float                # seconds of this call's loop
    tokens_per_sec: float
    peak_memory_mb: float
    best_model_checkpoint: Optional[str] = None  # checkpoint-N with the lowest validation loss (--save_steps)
    stopped_early: bool = False                  # --early_stopping_patience ended the run before max_iters


def training_dtype(cfg, rt, model):
    """-> (dtype, why) for this run. --dtype auto on the CPU times the model's own forward + backward on
    a slice of a batch in fp32 and under bf16 autocast (runtime.resolve_dtype decides); nothing of the
    model changes (its gradients are cleared, the RNG restored). Under DDP every rank takes rank 0's answer."""
    config = model.config
    T = cfg.block_size or config.block_size
    rows = max(1, min(cfg.batch_size, 1024 // T))  # as many tokens as the fp32 kernels are timed on

    def step_speedup():
        x = torch.randint(0, config.vocab_size, (rows, T), generator=torch.Generator().manual_seed(0))
        seconds = {}
        with torch.random.fork_rng():
            for dtype in ("fp32", "bf16", "fp32", "bf16"):  # the first of each is a warm-up
                t0 = time.perf_counter()
                with autocast_context(rt.device_type, dtype):
                    _, loss = model(x, x, loss_only=True)
                loss.backward()
                seconds[dtype] = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return seconds["fp32"] / seconds["bf16"]

    widest = (min(2048, cfg.batch_size * T), config.n_embd, config.mlp_width)
    choice = list(resolve_dtype(cfg.dtype, rt.device_type, widest, step_speedup))
    if rt.ddp:
        dist.broadcast_object_list(choice, src=0)
    return tuple(choice)


def total_iters(cfg, dataset, rt):
    """--max_iters, or --epochs converted to optimizer steps (each takes batch_size*grad_accum*world rows)."""
    if cfg.epochs is None:
        return cfg.max_iters
    batches = dataset.batches_per_epoch(cfg.batch_size * rt.world_size)
    return max(1, math.ceil(cfg.epochs * batches / cfg.grad_accum))


def train(model, dataset, cfg, rt, eval_fn=None, stream=None, info=None):
    """Run the optimizer steps `cfg` asks for (resuming from out_dir/checkpoint with cfg.resume).

    eval_fn(model) -> dict of metrics runs at each evaluation beside the validation loss (on the
    master process only). The model is trained in place; the returned TrainResult has the numbers.
    info: the run's RunInfo (start_run's run.info); with it, each checkpoint-N gets minilora.json (and
    the chat template) like the final output, so --init_from can start from it.
    """
    cfg = dataclasses.replace(cfg, max_iters=total_iters(cfg, dataset, rt))
    raw_model = model
    optimizer = configure_optimizer(raw_model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type,
                                    cfg.loraplus_lr_ratio)
    # fp16's narrow range needs loss scaling; bf16 has fp32's exponent range, so its scaler stays off
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "fp16")
    iter_num, best_val, kept = 0, None, {}
    checkpoint = find_checkpoint(cfg.out_dir)
    restored_dtype = False
    if cfg.resume and checkpoint:
        before = rt.dtype
        iter_num, best_val, kept = load_checkpoint(checkpoint, raw_model, optimizer, scaler, dataset, cfg, rt)
        restored_dtype = rt.dtype != before  # --dtype auto keeps what the run measured when it started
    elif checkpoint and not cfg.resume:
        raise MiniloraError(f"{cfg.out_dir} already holds a checkpoint; pass --resume to continue it, "
                            "or choose a new --out_dir")
    else:
        if cfg.resume and rt.master:
            print(f"--resume: no checkpoint in {cfg.out_dir} yet, starting at step 0")
        seed_everything(cfg.seed + rt.rank)  # from here on: per-rank dropout, independent of model building
    progress = Progress(cfg.out_dir, rt.master, iter_num if cfg.resume else None, stream)
    # timed after the checkpoint is read: a resumed run takes the dtype its start measured (resuming stays exact)
    rt.dtype, why = (rt.dtype, "auto: as measured when this run started") if restored_dtype else \
        training_dtype(cfg, rt, raw_model)
    progress.note(f"precision: {rt.dtype if rt.dtype == 'fp32' else rt.dtype + ' autocast'} ({why})")
    if rt.device_type == "cpu" and keep_freed_memory():
        progress.note("memory: malloc keeps what a step frees for the next one (runtime.keep_freed_memory)")
    if cfg.compile:
        model = torch.compile(model)
    if rt.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)

    if (cfg.load_best_model_at_end or cfg.early_stopping_patience) and next(iter(dataset.val_batches(1, max_batches=1)), None) is None:
        raise MiniloraError(f"--load_best_model_at_end and --early_stopping_patience compare validation losses, but "
                            f"{cfg.val_data or cfg.data} leaves no validation split; raise --val_fraction or pass --val_data")
    # the loop's own bookkeeping that --resume restores: the best checkpoint-N (step, val loss) and the
    # evaluations since the validation loss last improved (--early_stopping_patience)
    kept = {"best_step": None, "best_step_loss": None, "bad_evals": 0, "stopped_early": False, **kept}
    if kept["stopped_early"] and iter_num < cfg.max_iters:
        progress.note(f"the run stopped early at step {iter_num} (--early_stopping_patience); nothing left to train")
    start_iter, t0, t_log, tokens, tokens_log = iter_num, time.time(), time.time(), 0, 0
    losses, val_loss, metrics = {}, None, {}
    while iter_num < cfg.max_iters and not kept["stopped_early"]:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # LoRA+ gives lora_B a multiple
        batches = [dataset.next_batch(cfg.batch_size * rt.world_size, rt.device) for _ in range(cfg.grad_accum)]
        loss = forward_backward(model, batches, rt, scaler)
        if not math.isfinite(loss):
            raise stop(f"non-finite loss ({loss})", iter_num + 1, cfg,
                       "Lower --learning_rate, keep --grad_clip on, or use --dtype bf16/fp32")
        grad_norm = optimizer_step(optimizer, scaler, cfg.grad_clip)
        if not math.isfinite(grad_norm) and not scaler.is_enabled():  # the step was skipped (see optimizer_step)
            raise stop(f"non-finite gradient norm ({grad_norm})", iter_num + 1, cfg,
                       "Lower --lora_alpha (updates are scaled by alpha/r) or --learning_rate")
        iter_num += 1
        if iter_num == start_iter + 1 and kernel_summary():  # the fp32 kernels were timed by now
            progress.note(kernel_summary())
        n = sum(x.numel() for x, _ in batches) * rt.world_size
        tokens, tokens_log = tokens + n, tokens_log + n
        losses[iter_num] = loss
        last = iter_num == cfg.max_iters
        if iter_num % cfg.log_interval == 0 or last:
            now = time.time()
            tok_s, elapsed = tokens_log / max(now - t_log, 1e-9), now - t0
            eta = elapsed / (iter_num - start_iter) * (cfg.max_iters - iter_num)
            progress.record(step=iter_num, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_sec=tok_s,
                            elapsed=elapsed, epoch=dataset.epoch)
            progress.line(f"step {iter_num}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                          f"{fmt_time(elapsed)} elapsed | ETA {fmt_time(eta)}")
            t_log, tokens_log = now, 0
        step_loss = None  # this step's validation loss, if it was evaluated
        eval_step = (cfg.eval_interval and iter_num % cfg.eval_interval == 0) or last
        if rt.master and eval_step:
            val_loss, metrics = evaluate(raw_model, dataset, cfg, rt, eval_fn)
            step_loss = val_loss
            if val_loss is not None and (best_val is None or val_loss < best_val):
                best_val, kept["bad_evals"] = val_loss, 0
            elif val_loss is not None:
                kept["bad_evals"] += 1
            progress.record(step=iter_num, val_loss=val_loss, **metrics)
            shown = [f"val loss {val_loss:.4f}" if val_loss is not None else "no validation split"]
            progress.note(f"step {iter_num}: " + " | ".join(shown + [f"{k} {v:.4f}" for k, v in metrics.items()]))
        patience = cfg.early_stopping_patience
        if patience and eval_step and not last and agree(rt, rt.master and kept["bad_evals"] >= patience):
            kept["stopped_early"] = last = True
            progress.note(f"step {iter_num}: no better validation loss in {patience} evaluations; stopping early")
        if cfg.save_steps and (iter_num % cfg.save_steps == 0 or last) and rt.master:
            save_steps_checkpoint(raw_model, cfg, iter_num, step_loss, kept, info)
        if iter_num % cfg.checkpoint_interval == 0 or last:
            save_checkpoint(raw_model, optimizer, scaler, dataset, cfg, rt, iter_num, best_val, kept)

    elapsed = time.time() - t0
    forget_packed()  # the frozen head's layout for training (ops.packed_transpose) is of no use after it
    best = step_checkpoint_path(cfg.out_dir, kept["best_step"])
    if cfg.load_best_model_at_end and best and rt.master:  # out_dir/checkpoint keeps the last step, for --resume
        restore_step_checkpoint(raw_model, best)
        progress.note(f"best validation loss {kept['best_step_loss']:.4f} at step {kept['best_step']}: "
                      f"the output is {best}'s weights")
    result = TrainResult(iter_num, losses, val_loss, best_val, metrics, elapsed, tokens / max(elapsed, 1e-9),
                         peak_memory_mb(rt.device_type), best, kept["stopped_early"])
    if losses:
        progress.note(summary(result, cfg))
    return result


def agree(rt, flag):
    """The master's decision, on every rank (only the master evaluates), so all stop together."""
    if not rt.ddp:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_steps_checkpoint(raw_model, cfg, step, val_loss, kept, info=None):
    """--save_steps: write checkpoint-{step}, note it if its validation loss is the best, apply --save_total_limit."""
    extra = {}
    if info is not None:  # what save_output writes beside the weights, as of this step
        extra[RUN_FILE] = json.dumps(run_record(raw_model, cfg, info, step, val_loss), indent=2) + "\n"
        if info.chat_template is not None:
            extra[TEMPLATE_FILE] = info.chat_template.source
    save_step_checkpoint(raw_model, cfg.out_dir, step, val_loss, extra)
    if val_loss is not None and (kept["best_step_loss"] is None or val_loss < kept["best_step_loss"]):
        kept["best_step"], kept["best_step_loss"] = step, val_loss
    if cfg.save_total_limit:
        best = step_checkpoint_path(cfg.out_dir, kept["best_step"])
        prune_step_checkpoints(cfg.out_dir, cfg.save_total_limit, keep=best if cfg.load_best_model_at_end else None)


def stop(what, step, cfg, fix):
    """The error that ends a run gone numerically bad; out_dir's checkpoint is left as it was."""
    kept = find_checkpoint(cfg.out_dir)
    kept = f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint had been written yet"
    return MiniloraError(f"{what} at step {step}; stopping: {kept}. {fix}")


def evaluate(model, dataset, cfg, rt, eval_fn=None):
    """Validation loss and eval_fn's metrics, leaving every RNG as it was (so resumed runs match)."""
    state = rng_state()
    val_loss = estimate_val_loss(model, dataset, cfg, rt)
    metrics = eval_fn(model) if eval_fn else {}
    model.train()
    set_rng_state(state)
    return val_loss, metrics


def summary(result, cfg):
    val = "" if result.val_loss is None else f" | val loss {result.val_loss:.4f} (best {result.best_val_loss:.4f})"
    extra = "".join(f" | {k} {v:.4f}" for k, v in result.metrics.items())
    last = result.losses[max(result.losses)]
    return (f"done: {result.iter_num} steps in {fmt_time(result.elapsed)} | train loss {last:.4f}{val}{extra} | "
            f"{result.tokens_per_sec:,.0f} tok/s | peak memory {result.peak_memory_mb:,.0f} MiB | out_dir {cfg.out_dir}")


# ---- output ------------------------------------------------------------------------------------

def save_output(model, cfg, info, rt, result=None):
    """The run's product in out_dir: a PEFT adapter (LoRA) or an HF-layout model (full), + minilora.json."""
    if not rt.master:
        return
    model = getattr(model, "_orig_mod", model)
    os.makedirs(cfg.out_dir, exist_ok=True)
    # save_adapter/save_pretrained replace their whole directory, so write into a scratch one and move
    # the files over: out_dir's log.jsonl and checkpoint/ stay. Each file lands by an atomic rename.
    with tempfile.TemporaryDirectory(dir=cfg.out_dir, prefix=".output.") as tmp:
        target = os.path.join(tmp, "out")
        if info.kind == "lora":
            save_adapter(model, target)
        else:
            model.save_pretrained(target)
        for name in os.listdir(target):
            os.replace(os.path.join(target, name), os.path.join(cfg.out_dir, name))
    if info.chat_template is not None:  # generate.py and serve.py render conversations the way training did
        write_template(info.chat_template, cfg.out_dir)
    run = run_record(model, cfg, info, result.iter_num if result else None, result.val_loss if result else None)
    with atomic_open(os.path.join(cfg.out_dir, RUN_FILE), "w") as f:
        json.dump(run, f, indent=2)
        f.write("\n")


def run_record(model, cfg, info, iter_num=None, val_loss=None):
    """minilora.json: what the directory holds (kind), its base and tokenizer (what --init_from and
    generate.py load it with), and the run that made it."""
    return {"kind": info.kind, "base_model": info.base_model, "tokenizer": info.tokenizer,
            "chat_template": info.chat_template and info.chat_template.name,
            "model_config": model.config.to_dict(), "iter_num": iter_num, "val_loss": val_loss,
            "train_config": dataclasses.asdict(cfg)}
