"""The adapter registry: LRU slots and CPU cache, pinning, unload, and rows served through adapter_rows."""

import copy
import gc
import weakref

import pytest
import torch

from minilora import GPT, GPTConfig, MiniloraError
from minilora import merge_and_unload
from minilora import adapter_rows
from minilora.registry import AdapterRegistry, UnknownAdapter

from scripts import random_adapter


def make_adapter(base, path, r, seed, targets=("q_proj", "v_proj", "fc_in")):
    """Save a random (non-zero B) adapter for `base` to `path`; return the base + adapter model."""
    return random_adapter(base, path, r, seed, targets)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("tiny")).eval()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """name -> (dir, merged model): ranks 2, 4, 8 on different targets."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (name, r, targets) in enumerate([("a", 2, ("q_proj", "v_proj")), ("b", 4, ("q_proj", "v_proj", "fc_in")),
                                            ("c", 8, ("k_proj", "out_proj", "fc_out")), ("d", 4, ("v_proj",))]):
        m = make_adapter(base, root / name, r, seed=i, targets=targets)
        out[name] = (root / name, merge_and_unload(m).eval())
    return out


def registry(base, adapters, **kw):
    model = copy.deepcopy(base)
    reg = AdapterRegistry(model, **kw)
    for name, (path, _) in adapters.items():
        reg.add(name, path)
    return reg


def rows(reg, slots):
    """adapter_rows the way the serving engine calls it: fixed slots, padded to the max rank."""
    return adapter_rows(reg.model, reg.row_names(slots), slots=reg.slot_names, pad_rank=reg.max_lora_rank)


def test_base_rows_bit_identical_and_adapter_rows_match_merged_model(base, adapters):
    reg = registry(base, adapters, max_loras=4)
    names = ["a", "__base__", "b", "c", "__base__", "d"]
    slots = [reg.acquire(n) for n in names]
    idx = torch.randint(0, 257, (len(names), 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with rows(reg, slots):
            mixed, _ = reg.model(idx, all_logits=True)
        plain, _ = base(idx, all_logits=True)
        for i, n in enumerate(names):
            if n == "__base__":
                assert torch.equal(mixed[i], plain[i])
            else:
                alone, _ = adapters[n][1](idx[i:i + 1], all_logits=True)
                torch.testing.assert_close(mixed[i], alone[0], atol=1e-5, rtol=1e-5)
                assert not torch.allclose(mixed[i], plain[i], atol=1e-3)  # the adapter does change the output


# ---- the registry --------------------------------------------------------------------------------

def test_unknown_adapter_raises_before_compute(base, adapters):
    reg = registry(base, adapters)
    with pytest.raises(UnknownAdapter, match="unknown adapter 'nope'.*a, b, c, d"):
        reg.acquire("nope")
    assert all(u == 0 for u in reg.users)


def test_lru_eviction_order_of_slots_and_cpu_cache(base, adapters):
    reg = registry(base, adapters, max_loras=2, max_cpu_loras=3)
    assert list(reg.cpu) == ["b", "c", "d"]  # "a" was the least recently used when "d" arrived
    for n in ("a", "b"):
        reg.release(reg.acquire(n))
    assert set(reg.slot_of) == {"a", "b"} and list(reg.cpu) == ["d", "a", "b"]  # "a" re-read from disk
    reg.release(reg.acquire("a"))  # touch "a": now "b" is the least recently used slot
    s = reg.acquire("c")
    assert set(reg.slot_of) == {"a", "c"} and reg.slot_of["c"] == s
    reg.release(s)


def test_more_adapters_than_slots_waits_for_a_release(base, adapters):
    reg = registry(base, adapters, max_loras=2)
    sa, sb = reg.acquire("a"), reg.acquire("b")
    assert reg.acquire("c") is None  # both slots serve running rows: nothing may be evicted
    assert reg.acquire("a") == sa  # an adapter already in a slot is shared
    reg.release(sb)
    sc = reg.acquire("c")
    assert sc == sb and set(reg.slot_of) == {"a", "c"}
    for s in (sa, sa, sc):
        reg.release(s)


def test_pinned_adapters_are_never_evicted(base, adapters):
    reg = registry(base, adapters, max_loras=2, max_cpu_loras=2)
    reg.pin("a")
    for n in ("b", "c", "d", "b"):
        reg.release(reg.acquire(n))
        assert "a" in reg.slot_of and "a" in reg.cpu
    with pytest.raises(MiniloraError, match="max_loras=2"):
        reg.pin("b") or reg.pin("c")


def test_rank_above_max_is_refused_naming_both_numbers(base, adapters):
    reg = AdapterRegistry(copy.deepcopy(base), max_lora_rank=4)
    with pytest.raises(MiniloraError, match=r"rank 8, above the server's max_lora_rank 4.*--max-lora-rank 8"):
        reg.add("c", adapters["c"][0])
    assert reg.names() == []


def test_adapter_for_another_base_is_refused(adapters, tmp_path):
    other = GPT(GPTConfig.from_name("tiny", n_embd=64))
    with pytest.raises(MiniloraError, match="made for a base model of another shape"):
        AdapterRegistry(other).add("a", adapters["a"][0])
    with pytest.raises(MiniloraError, match="does not exist"):
        AdapterRegistry(other).add("x", tmp_path / "missing")


def test_unload_frees_the_adapter(base, adapters):
    reg = registry(base, adapters, max_loras=2)
    s = reg.acquire("b")
    layer = reg.model.transformer.h[0].attn.q_proj
    live, cached = weakref.ref(layer.lora_A[reg.slot_names[s]].weight), weakref.ref(reg.cpu["b"].tensors[
        "base_model.model.transformer.h.0.attn.q_proj.lora_A.weight"])
    reg.remove("b")  # in use: still computing for its running row
    assert reg.slot_names[s] in reg.model.peft_config and live() is not None
    reg.release(s)  # its last row finished: now the slot is cleared too
    gc.collect()
    assert live() is None and cached() is None
    assert reg.slot_names[s] not in getattr(reg.model, "peft_config", {})
    assert "b" not in reg.names() and "b" not in reg.cpu and "b" not in reg.owner
    with pytest.raises(UnknownAdapter):
        reg.acquire("b")


def test_reloading_a_name_serves_the_new_weights(base, adapters, tmp_path):
    reg = registry(base, adapters, max_loras=2)
    idx = torch.tensor([[5, 6, 7, 8]])

    def run(name):
        s = reg.acquire(name)
        with torch.no_grad(), rows(reg, [s, -1]):
            logits, _ = reg.model(idx.repeat(2, 1))
        reg.release(s)
        return logits[0]

    old = run("a")
    reg.remove("a")
    merged_new = merge_and_unload(make_adapter(base, tmp_path / "a2", 2, seed=99, targets=("q_proj", "v_proj")))
    reg.add("a", tmp_path / "a2")
    new = run("a")
    with torch.no_grad():
        expect, _ = merged_new(idx)
    torch.testing.assert_close(new, expect[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(new, old, atol=1e-3)
