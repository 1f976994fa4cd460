"""LoRA (Hu et al. 2021, section 4) in code: freeze W, learn a low-rank update B @ A beside it.

    h = W x + b + (alpha / r) * B A x          A: (r, in), B: (out, r), r << min(in, out)

A starts random and B starts at zero, so training begins exactly at the pretrained model.
Only A and B get gradients; W never changes. After training, W + (alpha/r) B A can be folded
into W (`merge`) so inference costs nothing extra, or kept apart so one base serves many
adapters (`set_adapter`).

Names follow PEFT so tutorials read the same: `LoraConfig(r, lora_alpha, target_modules, ...)`,
`model.peft_config`, `lora_A`/`lora_B`/`base_layer` in the state dict.

Precision: adapter weights are created in fp32 even when the base is bf16/fp16 (small, and
fp32 keeps tiny updates from rounding away); the forward casts x to the adapter dtype and the
update back to the output dtype. Merging computes W + delta in fp32 and rounds once to W's
dtype. Expect merged vs unmerged logits to agree within ~1e-6 with fp32 weights, but only to
the weight dtype's rounding otherwise: measured on the "small" preset with logits of size ~1,
about 1e-2 in bf16 and 1e-3 in fp16 (the merged weight itself is rounded; the adapter was not).

modules_to_save: the named modules are trained in place (not copied per adapter), so they are
shared by every adapter and are not undone by disable_adapter/delete_adapter. GPT-2's lm_head
is tied to transformer.wte: saving lm_head trains the input embedding too (one tensor).
"""

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from minilora.errors import MiniloraError

BIAS_MODES = ("none", "all", "lora_only")
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
_BLOCK = re.compile(r"transformer\.h\.(\d+)\.")  # a module path inside block i of GPT


@dataclass
class LoraConfig:
    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # the paper's W_q, W_v
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False  # scaling alpha/sqrt(r) (Kalajdzievski 2023) instead of alpha/r
    init_lora_weights: bool | str = True  # True: kaiming A, zero B; "gaussian": A ~ N(0, (1/r)^2); False: both random
    layers_to_transform: list[int] | None = None  # block indices i of transformer.h.<i>
    modules_to_save: list[str] | None = None
    task_type: str | None = None  # accepted and stored for PEFT compatibility
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        def bad(name, want):
            raise MiniloraError(f"LoraConfig.{name} must be {want}, got {getattr(self, name)!r}")

        if not _is_int(self.r) or not 0 < self.r < 2**31:  # a rank no tensor can have is a corrupt config
            bad("r", "a positive int below 2**31 (the rank)")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not 0 < self.lora_alpha < math.inf:
            bad("lora_alpha", "a positive, finite number")
        tm = self.target_modules
        if isinstance(tm, (list, tuple)) and list(tm) == ["all-linear"]:
            tm = self.target_modules = "all-linear"  # as a CLI list option delivers it
        if isinstance(tm, (list, tuple, set)) and tm and all(isinstance(t, str) and t for t in tm):
            self.target_modules = sorted(tm) if isinstance(tm, set) else list(tm)
        elif isinstance(tm, str) and tm:
            try:
                re.compile(tm)
            except (re.error, RecursionError, OverflowError) as e:  # e.g. 5000 nested groups, a{99999999999}
                raise MiniloraError(f"LoraConfig.target_modules {tm!r} is not a valid regex ({e}); pass a list of names instead")
        else:
            bad("target_modules", "a non-empty list of module names, a regex string or 'all-linear'")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", "a probability in [0, 1)")
        if self.bias not in BIAS_MODES:
            bad("bias", f"one of {', '.join(BIAS_MODES)}")
        if not isinstance(self.use_rslora, bool):
            bad("use_rslora", "a bool")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            bad("init_lora_weights", "True, False or 'gaussian' (PEFT's other schemes are not implemented)")
        if _is_int(self.layers_to_transform):
            self.layers_to_transform = [self.layers_to_transform]  # PEFT accepts a single index
        if self.layers_to_transform is not None and not (
                isinstance(self.layers_to_transform, (list, tuple)) and self.layers_to_transform
                and all(_is_int(i) and i >= 0 for i in self.layers_to_transform)):
            bad("layers_to_transform", "None or a non-empty list of block indices >= 0")
        if self.modules_to_save is not None and not (
                isinstance(self.modules_to_save, (list, tuple)) and all(isinstance(m, str) and m for m in self.modules_to_save)):
            bad("modules_to_save", "None or a list of module names")
        for name in ("task_type", "base_model_name_or_path"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                bad(name, "None or a string")
        for name in ("layers_to_transform", "modules_to_save"):
            if getattr(self, name) is not None:
                setattr(self, name, list(getattr(self, name)))

    def to_peft_dict(self):
        """PEFT's adapter_config.json, with the keys PEFT has written since v0.10 so any recent PEFT loads it."""
        return {
            "peft_type": "LORA", "auto_mapping": None, "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None, "task_type": self.task_type, "inference_mode": True,  # as PEFT's save_pretrained writes
            "r": self.r, "target_modules": self.target_modules if isinstance(self.target_modules, str)
            else list(self.target_modules), "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "fan_in_fan_out": False, "bias": self.bias, "use_rslora": self.use_rslora,
            "modules_to_save": None if self.modules_to_save is None else list(self.modules_to_save),
            "init_lora_weights": self.init_lora_weights,
            "layers_to_transform": None if self.layers_to_transform is None else list(self.layers_to_transform),
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "megatron_config": None,
            "megatron_core": "megatron.core", "loftq_config": {}, "use_dora": False, "layer_replication": None,
        }

    @classmethod
    def from_peft_dict(cls, d):
        """A LoraConfig from PEFT's adapter_config.json dict; unknown keys are ignored, features we lack refused.

        fan_in_fan_out (HF GPT-2's Conv1D layout) is accepted: minilora.adapter_files reads it from the dict.
        """
        if not isinstance(d, dict):
            raise MiniloraError(f"adapter config must be a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise MiniloraError(f"adapter config has peft_type {d['peft_type']!r}; minilora loads only LORA adapters")
        for key in ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "layer_replication", "loftq_config",
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
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: d[k] for k in names if k in d})


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _fp32(t):
    """t in at least fp32 (fp64 stays fp64): merge arithmetic never happens in bf16/fp16."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_adapter_name(name):
    if not isinstance(name, str) or not name or "." in name or name == BASE_ADAPTER:
        raise MiniloraError(f"adapter name must be a non-empty string without '.', other than {BASE_ADAPTER!r}, "
                            f"got {name!r}")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus any number of named low-rank updates, applied if active."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()  # name -> Linear(in, r): weight (r, in)
        self.lora_B = nn.ModuleDict()  # name -> Linear(r, out): weight (out, r)
        self.lora_dropout = nn.ModuleDict()
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.active_adapters = []  # applied in forward, in this order
        self.merged_adapters = []  # already folded into base_layer.weight, so skipped in forward
        self.disable_adapters = False
        self.row_groups = None  # in a mixed-adapter batch: adapter name -> (n,) batch rows, see row_adapters()

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, init_lora_weights=True):
        _check_adapter_name(name)
        if name in self.lora_A:
            raise MiniloraError(f"adapter {name!r} already exists in this layer; delete it first or choose another name")
        if not _is_int(r) or r <= 0:
            raise MiniloraError(f"LoRA rank must be a positive int, got {r!r}")
        w = self.base_layer.weight
        # fp32 even for a bf16/fp16 base: A and B are small, and low precision would swallow small updates
        kw = dict(bias=False, device=w.device, dtype=torch.promote_types(w.dtype, torch.float32))
        self.lora_A[name] = nn.Linear(self.in_features, r, **kw)  # nn.Linear's own init: kaiming_uniform(a=sqrt(5))
        self.lora_B[name] = nn.Linear(r, self.out_features, **kw)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_dropout[name].train(self.training)  # new modules start in train mode; follow the layer's
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / r)
        if init_lora_weights:  # B = 0: the update starts at exactly zero, so training starts at the base model
            nn.init.zeros_(self.lora_B[name].weight)

    def delete_adapter(self, name):
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]  # the ModuleDict held the model's only reference: freed unless e.g. an optimizer keeps one
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def lora_update(self, x, name):
        """scaling * B(A(dropout(x))) for one adapter: the low-rank path, computed in the adapter's dtype.

        Kept as one method so a per-row variant (mixed adapters in one batch) can sit beside it.
        """
        A = self.lora_A[name]
        return self.lora_B[name](A(self.lora_dropout[name](x.to(A.weight.dtype)))) * self.scaling[name]

    def mixed_update(self, x, result):
        """result + each batch row's own adapter update (row_groups), rows on BASE_ADAPTER untouched.

        Rows are grouped by adapter (SGMV, Punica's segmented kernel): each adapter present costs
        one index_select, its own two small matmuls at its own rank on its own rows, and one
        index_add. On a CPU that is the cheapest exact choice here: padded prefill batches have
        B x T rows, where stacking every adapter for every row (multi_lora.SlotLoRALinear's
        decode kernel) would multiply the low-rank work by the number of adapters, and gathering
        per-row A/B copies them once per row. Rows of no group are never written: bit-identical
        to the base layer.
        """
        for name, rows in self.row_groups.items():
            if name in self.lora_A:  # an adapter that does not target this layer adds nothing here
                delta = self.lora_update(x.index_select(0, rows), name)  # (n, ..., out) for its n rows
                result = result.index_add(0, rows, delta.to(result.dtype))
        return result

    def forward(self, x):
        result = self.base_layer(x)
        if self.row_groups is not None:
            return self.mixed_update(x, result)
        if self.disable_adapters:
            return result  # disabled adapters cost nothing: no low-rank compute at all
        for name in self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                result = result + self.lora_update(x, name).to(result.dtype)
        return result

    def delta_weight(self, name):
        """scaling * B @ A as an (out, in) tensor in fp32 (fp64 for an fp64 adapter)."""
        return (_fp32(self.lora_B[name].weight) @ _fp32(self.lora_A[name].weight)) * self.scaling[name]

    def _to_merge(self, adapter_names=None):
        names = self.active_adapters if adapter_names is None else adapter_names
        return [n for n in names if n in self.lora_A and n not in self.merged_adapters]

    def merged_weight(self, names):
        """W + sum of the adapters' deltas, in fp32 and cast once to W's dtype, computed on a copy."""
        w = self.base_layer.weight
        return (_fp32(w) + sum(self.delta_weight(n) for n in names)).to(w.dtype)

    def merge(self, adapter_names=None, safe_merge=False):
        """Fold adapters (default: the active ones) into base_layer.weight; merging twice is a no-op."""
        names = self._to_merge(adapter_names)
        if not names:
            return
        new = self.merged_weight(names)
        if safe_merge and not torch.isfinite(new).all():
            raise MiniloraError(f"safe_merge: adapter(s) {', '.join(names)} give non-finite weights; nothing was merged")
        with torch.no_grad():
            self.base_layer.weight.copy_(new)
        self.merged_adapters += names

    def unmerge(self):
        if not self.merged_adapters:
            return
        w = self.base_layer.weight
        with torch.no_grad():
            w.copy_((_fp32(w) - sum(self.delta_weight(n) for n in self.merged_adapters)).to(w.dtype))
        self.merged_adapters = []


# ---- wrapping a model ----------------------------------------------------------------------------

def lora_layers(model):
    """Yield (module path, LoRALinear) for every wrapped layer."""
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield path, m


def _leaf_names(paths):
    return ", ".join(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))  # distinct, in model order


def _matches(target, path):
    """PEFT's rule for a listed name: the full module path, or a dotted suffix of it ('attn.q_proj')."""
    return path == target or path.endswith("." + target)


def _find_targets(model, config):
    wrapped = {id(m.base_layer) for _, m in lora_layers(model)}
    linears = [p for p, m in model.named_modules()
               if isinstance(m, LoRALinear) or isinstance(m, nn.Linear) and id(m) not in wrapped]
    candidates, where = linears, ""
    if config.layers_to_transform is not None:
        block = {p: int(m.group(1)) for p in linears if (m := _BLOCK.match(p))}
        missing = sorted(set(config.layers_to_transform) - set(block.values()))
        if missing:
            raise MiniloraError(f"layers_to_transform {missing} names blocks this model lacks "
                                f"(it has transformer.h.0 .. {max(block.values(), default=-1)})")
        candidates = [p for p in linears if block.get(p) in config.layers_to_transform]
        where = f" in blocks {config.layers_to_transform}"
    tm, unmatched = config.target_modules, []
    if tm == "all-linear":  # PEFT's meaning: every linear layer except the output head
        found = [p for p in candidates if p.rsplit(".", 1)[-1] != "lm_head"]
    elif isinstance(tm, str):
        found = [p for p in candidates if re.fullmatch(tm, p)]
    else:
        found = [p for p in candidates if any(_matches(t, p) for t in tm)]
        unmatched = [t for t in tm if not any(_matches(t, p) for p in candidates)]
    hint = (f"; the model's nn.Linear modules are: {_leaf_names(linears)} "
            f"(give names, dotted suffixes like 'attn.q_proj', a regex string, or 'all-linear')")
    if not found:
        raise MiniloraError(f"target_modules {tm!r} matched no nn.Linear{where}{hint}")
    if unmatched:
        raise MiniloraError(f"target_modules {unmatched} matched no nn.Linear{where} (a typo?){hint}")
    if "" in found:
        raise MiniloraError("cannot wrap the model itself; put the nn.Linear inside a container module")
    return found


def _find_modules(model, names):
    """The modules named in modules_to_save (same name/suffix rule), every name required to match."""
    paths = [p for p, _ in model.named_modules() if p]
    unmatched = [n for n in names if not any(_matches(n, p) for p in paths)]
    if unmatched:
        raise MiniloraError(f"modules_to_save {unmatched} matched no module; module names include: "
                            f"{_leaf_names(p for p, m in model.named_modules() if p and list(m.parameters(recurse=False)))}")
    return [model.get_submodule(p) for p in paths if any(_matches(n, p) for n in names)]


def _set_module(model, path, module):
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _refuse_if_merged(model, action):
    merged = sorted({n for _, layer in lora_layers(model) for n in layer.merged_adapters})
    if merged:
        raise MiniloraError(f"cannot {action} while adapter(s) {', '.join(merged)} are merged; call unmerge(model) first")


def apply_lora(model, config, adapter_name="default"):
    """Wrap the targeted linears with adapter `adapter_name`, make it the active one, freeze the rest.

    Like get_peft_model: afterwards only this adapter's A/B (plus modules_to_save and biases per
    config.bias) require grad. A second adapter name adds to the same LoRALinear modules.
    """
    if not isinstance(config, LoraConfig):
        raise MiniloraError(f"apply_lora needs a LoraConfig, got {type(config).__name__}")
    _check_adapter_name(adapter_name)
    configs = getattr(model, "peft_config", {})
    if adapter_name in configs:
        raise MiniloraError(f"adapter {adapter_name!r} already exists; delete_adapter it first or choose another name")
    _refuse_if_merged(model, "add an adapter")
    targets = _find_targets(model, config)
    _find_modules(model, config.modules_to_save or [])  # check the names before changing anything
    for path in targets:
        layer = model.get_submodule(path)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            _set_module(model, path, layer)
        layer.add_adapter(adapter_name, config.r, config.lora_alpha, config.lora_dropout,
                          config.use_rslora, config.init_lora_weights)
    model.peft_config = {**configs, adapter_name: config}
    set_adapter(model, adapter_name)
    return model


def _active(model):
    return next((layer.active_adapters for _, layer in lora_layers(model)), [])


def _mark_trainable(model):
    """requires_grad follows the active set: its A/B, modules_to_save, and biases per `bias`."""
    model.requires_grad_(False)
    active = _active(model)
    for _, layer in lora_layers(model):
        for name in active:
            if name in layer.lora_A:
                layer.lora_A[name].requires_grad_(True)
                layer.lora_B[name].requires_grad_(True)
                if model.peft_config[name].bias == "lora_only" and layer.base_layer.bias is not None:
                    layer.base_layer.bias.requires_grad_(True)
    for name in active:
        config = model.peft_config[name]
        if config.bias == "all":
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):
                    p.requires_grad_(True)
        for module in _find_modules(model, config.modules_to_save or []):
            module.requires_grad_(True)


# ---- trainable-parameter report ------------------------------------------------------------------

def count_parameters(model):
    """(trainable, total); works on the meta device, tied weights counted once (parameters() deduplicates)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_line(trainable, total):
    """PEFT's exact print_trainable_parameters line."""
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total if total else 0.0:.4f}")


def print_trainable_parameters(model):
    trainable, total = count_parameters(model)
    print(trainable_line(trainable, total))
    return trainable, total


# ---- several adapters ----------------------------------------------------------------------------

def _check_known(model, names):
    known = getattr(model, "peft_config", {})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MiniloraError(f"unknown adapter(s) {unknown}; this model has: {', '.join(known) or 'none'}")


def set_adapter(model, adapter_name):
    """Make `adapter_name` (a name or a list of names, summed) the active set; only it is trainable."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    _check_known(model, names)
    merged = {n for _, layer in lora_layers(model) for n in layer.merged_adapters}
    if not merged <= set(names):
        _refuse_if_merged(model, "switch adapters")
    for _, layer in lora_layers(model):
        layer.active_adapters = list(names)  # a layer lacking one of them simply skips it
    _mark_trainable(model)


def check_row_adapters(model, adapter_names, batch_size):
    """Refuse a mixed-adapter batch before any compute: one known name (or BASE_ADAPTER) per row."""
    names = list(adapter_names) if isinstance(adapter_names, (list, tuple)) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise MiniloraError(f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}")
    if len(names) != batch_size:
        raise MiniloraError(f"adapter_names has {len(names)} names for {batch_size} rows; give one per row "
                            f"({BASE_ADAPTER!r} for the base model)")
    _check_known(model, sorted({n for n in names if n != BASE_ADAPTER}))
    _refuse_if_merged(model, "run a mixed-adapter batch (a merged adapter would apply to every row)")
    return names


@contextlib.contextmanager
def row_adapters(model, adapter_names):
    """`with row_adapters(model, ["sql", "__base__", "quotes"]):` every forward inside gives batch
    row i the adapter adapter_names[i] alone (PEFT's adapter_names=), whatever set_adapter says."""
    names = check_row_adapters(model, adapter_names, len(adapter_names))
    device = next(model.parameters()).device
    groups = {}
    for i, n in enumerate(names):
        if n != BASE_ADAPTER:
            groups.setdefault(n, []).append(i)
    groups = {n: torch.tensor(rows, device=device) for n, rows in groups.items()}  # (n,) rows of each adapter
    with _set_on_layers(model, "row_groups", groups):
        yield model


@contextlib.contextmanager
def disable_adapter(model):
    """`with disable_adapter(model):` runs the base model; adapters come back on exit, even after an error."""
    _refuse_if_merged(model, "disable adapters")
    with _set_on_layers(model, "disable_adapters", True):
        yield model


@contextlib.contextmanager
def _set_on_layers(model, attr, value):
    """Set `attr` on every LoRALinear for the with-block, then give each layer back its own value."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [getattr(layer, attr) for layer in layers]
    for layer in layers:
        setattr(layer, attr, value)
    try:
        yield model
    finally:
        for layer, old in zip(layers, before):
            setattr(layer, attr, old)


def delete_adapter(model, adapter_name):
    """Remove an adapter and free its tensors; layers left without adapters become plain nn.Linear again."""
    _check_known(model, [adapter_name])
    _refuse_if_merged(model, "delete an adapter")
    for path, layer in list(lora_layers(model)):
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
        layer.active_adapters = [n for n in layer.active_adapters if n != adapter_name]  # may leave none active
        if not layer.lora_A:
            _set_module(model, path, layer.base_layer)
    del model.peft_config[adapter_name]
    _mark_trainable(model)


def add_weighted_adapter(model, adapters, weights, adapter_name, combination_type="linear"):
    """A new adapter combining existing ones (PEFT's semantics); it is added, not activated.

    "cat": A = concat_i(w_i * s_i * A_i), B = concat_i(B_i), rank = sum of ranks, scaling 1, so
        B @ A = sum_i w_i * delta_i exactly.
    "linear": A = sum_i sqrt(w_i) * s_i * A_i, B = sum_i sqrt(w_i) * B_i at the common rank; the
        cross terms B_i A_j mean this is not the sum of deltas (use "cat" for that).
    """
    adapters, weights = list(adapters), list(weights)
    _check_known(model, adapters)
    _check_adapter_name(adapter_name)
    if adapter_name in model.peft_config:
        raise MiniloraError(f"adapter {adapter_name!r} already exists; choose another name")
    if not adapters or len(adapters) != len(weights):
        raise MiniloraError(f"add_weighted_adapter needs one weight per adapter, got {len(adapters)} adapters "
                            f"and {len(weights)} weights")
    if combination_type not in ("linear", "cat"):
        raise MiniloraError(f"combination_type must be 'linear' or 'cat', got {combination_type!r}")
    ranks = [model.peft_config[a].r for a in adapters]
    if combination_type == "linear":
        if len(set(ranks)) > 1:
            raise MiniloraError(f"combination_type='linear' needs adapters of the same rank, got "
                                f"{dict(zip(adapters, ranks))}; use combination_type='cat' to concatenate ranks")
        if any(w < 0 for w in weights):
            raise MiniloraError(f"combination_type='linear' scales by sqrt(weight), so weights must be >= 0, got {weights}")
    first = model.peft_config[adapters[0]]
    new_r = ranks[0] if combination_type == "linear" else sum(ranks)
    paths = []
    for path, layer in lora_layers(model):
        if not any(a in layer.lora_A for a in adapters):
            continue
        # alpha = r gives scaling 1: each source adapter's scaling is folded into A below
        layer.add_adapter(adapter_name, new_r, new_r, first.lora_dropout, init_lora_weights=False)
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        with torch.no_grad():
            A.zero_()
            B.zero_()
            start = 0
            for a, w, r in zip(adapters, weights, ranks):
                if a in layer.lora_A:
                    src_A, src_B, s = layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a]
                    if combination_type == "linear":
                        A += math.sqrt(w) * s * src_A
                        B += math.sqrt(w) * src_B
                    else:
                        A[start:start + r] = w * s * src_A  # rows of A: (r_i, in)
                        B[:, start:start + r] = src_B  # columns of B: (out, r_i)
                start += r  # an adapter missing here leaves its block at zero
        paths.append(path)
    model.peft_config[adapter_name] = dataclasses.replace(
        first, r=new_r, lora_alpha=new_r, use_rslora=False, target_modules=paths, layers_to_transform=None)
    _mark_trainable(model)  # the new A/B were created trainable; only the active set should be


# ---- merging -------------------------------------------------------------------------------------

def _tied(model):
    """Ids of parameters that more than one module owns (GPT-2's lm_head.weight is transformer.wte.weight)."""
    seen, tied = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return tied


def merge(model, safe_merge=False, adapter_names=None):
    """Fold adapters (default: the active set) into the base weights. Idempotent; never done implicitly.

    safe_merge=True computes every merged weight on a copy first and raises, leaving the model
    untouched, if any would be NaN/inf.
    """
    if adapter_names is not None:
        _check_known(model, adapter_names)
    layers = list(lora_layers(model))
    tied = _tied(model)
    for path, layer in layers:
        if layer._to_merge(adapter_names) and id(layer.base_layer.weight) in tied:
            raise MiniloraError(f"{path}'s weight is tied to another module (GPT-2's lm_head is transformer.wte); "
                                f"merging would change both, so keep this adapter unmerged")
    if safe_merge:  # check all layers before writing any, so a bad adapter leaves the whole model unchanged
        for path, layer in layers:
            names = layer._to_merge(adapter_names)
            if names and not torch.isfinite(layer.merged_weight(names)).all():
                raise MiniloraError(f"safe_merge: adapter(s) {', '.join(names)} give non-finite weights in {path}; "
                                    f"nothing was merged (check the adapter for NaN/inf)")
    for _, layer in layers:
        layer.merge(adapter_names)


def unmerge(model):
    """Subtract every merged adapter again (exact up to fp32 rounding for fp32 weights)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model, safe_merge=False):
    """Merge the active adapters and return the plain GPT (same object): only base keys, all trainable."""
    merge(model, safe_merge=safe_merge)
    for path, layer in list(lora_layers(model)):
        _set_module(model, path, layer.base_layer)
    del model.peft_config
    model.requires_grad_(True)
    return model


# ---- adapter files (minilora.adapter_files, imported on use: it builds on this module) ------------

def save_adapter(*args, **kwargs):
    """See minilora.adapter_files.save_adapter: a PEFT-format adapter directory."""
    from minilora.adapter_files import save_adapter as save
    return save(*args, **kwargs)


def load_adapter(*args, **kwargs):
    """See minilora.adapter_files.load_adapter."""
    from minilora.adapter_files import load_adapter as load
    return load(*args, **kwargs)
