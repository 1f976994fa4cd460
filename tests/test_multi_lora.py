"""Many adapters on one base: the slot kernel, per-row isolation, and the adapter registry (LRU, pinning, unload)."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn

from minilora import GPT, GPTConfig, MiniloraError
from minilora.lora import LoraConfig, apply_lora, merge_and_unload, save_adapter
from minilora.multi_lora import AdapterRegistry, RowSlots, SlotLoRALinear, UnknownAdapter


def make_adapter(base, path, r, seed, targets=("q_proj", "v_proj", "fc_in")):
    """Save a random (non-zero B) adapter for `base` to `path`; return the base + adapter model."""
    m = copy.deepcopy(base)
    apply_lora(m, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(m, path)
    return m


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


# ---- the kernel ----------------------------------------------------------------------------------

def slot_layer(ranks, n_slots=4, max_rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(16, 24)
    layer = SlotLoRALinear(base, n_slots, max_rank, RowSlots())
    ref = {}
    for s, r in enumerate(ranks):
        A, B, scaling = torch.randn(r, 16, generator=g), torch.randn(24, r, generator=g), 0.5 + s
        layer.load(s, A, B, scaling)
        ref[s] = (A, B, scaling)
    return layer, ref


def test_slot_kernel_matches_per_row_loop_with_mixed_ranks():
    layer, ref = slot_layer([2, 5, 8])
    x = torch.randn(6, 3, 16)
    slots = [0, -1, 2, 1, 0, -1]
    with torch.no_grad(), layer.rows.use(slots):
        y = layer(x)
    base = layer.base_layer(x)
    for b, s in enumerate(slots):
        if s < 0:
            assert torch.equal(y[b], base[b])  # the base rows: bit-identical, not just close
        else:
            A, B, scaling = ref[s]
            expect = layer.base_layer(x[b]) + scaling * (x[b] @ A.t()) @ B.t()
            torch.testing.assert_close(y[b], expect, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), layer.rows.use([1]):  # one request: the single-adapter path
        A, B, scaling = ref[1]
        torch.testing.assert_close(layer(x[:1]), layer.base_layer(x[:1]) + scaling * (x[:1] @ A.t()) @ B.t(),
                                   atol=1e-5, rtol=1e-5)


def test_slot_kernel_row_does_not_depend_on_neighbours_or_slot():
    layer, ref = slot_layer([3, 8, 3])
    layer.load(3, *ref[0])  # the same adapter again, in slot 3
    x = torch.randn(8, 1, 16)
    with torch.no_grad():
        with layer.rows.use([0, 1, 1, -1, 2, 1, 0, -1]):
            y1 = layer(x)
        x2 = torch.randn(8, 1, 16)
        x2[5] = x[0]
        with layer.rows.use([-1, 2, -1, 1, 2, 3, -1, 1]):  # row 0's input, now row 5, its adapter now in slot 3
            y2 = layer(x2)
    assert torch.equal(y1[0], y2[5])


def test_base_rows_bit_identical_and_adapter_rows_match_merged_model(base, adapters):
    reg = registry(base, adapters, max_loras=4)
    names = ["a", "__base__", "b", "c", "__base__", "d"]
    slots = [reg.acquire(n) for n in names]
    idx = torch.randint(0, 257, (len(names), 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with reg.rows.use(slots):
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
    with pytest.raises(MiniloraError, match="does not fit this base model"):
        AdapterRegistry(other).add("a", adapters["a"][0])
    with pytest.raises(MiniloraError, match="does not exist"):
        AdapterRegistry(other).add("x", tmp_path / "missing")


def test_unload_frees_the_adapter(base, adapters):
    reg = registry(base, adapters, max_loras=2)
    s = reg.acquire("b")
    A = reg.cpu["b"].layers["transformer.h.0.attn.q_proj"][0]
    ref = weakref.ref(A)
    del A
    reg.remove("b")  # in use: still computing for its running row
    assert reg.layers["transformer.h.0.attn.q_proj"].A[s].abs().sum() > 0
    reg.release(s)  # its last row finished: now the slot is cleared too
    gc.collect()
    assert ref() is None
    assert all(not layer.A[s].any() and not layer.B[s].any() for layer in reg.layers.values())
    assert "b" not in reg.names() and "b" not in reg.cpu and all(w is None or w.name != "b" for w in reg.owner)
    with pytest.raises(UnknownAdapter):
        reg.acquire("b")


def test_reloading_a_name_serves_the_new_weights(base, adapters, tmp_path):
    reg = registry(base, adapters, max_loras=2)
    idx = torch.tensor([[5, 6, 7, 8]])

    def run(name):
        s = reg.acquire(name)
        with torch.no_grad(), reg.rows.use([s, -1]):
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


# ---- the library path: LoRALinear's per-row update and generate(adapter_names=...) ------------------

@pytest.fixture(scope="module")
def multi(base):
    """The base with adapters a (r=2), b (r=5) and c (r=8) in the same LoRALinear modules, all random."""
    m = copy.deepcopy(base)
    for name, r, targets in (("a", 2, ["q_proj", "v_proj"]), ("b", 5, ["q_proj", "fc_in"]), ("c", 8, ["v_proj"])):
        apply_lora(m, LoraConfig(r=r, lora_alpha=r + 1, target_modules=targets), name)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def test_row_adapters_match_a_per_row_loop_with_mixed_ranks(multi):
    from minilora.lora import row_adapters, set_adapter
    layer = multi.transformer.h[0].attn.q_proj  # a and b target it, c does not
    x = torch.randn(5, 4, layer.in_features)
    names = ["b", "__base__", "a", "c", "b"]
    with torch.no_grad():
        with row_adapters(multi, names):
            y = layer(x)
        for i, n in enumerate(names):
            if n in ("__base__", "c"):
                assert torch.equal(y[i], layer.base_layer(x)[i])  # nothing added: bit-identical
            else:
                set_adapter(multi, n)
                torch.testing.assert_close(y[i], layer(x[i:i + 1])[0], atol=1e-5, rtol=1e-5)
    set_adapter(multi, "a")


def test_generate_adapter_names_isolates_rows(base, multi):
    from minilora.generation import generate
    from minilora.lora import set_adapter
    prompts = [[1, 2, 3, 4, 5], [9, 8], [7, 7, 7, 7], [3, 1, 4], [100, 101, 102]]
    names = ["a", "__base__", "c", "b", "__base__"]
    out = generate(multi, prompts, 6, temperature=0, adapter_names=names, return_logits=True)
    plain = generate(base, prompts, 6, temperature=0, return_logits=True)
    for i, n in enumerate(names):
        if n == "__base__":  # the same batch through the plain base model: identical bits
            assert torch.equal(out.logits[i], plain.logits[i]) and out.tokens[i] == plain.tokens[i]
        else:
            one = copy.deepcopy(multi)
            set_adapter(one, n)
            merged = merge_and_unload(one)
            alone = generate(merged, [prompts[i]], 6, temperature=0, return_logits=True)
            torch.testing.assert_close(out.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)
            assert out.tokens[i] == alone.tokens[0]
    assert len({tuple(t) for t in out.tokens}) > 2  # the adapters do change the answers


def test_generate_adapter_names_is_checked_before_compute(multi):
    from minilora.generation import generate
    from minilora.lora import merge, unmerge
    with pytest.raises(MiniloraError, match=r"unknown adapter\(s\) \['zzz'\]"):
        generate(multi, [[1], [2]], 2, adapter_names=["a", "zzz"])
    with pytest.raises(MiniloraError, match="2 names for 3 rows"):
        generate(multi, [[1], [2], [3]], 2, adapter_names=["a", "b"])
    merge(multi, adapter_names=["a"])
    try:
        with pytest.raises(MiniloraError, match="merged"):
            generate(multi, [[1]], 2, adapter_names=["a"])
    finally:
        unmerge(multi)
    with pytest.raises(MiniloraError, match="__base__"):
        apply_lora(copy.deepcopy(multi), LoraConfig(), "__base__")
