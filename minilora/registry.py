"""The adapters one server holds: each read and checked once, a CPU cache, and a few active slots.

This is the serving side of LoRA (the idea behind vLLM's --enable-lora, S-LoRA and Punica): the
base weights are in memory once, and every request names its own adapter.

    registry = AdapterRegistry(model, max_loras=4, max_cpu_loras=8, max_lora_rank=16)
    registry.add("sql", "out/sql")           # read and checked now (adapter_files.read_adapter)
    slot = registry.acquire("sql")           # put into one of the 4 slots (least recently used evicted)
    with adapter_rows(model, registry.row_names([slot, -1]), slots=registry.slot_names,
                      pad_rank=registry.max_lora_rank):
        logits, _ = model(idx, ...)          # row 0 uses "sql", row 1 the base model
    registry.release(slot)

Two levels, as in vLLM: the CPU cache holds up to max_cpu_loras adapters as read from disk
(least recently used first out; re-read, and checked again, on demand); the active slots are
ordinary LoRA adapters of the model named "slot0", "slot1", ..., which the one mixed-adapter
kernel (adapters.RowAdapters) reads, padded to max_lora_rank so every step has the same shapes.
An adapter in use by a running row is never evicted; pinned adapters are never evicted at all.
"""

from collections import OrderedDict

import torch

from minilora.adapter_files import attach_adapter, read_adapter
from minilora.adapters import delete_adapter
from minilora.errors import MiniloraError
from minilora.lora import BASE_ADAPTER, check_adapter_name, lora_layers


class UnknownAdapter(MiniloraError):
    """A name that is not registered (the server answers 404)."""


def _positive(flag, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise MiniloraError(f"{flag} must be a positive int, got {v!r}")


class AdapterRegistry:
    """Named adapters for one base model: a CPU cache and max_loras active slots, both LRU.

    Methods that touch slots (acquire, release, add, remove, pin) change the model: call them
    from the thread that runs it, or under its lock. read() touches nothing: any thread.
    """

    def __init__(self, model, max_loras=4, max_cpu_loras=None, max_lora_rank=16):
        max_cpu_loras = max(max_loras, 8) if max_cpu_loras is None else max_cpu_loras
        for flag, v in (("max_loras", max_loras), ("max_cpu_loras", max_cpu_loras), ("max_lora_rank", max_lora_rank)):
            _positive(flag, v)
        if max_cpu_loras < max_loras:
            raise MiniloraError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({max_loras}): "
                                f"every active adapter is also in the CPU cache")
        if any(True for _ in lora_layers(model)):
            raise MiniloraError("the served model already has LoRA layers; serve the plain base "
                                "(merge_and_unload or load it without the adapter) and register adapters by name")
        self.model, self.max_loras, self.max_cpu_loras, self.max_lora_rank = model, max_loras, max_cpu_loras, max_lora_rank
        self.slot_names = [f"slot{s}" for s in range(max_loras)]  # the model's adapter name for each slot
        # name -> adapter directory, everything servable; replaced, never mutated, so any thread may read it
        self.paths = {}
        self.checks = {}           # name -> a callable run on the path before each re-read (the server's allowed dirs)
        self.pinned = set()
        self.cpu = OrderedDict()   # name -> AdapterWeights, least recently used first
        self.slot_of = {}          # name -> slot, for adapters in a slot
        self.owner = [None] * max_loras  # the name in each slot (kept until the slot is reused)
        self.users = [0] * max_loras     # running rows (and pins) using each slot
        self.lru = OrderedDict((s, None) for s in range(max_loras))  # slots, least recently used first

    def names(self):
        return list(self.paths)

    def read(self, name, path):
        """Read and check an adapter directory for this server (the same reader as load_adapter)."""
        check_adapter_name(name)
        weights = read_adapter(self.model, path, max_rank=self.max_lora_rank)
        config = weights.config
        if config.bias != "none" or config.modules_to_save:
            raise MiniloraError(f"adapter {name!r} trains biases or modules_to_save, which every request would share; "
                                f"only bias='none' adapters without modules_to_save can be served per request")
        if config.use_dora:  # the server's batches mix adapters, and the mixed kernel has no DoRA magnitude
            raise MiniloraError(f"adapter {name!r} is a DoRA adapter, which the server's mixed-adapter batches do not "
                                f"support; merge it into the base (merge.py) and serve that")
        return weights

    def add(self, name, path, weights=None, pinned=False, check=None):
        """Register an adapter under `name` (read now unless `weights` come from read()).

        check(path), if given, runs again before every re-read of an evicted adapter (the server
        passes its allowed-directory and symlink test), so a re-read trusts no more than the first.
        """
        check_adapter_name(name)
        if name in self.paths:
            raise MiniloraError(f"adapter {name!r} is already loaded; unload it first to replace it")
        weights = weights or self.read(name, path)
        self.paths = {**self.paths, name: weights.path}
        if check is not None:
            self.checks[name] = check
        self._cache(name, weights)
        if pinned:
            self.pin(name)

    def remove(self, name):
        """Forget an adapter and free it: its CPU copy now, its slot once no running row uses it."""
        self._known(name)
        if name in self.pinned:
            self.pinned.discard(name)
            self.release(self.slot_of[name])
        self.paths = {n: p for n, p in self.paths.items() if n != name}
        self.checks.pop(name, None)
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
        that is not registered, and MiniloraError if an evicted adapter's files no longer read
        back cleanly: both before anything is computed, and only for this name.
        """
        if name == BASE_ADAPTER:
            return -1
        self._known(name)
        s = self.slot_of.get(name)
        if s is None:
            s = next((s for s in self.lru if self.users[s] == 0), None)  # least recently used idle slot
            if s is None:
                return None
            weights = self._weights(name)  # may raise (a re-read): no slot has changed yet
            if self.owner[s] is not None and self.slot_of.get(self.owner[s]) == s:
                del self.slot_of[self.owner[s]]  # evicted: back to the CPU cache (or disk) only
            self._fill(s, name, weights)
            self.slot_of[name] = s
        self.users[s] += 1
        self.lru.move_to_end(s)
        return s

    def release(self, slot):
        if slot < 0:
            return
        self.users[slot] -= 1
        owner = self.owner[slot]
        if self.users[slot] == 0 and owner is not None and self.slot_of.get(owner) != slot:
            self._clear(slot)  # its adapter was removed (or replaced) while rows still used it

    def row_names(self, slots):
        """The model adapter name of each row's slot (-1: the base), for adapters.adapter_rows."""
        return [BASE_ADAPTER if s < 0 else self.slot_names[s] for s in slots]

    # ---- internals -----------------------------------------------------------------------------

    def _known(self, name):
        if name not in self.paths:
            raise UnknownAdapter(f"unknown adapter {name!r}; loaded adapters: {', '.join(self.paths) or 'none'}")

    def _cache(self, name, weights):
        self.cpu[name] = weights
        self.cpu.move_to_end(name)
        for n in list(self.cpu):  # least recently used first; pinned ones stay
            if len(self.cpu) <= self.max_cpu_loras:
                break
            if n not in self.pinned:
                del self.cpu[n]

    def _weights(self, name):
        w = self.cpu.get(name)
        if w is None:  # evicted from the CPU cache: read (and check) it again, as the first time
            path = self.paths[name]
            if name in self.checks:
                try:
                    self.checks[name](path)
                except Exception as e:  # the server's refusal (an ApiError, 403): a failure of this name only
                    raise MiniloraError(str(e)) from None
            w = self.read(name, path)
        self._cache(name, w)
        return w

    def _fill(self, s, name, weights):
        self._clear(s)
        with torch.inference_mode(False):  # ordinary tensors, even when called from the engine's inference mode
            attach_adapter(self.model, weights, self.slot_names[s], activate=False)
        self.owner[s] = name

    def _clear(self, s):
        if self.slot_names[s] in getattr(self.model, "peft_config", {}):
            delete_adapter(self.model, self.slot_names[s])  # really frees the tensors
        self.owner[s] = None
        self.lru.move_to_end(s, last=False)  # an empty slot is the first to reuse
