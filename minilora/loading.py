"""What a model argument names, in one place: every script and the dry run resolve it here.

    scratch:PRESET, or a preset that is no hub name (tiny, small)   random weights of that shape
    scratch (train.py)                                                random weights of --model
    opt-350m, ...    a published model's shape (config.HUB_NAMES): --dry_run only; its weights come by hub name
    a directory      an HF layout (config.json + weights; GPT-2, OPT, Llama, Mistral, Qwen2), or a train.py output dir:
                     minilora.json says "full" (an HF-layout model) or "lora" (an adapter whose
                     base_model names the base to load first)
    gpt2, org/name   an HF checkpoint on the hub (downloaded once)

    model, base_name = load_model("out/sql")              # base + the run's adapter
    model, _ = load_model("out/base", adapter="out/sql")  # what generate.py and merge.py run
    config = model_config("gpt2")                         # the shape alone, no download (--dry_run)
"""

import json
import os
import sys
from dataclasses import dataclass

import torch

from minilora.adapter_files import CONFIG_NAME, load_adapter
from minilora.adapters import set_adapter
from minilora.config import HUB_NAMES, PRESETS, GPTConfig
from minilora.errors import MiniloraError
from minilora.hub import CONFIG_FILE, read_config
from minilora.model import GPT
from minilora.quantize import quantize as quantize_model

RUN_FILE = "minilora.json"
HUB_PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # presets that are also hub names: downloaded


@dataclass
class RunInfo:
    """A train.py output directory's minilora.json: what it holds and what it was built on."""
    kind: str            # "lora" (an adapter) or "full" (a whole model)
    base_model: str      # the model argument it was trained from
    tokenizer: str
    model_config: dict | None = None
    chat_template: object = None  # the chat.ChatTemplate a run trained with (recorded as chat_template.jinja)


def read_run_info(path):
    """The minilora.json of a minilora output directory, or None if `path` is not one."""
    fp = os.path.join(path, RUN_FILE)
    if not os.path.isfile(fp):
        return None
    try:
        with open(fp, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise MiniloraError(f"{fp}: unreadable ({e}); restore it or train again") from None
    if (not isinstance(info, dict) or info.get("kind") not in ("lora", "full")
            or not isinstance(info.get("base_model"), str) or not isinstance(info.get("tokenizer", ""), str)):
        raise MiniloraError(f"{fp}: not a minilora run file (needs kind 'lora' or 'full' and base_model)")
    cfg = info.get("model_config")
    return RunInfo(info["kind"], info["base_model"], info.get("tokenizer", "gpt2"), cfg if isinstance(cfg, dict) else None)


@dataclass
class Source:
    kind: str   # "preset", "dir", "run" or "hub"
    name: str   # the preset, directory or hub name
    info: RunInfo | None = None


def model_source(arg, preset="tiny"):
    """Classify a model argument (see the module doc); nothing is loaded or downloaded."""
    if not isinstance(arg, str) or not arg:
        raise MiniloraError(f"a model argument must be a non-empty string, got {arg!r}")
    if arg == "scratch" or arg.startswith("scratch:"):
        name = preset if arg == "scratch" else arg.removeprefix("scratch:")
        if name not in PRESETS:
            raise MiniloraError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return Source("preset", name)
    if os.path.isdir(arg):
        info = read_run_info(arg)
        return Source("run", arg, info) if info is not None else Source("dir", arg)
    if arg in PRESETS and arg not in HUB_PRESETS:
        return Source("preset", arg)
    if os.path.exists(arg):
        raise MiniloraError(f"{arg} is a file; pass the model directory (config.json + model.safetensors)")
    return Source("hub", arg)


def load_model(arg, *, adapter=None, preset="tiny", seed=None, dropout=None, trainable=False, allow_pickle=False,
               quantize=None, _seen=()):
    """The model `arg` names (+ the adapter directory `adapter`) -> (GPT in fp32, or with its linears quantized
    when `quantize` says so, name of its base).

    The base name is what an adapter trained on this model records. Random weights are drawn
    from torch's global RNG, or from `seed` without touching it. trainable: a LoRA run's adapter
    stays trainable (train.py continues it); otherwise adapters load frozen and the model is in eval mode.
    allow_pickle: an adapter may be an older adapter_model.bin, read with torch.load(weights_only=True).
    quantize: "nf4" or "int8": the base's linears are quantized as they are read from its file (QLoRA);
    adapters stay float.
    """
    src = model_source(arg, preset)
    if src.kind == "run" and os.path.realpath(arg) in _seen:
        raise MiniloraError(f"{arg}/{RUN_FILE} names a base that leads back to itself "
                            f"({' -> '.join(_seen)}); fix base_model there, or pass the base with --init_from")
    if src.kind == "preset" and arg in HUB_NAMES:  # random weights where the user surely meant the real ones
        raise MiniloraError(f"{arg} is the shape of {HUB_NAMES[arg]} (for --dry_run and parameter counts); pass "
                            f"{HUB_NAMES[arg]} (or its directory) for its weights, or scratch:{arg} for random ones")
    if src.kind == "preset":
        config = GPTConfig.from_name(src.name, **({} if dropout is None else {"dropout": dropout}))
        if seed is None:
            model = GPT(config)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = GPT(config)
        if quantize:  # random weights: nothing to read, quantized once built
            quantize_model(model, quantize)
        base = "scratch:" + src.name
    elif src.kind == "run" and src.info.kind == "lora":
        model, base = load_model(src.info.base_model, dropout=dropout, seed=seed, quantize=quantize,
                                 _seen=(*_seen, os.path.realpath(arg)))
        try:
            load_adapter(model, arg, is_trainable=trainable, allow_pickle=allow_pickle)
        except MiniloraError as e:
            raise MiniloraError(f"{e} (the base {src.info.base_model!r} comes from {arg}/{RUN_FILE}; "
                                f"if it moved, pass the base with --init_from and this directory with --adapter)") from None
    elif src.kind == "hub":
        try:
            model = GPT.from_pretrained(arg, dropout=dropout, quantize=quantize)
        except MiniloraError as e:
            raise MiniloraError(f"no directory {arg!r} here, and as a hub name: {e}") from None
        base = arg
    else:
        model, base = GPT.from_pretrained(arg, dropout=dropout, quantize=quantize), os.path.abspath(arg)
    if adapter is not None:
        name = "default" if not hasattr(model, "peft_config") else "cli"
        load_adapter(model, adapter, adapter_name=name, allow_pickle=allow_pickle)
        _warn_other_base(adapter, model.peft_config[name].base_model_name_or_path, base)
        set_adapter(model, list(model.peft_config))  # a LoRA run dir's own adapter stays on beside --adapter
    return (model if trainable else model.eval()), base


def _warn_other_base(adapter, recorded, base):
    """The adapter fits this base's shapes; one trained on another base of the same shape still
    computes nonsense, so say when the base it records is not this one."""
    same = recorded == base or (isinstance(recorded, str) and os.path.isdir(recorded) and os.path.isdir(base)
                                and os.path.realpath(recorded) == os.path.realpath(base))
    if isinstance(recorded, str) and recorded and not same:
        print(f"warning: the adapter in {adapter} was trained on {recorded!r}, not on {base!r}; its outputs are "
              f"only meaningful on its own base", file=sys.stderr)


def adapter_specs(items):
    """generate.py's --adapter values -> [(name, path)]: NAME=PATH names an adapter; one plain PATH is
    (None, PATH), the single adapter as before (a directory whose name holds "=" is still a PATH)."""
    specs = []
    for item in items:
        name, eq, path = item.partition("=")
        if eq and not os.path.isdir(item) and name and all(c.isalnum() or c in "_-." for c in name):
            specs.append((name, path))
        else:
            specs.append((None, item))
    if len(specs) > 1 and any(name is None for name, _ in specs):
        raise MiniloraError(f"several adapters need a name each: --adapter sql=PATH dates=PATH (got {' '.join(items)})")
    names = [name for name, _ in specs]
    if len(set(names)) < len(names):
        raise MiniloraError(f"--adapter names must differ, got {', '.join(names)}")
    return specs


def load_named_adapters(model, specs, base, *, allow_pickle=False):
    """Load each (name, path) of adapter_specs onto `model` (built from `base`), frozen; none is activated."""
    for name, path in specs:
        load_adapter(model, path, adapter_name=name, allow_pickle=allow_pickle, activate=False)
        _warn_other_base(path, model.peft_config[name].base_model_name_or_path, base)
    return [name for name, _ in specs]


def template_dirs(arg, adapter=None, tokenizer=None):
    """Directories whose chat template (chat_template.jinja, tokenizer_config.json) applies to model `arg`
    (+ `adapter`), nearest first: the adapter, the run directories down to the base, the tokenizer's."""
    dirs, seen = ([adapter] if adapter else []), set()
    while isinstance(arg, str) and os.path.isdir(arg) and os.path.realpath(arg) not in seen:
        seen.add(os.path.realpath(arg))
        dirs.append(arg)
        info = read_run_info(arg)
        if info is None or info.kind != "lora":
            break
        arg = info.base_model
    if isinstance(tokenizer, str) and os.path.exists(tokenizer):
        dirs.append(tokenizer if os.path.isdir(tokenizer) else os.path.dirname(tokenizer))
    return dirs


def model_config(arg, preset="tiny"):
    """The GPTConfig `arg` names, read without building or downloading anything (for --dry_run)."""
    src = model_source(arg, preset)
    if src.kind == "preset":
        return GPTConfig.from_name(src.name)
    if src.kind == "run":
        if src.info.model_config is not None:
            return GPTConfig(**src.info.model_config)
        return model_config(src.info.base_model) if src.info.kind == "lora" else read_config(os.path.join(arg, CONFIG_FILE))
    if src.kind == "dir":
        return read_config(os.path.join(arg, CONFIG_FILE))
    if arg in PRESETS:  # the hub's GPT-2 names are also presets: their shapes need no download
        return GPTConfig.from_name(arg)
    raise MiniloraError(f"{arg!r} is neither a preset ({', '.join(PRESETS)}) nor a directory; "
                        f"its shape is unknown without downloading it")


def adapter_base(adapter, flag="--init_from"):
    """The base model an adapter directory records (adapter_config.json's base_model_name_or_path).

    A file from elsewhere may name a hub model or a directory, never a preset or scratch: (random
    weights, maybe of a 175B shape). `flag` is the script option that names a base instead.
    """
    path = os.path.join(adapter, CONFIG_NAME)
    if not os.path.isdir(adapter):
        raise MiniloraError(f"adapter directory {adapter} does not exist; pass a directory save_adapter or train.py wrote")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise MiniloraError(f"{adapter} is not an adapter directory: it has no {CONFIG_NAME}") from None
    except (OSError, ValueError, RecursionError) as e:
        raise MiniloraError(f"cannot read {path} ({e}); pass the base with {flag}") from None
    base = raw.get("base_model_name_or_path") if isinstance(raw, dict) else None
    if base is None or base == "":
        raise MiniloraError(f"the adapter in {adapter} does not name its base model; pass {flag}")
    if not isinstance(base, str):
        raise MiniloraError(f"{path}: base_model_name_or_path must be a string, got {base!r}; pass {flag}")
    if base.startswith("scratch:") or (base in PRESETS and base not in HUB_PRESETS):
        raise MiniloraError(f"{path} names {base!r} as its base, a random-weight preset; an adapter's base must be "
                            f"a hub name or a directory: pass {flag}")
    return base
