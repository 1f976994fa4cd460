"""How many parameters LoRA trains, and how big the adapter is, computed without allocating a weight.

The model is built on the meta device (shapes only), so even GPT-3 175B's shape costs about a
second and no memory. Reproduces the LoRA paper's counts:

    python -m minilora.params --model gpt2 --r 8 --target_modules q_proj v_proj
    python -m minilora.params --model linear4096 --r 8       # the single 4096x4096 matrix
    python -m minilora.params --table                        # the README's table, as markdown
    python -m minilora.params --memory --model llama2-7b --r 8 --quantize nf4 --batch_size 1 --seq_len 512
                                                             # what a training step needs (minilora.memory)

`parameter_report` is importable and side-effect free (train.py --dry_run reuses it).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from minilora.cli import main_guard, opt, parse_args
from minilora.config import PRESETS, GPTConfig
from minilora.errors import MiniloraError
from minilora.lora import LoraConfig, apply_lora, count_parameters, trainable_line
from minilora.memory import plan_table
from minilora.model import GPT
from minilora.targets import target_modules_arg

LINEAR4096 = "linear4096"  # one 4096x4096 weight, the example of the LoRA explainers


def build_meta_model(model_name_or_config):
    """A model with shapes but no storage: a GPT preset name, a GPTConfig, or "linear4096"."""
    if isinstance(model_name_or_config, GPTConfig):
        config = model_name_or_config
    elif model_name_or_config == LINEAR4096:
        with torch.device("meta"):
            return nn.ModuleDict({"proj": nn.Linear(4096, 4096, bias=False)})  # a container, so "proj" can be wrapped
    elif isinstance(model_name_or_config, str):
        config = GPTConfig.from_name(model_name_or_config) if model_name_or_config in PRESETS else None
        if config is None:
            raise MiniloraError(f"unknown model {model_name_or_config!r}; use one of {', '.join([*PRESETS, LINEAR4096])}")
    else:
        raise MiniloraError(f"model must be a preset name or a GPTConfig, got {type(model_name_or_config).__name__}")
    with torch.device("meta"):
        return GPT(config)  # GPT skips weight init on meta


def parameter_report(model_name_or_config, lora_config):
    """Counts and sizes for LoRA `lora_config` on a model (see build_meta_model). Prints nothing.

    Returns a dict: trainable, total (PEFT's "all params": base + adapter, tied weights once),
    base, percent (PEFT's trainable%), ratio (base / trainable), adapter_bytes_fp32/_bf16
    (tensor data of everything trainable, which is what the adapter file holds) and
    checkpoint_bytes_fp32/_bf16 (the full base model).
    """
    model = build_meta_model(model_name_or_config)
    base = count_parameters(model)[1]
    apply_lora(model, lora_config)
    trainable, total = count_parameters(model)
    return dict(
        model=model_name_or_config if isinstance(model_name_or_config, str) else "custom",
        r=lora_config.r, target_modules=lora_config.target_modules,
        trainable=trainable, total=total, base=base, percent=100 * trainable / total, ratio=base / trainable,
        adapter_bytes_fp32=4 * trainable, adapter_bytes_bf16=2 * trainable,
        checkpoint_bytes_fp32=4 * base, checkpoint_bytes_bf16=2 * base,
    )


def format_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.{2 if n < 10 else 1}f} {unit}"
        n /= 1024


def format_report(rep):
    """The PEFT line, then the adapter's size against the full checkpoint's."""
    return "\n".join([
        trainable_line(rep["trainable"], rep["total"]),
        f"adapter: {rep['trainable']:,d} params = {format_bytes(rep['adapter_bytes_fp32'])} fp32, "
        f"{format_bytes(rep['adapter_bytes_bf16'])} bf16 (tensor data; file headers add a few KiB)",
        f"full checkpoint: {rep['base']:,d} params = {format_bytes(rep['checkpoint_bytes_fp32'])} fp32, "
        f"{format_bytes(rep['checkpoint_bytes_bf16'])} bf16 ({rep['ratio']:,.0f}x the adapter's parameters)",
    ])


# The README table: (model, r, targets, what the paper / explainer says)
TABLE = [
    ("gpt2", 8, ["q_proj", "v_proj"], "PEFT's GPT-2 example line"),
    ("gpt2-medium", 4, ["q_proj", "v_proj"], "0.35M (LoRA paper, Table 3)"),
    ("gpt3-175b", 8, ["q_proj", "v_proj"], "37.7M (LoRA paper, Table 4)"),
    ("gpt3-175b", 1, ["q_proj", "v_proj"], "4.7M (LoRA paper, Table 4)"),
    (LINEAR4096, 8, ["proj"], "65,536 vs 16,777,216: 256x fewer"),
    # The guide's setting on its own model, then r=8 on q/v for today's open models: PEFT prints the same lines.
    ("opt-350m", 16, ["q_proj", "v_proj"], "the guide's LoraConfig; PEFT: 1,572,864 / 332,769,280"),
    ("opt-125m", 8, ["q_proj", "v_proj"], "PEFT: 294,912 / 125,534,208"),
    ("llama2-7b", 8, ["q_proj", "v_proj"], "PEFT: 4,194,304 / 6,742,609,920"),
    ("llama3-8b", 8, ["q_proj", "v_proj"], "PEFT: 3,407,872 / 8,033,669,120"),
    ("mistral-7b", 8, ["q_proj", "v_proj"], "PEFT: 3,407,872 / 7,245,139,968"),
    ("qwen2.5-0.5b", 8, ["q_proj", "v_proj"], "PEFT: 540,672 / 494,573,440"),
    ("smollm2-135m", 8, ["q_proj", "v_proj"], "PEFT: 460,800 / 134,975,808"),
    ("tinyllama-1.1b", 8, ["q_proj", "v_proj"], "PEFT: 1,126,400 / 1,101,174,784"),
]


def format_table(rows=TABLE):
    lines = ["| model | r | targets | LoRA params | base params | base / LoRA | trainable% | "
             "adapter fp32 / bf16 | full checkpoint fp32 / bf16 | published |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r, targets, published in rows:
        rep = parameter_report(name, LoraConfig(r=r, lora_alpha=r, target_modules=targets))
        lines.append(
            f"| {name} | {r} | {', '.join(targets)} | {rep['trainable']:,d} | {rep['base']:,d} | {rep['ratio']:,.0f}x | "
            f"{rep['percent']:.4f} | {format_bytes(rep['adapter_bytes_fp32'])} / {format_bytes(rep['adapter_bytes_bf16'])} | "
            f"{format_bytes(rep['checkpoint_bytes_fp32'])} / {format_bytes(rep['checkpoint_bytes_bf16'])} | {published} |")
    return "\n".join(lines)


@dataclass
class Args:
    """Trainable-parameter count and adapter size for LoRA on a model, computed on the meta device."""
    model: str = opt("gpt2", f"GPT preset ({', '.join(PRESETS)}) or {LINEAR4096} (one 4096x4096 matrix)")
    r: int = opt(8, "LoRA rank")
    target_modules: list[str] = opt(["q_proj", "v_proj"], "module names (space or comma separated), all-linear, "
                                                          "or one regex over module paths")
    bias: str = opt("none", "which biases train too", choices=["none", "all", "lora_only"])
    table: bool = opt(False, "print the README's parameter-savings table (markdown) instead")
    memory: bool = opt(False, "print the memory of a training step for full fine-tuning, LoRA and QLoRA instead")
    quantize: str = opt("nf4", "--memory: the QLoRA column's base format", choices=["nf4", "int8"])
    gradient_checkpointing: bool = opt(False, "--memory: recompute activations in the backward pass")
    batch_size: int = opt(1, "--memory: rows per step")
    seq_len: int = opt(512, "--memory: tokens per row")
    dtype: str = opt("bf16", "--memory: compute dtype (bf16 = autocast, as on a GPU)", choices=["fp32", "bf16"])
    base_dtype: str = opt("bf16", "--memory: dtype of a frozen float base (train.py keeps fp32; PEFT users bf16)",
                          choices=["fp32", "bf16"])


def main(argv=None):
    args = parse_args(Args, argv)
    if args.table:
        print(format_table())
        return
    targets = target_modules_arg(args.target_modules)  # train.py's rule: names, q_proj,v_proj, all-linear or a regex
    if args.memory:
        config = build_meta_model(args.model).config if args.model != LINEAR4096 else None
        if config is None:
            raise MiniloraError("--memory needs a GPT preset, not linear4096")
        lora = LoraConfig(r=args.r, lora_alpha=args.r, target_modules=targets)
        _, table = plan_table(config, lora, args.quantize, args.dtype, args.base_dtype, args.batch_size, args.seq_len,
                              args.gradient_checkpointing, title=f"{args.model}, r={args.r}, {args.batch_size}x{args.seq_len}"
                              + (", checkpointing" if args.gradient_checkpointing else ""))
        print(table)
        return
    if args.model == LINEAR4096 and targets == ["q_proj", "v_proj"]:
        targets = ["proj"]  # the default targets name GPT modules; the bare matrix has only this one
    config = LoraConfig(r=args.r, lora_alpha=args.r, bias=args.bias, target_modules=targets)
    print(format_report(parameter_report(args.model, config)))


if __name__ == "__main__":
    main_guard(main)
