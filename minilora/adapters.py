"""Several adapters on one model: choose, switch off, delete, combine, or give each batch row its own.

    set_adapter(model, "sql")                    # the active adapter (a list of names sums them)
    with disable_adapter(model): ...             # the base model inside the block
    delete_adapter(model, "sql")                 # frees its tensors; bare layers become nn.Linear again
    add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "ab", combination_type="cat")
    with adapter_rows(model, ["sql", "__base__", "dates"]): model(idx)   # row i uses adapter i

adapter_rows is the one mixed-adapter runtime: generate(adapter_names=...) and the serving engine
both run their batches through it (RowAdapters.forward is the kernel).
"""

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from minilora.errors import MiniloraError
from minilora.lora import (BASE_ADAPTER, activate_adapters, check_adapter_name, lora_layers, refuse_if_merged,
                           set_module)


def check_known(model, names):
    known = getattr(model, "peft_config", {})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MiniloraError(f"unknown adapter(s) {unknown}; this model has: {', '.join(known) or 'none'}")


def set_adapter(model, adapter_name):
    """Make `adapter_name` (a name or a list of names, summed) the active set; only it is trainable."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    check_known(model, names)
    merged = {n for _, layer in lora_layers(model) for n in layer.merged_adapters}
    if not merged <= set(names):
        refuse_if_merged(model, "switch adapters")
    activate_adapters(model, names)


@contextlib.contextmanager
def disable_adapter(model):
    """`with disable_adapter(model):` runs the base model; adapters come back on exit, even after an error."""
    refuse_if_merged(model, "disable adapters")
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
    check_known(model, [adapter_name])
    refuse_if_merged(model, "delete an adapter")
    for path, layer in list(lora_layers(model)):
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
            layer.stacked = None
        if not layer.lora_A:
            set_module(model, path, layer.base_layer)
    del model.peft_config[adapter_name]
    activate_adapters(model, [n for n in active_names(model) if n != adapter_name])


def active_names(model):
    return next((list(layer.active_adapters) for _, layer in lora_layers(model)), [])


def add_weighted_adapter(model, adapters, weights, adapter_name, combination_type="linear"):
    """A new adapter combining existing ones (PEFT's semantics); it is added, not activated.

    "cat": A = concat_i(w_i * s_i * A_i), B = concat_i(B_i), rank = sum of ranks, scaling 1, so
        B @ A = sum_i w_i * delta_i exactly.
    "linear": A = sum_i sqrt(w_i) * s_i * A_i, B = sum_i sqrt(w_i) * B_i at the common rank; the
        cross terms B_i A_j mean this is not the sum of deltas (use "cat" for that).
    """
    adapters, weights = list(adapters), list(weights)
    check_known(model, adapters)
    check_adapter_name(adapter_name)
    if adapter_name in model.peft_config:
        raise MiniloraError(f"adapter {adapter_name!r} already exists; choose another name")
    if not adapters or len(adapters) != len(weights):
        raise MiniloraError(f"add_weighted_adapter needs one weight per adapter, got {len(adapters)} adapters "
                            f"and {len(weights)} weights")
    if combination_type not in ("linear", "cat"):
        raise MiniloraError(f"combination_type must be 'linear' or 'cat', got {combination_type!r}")
    dora = [a for a in adapters if model.peft_config[a].use_dora]
    if dora:
        raise MiniloraError(f"add_weighted_adapter cannot combine DoRA adapter(s) {', '.join(dora)} (each rescales "
                            f"W by its own magnitude); merge them one at a time instead")
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
    activate_adapters(model, active_names(model))  # the new A/B were created trainable; only the active set should be



# ---- one batch, an adapter per row ---------------------------------------------------------------

def check_row_adapters(model, adapter_names, batch_size):
    """Refuse a mixed-adapter batch before any compute: one known name (or BASE_ADAPTER) per row."""
    names = list(adapter_names) if isinstance(adapter_names, (list, tuple)) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise MiniloraError(f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}")
    if len(names) != batch_size:
        raise MiniloraError(f"adapter_names has {len(names)} names for {batch_size} rows; give one per row "
                            f"({BASE_ADAPTER!r} for the base model)")
    check_known(model, sorted({n for n in names if n != BASE_ADAPTER}))
    refuse_if_merged(model, "run a mixed-adapter batch (a merged adapter would apply to every row)")
    return names


@dataclass
class RowAdapters:
    """Which adapter each batch row uses in a mixed-adapter forward, and the kernel that applies them.

    slots: adapter names in column order (None: an empty slot); row_slot: (B,) index into slots for
    each row, -1 for the base model; pad_rank: pad every slot to this rank so the kernel's shapes
    never change (the serving engine), or None for each adapter's own rank.
    """
    slots: list
    row_slot: torch.Tensor
    pad_rank: int | None = None
    single: str | None = None  # set when every row uses this one adapter and nothing is padded

    def forward(self, layer, x, result):
        """result + each row's own adapter update in `layer`; rows on the base model stay bit-identical.

        Every slot's A side by side, (in, S*R), and its scaled B stacked, (S*R, out): one matmul
        gives every row every slot's h, a mask keeps each row's own slot's columns, and a second
        matmul maps them out. Why this kernel (serving_bench.bench_lora_kernels, gpt2 shapes on a
        CPU): S*R extra columns (8 x 16 = 128 against 768) cost little in two large matmuls, where
        grouping rows by adapter costs 4 small ops per adapter present and gathering per-row A/B
        copies rank x (in + out) floats per row. Its shapes depend only on (rows, S*R), and a row's
        products never mix with another row's, so a row's result does not depend on which adapters
        its neighbours use (the server's "same answer alone or batched").
        """
        slot = self.row_slot
        if not self.slots:  # every row on the base model (the adapters' rows have finished, say): nothing to add
            return result
        if self.single is not None:  # one adapter for the whole batch: the plain path at its own rank
            name = self.single
            return result + layer.lora_update(x, name, result).to(result.dtype) if name in layer.lora_A else result
        A, B, col_slot, present = self._stacked(layer)
        use = (slot >= 0) & present[slot.clamp(min=0)]  # (B,) rows with an update in this layer
        if not bool(use.any()):
            return result
        h = x.to(A.dtype) @ A  # (B, T, S*R): every slot's A x in one matmul
        h = h * (slot[:, None] == col_slot[None, :]).to(h.dtype)[:, None, :]  # each row keeps its own slot
        delta = (h @ B).to(result.dtype)  # (B, T, out)
        return torch.where(use[:, None, None], result + delta, result)

    def _stacked(self, layer):
        """(A (in, S*R), B (S*R, out) with the scaling folded in, col_slot (S*R,), present (S,)), cached
        on the layer until the slots or an adapter's weights change (an optimizer step bumps _version)."""
        key = (tuple(self.slots), self.pad_rank) + tuple(
            (id(layer.lora_A[n].weight), layer.lora_A[n].weight._version, layer.lora_B[n].weight._version)
            for n in self.slots if n in layer.lora_A)
        if layer.stacked is None or layer.stacked[0] != key:
            ref = next(iter(layer.lora_A.values())).weight
            ranks = [self.pad_rank or (layer.r[n] if n in layer.lora_A else 0) for n in self.slots]
            A = torch.zeros(layer.in_features, sum(ranks), dtype=ref.dtype, device=ref.device)
            B = torch.zeros(sum(ranks), layer.out_features, dtype=ref.dtype, device=ref.device)
            col_slot = torch.repeat_interleave(torch.arange(len(ranks), device=ref.device),
                                               torch.tensor(ranks, dtype=torch.long, device=ref.device))
            start = 0
            for n, width in zip(self.slots, ranks):
                if n in layer.lora_A:
                    r = layer.r[n]
                    A[:, start:start + r] = layer.lora_A[n].weight.detach().t()  # (in, r)
                    B[start:start + r] = (layer.lora_B[n].weight.detach() * layer.scaling[n]).t()  # (r, out)
                start += width
            present = torch.tensor([n in layer.lora_A for n in self.slots], dtype=torch.bool, device=ref.device)
            layer.stacked = (key, A, B, col_slot, present)
        return layer.stacked[1:]


@contextlib.contextmanager
def adapter_rows(model, adapter_names, *, slots=None, pad_rank=None):
    """`with adapter_rows(model, ["sql", "__base__", "quotes"]):` every forward inside gives batch
    row i the adapter adapter_names[i] alone (PEFT's adapter_names=), whatever set_adapter says.

    slots: the adapters' column order (default: the distinct names of this batch); the serving
    engine passes its fixed slots and pad_rank so every step has the same shapes.
    """
    names = check_row_adapters(model, adapter_names, len(adapter_names))
    slots = list(slots) if slots is not None else list(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
    missing = sorted({n for n in names if n != BASE_ADAPTER} - set(slots))
    if missing:
        raise MiniloraError(f"adapter(s) {missing} have no slot in {slots}")
    device = next(model.parameters()).device
    row_slot = torch.tensor([-1 if n == BASE_ADAPTER else slots.index(n) for n in names], device=device)
    single = names[0] if pad_rank is None and len(set(names)) == 1 and names[0] != BASE_ADAPTER else None
    dora = sorted({n for n in names if n != BASE_ADAPTER and model.peft_config[n].use_dora})
    if dora and single is None:  # the stacked kernel has no place for DoRA's per-row magnitude (PEFT refuses too)
        raise MiniloraError(f"DoRA adapter(s) {', '.join(dora)} cannot share a mixed-adapter batch; run them in a "
                            f"batch of their own, or merge_and_unload a copy of the model")
    with _set_on_layers(model, "rows", RowAdapters(slots, row_slot, pad_rank, single)):
        yield model


row_adapters = adapter_rows  # the first wave's name, kept for code written against it
