"""Merge a LoRA adapter into its base model and write a standalone checkpoint (the base family's HF layout).

    python merge.py --adapter out/sql --out out/sql-merged                 # base read from the adapter
    python merge.py --base out/base --adapter out/sql --out out/merged --dtype bf16
    python generate.py --init_from out/sql-merged --prompt "list all users"   # no adapter needed now

W' = W + scaling * B @ A is computed in fp32 and cast once to the output dtype. Before anything is
written, the merged model is checked against the unmerged one on a fixed batch of random tokens:
max |logit difference| / max |unmerged logit| must stay under the tolerance (fp32 1e-4; the
written dtype's own, looser one for bf16/fp16). A failed check writes nothing. An existing --out is
left alone unless --force; the new directory appears in one rename. Every option: -h.

A chat template the adapter trained with (its chat_template.jinja, or tokenizer_config.json's
chat_template) is written into the merged directory as chat_template.jinja, so the merged model
renders conversations as the adapter did; without one, the base's tokenizer files carry the base's.
"""

import os
import time
from dataclasses import dataclass

import torch

from minilora.chat import template_source
from minilora.cli import DTYPE_CHOICES, dtype_name, main_guard, opt, parse_args, parse_dtype
from minilora.errors import MiniloraError
from minilora.hub import foreign_files
from minilora.loading import adapter_base, load_model
from minilora.lora import lora_layers, merge_and_unload
# Allowed max |Δlogit| / max |logit|. fp32 only sees the merge's rounding (~1e-7 per weight); bf16/fp16
# are measured against the unmerged fp32 model, so they include casting every weight (eps 2^-7, 2^-10):
# random tiny/small/gpt2-shape models with r=8 adapters measured 0.5-1.2e-2 in bf16 and 0.5-1.6e-3 in fp16,
# with extreme weights (std 0.3) up to 4.1e-2 and 6.1e-3; the defaults leave room above that.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}
SAMPLE_ROWS, SAMPLE_LEN, SAMPLE_SEED = 4, 32, 0  # the verification batch: random token ids, always the same


@dataclass
class Args:
    """Merge a LoRA adapter into its base model and write the result in the base family's HF layout."""
    adapter: str = opt("", "the PEFT-format adapter directory to merge (required)")
    out: str = opt("", "directory to write the merged model to (required)")
    base: str | None = opt(None, "base model dir or hub name; default: the base the adapter records")
    dtype: str = opt("fp32", "dtype of the written weights (the merge itself is always fp32)", choices=DTYPE_CHOICES)
    force: bool = opt(False, "replace an existing --out directory (one that holds only a saved model)")
    safe_merge: bool = opt(True, "refuse NaN/inf merged weights (--no-safe-merge skips it; the logit check still runs)")
    tolerance: float | None = opt(None, "max |Δlogit| / max |logit| allowed for the written dtype; "
                                        f"default {', '.join(f'{k} {v:g}' for k, v in TOLERANCE.items())}")


def check_out(out, force, inputs=()):
    """Refuse an --out we may not replace, before any work is done: never one of the inputs (the
    adapter or a base directory), inside one, or holding one, symlinks resolved."""
    real = os.path.realpath(out)
    for path in inputs:
        if path and os.path.exists(path):
            other = os.path.realpath(path)
            if os.path.commonpath([real, other]) in (real, other):
                raise MiniloraError(f"--out {out} would overwrite the input {path} (the same directory, inside it, "
                                    f"or holding it); choose another --out")
    if not os.path.lexists(out):
        return
    if not force:
        raise MiniloraError(f"{out} already exists; pass --force to replace it, or choose another --out")
    if not os.path.isdir(out):
        raise MiniloraError(f"{out} is a file, not a model directory; remove it or choose another --out")
    # save_pretrained swaps the whole directory, so --force may only replace a directory of its own files
    foreign = foreign_files(out)
    if foreign:
        raise MiniloraError(f"--force would delete {out}/{foreign[0]} (and {len(foreign) - 1} more), which is "
                            "not part of a saved model; choose another --out")


def sample_batch(config):
    g = torch.Generator().manual_seed(SAMPLE_SEED)
    return torch.randint(0, config.vocab_size, (SAMPLE_ROWS, min(SAMPLE_LEN, config.block_size)), generator=g)


@torch.no_grad()
def logits_of(model, idx):
    return model(idx, all_logits=True)[0].float()  # (B, T, V), every position: the check sees all of them


def verify(what, model, idx, ref, tolerance):
    """max |logits - ref| / max |ref| -> (absolute, relative); raises if over tolerance (NaN fails too)."""
    diff = (logits_of(model, idx) - ref).abs().max().item()
    rel = diff / max(ref.abs().max().item(), 1e-12)
    ok = rel <= tolerance  # False for NaN
    print(f"verify {what}: max |Δlogit| {diff:.3g} = {rel:.3g} of max |logit| "
          f"(tolerance {tolerance:g}) {'ok' if ok else 'FAILED'}")
    if not ok:
        raise MiniloraError(f"merged model disagrees with the unmerged one ({what}: {rel:.3g} > {tolerance:g} of the "
                            "logit scale); nothing was written. Check the adapter, or loosen --tolerance if expected")
    return diff, rel


def describe(model):
    """One line per adapter: rank, alpha, targets, wrapped layer count."""
    lines = []
    for name, c in model.peft_config.items():
        n = sum(name in layer.lora_A for _, layer in lora_layers(model))
        targets = c.target_modules if isinstance(c.target_modules, str) else ",".join(c.target_modules)
        lines.append(f"{name}: r={c.r} lora_alpha={c.lora_alpha}{' rslora' if c.use_rslora else ''} "
                     f"targets={targets} ({n} layers)")
    return "; ".join(lines)


def main(argv=None):
    args = parse_args(Args, argv)
    t0 = time.time()
    if not args.adapter or not args.out:
        raise MiniloraError("give --adapter DIR (the adapter to merge) and --out DIR (where the merged model goes)")
    if args.tolerance is not None and not args.tolerance > 0:
        raise MiniloraError(f"--tolerance must be a positive number, got {args.tolerance}")
    dtype = dtype_name(args.dtype)
    check_out(args.out, args.force, [args.adapter, args.base])  # before any work: a bad adapter is not read
    base = args.base or adapter_base(args.adapter, flag="--base")
    check_out(args.out, args.force, [base])
    template, template_file = template_source(args.adapter)  # travels to the merged model (see the module doc)

    try:
        model, _ = load_model(base, adapter=args.adapter)  # fp32 on the CPU, eval mode
    except MiniloraError as e:
        if args.base is not None:
            raise
        raise MiniloraError(f"{e} (the base {base!r} is what {args.adapter}/adapter_config.json records; "
                            f"if it moved, pass it with --base)") from None
    adapters = describe(model)
    idx = sample_batch(model.config)
    ref = logits_of(model, idx)  # the unmerged model: what the adapter defines

    # fp32 delta, cast once; safe_merge raises before changing any weight
    model = merge_and_unload(model, safe_merge=args.safe_merge)
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[dtype]
    # the merge itself is always held to fp32's tolerance; --tolerance loosens it only for --dtype fp32
    fp32_tolerance = tolerance if dtype == "fp32" else TOLERANCE["fp32"]
    diff, rel = verify("merged vs unmerged, fp32", model, idx, ref, fp32_tolerance)
    if dtype != "fp32":
        model.to(parse_dtype(dtype))  # the one cast, after the fp32 merge
        diff, rel = verify(f"written {dtype} vs unmerged fp32", model, idx, ref, tolerance)

    # config.json (tokenizer under "minilora") + model.safetensors (+ the adapter's chat template), one rename
    model.save_pretrained(args.out, chat_template=template)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"merged {args.adapter} into {base}\n  adapter {adapters}\n"
          + (f"  chat template: {template_file} -> {os.path.join(args.out, 'chat_template.jinja')}\n" if template else "")
          + f"  max |Δlogit| {diff:.3g} ({rel:.3g} of the logit scale) | wrote {args.out}: {dtype}, "
          f"{size / 1e6:.2f} MB | {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main_guard(main)
