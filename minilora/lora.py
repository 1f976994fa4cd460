"""LoRA (Hu et al. 2021, section 4) in code: freeze W, learn a low-rank update B @ A beside it.

    h = W x + b + (alpha / r) * B A x          A: (r, in), B: (out, r), r << min(in, out)

A starts random and B starts at zero, so training begins exactly at the pretrained model.
Only A and B get gradients; W never changes. After training, W + (alpha/r) B A can be folded
into W (`merge`) so inference costs nothing extra, or kept apart so one base serves many
adapters (minilora.adapters).

Names follow PEFT so tutorials read the same: `LoraConfig(r, lora_alpha, target_modules, ...)`,
`model.peft_config`, `lora_A`/`lora_B`/`base_layer` in the state dict. This page is the math;
several adapters (set / delete / disable / weighted / per-row) are minilora.adapters, and the
PEFT file format is minilora.adapter_files.

Precision: adapter weights are created in fp32 even when the base is bf16/fp16 (small, and
fp32 keeps tiny updates from rounding away); the forward casts x to the adapter dtype and the
update back to the output dtype. Merging computes W + delta in fp32 and rounds once to W's
dtype. Expect merged vs unmerged logits to agree within ~1e-6 with fp32 weights, but only to
the weight dtype's rounding otherwise: measured on the "small" preset with logits of size ~1,
about 1e-2 in bf16 and 1e-3 in fp16 (the merged weight itself is rounded; the adapter was not).

modules_to_save: the named modules are trained in place (not copied per adapter), so they are
shared by every adapter and are not undone by disable_adapter/delete_adapter. GPT-2's lm_head
is tied to transformer.wte: saving lm_head trains the input embedding too (one tensor).

DoRA (use_dora=True) adds a trained magnitude per output row; its math is minilora.dora.
"""

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from minilora import dora
from minilora.errors import MiniloraError
from minilora.ops import Linear
from minilora.quantize import QuantizedLinear, dequantize_model
from minilora.targets import find_modules, find_targets

BIAS_MODES = ("none", "all", "lora_only")
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


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
    use_dora: bool = False  # DoRA (Liu et al. 2024): a trained magnitude per output row (minilora.dora)

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
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "a bool")
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


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _fp32(t):
    """t in at least fp32 (fp64 stays fp64): merge arithmetic never happens in bf16/fp16."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def check_adapter_name(name):
    """Adapter names key nn.ModuleDicts, so no '.'; BASE_ADAPTER means "no adapter"."""
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
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only: name -> m, (out,)
        self.dora_norms = {}  # DoRA adapters merged: the ‖W + ΔW‖ they were merged with, for unmerge
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.active_adapters = []  # applied in forward, in this order
        self.merged_adapters = []  # already folded into base_layer.weight, so skipped in forward
        self.disable_adapters = False
        self.rows = None  # during a mixed-adapter forward: adapters.RowAdapters, which routes each row
        self.stacked = None  # RowAdapters' cache: every slot's A and B side by side

    @property
    def weight(self):
        """The frozen base weight, as PEFT exposes it: code reading e.g. lm_head.weight.device keeps working."""
        return self.base_layer.weight

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, init_lora_weights=True,
                    use_dora=False):
        check_adapter_name(name)
        if name in self.lora_A:
            raise MiniloraError(f"adapter {name!r} already exists in this layer; delete it first or choose another name")
        if not _is_int(r) or r <= 0:
            raise MiniloraError(f"LoRA rank must be a positive int, got {r!r}")
        base = self.base_layer
        if use_dora and isinstance(base, QuantizedLinear):  # its norm would need the whole float W at every step
            raise MiniloraError("DoRA on a quantized base is not supported; use plain LoRA on it (QLoRA), "
                                "or DoRA on a float base")
        ref = base if isinstance(base, QuantizedLinear) else base.weight  # a quantized weight has no .weight
        device, dtype = ref.device, ref.dtype
        # fp32 even for a bf16/fp16 (or 4-bit) base: A and B are small, and low precision would swallow small updates
        kw = dict(bias=False, device=device, dtype=torch.promote_types(dtype, torch.float32))
        # nn.Linear's own init (kaiming_uniform(a=sqrt(5))); ops.Linear: fp32 training products on the faster library
        self.lora_A[name] = Linear(self.in_features, r, **kw)
        self.lora_B[name] = Linear(r, self.out_features, **kw)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_dropout[name].train(self.training)  # new modules start in train mode; follow the layer's
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / r)
        if init_lora_weights:  # B = 0: the update starts at exactly zero, so training starts at the base model
            nn.init.zeros_(self.lora_B[name].weight)
        if use_dora:  # m = ‖W + s B A‖ per row: with B = 0, W' = W, so training starts at the base model
            with torch.no_grad():
                m = dora.weight_norm(base.weight, self.delta_weight(name))
            self.lora_magnitude_vector[name] = nn.Parameter(m.to(kw["dtype"]))

    def delete_adapter(self, name):
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]  # the ModuleDict held the model's only reference: freed unless e.g. an optimizer keeps one
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def lora_update(self, x, name, base=None):
        """What adapter `name` adds to base = base_layer(x), in the adapter's dtype: scaling * B(A(dropout(x)))
        for LoRA; for DoRA that rescaled by m/‖W + ΔW‖ plus the change to W x (dora.update, which reuses `base`)."""
        A, drop = self.lora_A[name], self.lora_dropout[name]
        xd = drop(x.to(A.weight.dtype))
        out = self.lora_B[name](A(xd)) * self.scaling[name]
        if name in self.lora_magnitude_vector:
            out = dora.update(self, name, xd, out, base, dropped=self.training and not isinstance(drop, nn.Identity))
        return out

    def forward(self, x):
        base = result = self.base_layer(x)
        if self.rows is not None:  # one batch, an adapter per row (adapters.adapter_rows)
            return self.rows.forward(self, x, result)
        if self.disable_adapters:
            return result  # disabled adapters cost nothing: no low-rank compute at all
        for name in self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                result = result + self.lora_update(x, name, base).to(result.dtype)
        return result

    # ---- merging ---------------------------------------------------------------------------------

    def delta_weight(self, name):
        """scaling * B @ A as an (out, in) tensor in fp32 (fp64 for an fp64 adapter)."""
        return (_fp32(self.lora_B[name].weight) @ _fp32(self.lora_A[name].weight)) * self.scaling[name]

    def to_merge(self, adapter_names=None):
        names = self.active_adapters if adapter_names is None else adapter_names
        return [n for n in names if n in self.lora_A and n not in self.merged_adapters]

    def merge_into(self, w32, names):
        """(w32 with the adapters folded in one after another, {DoRA adapter: the norm it used}), in fp32."""
        norms = {}
        with torch.no_grad():
            for n in names:
                if n in self.lora_magnitude_vector:
                    w32, norms[n] = dora.merge(w32, self.delta_weight(n), self.lora_magnitude_vector[n])
                else:
                    w32 = w32 + self.delta_weight(n)
        return w32, norms

    def merged_weight(self, names):
        """W with the adapters folded in, in fp32 and cast once to W's dtype, computed on a copy."""
        w = self.base_layer.weight
        return self.merge_into(_fp32(w), names)[0].to(w.dtype)

    def merge(self, adapter_names=None):
        """Fold adapters (default: the active ones) into base_layer.weight; merging twice is a no-op."""
        names = self.to_merge(adapter_names)
        if names:
            w = self.base_layer.weight
            merged, norms = self.merge_into(_fp32(w), names)
            with torch.no_grad():
                w.copy_(merged.to(w.dtype))
            self.dora_norms.update(norms)
            self.merged_adapters += names

    def unmerge(self):
        """Take the merged adapters out again, last merged first (DoRA divides by the factor it multiplied by)."""
        if not self.merged_adapters:
            return
        w = self.base_layer.weight
        with torch.no_grad():
            w32 = _fp32(w)
            for n in reversed(self.merged_adapters):
                if n in self.dora_norms:
                    w32 = dora.unmerge(w32, self.delta_weight(n), self.lora_magnitude_vector[n], self.dora_norms.pop(n))
                else:
                    w32 = w32 - self.delta_weight(n)
            w.copy_(w32.to(w.dtype))
        self.merged_adapters = []


# ---- wrapping a model ----------------------------------------------------------------------------

def lora_layers(model):
    """Yield (module path, LoRALinear) for every wrapped layer."""
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield path, m


def set_module(model, path, module):
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def refuse_if_merged(model, action):
    merged = sorted({n for _, layer in lora_layers(model) for n in layer.merged_adapters})
    if merged:
        raise MiniloraError(f"cannot {action} while adapter(s) {', '.join(merged)} are merged; call unmerge(model) first")


def apply_lora(model, config, adapter_name="default", *, activate=None):
    """Wrap the targeted linears with adapter `adapter_name`; the first adapter becomes the active one.

    Like get_peft_model: afterwards only the active adapter's A/B (plus modules_to_save and biases
    per config.bias) require grad. A second adapter name adds to the same LoRALinear modules and,
    as in PEFT (add_adapter, load_adapter), does not become active: set_adapter switches.
    activate: None (PEFT's rule: active only when no adapter is active yet), True (make it the
    active one), False (never: serving's registry).
    """
    if not isinstance(config, LoraConfig):
        raise MiniloraError(f"apply_lora needs a LoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    configs = getattr(model, "peft_config", {})
    if adapter_name in configs:
        raise MiniloraError(f"adapter {adapter_name!r} already exists; delete_adapter it first or choose another name")
    refuse_if_merged(model, "add an adapter")
    before = active_adapters(model)  # read before new LoRALinears (with no active adapter) exist
    targets = find_targets(model, config.target_modules, config.layers_to_transform)
    find_modules(model, config.modules_to_save or [])  # check the names before changing anything
    for path, layer in ((p, model.get_submodule(p)) for p in targets):  # before allocating: r adds size, not rank
        if config.r > min(layer.in_features, layer.out_features):
            raise MiniloraError(f"LoRA rank {config.r} exceeds {path}'s min(in_features {layer.in_features}, out_features "
                                f"{layer.out_features}); use r <= {min(layer.in_features, layer.out_features)} (--lora_r)")
    for path in targets:
        layer = model.get_submodule(path)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            layer.train(model.training)
            set_module(model, path, layer)
        layer.add_adapter(adapter_name, config.r, config.lora_alpha, config.lora_dropout,
                          config.use_rslora, config.init_lora_weights, config.use_dora)
    if activate is None:
        activate = not before  # a second adapter never silently replaces the one in use
    model.peft_config = {**configs, adapter_name: config}
    activate_adapters(model, [adapter_name] if activate else before)
    return model


def active_adapters(model):
    return next((list(layer.active_adapters) for _, layer in lora_layers(model)), [])


def activate_adapters(model, names):
    """Make `names` (summed) the active set; requires_grad follows it: their A/B, modules_to_save,
    and biases per `bias`. adapters.set_adapter is the checked, public form."""
    for _, layer in lora_layers(model):
        layer.active_adapters = list(names)  # a layer lacking one of them simply skips it
    model.requires_grad_(False)
    for _, layer in lora_layers(model):
        for name in names:
            if name in layer.lora_A:
                layer.lora_A[name].requires_grad_(True)
                layer.lora_B[name].requires_grad_(True)
                if name in layer.lora_magnitude_vector:
                    layer.lora_magnitude_vector[name].requires_grad_(True)
                if model.peft_config[name].bias == "lora_only" and layer.base_layer.bias is not None:
                    layer.base_layer.bias.requires_grad_(True)
    for name in names:
        config = model.peft_config[name]
        if config.bias == "all":
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):
                    p.requires_grad_(True)
        for module in find_modules(model, config.modules_to_save or []):
            module.requires_grad_(True)


# ---- merging -------------------------------------------------------------------------------------

QUANTIZED_MERGE = ("cannot merge into {path}'s {method} base: the merged weight would be rounded to the {method} grid "
                   "again, an error as large as the quantization itself and larger than most adapters' updates; "
                   "merge_and_unload(model) dequantizes to fp32 first and returns a float model")


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
        known = getattr(model, "peft_config", {})
        unknown = [n for n in adapter_names if n not in known]
        if unknown:
            raise MiniloraError(f"unknown adapter(s) {unknown}; this model has: {', '.join(known) or 'none'}")
    layers = list(lora_layers(model))
    for path, layer in layers:
        if layer.to_merge(adapter_names) and isinstance(layer.base_layer, QuantizedLinear):
            raise MiniloraError(QUANTIZED_MERGE.format(path=path, method=layer.base_layer.method))
    tied = _tied(model)
    for path, layer in layers:
        if layer.to_merge(adapter_names) and id(layer.base_layer.weight) in tied:
            raise MiniloraError(f"{path}'s weight is tied to another module (GPT-2's lm_head is transformer.wte); "
                                f"merging would change both, so keep this adapter unmerged")
    for path, layer in layers:
        dora.check_merge(path, layer.merged_adapters + layer.to_merge(adapter_names), layer.lora_magnitude_vector)
    if safe_merge:  # check all layers before writing any, so a bad adapter leaves the whole model unchanged
        for path, layer in layers:
            names = layer.to_merge(adapter_names)
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
    """Merge the active adapters and return the plain GPT (same object): only base keys, all trainable.

    A quantized base (minilora.quantize) is dequantized to fp32 first, the merge is done there, and
    each layer returns to the float dtype it had before quantization: a plain float model, as PEFT
    users get from a QLoRA run before deploying it.
    """
    dtypes = {p: q.dtype for p, q in model.named_modules() if isinstance(q, QuantizedLinear)}
    dequantize_model(model, torch.float32)
    merge(model, safe_merge=safe_merge)
    for path, dtype in dtypes.items():
        model.get_submodule(path).to(dtype)
    for path, layer in list(lora_layers(model)):
        set_module(model, path, layer.base_layer)
    del model.peft_config
    model.requires_grad_(True)
    return model


# ---- trainable-parameter report ------------------------------------------------------------------

def count_parameters(model):
    """(trainable, total); works on the meta device, tied weights counted once (parameters() deduplicates).

    A quantized layer's weight counts as its in x out weights (frozen), though stored as packed buffers:
    QLoRA's trainable% is of the model's weights, as PEFT reports it for a 4-bit base.
    """
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return trainable, total


def trainable_line(trainable, total):
    """PEFT's exact print_trainable_parameters line."""
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total if total else 0.0:.4f}")


def print_trainable_parameters(model):
    trainable, total = count_parameters(model)
    print(trainable_line(trainable, total))
    return trainable, total
