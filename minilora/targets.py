"""Which modules a LoraConfig names, by PEFT's rules: a name or dotted suffix, a regex, or "all-linear".

    find_targets(model, ["q_proj", "v_proj"])   -> ["transformer.h.0.attn.q_proj", ...]
    find_targets(model, "all-linear")           -> every nn.Linear but the output head
A quantized linear (minilora.quantize) counts as an nn.Linear.
A name that matches nothing is an error listing the names that exist (typos never pass silently).

On the command line (every script, one rule: target_modules_arg): `q_proj v_proj`, `q_proj,v_proj`
and `q_proj, v_proj` are the same two names; `all-linear` is PEFT's all-linear; an item holding a
character no module path has (anything but letters, digits, `_`, `-` and `.`), e.g.
'.*[.](q_proj|v_proj)', is a regex matched against whole module paths, and must come alone.
"""

import re

import torch.nn as nn

from minilora.errors import MiniloraError
from minilora.quantize import QuantizedLinear

_BLOCK = re.compile(r"transformer\.h\.(\d+)\.")  # a module path inside block i of GPT
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")  # what a module path (or all-linear) can hold


def split_list(items):
    """A list option as typed: ['q_proj,v_proj'], ['q_proj', 'v_proj'], ['q_proj,', 'v_proj'] -> ['q_proj', 'v_proj']."""
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def target_modules_arg(items):
    """--target_modules as typed -> LoraConfig.target_modules: a list of names, 'all-linear', or a regex string."""
    items = [item for item in items if item.strip()]
    regex = [item for item in items if not all(_NAME.fullmatch(p.strip()) for p in item.split(",") if p.strip())]
    if regex:
        if len(items) > 1:
            raise MiniloraError(f"--target_modules {' '.join(items)}: {regex[0]!r} is a regex (it holds characters no "
                                f"module name has), and a regex must come alone; fold the names into it")
        return regex[0]
    names = split_list(items)
    if not names:
        raise MiniloraError("--target_modules is empty; give module names (q_proj v_proj), all-linear, or a regex")
    return "all-linear" if names == ["all-linear"] else names


def _leaf_names(paths):
    return ", ".join(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))  # distinct, in model order


def matches(target, path):
    """PEFT's rule for a listed name: the full module path, or a dotted suffix of it ('attn.q_proj')."""
    return path == target or path.endswith("." + target)


def find_targets(model, target_modules, layers_to_transform=None):
    """Paths of the linears a LoraConfig's target_modules / layers_to_transform name; an error lists what exists."""
    # A wrapped layer (it has a base_layer) counts once, under its own path: its base_layer and its adapters'
    # lora_A/lora_B linears are no targets (a second all-linear adapter must not put LoRA on the first's A and B).
    wrapped = [p + "." for p, m in model.named_modules() if hasattr(m, "base_layer")]
    linears = [p for p, m in model.named_modules() if (hasattr(m, "base_layer") or isinstance(m, (nn.Linear, QuantizedLinear)))
               and not p.startswith(tuple(wrapped))]
    candidates, where = linears, ""
    if layers_to_transform is not None:
        block = {p: int(m.group(1)) for p in linears if (m := _BLOCK.match(p))}
        missing = sorted(set(layers_to_transform) - set(block.values()))
        if missing:
            raise MiniloraError(f"layers_to_transform {missing} names blocks this model lacks "
                                f"(it has transformer.h.0 .. {max(block.values(), default=-1)})")
        candidates = [p for p in linears if block.get(p) in layers_to_transform]
        where = f" in blocks {layers_to_transform}"
    tm, unmatched = target_modules, []
    if tm == "all-linear":  # PEFT's meaning: every linear layer except the output head
        found = [p for p in candidates if p.rsplit(".", 1)[-1] != "lm_head"]
    elif isinstance(tm, str):
        found = [p for p in candidates if re.fullmatch(tm, p)]
    else:
        found = [p for p in candidates if any(matches(t, p) for t in tm)]
        unmatched = [t for t in tm if not any(matches(t, p) for p in candidates)]
    hint = (f"; the model's nn.Linear modules are: {_leaf_names(linears)} "
            f"(give names, dotted suffixes like 'attn.q_proj', a regex string, or 'all-linear')")
    if not found:
        raise MiniloraError(f"target_modules {tm!r} matched no nn.Linear{where}{hint}")
    if unmatched:
        raise MiniloraError(f"target_modules {unmatched} matched no nn.Linear{where} (a typo?){hint}")
    if "" in found:
        raise MiniloraError("cannot wrap the model itself; put the nn.Linear inside a container module")
    return found


def find_modules(model, names):
    """The modules named in modules_to_save (same name/suffix rule), every name required to match."""
    paths = [p for p, _ in model.named_modules() if p]
    unmatched = [n for n in names if not any(matches(n, p) for p in paths)]
    if unmatched:
        raise MiniloraError(f"modules_to_save {unmatched} matched no module; module names include: "
                            f"{_leaf_names(p for p, m in model.named_modules() if p and list(m.parameters(recurse=False)))}")
    return [model.get_submodule(p) for p in paths if any(matches(n, p) for n in names)]


