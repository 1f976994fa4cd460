"""What an output directory holds, and how to load whatever an --init_from names.

The scripts accept one kind of model argument everywhere (train.py --init_from, generate.py,
merge.py --base, serve.py):

    scratch / tiny / scratch:gpt2   random weights of a preset (seeded)
    gpt2, org/name                  an HF GPT-2 checkpoint on the hub (downloaded once)
    a directory                     HF GPT-2 layout (config.json + model.safetensors), or a train.py
                                    output dir: minilora.json says "full" (an HF-layout model) or
                                    "lora" (an adapter whose base_model names the base to load first)

    model, base_name = load_base("out/sql")             # what train.py builds on
    model = load_model("out/base", adapter="out/sql")   # what generate.py and merge.py run
"""

import json
import os

import torch

from minilora.config import PRESETS, GPTConfig
from minilora.errors import MiniloraError
from minilora.lora import load_adapter, set_adapter
from minilora.model import GPT


def read_run_info(path):
    """The minilora.json of a minilora output directory, or None if `path` is not one."""
    fp = os.path.join(path, "minilora.json")
    if not os.path.isfile(fp):
        return None
    try:
        with open(fp, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise MiniloraError(f"{fp}: unreadable ({e}); restore it or train again") from None
    if (not isinstance(info, dict) or info.get("kind") not in ("lora", "full")
            or not isinstance(info.get("base_model"), str)):
        raise MiniloraError(f"{fp}: not a minilora run file (needs kind 'lora' or 'full' and base_model)")
    return info


def load_base(init_from, preset="tiny", dropout=None):
    """The weights --init_from names -> (GPT, name of the base to record). A LoRA dir gives base + adapter."""
    if init_from == "scratch":
        overrides = {} if dropout is None else {"dropout": dropout}
        return GPT(GPTConfig.from_name(preset, **overrides)), "scratch:" + preset
    info = read_run_info(init_from) if os.path.isdir(init_from) else None
    if info is None or info["kind"] == "full":  # an HF GPT-2 name or directory (ours or anyone's)
        name = os.path.abspath(init_from) if os.path.isdir(init_from) else init_from
        return GPT.from_pretrained(init_from, dropout=dropout), name
    model, base = load_base(info["base_model"], dropout=dropout)
    load_adapter(model, init_from, is_trainable=True)
    return model, base


def adapter_base(adapter, flag="--init_from"):
    """The base model an adapter directory records (adapter_config.json's base_model_name_or_path).

    `flag` is the script option that names a base instead, for the error message.
    """
    try:
        with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        raise MiniloraError(f"cannot read the base model from {adapter}/adapter_config.json ({e}); "
                            f"pass {flag}") from None
    if not base:
        raise MiniloraError(f"the adapter in {adapter} does not name its base model; pass {flag}")
    return base


def load_model(init_from, adapter=None, seed=0):
    """The GPT --init_from names (+ the adapter), in fp32 on the CPU, in eval mode.

    init_from=None takes the base the adapter records. Random-weight presets are seeded with `seed`.
    """
    if init_from is None:
        if adapter is None:
            raise MiniloraError("give --init_from (a model dir, a hub name like gpt2, or tiny) or --adapter")
        init_from = adapter_base(adapter)
    preset = init_from.removeprefix("scratch:")
    if init_from.startswith("scratch:") or (preset in PRESETS and not preset.startswith("gpt2")):
        torch.manual_seed(seed)
        model = GPT(GPTConfig.from_name(preset))
    elif os.path.isdir(init_from):
        model, _ = load_base(init_from)  # HF dirs and train.py output dirs (LoRA: base + adapter)
    else:
        model = GPT.from_pretrained(init_from)
    if adapter is not None:
        load_adapter(model, adapter, adapter_name="default" if not hasattr(model, "peft_config") else "cli")
        set_adapter(model, list(model.peft_config))  # a LoRA run dir's own adapter stays on beside --adapter
    return model.eval()
