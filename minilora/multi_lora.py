"""Many adapters on one base model at once: adapter slots, a batched LoRA kernel, and a registry.

This is the serving side of LoRA (the idea behind vLLM's --enable-lora, S-LoRA and Punica):
the base weights are in memory once, and every request names its own adapter. A batch mixes
adapters freely; each row gets W x + b (one matmul for the whole batch) plus its own B A x.

    registry = AdapterRegistry(model, max_loras=4, max_cpu_loras=8, max_lora_rank=16)
    registry.add("sql", "out/sql")           # read and checked now, kept in the CPU cache
    slot = registry.acquire("sql")           # copied into one of the 4 active slots (LRU eviction)
    with registry.rows.use([slot, -1]):      # row 0 uses "sql", row 1 the base model
        logits, _ = model(idx, ...)
    registry.release(slot)

Two levels, as in vLLM: the CPU cache holds up to max_cpu_loras adapters as read from disk
(evicted least recently used first, re-read on demand); the active slots (max_loras) are
stacked, zero-padded tensors inside every adapted layer, which is what the kernel reads. An
adapter in use by a running row is never evicted; pinned adapters are never evicted at all.
"""

import contextlib
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn

from minilora.adapter_files import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from minilora.errors import MiniloraError
from minilora.lora import LoRALinear, LoraConfig
from minilora.safetensors import load_file

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
_KEY = re.compile(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight")


class UnknownAdapter(MiniloraError):
    """A name that is not registered (the server answers 404)."""


@dataclass
class AdapterWeights:
    """One adapter as read from disk: fp32 (A, B) per module path, and its scaling."""
    name: str
    path: str
    r: int
    scaling: float
    layers: dict  # module path -> (A (r, in), B (out, r))

    @property
    def nbytes(self):
        return sum(a.nbytes + b.nbytes for a, b in self.layers.values())


def read_adapter(adapter_dir, name, shapes, max_lora_rank=None):
    """Read and check a PEFT-format adapter directory against the base's linears.

    shapes: {module path: (in_features, out_features)} of the base model. Every problem is a
    MiniloraError naming it; nothing about the model changes here, so any thread may call this.
    """
    adapter_dir = os.fspath(adapter_dir)
    if not os.path.isdir(adapter_dir):
        raise MiniloraError(f"adapter directory {adapter_dir} does not exist; pass a directory save_adapter wrote")
    cfg_path, w_path = os.path.join(adapter_dir, CONFIG_NAME), os.path.join(adapter_dir, WEIGHTS_NAME)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = LoraConfig.from_peft_dict(json.load(f))
    except FileNotFoundError:
        raise MiniloraError(f"{cfg_path} is missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}") from None
    except (ValueError, TypeError, RecursionError) as e:  # bad or too deeply nested JSON, or a config LoraConfig refuses
        raise MiniloraError(f"{cfg_path}: {e}") from None
    if max_lora_rank is not None and config.r > max_lora_rank:
        raise MiniloraError(f"adapter {name!r} has rank {config.r}, above the server's max_lora_rank {max_lora_rank}; "
                            f"restart with --max-lora-rank {config.r} or more")
    if config.bias != "none" or config.modules_to_save:
        raise MiniloraError(f"adapter {name!r} trains biases or modules_to_save, which every request would share; "
                            f"only bias='none' adapters without modules_to_save can be served per request")
    if not os.path.isfile(w_path):
        raise MiniloraError(f"{w_path} is missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    tensors = load_file(w_path)
    found, unexpected = {}, []
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None or m[1] not in shapes:
            unexpected.append(key)
        else:
            found.setdefault(m[1], {})[m[2]] = t
    if any(re.search(r"\.(c_attn|c_fc|c_proj)\.", k) for k in unexpected):
        raise MiniloraError(f"{w_path} is an HF GPT-2 (c_attn) adapter; load it with minilora.lora.load_adapter "
                            f"and save_adapter it again to serve it")
    problems = [f"unexpected keys: {', '.join(unexpected[:5])}"] if unexpected else []
    layers = {}
    for path, ab in found.items():
        i, o = shapes[path]
        A, B = ab.get("A"), ab.get("B")
        if A is None or B is None:
            problems.append(f"{path} lacks lora_{'A' if A is None else 'B'}.weight")
        elif tuple(A.shape) != (config.r, i) or tuple(B.shape) != (o, config.r):
            problems.append(f"{path} has A {tuple(A.shape)} and B {tuple(B.shape)}, expected ({config.r}, {i}) "
                            f"and ({o}, {config.r})")
        elif not (torch.isfinite(A).all() and torch.isfinite(B).all()):  # NaN logits would fail every row's sampling
            problems.append(f"{path} has NaN or inf weights")
        else:
            layers[path] = (A.float().clone(), B.float().clone())  # clone: no view keeps the file's mmap alive
    if problems or not layers:
        raise MiniloraError(f"{w_path} does not fit this base model: {'; '.join(problems) or 'no LoRA weights'}")
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    return AdapterWeights(name, adapter_dir, config.r, scaling, layers)


class RowSlots:
    """Which slot each batch row uses in the next forward (-1: the base model); shared by every layer."""

    def __init__(self):
        self.slots = None   # (B,) LongTensor, or None: no adapters at all
        self.single = None  # the one slot of a single-request forward (prefill), else None

    @contextlib.contextmanager
    def use(self, slots, device=None):
        """`with rows.use([2, -1, 0]):` one slot per row for the forwards inside. A list of
        length 1 is a single request (prefill) and takes the cheaper one-adapter path."""
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.single = slots[0] if len(slots) == 1 else None
        try:
            yield
        finally:
            self.slots = self.single = None


class SlotLoRALinear(nn.Module):
    """A frozen nn.Linear plus n_slots stacked adapters, zero-padded to max_rank; each row picks one.

    The kernel (decode, many rows): h = x @ A[s] for EVERY slot s in one batched matmul, then
    d = h @ B[s], then each row picks its own slot's d. Why this one, on a CPU (measured with
    serving_bench.bench_lora_kernels: a 768x768 layer, 8 slots of rank 16, 16-32 rows, 1 thread):
    base matmul 300-500 us; gathering each row's A and B (vLLM's BGMV) 460-900 us, since it
    copies rows x rank x (in + out) floats per layer per step; segmenting rows by adapter (SGMV)
    330-380 us, 4 small ops per adapter present; all slots at once 140-260 us: 8 x 16 = 128
    extra columns against 768 is cheap, in two large matmuls. Its shapes are also fixed (rows,
    slots, max_rank), and every slot's product is its own batch element, so a row's result never
    depends on its neighbours or on which slot its adapter got (SGMV's shapes, and so its
    rounding, change with how many rows share an adapter).
    The scaling is folded into B when an adapter is copied in, so the kernel never multiplies by it.
    Rows on the base model take the base result untouched (torch.where), so they are bit-identical.
    """

    def __init__(self, base_layer, n_slots, max_rank, rows):
        super().__init__()
        self.base_layer = base_layer
        i, o = base_layer.in_features, base_layer.out_features
        kw = dict(device=base_layer.weight.device, dtype=torch.promote_types(base_layer.weight.dtype, torch.float32))
        self.register_buffer("A", torch.zeros(n_slots, i, max_rank, **kw), persistent=False)  # (S, in, R): A^T per slot
        self.register_buffer("B", torch.zeros(n_slots, max_rank, o, **kw), persistent=False)  # (S, R, out): (s*B)^T
        self.rank = [0] * n_slots  # 0: nothing in this slot for this layer (adapter absent here, or slot empty)
        self.register_buffer("filled", torch.zeros(n_slots, dtype=torch.bool, device=kw["device"]), persistent=False)
        self.rows = rows

    @property
    def weight(self):  # GPT reads lm_head.weight for its dtype and device
        return self.base_layer.weight

    def load(self, slot, A, B, scaling):
        r = A.shape[0]
        with torch.no_grad():
            self.clear(slot)
            self.A[slot, :, :r] = A.t()
            self.B[slot, :r] = (B * scaling).t()
            self.filled[slot] = True
        self.rank[slot] = r

    def clear(self, slot):
        with torch.no_grad():
            self.A[slot].zero_()
            self.B[slot].zero_()
            self.filled[slot] = False
        self.rank[slot] = 0

    def forward(self, x):
        y = self.base_layer(x)
        slots, s = self.rows.slots, self.rows.single
        if slots is None:
            return y
        if s is not None:  # one request: its own adapter only, at its true rank
            r = self.rank[s] if s >= 0 else 0
            if r == 0:
                return y
            return y + ((x.to(self.A.dtype) @ self.A[s, :, :r]) @ self.B[s, :r]).to(y.dtype)
        use = (slots >= 0) & self.filled[slots.clamp(min=0)]  # (B,) rows with an update in this layer
        if not bool(use.any()):
            return y
        B, T, C = x.shape
        N = B * T
        h = torch.matmul(x.reshape(1, N, C).to(self.A.dtype), self.A)  # (S, N, R): every slot, one batched matmul
        d = torch.bmm(h, self.B)  # (S, N, out)
        pick = slots.clamp(min=0).repeat_interleave(T)  # (N,): each token row's slot
        delta = d[pick, torch.arange(N, device=x.device)].view(B, T, -1)  # (B, T, out)
        return torch.where(use.view(B, 1, 1), y + delta.to(y.dtype), y)


class AdapterRegistry:
    """Named adapters for one base model: a CPU cache and max_loras active slots, both LRU.

    The model's linears are wrapped in SlotLoRALinear the first time an adapter targets them.
    Methods that touch slots (acquire, release, add, remove, pin) change the model: call them
    from the thread that runs it, or under its lock.
    """

    def __init__(self, model, max_loras=4, max_cpu_loras=None, max_lora_rank=16):
        max_cpu_loras = max(max_loras, 8) if max_cpu_loras is None else max_cpu_loras
        for flag, v in (("max_loras", max_loras), ("max_cpu_loras", max_cpu_loras), ("max_lora_rank", max_lora_rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MiniloraError(f"{flag} must be a positive int, got {v!r}")
        if max_cpu_loras < max_loras:
            raise MiniloraError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({max_loras}): "
                                f"every active adapter is also in the CPU cache")
        if any(isinstance(m, LoRALinear) for m in model.modules()):
            raise MiniloraError("the served model already has LoRA layers; serve the plain base "
                                "(merge_and_unload or load it without the adapter) and register adapters by name")
        self.model, self.max_loras, self.max_cpu_loras, self.max_lora_rank = model, max_loras, max_cpu_loras, max_lora_rank
        self.shapes = {p: (m.in_features, m.out_features) for p, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.rows = RowSlots()
        # name -> adapter directory, everything servable; replaced, never mutated, so any thread may read it
        self.paths = {}
        self.pinned = set()
        self.cpu = OrderedDict()   # name -> AdapterWeights, least recently used first
        self.slot_of = {}          # name -> slot, for adapters in a slot
        self.owner = [None] * max_loras  # AdapterWeights in each slot (kept until the slot is reused)
        self.users = [0] * max_loras     # running rows (and pins) using each slot
        self.lru = OrderedDict((s, None) for s in range(max_loras))  # slots, least recently used first
        self.layers = {}           # module path -> SlotLoRALinear

    def names(self):
        return list(self.paths)

    def read(self, name, path):
        return read_adapter(path, name, self.shapes, self.max_lora_rank)

    def add(self, name, path, weights=None, pinned=False):
        """Register an adapter under `name` (read now unless `weights` come from read())."""
        if not isinstance(name, str) or not name.strip() or name == BASE:
            raise MiniloraError(f"adapter name must be a non-empty string other than {BASE!r}, got {name!r}")
        if name in self.paths:
            raise MiniloraError(f"adapter {name!r} is already loaded; unload it first to replace it")
        weights = weights or self.read(name, path)
        self.paths = {**self.paths, name: weights.path}
        self._cache(weights)
        if pinned:
            self.pin(name)

    def remove(self, name):
        """Forget an adapter and free it: its CPU copy now, its slot once no running row uses it."""
        self._known(name)
        if name in self.pinned:
            self.pinned.discard(name)
            self.release(self.slot_of[name])
        self.paths = {n: p for n, p in self.paths.items() if n != name}
        self.cpu.pop(name, None)
        s = self.slot_of.pop(name, None)
        if s is not None and self.users[s] == 0:
            self._clear(s)  # in use: release() clears it when its last row finishes

    def pin(self, name):
        """Keep `name` in the CPU cache and in a slot for good (until remove)."""
        self._known(name)
        if name in self.pinned:
            return
        if len(self.pinned) >= self.max_loras:
            raise MiniloraError(f"all max_loras={self.max_loras} slots are pinned already; raise --max-loras "
                                f"or remove a pinned adapter")
        if self.acquire(name) is None:
            raise MiniloraError(f"no free slot to pin {name!r}: all {self.max_loras} are in use; retry later")
        self.pinned.add(name)

    def acquire(self, name):
        """The slot serving `name` (-1 for the base), loading it if needed; None if every slot is busy.

        The caller must release() the slot when its row is done. Raises UnknownAdapter for a name
        that is not registered, before anything is computed.
        """
        if name == BASE:
            return -1
        self._known(name)
        s = self.slot_of.get(name)
        if s is None:
            s = next((s for s in self.lru if self.users[s] == 0), None)  # least recently used idle slot
            if s is None:
                return None
            weights = self._weights(name)
            if self.owner[s] is not None and self.slot_of.get(self.owner[s].name) == s:
                del self.slot_of[self.owner[s].name]  # evicted: back to the CPU cache (or disk) only
            self._fill(s, weights)
            self.slot_of[name] = s
        self.users[s] += 1
        self.lru.move_to_end(s)
        return s

    def release(self, slot):
        if slot < 0:
            return
        self.users[slot] -= 1
        w = self.owner[slot]
        if self.users[slot] == 0 and w is not None and self.slot_of.get(w.name) != slot:
            self._clear(slot)  # its adapter was removed (or replaced) while rows still used it

    # ---- internals -----------------------------------------------------------------------------

    def _known(self, name):
        if name not in self.paths:
            raise UnknownAdapter(f"unknown adapter {name!r}; loaded adapters: {', '.join(self.paths) or 'none'}")

    def _cache(self, weights):
        self.cpu[weights.name] = weights
        self.cpu.move_to_end(weights.name)
        for n in list(self.cpu):  # least recently used first; pinned ones stay
            if len(self.cpu) <= self.max_cpu_loras:
                break
            if n not in self.pinned:
                del self.cpu[n]

    def _weights(self, name):
        w = self.cpu.get(name)
        if w is None:  # evicted from the CPU cache: read it again
            w = self.read(name, self.paths[name])
        self._cache(w)
        return w

    def _fill(self, s, weights):
        for path in weights.layers:
            if path not in self.layers:
                self._wrap(path)
        for path, layer in self.layers.items():
            if path in weights.layers:
                A, B = weights.layers[path]
                layer.load(s, A, B, weights.scaling)
            elif layer.rank[s]:
                layer.clear(s)
        self.owner[s] = weights

    def _clear(self, s):
        for layer in self.layers.values():
            layer.clear(s)
        self.owner[s] = None
        self.lru.move_to_end(s, last=False)  # an empty slot is the first to reuse

    def _wrap(self, path):
        parent, _, leaf = path.rpartition(".")
        owner = self.model.get_submodule(parent) if parent else self.model
        with torch.inference_mode(False):  # normal tensors: remove() may zero them outside inference mode
            layer = SlotLoRALinear(getattr(owner, leaf), self.max_loras, self.max_lora_rank, self.rows)
        setattr(owner, leaf, layer)
        self.layers[path] = layer
