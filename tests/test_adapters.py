"""Several adapters on one model, and the one mixed-adapter kernel (adapters.adapter_rows) that
generate(adapter_names=...) and the serving engine share."""

import copy

import pytest
import torch

from minilora import (GPT, GPTConfig, LoraConfig, MiniloraError, adapter_rows, apply_lora, generate, merge,
                      merge_and_unload, set_adapter, unmerge)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("tiny")).eval()


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
    layer = multi.transformer.h[0].attn.q_proj  # a and b target it, c does not
    x = torch.randn(5, 4, layer.in_features)
    names = ["b", "__base__", "a", "c", "b"]
    with torch.no_grad():
        with adapter_rows(multi, names):
            y = layer(x)
        for i, n in enumerate(names):
            if n in ("__base__", "c"):
                assert torch.equal(y[i], layer.base_layer(x)[i])  # nothing added: bit-identical
            else:
                set_adapter(multi, n)
                torch.testing.assert_close(y[i], layer(x[i:i + 1])[0], atol=1e-5, rtol=1e-5)
    set_adapter(multi, "a")


def test_base_rows_go_on_after_every_adapter_row_has_finished(base, multi):
    """generate.py --prompt_adapter sql dates __base__: once the adapters' rows stop (their end-of-text), the
    batch holds base rows only, and those go on as the plain base model would (this used to crash)."""
    first = generate(multi, [[1, 2, 3]], 1, temperature=0, adapter_names=["a"]).tokens[0][0]
    plain = generate(base, [[9, 8, 7]], 6, temperature=0, eot_token=first)
    assert first not in plain.tokens[0]  # so the base row runs all 6 steps, 5 of them alone
    out = generate(multi, [[1, 2, 3], [9, 8, 7]], 6, temperature=0, adapter_names=["a", "__base__"], eot_token=first)
    assert out.tokens == [[], plain.tokens[0]] and out.finish_reasons == ["stop", "length"]
    alone = generate(multi, [[1, 2, 3], [9, 8, 7]], 3, temperature=0, adapter_names=["__base__", "__base__"])
    assert alone.tokens == generate(base, [[1, 2, 3], [9, 8, 7]], 3, temperature=0).tokens


def test_generate_adapter_names_isolates_rows(base, multi):
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


def test_padded_fixed_slots_match_each_adapters_own_rank(multi):
    """The engine's form: every slot padded to one rank, an empty slot among them; same results."""
    layer = multi.transformer.h[0].attn.v_proj  # a and c target it, b does not
    x = torch.randn(4, 3, layer.in_features)
    names = ["c", "a", "__base__", "b"]
    with torch.no_grad():
        with adapter_rows(multi, names):
            own = layer(x)
        with adapter_rows(multi, names, slots=["a", None, "b", "c"], pad_rank=16):
            padded = layer(x)
    torch.testing.assert_close(padded, own, atol=1e-6, rtol=1e-6)
    assert torch.equal(padded[2], layer.base_layer(x)[2]) and torch.equal(padded[3], layer.base_layer(x)[3])


def test_a_row_does_not_depend_on_its_neighbours_or_its_slot(multi):
    """Bit for bit: the server's "same answer alone or batched" rests on this."""
    layer = multi.transformer.h[0].attn.q_proj
    x = torch.randn(6, 1, layer.in_features)
    with torch.no_grad():
        with adapter_rows(multi, ["a", "b", "b", "__base__", "a", "b"], slots=["a", "b", None, None], pad_rank=8):
            y1 = layer(x)
        x2 = torch.randn(6, 1, layer.in_features)
        x2[4] = x[0]
        # row 0's input is now row 4, among other neighbours, and adapter a sits in the last slot
        with adapter_rows(multi, ["b", "__base__", "b", "b", "a", "__base__"], slots=[None, "b", None, "a"], pad_rank=8):
            y2 = layer(x2)
    assert torch.equal(y1[0], y2[4])


def test_mixed_batch_after_training_steps_uses_the_new_weights(base):
    """The kernel caches the stacked weights; an optimizer step must invalidate that cache."""
    m = copy.deepcopy(base)
    apply_lora(m, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    apply_lora(m, LoraConfig(r=2, target_modules=["q_proj"]), "b")
    idx = torch.randint(0, 257, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), adapter_rows(m, ["a", "b"]):
        before, _ = m(idx, all_logits=True)
    with torch.no_grad():
        m.transformer.h[0].attn.q_proj.lora_B["a"].weight.add_(0.5)  # in place, as AdamW does
    with torch.no_grad(), adapter_rows(m, ["a", "b"]):
        after, _ = m(idx, all_logits=True)
    assert not torch.allclose(before[0], after[0]) and torch.equal(before[1], after[1])
