import math

import pytest
import torch
import torch.nn.functional as F

from minilora import GPT, GPTConfig, MiniloraError


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("tiny", **kw))


def test_forward_shapes_and_last_position_logits():
    model = tiny()
    idx = torch.randint(0, 257, (3, 11))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 11, 257) and loss.shape == ()
    last, none = model(idx)
    assert last.shape == (3, 1, 257) and none is None
    torch.testing.assert_close(last[:, 0], logits[:, -1], rtol=0, atol=1e-6)
    assert model(idx, all_logits=True)[0].shape == (3, 11, 257)


def test_loss_at_init_is_close_to_uniform():
    model = tiny()
    idx, targets = torch.randint(0, 257, (2, 8, 32))  # independent: tied weights favour target == input
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(257)) < 0.3


def test_targets_minus_100_are_ignored():
    model = tiny()
    idx = torch.randint(0, 257, (2, 8))
    targets = idx.clone()
    targets[:, :5] = -100
    _, loss = model(idx, targets)
    logits, _ = model(idx, all_logits=True)
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 257), idx[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_causality():
    model = tiny().eval()
    idx = torch.randint(0, 257, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 257
    a, _ = model(idx, all_logits=True)
    b, _ = model(changed, all_logits=True)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_head_is_tied_to_token_embedding():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_separate_attention_projections_exist():
    names = {n.rsplit(".", 1)[-1] for n, m in tiny().named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out", "lm_head"}


def test_gpt2_parameter_count_is_published_figure():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("gpt2"))
    assert model.num_parameters() == 124_439_808


def test_residual_projections_use_scaled_init():
    model = GPT(GPTConfig.from_name("tiny", n_layer=8, n_embd=64))
    std = model.transformer.h[0].attn.out_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.002
    assert abs(model.transformer.h[0].attn.q_proj.weight.std().item() - 0.02) < 0.003


def test_gpt3_shape_builds_on_meta_device_without_real_work():
    """Building GPT-3 175B's shape on the meta device allocates and computes nothing real, and does
    per-module work only: the ops it dispatches are exactly those of a 32-wide model of the same
    depth, whatever its 175e9 parameters. (How fast that is belongs to bench.py, not to a test.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        """Every aten op dispatched, and any tensor it produced that is not on the meta device."""

        def __init__(self):
            super().__init__()
            self.ops, self.real = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops.append(str(func))
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.real += [(str(func), tuple(t.shape)) for t in outs if isinstance(t, torch.Tensor) and not t.is_meta]
            return out

    def build(config):
        with torch.device("meta"), Ops() as ops:
            model = GPT(config)
        return model, ops

    big = GPTConfig.from_name("gpt3-175b")
    model, ops = build(big)
    assert model.num_parameters() > 174e9
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert ops.real == []  # not one tensor materialised on a real device
    _, narrow = build(GPTConfig.from_name("tiny", n_layer=big.n_layer))
    assert sorted(ops.ops) == sorted(narrow.ops)  # the same work as a 32-wide model of the same depth
    assert len(ops.ops) < 40 * big.n_layer  # a few ops per module: creating and shape-only init, no more


def test_sequence_longer_than_context_is_refused():
    model = tiny()
    with pytest.raises(MiniloraError, match="block_size=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_presets_and_bad_configs():
    cfg = GPTConfig.from_name("gpt2-xl")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (48, 25, 1600, 1024, 50257)
    assert GPTConfig.from_name("gpt3-175b").n_embd == 12288
    with pytest.raises(MiniloraError, match="known presets"):
        GPTConfig.from_name("gpt5")
    with pytest.raises(MiniloraError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)


def test_kv_cache_prefill_then_decode_matches_full_forward():
    model = tiny().eval()
    idx = torch.randint(0, 257, (2, 12))
    full, _ = model(idx, all_logits=True)
    model.setup_kv_cache(2, 12)
    steps = [model(idx[:, :5], cache_pos=0, all_logits=True)[0]]
    steps += [model(idx[:, t:t + 1], cache_pos=t)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


def test_kv_cache_per_row_positions_and_rows():
    """Rows at different lengths in one cache (continuous batching) match separate runs."""
    model = tiny().eval()
    a, b = torch.randint(0, 257, (1, 7)), torch.randint(0, 257, (1, 4))
    ref_a, _ = model(a)
    ref_b, _ = model(b)
    model.setup_kv_cache(3, 16)
    model(a[:, :6], cache_pos=0, cache_rows=torch.tensor([2]),
          attn_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool).tril())
    model(b[:, :3], cache_pos=0, cache_rows=torch.tensor([0]),
          attn_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool).tril())
    # one decode step for both rows: row 2 writes slot 6, row 0 writes slot 3
    mask = torch.zeros(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., :7] = True
    mask[1, ..., :4] = True
    out, _ = model(torch.cat([a[:, 6:], b[:, 3:]]), cache_pos=torch.tensor([6, 3]),
                   cache_rows=torch.tensor([2, 0]), attn_mask=mask)
    torch.testing.assert_close(out[0], ref_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], ref_b[0], rtol=0, atol=1e-5)


def test_kv_cache_errors():
    model = tiny()
    with pytest.raises(MiniloraError, match="setup_kv_cache"):
        model(torch.zeros(1, 1, dtype=torch.long), cache_pos=0)
    with pytest.raises(MiniloraError, match="block_size"):
        model.setup_kv_cache(1, 65)


@pytest.mark.parametrize("lora", [False, True])
def test_loss_only_matches_full_logits_loss_and_gradients(lora):
    """The chunked head + cross-entropy (never holding (B, T, V) logits) is the same loss and gradients."""
    from minilora import LoraConfig, apply_lora
    model = tiny()
    if lora:
        apply_lora(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    idx = torch.randint(0, 257, (3, 40))
    targets = torch.randint(0, 257, (3, 40))
    targets[0, :7] = -100
    grads = []
    for loss_only in (False, True):
        model.zero_grad(set_to_none=True)
        logits, loss = model(idx, targets, loss_only=loss_only)
        assert (logits is None) == loss_only
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (ref_loss, ref), (got_loss, got) = grads
    torch.testing.assert_close(got_loss, ref_loss, rtol=0, atol=1e-6)
    assert ref.keys() == got.keys() and ("transformer.wte.weight" in ref) == (not lora)  # the tied head
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("train_head", [False, True])
def test_linear_cross_entropy_in_chunks_matches_cross_entropy(dtype, train_head):
    """Several chunks (the last one partial), ignored rows, fp32 and bf16 autocast: loss, dx and dweight."""
    from minilora.ops import LinearCrossEntropy
    torch.manual_seed(0)
    x = torch.randn(50, 24, requires_grad=True)
    w = (torch.randn(100, 24) * 0.3).requires_grad_(train_head)  # 100 rows: padded to 128 inside
    targets = torch.randint(0, 100, (50,))
    targets[[0, 17, 18, 49]] = -100
    results = []
    for chunked in (False, True):
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            if chunked:
                loss = LinearCrossEntropy.apply(x, w, targets, 16)
            else:
                loss = F.cross_entropy(F.linear(x, w).float(), targets, ignore_index=-100)
        loss.backward()
        results.append((loss.detach(), x.grad, w.grad))
    (ref_loss, ref_dx, ref_dw), (loss, dx, dw) = results
    tol = dict(rtol=0, atol=1e-6) if dtype == "fp32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss, ref_loss, **tol)
    torch.testing.assert_close(dx, ref_dx, **tol)
    assert (dw is None) == (not train_head)
    if train_head:
        torch.testing.assert_close(dw, ref_dw, **tol)
    assert dx[[0, 17, 18, 49]].abs().max() == 0  # ignored rows get no gradient


def test_linear_without_autograd_matches_f_linear():
    """Linear's no-grad path (oneDNN for fp32 on the CPU) computes what F.linear computes."""
    from minilora.ops import Linear
    torch.manual_seed(0)
    for bias in (True, False):
        layer = Linear(48, 40, bias=bias)
        x = torch.randn(3, 5, 48)
        with torch.no_grad():
            got = layer(x)
            got_t = layer(x.transpose(0, 1))  # a non-contiguous input
        torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_t, F.linear(x.transpose(0, 1), layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
        out = layer(x)
        assert out.requires_grad  # with autograd on: recorded for backward
