"""A 4-bit / 8-bit frozen base (minilora.quantize), LoRA on top of it (QLoRA), and gradient checkpointing."""

import copy
import os

import pytest
import torch

from minilora import (GPT, GPTConfig, LoraConfig, MiniloraError, QuantizedLinear, adapter_rows, apply_lora,
                      generate, merge, merge_and_unload, set_adapter)
from minilora.memory import _build, _saved_activation_bytes, activation_bytes, memory_plan
from minilora.quantize import (DQ_BLOCK, NF4, double_dequantize, double_quantize, nf4_levels, nf4_quantize,
                               quantize, quantized_layers, quantized_nbytes)
from scripts import run_script_here

import minilora.quantize as qmod  # the module (its quantize() is not re-exported: `minilora.quantize` stays the module)

# The QLoRA paper's NF4 values (appendix E), as bitsandbytes' kernels hold them.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def linear_layer(out_f, in_f, seed=0, bias=True):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
        layer.weight[0, :5] = torch.tensor([0.3, -0.2, 0.0, 1e-9, -0.25])  # outliers and an exact zero in block 0
    return layer


def reference_nf4(w, block_size, absmax=None):
    """Blockwise absmax + nearest NF4 level, written out the slow way. -> (values, ambiguous mask)."""
    flat = w.detach().reshape(-1).double()
    n = flat.numel()
    blocks = torch.cat([flat, flat.new_zeros(-n % block_size)]).view(-1, block_size)
    true_absmax = blocks.abs().amax(1, keepdim=True)
    dist = (blocks / true_absmax.clamp(min=1e-30))[..., None].sub(torch.tensor(PAPER_NF4).double()).abs()  # (nb, bs, 16)
    code = dist.argmin(-1)
    two = dist.sort(-1).values
    ambiguous = (two[..., 1] - two[..., 0]) < 1e-6  # within float rounding of a decision boundary
    scale = true_absmax if absmax is None else absmax.double()[:, None]
    values = torch.tensor(PAPER_NF4).double()[code] * scale
    return values.view(-1)[:n].view(w.shape), ambiguous.view(-1)[:n].view(w.shape)


def test_nf4_table_is_the_papers():
    assert NF4.tolist() == [torch.tensor(v).item() for v in PAPER_NF4]  # the same float32 bits
    torch.testing.assert_close(nf4_levels().float(), NF4, atol=1e-7, rtol=0)  # and how they were derived
    assert NF4[7] == 0 and (NF4.diff() > 0).all() and len(NF4) == 16


@pytest.mark.parametrize("shape", [(48, 40), (33, 7)])  # whole blocks, and a padded last block
def test_nf4_dequantize_equals_blockwise_absmax_nearest_level(shape):
    layer = linear_layer(*shape)
    q = QuantizedLinear.from_linear(layer, "nf4", double_quant=False, block_size=64)
    ref, ambiguous = reference_nf4(layer.weight, 64)
    got = q.dequantize()
    assert got.dtype == torch.float32 and got.shape == shape
    assert ambiguous.sum() <= 2
    torch.testing.assert_close(got[~ambiguous].double(), ref[~ambiguous], atol=1e-7, rtol=1e-6)
    assert got[0, 2] == 0  # zero is a level: an exact zero stays exact
    # two codes per byte, the first in the high nibble; one fp32 absmax per block of 64
    codes, _ = nf4_quantize(layer.weight, 64)
    first = int((NF4 - layer.weight[0, 0] / layer.weight.abs().flatten()[:64].max()).abs().argmin())
    assert int(codes[0]) >> 4 == first == 15
    assert q.weight_nf4.dtype == torch.uint8 and q.weight_nf4.numel() == -(-shape[0] * shape[1] // 64) * 32
    assert q.absmax.numel() == -(-shape[0] * shape[1] // 64)


def test_double_quantized_absmax_is_within_its_bound_and_storage_is_4_127_bits():
    layer = linear_layer(256, 160, bias=False)  # 640 blocks: 3 double-quant blocks, the last one partial
    plain = QuantizedLinear.from_linear(layer, "nf4", double_quant=False)
    dq = QuantizedLinear.from_linear(layer, "nf4", double_quant=True)
    absmax = plain.absmax
    q, scale, offset = double_quantize(absmax)
    assert q.dtype == torch.int8 and scale.numel() == -(-absmax.numel() // DQ_BLOCK)
    err = (double_dequantize(q, scale, offset) - absmax).abs()
    bound = scale.repeat_interleave(DQ_BLOCK)[:absmax.numel()] / 2  # half a step: max|absmax - mean| / 254
    assert (err <= bound * (1 + 1e-5) + 1e-9).all() and err.max() > 0
    # the weights come back as the levels times the double-quantized absmax
    ref, ambiguous = reference_nf4(layer.weight, 64, double_dequantize(q, scale, offset))
    torch.testing.assert_close(dq.dequantize()[~ambiguous].double(), ref[~ambiguous], atol=1e-7, rtol=1e-6)
    bits = 8 * dq.nbytes() / layer.weight.numel()
    assert dq.nbytes() == quantized_nbytes(256, 160, "nf4", True) and 4.127 < bits < 4.13
    assert 8 * plain.nbytes() / layer.weight.numel() == 4.5


def test_int8_is_per_output_channel_absmax():
    layer = linear_layer(24, 40)
    q = QuantizedLinear.from_linear(layer, "int8")
    w = layer.weight.detach()
    scale = w.abs().amax(1, keepdim=True) / 127
    torch.testing.assert_close(q.dequantize(), torch.round(w / scale) * scale, atol=1e-7, rtol=1e-6)
    assert q.weight_int8.dtype == torch.int8 and q.nbytes() == quantized_nbytes(24, 40, "int8") == 24 * 40 + 4 * 24


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_forward_backward_equal_the_dequantized_linear_in_chunks(method, monkeypatch):
    layer = linear_layer(40, 48)
    q = QuantizedLinear.from_linear(layer, method)
    w = q.dequantize()
    x = torch.randn(3, 5, 48, requires_grad=True)
    y = q(x)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, w, layer.bias)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(qmod, "MAX_CHUNK", 64 * 3)  # row chunks of whole blocks: same numbers
    x.grad = None
    y2 = q(x)
    y2.square().sum().backward()
    torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", torch.bfloat16):  # computes in the activation (autocast) dtype
        assert q(x).dtype == torch.bfloat16


def test_bf16_forward_is_nn_linear_on_the_dequantized_weight_and_a_trained_bias_gets_its_gradient(monkeypatch):
    # nn.Linear under autocast adds the bias inside the product and rounds to bf16 once; adding it after
    # the bf16 product rounds twice (a QLoRA run then trained on different numbers than the same
    # weights in float): the quantized layer must give nn.Linear's bits.
    layer = linear_layer(40, 48)
    q = QuantizedLinear.from_linear(layer, "nf4")
    ref = torch.nn.Linear(48, 40)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize())
        ref.bias.copy_(layer.bias)
    x = torch.randn(3, 5, 48) * 3
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(q(x), ref(x))
    q.bias.requires_grad_(True)  # LoRA's bias="all" trains the bias of a quantized layer
    for chunk in (qmod.MAX_CHUNK, 64 * 3):
        monkeypatch.setattr(qmod, "MAX_CHUNK", chunk)
        q.bias.grad, ref.bias.grad = None, None
        q(x).square().sum().backward()
        ref(x).square().sum().backward()
        torch.testing.assert_close(q.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-5)


def test_state_dict_holds_the_packed_storage_and_loads_back():
    torch.manual_seed(0)
    m = quantize(GPT(GPTConfig.from_name("tiny")), "nf4")
    sd = m.state_dict()
    assert sd["transformer.h.0.attn.q_proj.weight_nf4"].dtype == torch.uint8
    assert sd["transformer.h.0.attn.q_proj.absmax_q"].dtype == torch.int8
    assert not any(k.endswith("q_proj.weight") for k in sd) and "lm_head.weight" in sd  # the head stays float
    fresh = quantize(GPT(GPTConfig.from_name("tiny")), "nf4")
    fresh.load_state_dict(sd, strict=True)
    x = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], m(x)[0])
        m.to(torch.bfloat16)  # the scales stay fp32; only the compute dtype follows
        layer = m.transformer.h[0].attn.q_proj
        assert layer.absmax_scale.dtype == torch.float32 and layer.dtype == torch.bfloat16
        torch.testing.assert_close(m(x)[0].float(), fresh(x)[0], atol=0.05, rtol=0.05)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_qlora_trains_and_merges_into_a_float_model(preset):
    torch.manual_seed(0)
    m = quantize(GPT(GPTConfig.from_name(preset)), "nf4")
    apply_lora(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert isinstance(m.transformer.h[0].attn.q_proj.base_layer, QuantizedLinear)
    assert all("lora_" in n for n, p in m.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randint(0, 257, (4, 16)), torch.randint(0, 257, (4, 16))
    losses = []
    for _ in range(8):
        _, loss = m(x, y, loss_only=True)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    m.eval()
    with pytest.raises(MiniloraError, match="cannot merge into .* nf4 base.*merge_and_unload"):
        merge(m)
    with torch.no_grad():
        unmerged = m(x, all_logits=True)[0]
        plain = merge_and_unload(m)
        torch.testing.assert_close(plain(x, all_logits=True)[0], unmerged, atol=2e-5, rtol=1e-5)
    assert not any(isinstance(mod, QuantizedLinear) for mod in plain.modules())
    GPT(GPTConfig.from_name(preset)).load_state_dict(plain.state_dict(), strict=True)  # a normal checkpoint


def test_qlora_generation_cache_and_mixed_adapter_rows():
    torch.manual_seed(0)
    m = quantize(GPT(GPTConfig.from_name("tiny-llama")), "nf4")
    for name, seed in (("a", 1), ("b", 2)):
        apply_lora(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if f"lora_B.{name}" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    m.eval()
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6]]
    cached = generate(m, prompts, 6, temperature=0, adapter_names=["a", "b"])
    fresh = generate(m, prompts, 6, temperature=0, adapter_names=["a", "b"], use_cache=False)
    assert cached.tokens == fresh.tokens
    x = torch.tensor(prompts)
    with torch.no_grad(), adapter_rows(m, ["b", "a"]):
        mixed = m(x, all_logits=True)[0]
    for i, name in enumerate(["b", "a"]):
        set_adapter(m, name)
        with torch.no_grad():
            torch.testing.assert_close(mixed[i], m(x[i:i + 1], all_logits=True)[0][0], atol=1e-5, rtol=1e-5)


def test_quantize_refusals_and_after_apply_lora():
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_name("tiny"))
    with pytest.raises(MiniloraError, match="method must be one of nf4, int8"):
        quantize(copy.deepcopy(base), "fp4")
    m = apply_lora(copy.deepcopy(base), LoraConfig(r=2))
    quantize(m, "int8")  # after apply_lora: the base layers are quantized, A and B are not
    layer = m.transformer.h[0].attn.q_proj
    assert isinstance(layer.base_layer, QuantizedLinear) and isinstance(layer.lora_A["default"], torch.nn.Linear)
    with pytest.raises(MiniloraError, match="no nn.Linear to quantize"):
        quantize(m)


@pytest.mark.parametrize("preset,lora,dtype", [("tiny", True, torch.float32), ("tiny", False, torch.bfloat16),
                                               ("tiny-llama", True, torch.bfloat16), ("tiny-llama", False, torch.float32)])
def test_gradient_checkpointing_gives_the_same_gradients(preset, lora, dtype):
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_name(preset, dropout=0.1))  # dropout: the recomputation must replay the same masks
    if lora:
        apply_lora(quantize(m, "nf4"), LoraConfig(r=4, target_modules="all-linear"))
    x, y = torch.randint(0, 257, (2, 16)), torch.randint(0, 257, (2, 16))
    grads = []
    for on in (False, True):
        m.gradient_checkpointing_enable() if on else m.gradient_checkpointing_disable()
        m.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            _, loss = m(x, y, loss_only=True)
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_train_and_generate_scripts_with_quantize_and_gradient_checkpointing(tmp_path, capsys):
    torch.manual_seed(0)
    base = str(tmp_path / "base")
    GPT(GPTConfig.from_name("tiny-llama")).save_pretrained(base)
    (tmp_path / "corpus.txt").write_text("".join(f"line {i}: the quick brown fox {i % 7}\n" for i in range(200)))
    out = str(tmp_path / "run")
    code, stdout, _ = run_script_here(capsys, "train.py", "--init_from", base, "--data", str(tmp_path / "corpus.txt"),
                                      "--out_dir", out, "--quantize", "nf4", "--gradient_checkpointing", "--max_iters",
                                      "3", "--batch_size", "2", "--block_size", "32", "--eval_iters", "1",
                                      "--lora_r", "4", "--target_modules", "all-linear", "--dtype", "bf16")
    assert code == 0 and "trainable params" in stdout
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    for extra in ([], ["--merge"]):  # on an NF4 base; or merged in float, then the merged model quantized
        code, stdout, err = run_script_here(capsys, "generate.py", "--adapter", out, "--init_from", base, "--quantize",
                                            "nf4", "--prompt", "line", "--max_new_tokens", "4", "--temperature", "0",
                                            *extra)
        assert code == 0 and stdout.startswith("line"), err
    code, _, err = run_script_here(capsys, "train.py", "--init_from", base, "--data", str(tmp_path / "corpus.txt"),
                                   "--out_dir", str(tmp_path / "full"), "--quantize", "int8", "--lora_r", "0")
    assert code == 2 and "cannot be trained in full" in err


def test_memory_planner_against_real_bytes():
    torch.manual_seed(0)
    config = GPTConfig.from_name("tiny-llama")
    lora = LoraConfig(r=4, target_modules="all-linear")
    plan = memory_plan(config, "qlora", lora, "nf4", dtype="fp32", base_dtype="fp32", batch_size=2, seq_len=16)
    real = apply_lora(quantize(GPT(config), "nf4"), lora)
    frozen = sum(t.numel() * t.element_size() for k, t in real.state_dict().items() if "lora_" not in k)
    assert plan["weights"] == frozen  # packed NF4 + float embeddings/norms/head: what the state_dict holds
    assert plan["lora"] == 4 * sum(p.numel() for p in real.parameters() if p.requires_grad) == plan["grads"]
    saved = _saved_activation_bytes(real.train(), 2, 16, "fp32")
    assert abs(plan["activations"] / saved - 1) < 0.1, (plan["activations"], saved)
    assert memory_plan(GPTConfig.from_name("llama-65b"), "qlora", LoraConfig(r=8), "nf4",
                       batch_size=1, seq_len=8)["weights"] < 48e9  # the QLoRA paper's headline: 65B on a 48 GB GPU


@pytest.mark.parametrize("name", ["small", "small-llama"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_activation_estimate_is_exact_where_widths_move_together(name, method):
    """GPT-2's key/value width is always C and full fine-tuning has no LoRA columns: the fit's system is
    rank-deficient, and a solver that did not cut the null space gave a different estimate run to run
    (llama2-7b full: 4.02 GB alone, 27 MB in one test process). Within 3% of the hooks' count at a shape
    away from the calibration widths, and the same on every call."""
    config = GPTConfig(**{**GPTConfig.from_name(name).to_dict(), "n_layer": 4})
    lora = LoraConfig(r=4, target_modules="all-linear")
    estimates = {activation_bytes(config, method, lora, batch_size=2, seq_len=128) for _ in range(3)}
    assert len(estimates) == 1
    torch.manual_seed(0)
    real = _saved_activation_bytes(_build(config, method, lora, "nf4", "fp32", device="cpu").train(), 2, 128, "fp32")
    assert abs(estimates.pop() / real - 1) < 0.03


def test_generation_under_inference_mode_then_training_on_a_quantized_base():
    """The quickstart scores the base with generate() (inference mode), then trains: the scratch buffer must not
    be an inference tensor the training forward then writes into."""
    torch.manual_seed(0)
    model = apply_lora(quantize(GPT(GPTConfig.from_name("tiny")), "nf4"), LoraConfig(r=2, target_modules="all-linear"))
    with torch.inference_mode():
        model(torch.zeros(1, 4, dtype=torch.long))
    x = torch.randint(0, 257, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("family", ["opt", "opt-post"])  # OPT's pre-LN (350m and up) and post-LN (125m) blocks
def test_qlora_on_opt_trains_and_merges(family):
    """QLoRA on the guide's own family, from its HF fixture: the base quantizes, LoRA trains on it, and
    merge_and_unload returns a float model that computes what the adapter on the 4-bit base computes."""
    torch.manual_seed(0)
    m = quantize(GPT.from_pretrained(os.path.join(os.path.dirname(__file__), "fixtures", "hf", family, "model")), "nf4")
    apply_lora(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian"))
    assert isinstance(m.transformer.h[0].attn.out_proj.base_layer, QuantizedLinear)
    assert isinstance(m.transformer.h[0].mlp.fc1.base_layer, QuantizedLinear)
    x = torch.randint(0, m.config.vocab_size, (2, 12))
    _, loss = m(x, x, loss_only=True)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n)
    m.eval()
    with torch.no_grad():
        unmerged = m(x, all_logits=True)[0]
        plain = merge_and_unload(m)
        torch.testing.assert_close(plain(x, all_logits=True)[0], unmerged, atol=2e-5, rtol=1e-5)


def test_serve_on_a_quantized_base_answers_as_generate_does(tmp_path):
    """serve.py --quantize nf4: the adapter's and the base's greedy answers are those of the same NF4 model in process."""
    import json
    import urllib.request
    from minilora import get_tokenizer, load_adapter
    from scripts import random_adapter, serve_process
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_name("tiny-llama"))
    base.save_pretrained(tmp_path / "base")
    random_adapter(base, str(tmp_path / "a"), r=4, seed=1, targets=("q_proj", "v_proj", "down_proj"))
    model = quantize(GPT.from_pretrained(tmp_path / "base"), "nf4")
    load_adapter(model, str(tmp_path / "a"), "a")
    model.eval()
    tok = get_tokenizer("byte")
    proc, url = serve_process(str(tmp_path), "--init_from", str(tmp_path / "base"), "--quantize", "nf4",
                              "--lora-modules", f"a={tmp_path / 'a'}")
    try:
        for name, adapter in ((str(tmp_path / "base"), "__base__"), ("a", "a")):
            body = json.dumps({"model": name, "prompt": "hello", "max_tokens": 6, "temperature": 0}).encode()
            req = urllib.request.Request(url + "/completions", body, {"Content-Type": "application/json"})
            got = json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["text"]
            want = generate(model, [tok.encode("hello")], 6, temperature=0, tokenizer=tok, eot_token=tok.eot_token,
                            adapter_names=[adapter])
            assert got == want.texts[0], name
    finally:
        proc.kill()
        proc.communicate(timeout=30)


HF = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


@pytest.mark.parametrize("source", ["gpt2", "gpt2-bin", "opt", "llama", "qwen2"])  # llama: a sharded checkpoint
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_from_pretrained_quantizes_each_layer_as_it_loads(source, method, tmp_path):
    """GPT.from_pretrained(d, quantize=...) holds exactly what quantizing the float model would, and keeps no
    view of the file (its memory map is released: every tensor owns its own storage)."""
    if source.startswith("gpt2"):  # GPT-2's file layout: fused c_attn and transposed Conv1D weights
        torch.manual_seed(0)
        d = tmp_path / "gpt2"
        GPT(GPTConfig.from_name("tiny")).save_pretrained(d)
        if source == "gpt2-bin":  # the same tensors as a pytorch_model.bin (memory-mapped by torch.load)
            from minilora.safetensors import load_file
            torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
            os.remove(d / "model.safetensors")
        d = str(d)
    else:
        d = os.path.join(HF, source, "model")
    loaded = GPT.from_pretrained(d, quantize=method)
    reference = quantize(GPT.from_pretrained(d), method)
    got, want = loaded.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [q.dtype for _, q in quantized_layers(loaded)] == [torch.float32] * len(quantized_layers(reference))
    for t in [*loaded.parameters(), *loaded.buffers()]:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    x = torch.randint(0, loaded.config.vocab_size, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, all_logits=True)[0], reference(x, all_logits=True)[0], atol=0, rtol=0)


def test_from_pretrained_quantizes_a_bf16_file_and_keeps_its_dtype_with_auto(tmp_path):
    torch.manual_seed(0)
    GPT(GPTConfig.from_name("tiny-llama")).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    loaded = GPT.from_pretrained(tmp_path / "m", dtype="auto", quantize="nf4")
    reference = quantize(GPT.from_pretrained(tmp_path / "m", dtype="auto"), "nf4")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
    assert {q.dtype for _, q in quantized_layers(loaded)} == {torch.bfloat16} == {loaded.lm_head.weight.dtype}


def test_quantized_load_never_holds_the_float_model(tmp_path):
    """Anonymous memory while from_pretrained(quantize="nf4") reads a 170 MB fp32 GPT-2 file, in a fresh process,
    sampled before and after each layer is quantized: it grows by the codes and one layer's scratch, never by
    the float model (the file's pages are clean page cache, not counted)."""
    import subprocess
    import sys
    import textwrap
    torch.manual_seed(0)
    config = GPTConfig.from_name("tiny", n_layer=6, n_embd=768, n_head=12)  # 42M weights
    GPT(config).save_pretrained(tmp_path / "m")  # GPT-2's layout: each Conv1D weight is transposed as it loads
    GPT(GPTConfig.from_name("tiny")).save_pretrained(tmp_path / "tiny")
    probe = textwrap.dedent("""
        import sys
        from minilora import GPT
        import minilora.quantize as q

        def anon():
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon:"))

        GPT.from_pretrained(sys.argv[2], quantize="nf4")  # a first (tiny) load: torch's one-time ~70 MB
        samples, encode = [anon()], q.QuantizedLinear._encode

        def watched(self, w):
            out = encode(self, w)
            samples.append(anon())
            return out

        q.QuantizedLinear._encode = watched
        GPT.from_pretrained(sys.argv[1], quantize="nf4")
        print(max(samples) - samples[0], len(samples))
    """)
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "m"), str(tmp_path / "tiny")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    growth_kb, layers = map(int, out.stdout.split())
    with torch.device("meta"):
        linears = [m for n, m in GPT(config).named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    codes_kb = sum(quantized_nbytes(m.out_features, m.in_features, "nf4") for m in linears) / 1024  # ~22 MB
    scratch_kb = 6 * max(m.weight.numel() for m in linears) * 4 / 1024  # a few fp32-sized copies of one layer
    # measured ~49 MB; making the float copy first measured 240-296 MB (the float weights alone: 167 MB)
    assert layers == 1 + 6 * 6 and growth_kb < codes_kb + scratch_kb, (growth_kb, codes_kb, scratch_kb)


def test_parameter_count_of_a_quantized_base_is_its_weights():
    """print_trainable_parameters on QLoRA: the quantized weights count as weights (PEFT does so for 4-bit),
    so trainable% is the same as on the float base, not the share of the few float parameters left."""
    from minilora.lora import count_parameters
    torch.manual_seed(0)
    float_model = apply_lora(GPT(GPTConfig.from_name("tiny")), LoraConfig(r=4, target_modules="all-linear"))
    q = copy.deepcopy(float_model)
    quantize(q, "nf4")
    assert count_parameters(q) == count_parameters(float_model)


def test_a_float_state_dict_loads_into_a_quantized_model_as_its_codes():
    torch.manual_seed(0)
    float_model = GPT(GPTConfig.from_name("tiny"))
    q = quantize(copy.deepcopy(float_model), "nf4")
    fresh = quantize(GPT(GPTConfig.from_name("tiny")), "nf4")
    fresh.load_state_dict(float_model.state_dict())  # float weights where the buffers would be: quantized
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), q.state_dict().values()))
    bad = {k: (v[:, :-1] if k.endswith("fc_in.weight") else v)
           for k, v in float_model.state_dict().items()}
    with pytest.raises(RuntimeError, match="size mismatch for .*weight"):
        fresh.load_state_dict(bad)
