"""Adapter files in PEFT's format, and adapters trained with PEFT on Hugging Face GPT-2.

An adapter directory is what PEFT's save_pretrained writes, so either library reads the other's:

    adapter_config.json          LoraConfig.to_peft_dict(): r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight   (r, in)
                                 base_model.model.<module path>.lora_B.weight   (out, r)
                                 base_model.model.<module path>.lora_magnitude_vector   (out,)  DoRA only
                                 (+ biases per `bias`, + modules_to_save parameters by their own names)

The adapter name is not in the keys (PEFT strips it), so one file loads under any name. Only the
adapter's tensors are stored: gpt2 with r=8 on q/v is 294,912 fp32 numbers, 1.2 MB, not 500 MB.

HF GPT-2 fuses the attention input projection into one Conv1D, c_attn, whose output rows are
[q | k | v] (3C of them), and PEFT adapts c_attn as a whole. A LoRA update there is B A x with
B: (3C, r), A: (r, C); since q, k and v all read the same x, it is exactly three updates with a
shared A and B split by rows. fan_in_fan_out only says the Conv1D stores its weight transposed;
it changes how PEFT merges, never the shapes of A and B. The other names map one to one:
attn.c_proj = attn.out_proj, mlp.c_fc = mlp.fc_in, mlp.c_proj = mlp.fc_out.
"""

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass

import torch

from minilora.errors import MiniloraError
from minilora.hf_layout import hf_name, our_name
from minilora.lora import LoraConfig, apply_lora, lora_layers
from minilora.fileio import atomic_directory
from minilora.safetensors import load_file, read_header, save_file
from minilora.targets import matches

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # older PEFT; a pickle can run code, so it is read only on request
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the model: PEFT's key prefix
HF_GPT2 = "hf-gpt2"

# our module (inside transformer.h.N) -> HF GPT-2's; q, k and v share the fused c_attn
_OURS_TO_HF = {"attn.q_proj": "attn.c_attn", "attn.k_proj": "attn.c_attn", "attn.v_proj": "attn.c_attn",
               "attn.out_proj": "attn.c_proj", "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}
_HF_TO_OURS = {"attn.c_proj": "attn.out_proj", "mlp.c_fc": "mlp.fc_in", "mlp.c_proj": "mlp.fc_out"}
_HF_LORA = re.compile(r"base_model\.model\.transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                      r"\.(lora_A|lora_B)\.weight")
_HF_NAME = re.compile(r"\.(c_attn|c_proj|c_fc)(\.|$)")  # names no minilora module has
_OUR_LINEAR = re.compile(r"\.(attn\.[qkv]_proj|attn\.out_proj|mlp\.fc_in|mlp\.fc_out)(\.|$)")


def _canon(key):
    # a bias is `x.base_layer.bias` once x is wrapped by any adapter, `x.bias` before: compare them as one
    return key.replace(".base_layer.", ".")


def _names(items, limit=10):
    items = list(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _config(model, adapter_name):
    configs = getattr(model, "peft_config", {})
    if adapter_name not in configs:
        raise MiniloraError(f"the model has no adapter {adapter_name!r} (it has: {', '.join(configs) or 'none'}); "
                            f"apply_lora or load_adapter it first")
    return configs[adapter_name]


def adapter_state_dict(model, adapter_name="default"):
    """{PEFT key: live parameter} for one adapter: what save_adapter writes and load_adapter fills."""
    config = _config(model, adapter_name)
    out = {}
    for path, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            out[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
            if adapter_name in layer.lora_magnitude_vector:  # PEFT's file key has no ".weight"
                out[f"{PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]
            if config.bias == "lora_only" and layer.base_layer.bias is not None:
                out[f"{PREFIX}{path}.base_layer.bias"] = layer.base_layer.bias
    if config.bias == "all":  # as in PEFT: every bias of the model is trained, so every one is saved
        out.update({PREFIX + n: p for n, p in model.named_parameters() if n.endswith("bias")})
    for path, module in model.named_modules():  # lora.py trains modules_to_save in place: their own names
        if path and any(matches(m, path) for m in config.modules_to_save or []):
            out.update({f"{PREFIX}{path}.{n}": p for n, p in module.named_parameters() if "lora_" not in n})
    return out


# ---- adapter_config.json <-> LoraConfig ------------------------------------------------------

def peft_config_dict(config):
    """PEFT's adapter_config.json, with the keys PEFT has written since v0.10 so any recent PEFT loads it."""
    return {
        "peft_type": "LORA", "auto_mapping": None, "base_model_name_or_path": config.base_model_name_or_path,
        "revision": None, "inference_mode": True,  # as PEFT's save_pretrained writes
        "task_type": config.task_type or "CAUSAL_LM",  # every minilora model is one: PEFT builds PeftModelForCausalLM
        "r": config.r, "target_modules": config.target_modules if isinstance(config.target_modules, str)
        else list(config.target_modules), "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "fan_in_fan_out": False, "bias": config.bias, "use_rslora": config.use_rslora,
        "modules_to_save": None if config.modules_to_save is None else list(config.modules_to_save),
        "init_lora_weights": config.init_lora_weights,
        "layers_to_transform": None if config.layers_to_transform is None else list(config.layers_to_transform),
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "megatron_config": None,
        "megatron_core": "megatron.core", "loftq_config": {}, "use_dora": config.use_dora, "layer_replication": None,
    }


def config_from_peft(d):
    """A LoraConfig from PEFT's adapter_config.json dict; unknown keys are ignored, features we lack refused.

    fan_in_fan_out (HF GPT-2's Conv1D layout) is accepted: the HF GPT-2 conversion below reads it.
    """
    if not isinstance(d, dict):
        raise MiniloraError(f"adapter config must be a JSON object, got {type(d).__name__}")
    if d.get("peft_type", "LORA") != "LORA":
        raise MiniloraError(f"adapter config has peft_type {d['peft_type']!r}; minilora loads only LORA adapters")
    for key in ("lora_bias", "rank_pattern", "alpha_pattern", "layer_replication", "loftq_config",
                "megatron_config", "exclude_modules", "trainable_token_indices"):
        # each of these changes the model PEFT builds; loading it as plain LoRA would be silently wrong
        if d.get(key) not in (None, False, {}, []):
            raise MiniloraError(f"adapter config sets {key}={d[key]!r}, which minilora does not implement; "
                                f"retrain or convert the adapter without it")
    if d.get("layers_pattern") not in (None, "h", ["h"]):
        raise MiniloraError(f"adapter config layers_pattern {d['layers_pattern']!r} is unknown; minilora's blocks are transformer.h")
    for key in ("fan_in_fan_out", "inference_mode"):
        if key in d and not isinstance(d[key], bool):
            raise MiniloraError(f"adapter config {key} must be true or false, got {d[key]!r}")
    names = [f.name for f in dataclasses.fields(LoraConfig)]
    return LoraConfig(**{k: d[k] for k in names if k in d})


# ---- saving --------------------------------------------------------------------------------------

def save_adapter(model, save_dir, adapter_name="default", base_model_name_or_path=None, dtype=None, format="peft"):
    """Write one adapter as a PEFT directory, atomically (a crash leaves the old directory or the new one).

    dtype: store the tensors in this dtype (e.g. torch.bfloat16); default: the adapter's own (fp32).
    format: "peft" or "hf-gpt2" (PEFT on HF GPT-2: c_attn, fan_in_fan_out). "peft" keys use the HF
    module names of OPT and Llama-family models (model.layers.N.self_attn.q_proj, ...), so PEFT and vLLM
    load them onto the HF model; a GPT-2 model's keep minilora's names (transformer.h.N.attn.q_proj).
    """
    config = _config(model, adapter_name)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise MiniloraError(f"save_adapter dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    tensors, peft = adapter_state_dict(model, adapter_name), peft_config_dict(config)
    if format == HF_GPT2:
        tensors, peft = _to_hf_gpt2(model, adapter_name, config, tensors, peft)
    elif format == "peft" and model.config.family != "gpt2":
        tensors, peft = _to_family(model.config, tensors, peft)
    elif format != "peft":
        raise MiniloraError(f"save_adapter format must be 'peft' or {HF_GPT2!r}, got {format!r}")
    if base_model_name_or_path is not None:
        peft["base_model_name_or_path"] = base_model_name_or_path
    save_dir = os.fspath(save_dir)
    if os.path.exists(save_dir):
        # the directory is swapped as a whole, so anything else in it would be lost
        other = sorted(set(os.listdir(save_dir)) - {CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME, "README.md"}) \
            if os.path.isdir(save_dir) else [os.path.basename(save_dir)]
        if other:
            raise MiniloraError(f"{save_dir} already holds {_names(other)}; save the adapter to a directory of its own")
    tensors = {k: t.detach().to("cpu", dtype or t.dtype) for k, t in tensors.items()}
    with atomic_directory(save_dir) as tmp:
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(peft, f, indent=2)
            f.write("\n")
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})  # PEFT's metadata


# ---- loading -------------------------------------------------------------------------------------

@dataclass
class AdapterWeights:
    """An adapter directory as read and checked against a model, not yet attached to it."""
    path: str
    config: LoraConfig
    tensors: dict  # PEFT key -> tensor (our module names; an HF GPT-2 adapter already converted)

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.tensors.values())


def read_adapter(model, adapter_dir, *, allow_pickle=False, expected_base=None, trim=True, max_rank=None):
    """Read the adapter in `adapter_dir` and check it against `model`, changing nothing -> AdapterWeights.

    The one reader behind load_adapter and the serving registry. Every key and shape is checked
    against the model before any tensor data is read: missing, unexpected and mis-shaped keys are
    named in one error. HF GPT-2 adapters (keys on c_attn/c_proj/c_fc) are recognised and
    converted (trim=True drops the zero padding an export adds). Tensors must be floating point
    and finite, and so must each update B * scaling: one bad adapter never yields NaN logits.
    """
    raw, where = _read_config(adapter_dir)
    if expected_base is not None and raw.get("base_model_name_or_path") != expected_base:
        raise MiniloraError(f"{where}: the adapter was trained on base {raw.get('base_model_name_or_path')!r}, "
                            f"not the expected {expected_base!r}; load it onto its own base model")
    shapes, read, wpath = _open_weights(os.fspath(adapter_dir), allow_pickle)
    hf = any(_HF_NAME.search(k) for k in shapes)
    if hf:
        if raw.get("use_dora"):  # c_attn's magnitude covers k rows that a q/v adapter leaves at ‖W_k‖: not converted
            raise MiniloraError(f"{where}: DoRA adapters of HF GPT-2 (fused c_attn) are not converted; "
                                f"load it with PEFT, merge it, and use the merged model")
        plan = _hf_plan(shapes, wpath)  # our key -> (file key, rows of it)
        raw = _hf_config(raw, plan, model.config.n_layer, where)
    else:
        family = model.config.family != "gpt2"  # OPT / Llama-family files name the HF model's modules
        plan = {_canon(_from_family(model.config, k) if family else k): (k, None) for k in shapes}
        if family:
            raw = _config_from_family(raw)
        if isinstance(raw.get("target_modules"), str) and raw["target_modules"] != "all-linear":
            # A regex from a file is never run: a nested quantifier can backtrack for hours on one module
            # name (ReDoS). The file's keys name exactly the modules it adapted; target those paths.
            paths = _lora_paths(plan)
            if not paths:
                raise MiniloraError(f"{wpath} holds no lora_A/lora_B weights")
            raw = {**raw, "target_modules": paths, "layers_to_transform": None}
    try:
        config = config_from_peft(raw)
    except MiniloraError as e:
        raise MiniloraError(f"{where}: {e}") from None
    if max_rank is not None and config.r > max_rank:
        raise MiniloraError(f"adapter {adapter_dir} has rank {config.r}, above the server's max_lora_rank {max_rank}; "
                            f"restart with --max-lora-rank {config.r} or more")
    got = {k: shapes[fk] if rows is None else (rows.stop - rows.start, *shapes[fk][1:]) for k, (fk, rows) in plan.items()}
    _check_fits(_expected_shapes(model, config), got, wpath, _show_hf if hf else str)

    data = read()  # only now is tensor data read
    tensors = {k: data[fk] if rows is None else data[fk][rows] for k, (fk, rows) in plan.items()}
    for k, t in tensors.items():
        # a shape can differ only if the file changed since its header was read; integer data is no adapter
        if tuple(t.shape) != got[k] or t.dtype not in _FLOATS:
            raise MiniloraError(f"{wpath}: tensor {k} is {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}, "
                                f"expected float16, bfloat16, float32 or float64 {got[k]}; re-save the adapter")
    _check_finite(tensors, config, wpath)
    if hf and trim:
        config, tensors = _trim(config, tensors, model.config.n_layer)
    # clone: no view keeps the file's memory map (and so the file) alive
    return AdapterWeights(os.fspath(adapter_dir), config, {k: t.clone() for k, t in tensors.items()})


def attach_adapter(model, weights, adapter_name, *, is_trainable=False, activate=None):
    """Add read_adapter's result to `model` under `adapter_name` (apply_lora, then copy the tensors in).

    activate: apply_lora's rule (None: active only if no adapter is active yet)."""
    apply_lora(model, weights.config, adapter_name, activate=activate)
    live = set_adapter_weights(model, weights, adapter_name)
    if not is_trainable:
        for p in live.values():
            p.requires_grad_(False)
    return model


def set_adapter_weights(model, weights, adapter_name="default"):
    """Copy read_adapter's tensors into the model's existing adapter `adapter_name`; returns its live tensors."""
    live = {_canon(k): p for k, p in adapter_state_dict(model, adapter_name).items()}
    with torch.no_grad():
        for k, t in weights.tensors.items():
            live[k].copy_(t)
    return live


def load_adapter(model, adapter_dir, adapter_name=None, *, is_trainable=False, allow_pickle=False, expected_base=None,
                 activate=None):
    """Add the adapter in `adapter_dir` to `model` under `adapter_name` (default "default"); return the model.

    read_adapter checks everything before the model changes. As in PEFT, the adapter becomes the
    active one only if no adapter is active yet: loading a second one leaves the first in use
    until set_adapter(model, name) (activate=True switches at once). With is_trainable=False its
    tensors are frozen (PEFT's inference mode). An existing adapter of the same name is an error,
    never silently replaced.
    """
    name = "default" if adapter_name is None else adapter_name
    if name in getattr(model, "peft_config", {}):
        raise MiniloraError(f"the model already has an adapter named {name!r}; pass another adapter_name "
                            f"or delete_adapter(model, {name!r}) first")
    weights = read_adapter(model, adapter_dir, allow_pickle=allow_pickle, expected_base=expected_base,
                           trim=not is_trainable)
    return attach_adapter(model, weights, name, is_trainable=is_trainable, activate=activate)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_finite(tensors, config, where):
    """NaN/inf weights, or a B * scaling that overflows fp32 (lora_alpha 1e300), would poison every logit."""
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    for k, t in tensors.items():
        t32 = t.float()
        if not torch.isfinite(t32).all():
            raise MiniloraError(f"{where}: tensor {k} has NaN or inf values; this adapter cannot be used")
        if k.endswith("lora_B.weight") and not torch.isfinite(t32 * torch.tensor(scaling, dtype=torch.float32)).all():
            raise MiniloraError(f"{where}: {k} times the scaling {scaling:.3g} (lora_alpha {config.lora_alpha:g}) "
                                f"overflows float32; this adapter cannot be used")


def _read_config(adapter_dir):
    adapter_dir = os.fspath(adapter_dir)
    if not os.path.isdir(adapter_dir):
        raise MiniloraError(f"adapter directory {adapter_dir} does not exist; pass a directory save_adapter wrote")
    path = os.path.join(adapter_dir, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise MiniloraError(f"{path} is missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting past the parser's limit
        raise MiniloraError(f"{path} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        found = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise MiniloraError(f"{path}: peft_type is {found!r}, not 'LORA'; minilora loads only LoRA adapters")
    return raw, path


def _open_weights(adapter_dir, allow_pickle):
    """({file key: shape}, a function that reads the tensors, the file's path); only headers read here."""
    path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if os.path.isfile(path):
        header, _ = read_header(path)
        return {k: tuple(v["shape"]) for k, v in header.items()}, lambda: load_file(path), path
    path = os.path.join(adapter_dir, PICKLE_NAME)
    if not os.path.isfile(path):
        raise MiniloraError(f"{adapter_dir} has no {WEIGHTS_NAME}; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not allow_pickle:
        raise MiniloraError(f"{path} is a pickle, which can run arbitrary code when loaded; convert it to {WEIGHTS_NAME} "
                            f"(in Python: load_adapter(model, dir, allow_pickle=True), then save_adapter), or pass "
                            f"allow_pickle=True to read it with torch.load(weights_only=True)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean the same here
        raise MiniloraError(f"{path} cannot be read with torch.load(weights_only=True): {type(e).__name__}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and torch.is_tensor(t) for k, t in data.items()):
        raise MiniloraError(f"{path} must hold a dict of name -> tensor")
    return {k: tuple(t.shape) for k, t in data.items()}, lambda: data, path


def _expected_shapes(model, config):
    """Key -> shape the adapter has on `model`, from a twin on the meta device: nothing is allocated or changed."""
    with torch.device("meta"):
        twin = type(model)(model.config)
    apply_lora(twin, config, "default")  # raises here, before the model is touched, if a target does not exist
    return {_canon(k): tuple(t.shape) for k, t in adapter_state_dict(twin, "default").items()}


def _check_fits(expected, got, where, show):
    """One error naming every base-shape mismatch, or every missing, unexpected and mis-shaped key."""
    wrong_base = []
    for a, shape in expected.items():
        b = a.replace(".lora_A.weight", ".lora_B.weight")
        if a != b and len(got.get(a, ())) == 2 and len(got.get(b, ())) == 2:
            here, there = (expected[b][0], shape[1]), (got[b][0], got[a][1])  # (out, in) of the base layer
            if here != there:
                wrong_base.append(f"{show(a[len(PREFIX):-len('.lora_A.weight')])} is {here[0]}x{here[1]} here "
                                  f"but {there[0]}x{there[1]} in the adapter")
    if wrong_base:
        raise MiniloraError(f"{where}: the adapter was made for a base model of another shape: {_names(wrong_base)} "
                            f"(out x in); load it onto the model it was trained for")
    # dict.fromkeys: q, k and v share c_attn's A, so HF names can repeat
    missing = list(dict.fromkeys(show(k) for k in expected if k not in got))
    unexpected = list(dict.fromkeys(show(k) for k in got if k not in expected))
    misshaped = [f"{show(k)} {got[k]} (model: {shape})" for k, shape in expected.items() if k in got and got[k] != shape]
    parts = [f"{what}: {_names(keys)}" for what, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if keys]
    if parts:
        raise MiniloraError(f"{where} does not match its config on this model: {'; '.join(parts)}; "
                            f"re-save the adapter from the model it was trained on")


# ---- HF GPT-2 (PEFT on transformers' GPT2LMHeadModel) --------------------------------------------

def _show_hf(key):
    """Our key as the HF adapter names it, for error messages."""
    m = _OUR_LINEAR.search(key)
    if m is None:
        return key
    part = f" ({m[1][5]} rows)" if m[1][5:6] in ("q", "k", "v") and key.endswith("lora_B.weight") else ""
    return key.replace(m[1], _OURS_TO_HF[m[1]], 1) + part


def _target_list(paths, n_layer):
    """target_modules (and layers_to_transform) selecting exactly `paths`, all of the form transformer.h.N.x.y."""
    blocks = sorted({int(p.split(".")[2]) for p in paths})
    kinds = sorted({p.split(".", 3)[3] for p in paths})  # e.g. attn.q_proj
    if set(paths) != {f"transformer.h.{i}.{k}" for i in blocks for k in kinds}:
        return sorted(paths), None  # not the same modules in every block: name each one
    # the leaf name alone unless it is ambiguous (GPT-2 has attn.c_proj and mlp.c_proj)
    names = [k if k.endswith("c_proj") else k.split(".")[-1] for k in kinds]
    return names, None if blocks == list(range(n_layer)) else blocks


# ---- OPT and Llama-family adapters: PEFT keys carry the HF model's module names ---------------

_MODULES_TO_SAVE = {"wte": "embed_tokens"}  # leaf names that differ (lm_head is lm_head everywhere)


def _to_family(config, tensors, peft):
    """Our keys and names -> the HF model's (model.layers.N.self_attn.q_proj, embed_tokens, ...)."""
    paths = _lora_paths(tensors)
    tensors = {PREFIX + hf_name(config, k[len(PREFIX):]): t for k, t in tensors.items()}
    targets = peft["target_modules"]
    if targets == "all-linear":  # written out, as PEFT saves it: loaders that only read lists (vLLM) see the names
        targets = sorted({p.rsplit(".", 1)[-1] for p in paths})
    elif isinstance(targets, str):  # a regex over our names means nothing on the HF model's: name each module
        targets = [hf_name(config, p) for p in paths]
    peft["target_modules"] = [hf_name(config, m) for m in targets]
    if peft["modules_to_save"]:
        peft["modules_to_save"] = [_MODULES_TO_SAVE.get(m, hf_name(config, m)) for m in peft["modules_to_save"]]
    peft["layers_pattern"] = None
    return tensors, peft


def _from_family(config, key):
    return PREFIX + our_name(config, key[len(PREFIX):]) if key.startswith(PREFIX) else key


def _config_from_family(raw):
    """adapter_config.json of an HF-named adapter -> our names (only leaf names and prefixes differ)."""
    back = {v: k for k, v in _MODULES_TO_SAVE.items()}
    raw = dict(raw)
    if isinstance(raw.get("modules_to_save"), list):
        raw["modules_to_save"] = [back.get(m, m) for m in raw["modules_to_save"]]
    if raw.get("layers_pattern") in ("layers", ["layers"]):  # HF's name for our transformer.h
        raw["layers_pattern"] = None
    return raw


def _lora_paths(keys):
    return sorted({k[len(PREFIX):k.rindex(".lora_")] for k in keys if ".lora_" in k})


def _hf_plan(shapes, where):
    """Our key -> (HF file key, rows of it or None): c_attn's A is shared by q/k/v, its B split by rows."""
    plan = {}
    for key, shape in shapes.items():
        m = _HF_LORA.fullmatch(key)
        if m is None:
            if _HF_NAME.search(key):
                raise MiniloraError(f"{where}: {key} is not a LoRA A/B weight; HF GPT-2 adapters load with bias='none' and "
                                    f"modules_to_save only on modules named alike in both models (ln_*, wte, wpe)")
            plan[_canon(key)] = (key, None)  # e.g. modules_to_save on transformer.ln_f: same name in both
            continue
        block, module, ab = m.groups()
        stem = f"{PREFIX}transformer.h.{block}."
        if module != "attn.c_attn":
            plan[f"{stem}{_HF_TO_OURS[module]}.{ab}.weight"] = (key, None)
        elif ab == "lora_A":
            for p in "qkv":
                plan[f"{stem}attn.{p}_proj.lora_A.weight"] = (key, None)  # q, k, v read the same x: same A
        else:
            if len(shape) != 2 or shape[0] % 3:
                raise MiniloraError(f"{where}: {key} has shape {shape}; a c_attn lora_B must be (3 * n_embd, r)")
            C = shape[0] // 3
            for i, p in enumerate("qkv"):  # the fused output rows are [q | k | v]
                plan[f"{stem}attn.{p}_proj.lora_B.weight"] = (key, slice(i * C, (i + 1) * C))
    return plan


def _hf_config(raw, plan, n_layer, where):
    """The HF adapter's config in our module names; targets come from the file's keys, which are exact."""
    if raw.get("bias", "none") != "none":
        raise MiniloraError(f"{where}: bias={raw['bias']!r} HF GPT-2 adapters are not supported (c_attn's bias is fused); "
                            f"only bias='none' converts")
    paths = _lora_paths(plan)
    if not paths:
        raise MiniloraError(f"{where}: the HF GPT-2 adapter holds no lora_A/lora_B weights")
    targets, layers = _target_list(paths, n_layer)
    # fan_in_fan_out described HF's transposed Conv1D; our layers are nn.Linear
    return {**raw, "target_modules": targets, "layers_to_transform": layers, "fan_in_fan_out": False}


def _trim(config, tensors, n_layer):
    """For inference: drop the all-zero columns of B with their rows of A, and modules whose B is all zero.

    Exact (those columns add nothing), and it undoes export's padding, so an adapter exported to
    HF GPT-2 comes back at its own rank and targets. Ranks stay as they are unless every module
    keeps the same number of columns (one LoraConfig has one r).
    """
    cols = {p: (tensors[f"{PREFIX}{p}.lora_B.weight"] != 0).any(dim=0).nonzero().flatten() for p in _lora_paths(tensors)}
    cols = {p: c for p, c in cols.items() if len(c)}
    if not cols:
        return config, tensors  # an all-zero adapter (freshly initialised): keep it whole
    ranks = {len(c) for c in cols.values()}
    r = ranks.pop() if len(ranks) == 1 else config.r
    out = {k: t for k, t in tensors.items() if ".lora_" not in k}
    for p, c in cols.items():
        A, B = tensors[f"{PREFIX}{p}.lora_A.weight"], tensors[f"{PREFIX}{p}.lora_B.weight"]
        out[f"{PREFIX}{p}.lora_A.weight"], out[f"{PREFIX}{p}.lora_B.weight"] = (A[c], B[:, c]) if r < config.r else (A, B)
    # alpha follows r so the scaling is unchanged; written as alpha * r / R, exact when export made alpha*n, n*r
    alpha = config.lora_alpha * math.sqrt(r) / math.sqrt(config.r) if config.use_rslora else config.lora_alpha * r / config.r
    targets, layers = _target_list(list(cols), n_layer)
    return dataclasses.replace(config, r=r, lora_alpha=alpha, target_modules=targets, layers_to_transform=layers), out


def _to_hf_gpt2(model, adapter_name, config, tensors, peft):
    """Our adapter as PEFT on HF GPT-2 would hold it: q/k/v fused into one c_attn adapter of rank n*r.

    c_attn gets A = [A_q; A_k; A_v] (the targeted ones, (n*r, C)) and a block B: A_q's rows feed
    only the q rows of the output, and so on, so B A x = [B_q A_q x | B_k A_k x | B_v A_v x]. Other
    layers are zero-padded to rank n*r (same B A), and lora_alpha becomes alpha*n (alpha*sqrt(n)
    with rslora) so the scaling, alpha/r, is unchanged.
    """
    if model.config.family != "gpt2":
        raise MiniloraError(f"format {HF_GPT2!r} is for GPT-2 models; on this {model.config.model_type} model the "
                            "default format 'peft' already uses the HF module names PEFT and vLLM load")
    if config.use_dora:
        raise MiniloraError("cannot export a DoRA adapter to HF GPT-2 (c_attn would need a magnitude for rows it "
                            "does not adapt); save it with format='peft'")
    if config.bias != "none":
        raise MiniloraError(f"cannot export bias={config.bias!r} to HF GPT-2 (c_attn's bias is fused); use bias='none'")
    blocks = {}
    for key in _lora_paths(tensors):
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(\w+\.\w+)", key)
        if m is None or m[2] not in _OURS_TO_HF:
            raise MiniloraError(f"cannot export the adapter on {key} to HF GPT-2: only q_proj, k_proj, v_proj, "
                                f"out_proj, fc_in and fc_out have HF counterparts")
        blocks.setdefault(int(m[1]), []).append(m[2])
    out = {}
    for key, t in tensors.items():
        if ".lora_" not in key:
            if _OUR_LINEAR.search(key):
                raise MiniloraError(f"cannot export {key} to HF GPT-2 (that layer is fused or transposed there); "
                                    f"keep modules_to_save to ln_*, wte, wpe")
            out[key] = t
    r, C = config.r, model.config.n_embd
    n = max(sum(k in ("attn.q_proj", "attn.k_proj", "attn.v_proj") for k in kinds) for kinds in blocks.values()) or 1
    R = n * r
    for i, kinds in blocks.items():
        stem = f"{PREFIX}transformer.h.{i}."
        qkv = [p for p in "qkv" if f"attn.{p}_proj" in kinds]
        if qkv:
            A0 = tensors[f"{stem}attn.{qkv[0]}_proj.lora_A.weight"]
            A, B = A0.new_zeros(R, C), A0.new_zeros(3 * C, R)
            for j, p in enumerate(qkv):
                s = "qkv".index(p)
                A[j * r:(j + 1) * r] = tensors[f"{stem}attn.{p}_proj.lora_A.weight"]  # (r, C)
                B[s * C:(s + 1) * C, j * r:(j + 1) * r] = tensors[f"{stem}attn.{p}_proj.lora_B.weight"]  # (C, r)
            out[f"{stem}attn.c_attn.lora_A.weight"], out[f"{stem}attn.c_attn.lora_B.weight"] = A, B
        for k in kinds:
            if k in _HF_TO_OURS.values():
                A, B = tensors[f"{stem}{k}.lora_A.weight"], tensors[f"{stem}{k}.lora_B.weight"]
                hf = f"{stem}{_OURS_TO_HF[k]}"
                out[f"{hf}.lora_A.weight"] = torch.cat([A, A.new_zeros(R - r, A.shape[1])])  # (R, in)
                out[f"{hf}.lora_B.weight"] = torch.cat([B, B.new_zeros(B.shape[0], R - r)], dim=1)  # (out, R)
    targets, layers = _target_list(_lora_paths(out), model.config.n_layer)
    alpha = config.lora_alpha * math.sqrt(n) if config.use_rslora else config.lora_alpha * n
    return out, {**peft, "r": R, "lora_alpha": alpha, "target_modules": targets, "layers_to_transform": layers,
                 "fan_in_fan_out": True}
