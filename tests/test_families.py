"""OPT and the Llama family (Llama, Mistral, Qwen2) on the one decoder: reference fixtures, an independent
forward, generation, merging, several adapters, checkpoints and refusals.

Two kinds of reference:
- tests/fixtures/hf/<kind>/: tiny checkpoints, PEFT adapters and logits made by transformers + peft;
- checkpoints written here by hand in each family's HF layout, whose logits come from a forward written
  below straight from the architecture's equations on those HF tensors (no minilora.model code), so a
  mapping mistake cannot cancel itself out between our loader and our model.
"""

import copy
import dataclasses
import json
import math
import os
import pathlib

import pytest
import torch

from minilora import (GPT, GPTConfig, LoraConfig, MiniloraError, apply_lora, generate, load_adapter, lora_layers,
                      merge_and_unload, save_adapter, set_adapter)
from minilora.safetensors import load_file, save_file, save_sharded

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
FIXTURE_KINDS = ["opt", "opt-post", "llama", "mistral", "qwen2"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
GPT2_FIELDS = ("n_embd", "n_layer", "n_head", "n_positions", "n_ctx", "n_inner", "layer_norm_epsilon")


def logits(model, idx):
    with torch.no_grad():
        return model(idx, all_logits=True)[0]


# ---- 1. transformers / peft fixtures ----------------------------------------------------------

@pytest.fixture(scope="module", params=FIXTURE_KINDS)
def fixture(request):
    d = FIXTURES / request.param
    return d, load_file(d / "expected.safetensors"), json.loads((d / "expected.json").read_text())


def test_fixture_base_and_adapter_logits_and_greedy_tokens(fixture):
    d, expected, greedy = fixture
    model = GPT.from_pretrained(d / "model")
    idx = expected["idx"]
    torch.testing.assert_close(logits(model, idx), expected["logits"], atol=1e-4, rtol=1e-4)
    out = generate(model, [greedy["greedy_prompt"]], 20, temperature=0, eot_token=None)  # eot None: never stops early
    assert out.tokens[0] == greedy["greedy_20_tokens_ignoring_eos"]
    load_adapter(model, d / "adapter")
    with_adapter = logits(model, idx)
    torch.testing.assert_close(with_adapter, expected["adapter_logits"], atol=1e-4, rtol=1e-4)
    assert (with_adapter - expected["logits"]).abs().max() > 1e-2  # the adapter really changes the logits


def test_fixture_adapter_saves_with_pefts_keys_and_reloads(fixture, tmp_path):
    d, expected, _ = fixture
    model = load_adapter(GPT.from_pretrained(d / "model"), d / "adapter")
    save_adapter(model, tmp_path / "a")
    peft_keys = set(load_file(d / "adapter" / "adapter_model.safetensors"))
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert set(saved) == peft_keys
    theirs = json.loads((d / "adapter" / "adapter_config.json").read_text())
    ours = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert set(ours["target_modules"]) == set(theirs["target_modules"])
    assert (ours["r"], ours["lora_alpha"], ours["peft_type"]) == (theirs["r"], theirs["lora_alpha"], "LORA")
    for k, t in load_file(d / "adapter" / "adapter_model.safetensors").items():
        assert torch.equal(saved[k], t), k
    again = load_adapter(GPT.from_pretrained(d / "model"), tmp_path / "a")
    torch.testing.assert_close(logits(again, expected["idx"]), expected["adapter_logits"], atol=1e-4, rtol=1e-4)


# ---- 2. hand-written HF checkpoints and a forward from the equations ---------------------------

V, C, L, NH, H, T_MAX = 50, 32, 2, 4, 48, 64


def rand_fn(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g) * 0.3


def llama_config(model_type="llama", **overrides):
    """config.json as transformers writes a Llama / Mistral / Qwen2 (HF field names only)."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    return {"architectures": [arch], "model_type": model_type, "vocab_size": V, "hidden_size": C,
            "intermediate_size": H, "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NH,
            "max_position_embeddings": T_MAX, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "float32", **overrides}


def llama_tensors(cfg, seed):
    """Random weights under HF Llama names; norm weights away from 1, Qwen2's q/k/v biases, no head if tied."""
    rand = rand_fn(seed)
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or C // nh
    t = {"model.embed_tokens.weight": rand(V, C), "model.norm.weight": 1 + rand(C)}
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": 1 + rand(C), p + "post_attention_layernorm.weight": 1 + rand(C),
              p + "self_attn.q_proj.weight": rand(nh * hd, C), p + "self_attn.k_proj.weight": rand(nkv * hd, C),
              p + "self_attn.v_proj.weight": rand(nkv * hd, C), p + "self_attn.o_proj.weight": rand(C, nh * hd),
              p + "mlp.gate_proj.weight": rand(H, C), p + "mlp.up_proj.weight": rand(H, C),
              p + "mlp.down_proj.weight": rand(C, H)}
        if cfg["model_type"] == "qwen2":
            t |= {p + "self_attn.q_proj.bias": rand(nh * hd), p + "self_attn.k_proj.bias": rand(nkv * hd),
                  p + "self_attn.v_proj.bias": rand(nkv * hd)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = rand(V, C)
    return t


def opt_config(**overrides):
    return {"architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": V, "hidden_size": C,
            "ffn_dim": H, "num_hidden_layers": L, "num_attention_heads": NH, "max_position_embeddings": T_MAX,
            "do_layer_norm_before": True, "word_embed_proj_dim": C, "activation_function": "relu",
            "enable_bias": True, "layer_norm_elementwise_affine": True, "_remove_final_layer_norm": False,
            "tie_word_embeddings": True, "dropout": 0.1, "attention_dropout": 0.0, "pad_token_id": 1,
            "bos_token_id": 2, "eos_token_id": 2, "torch_dtype": "float32", **overrides}


def opt_tensors(cfg, seed):
    """Random weights under HF OPT names: learned positions with 2 extra rows, no final norm when post-LN."""
    rand = rand_fn(seed)
    E = cfg["word_embed_proj_dim"]
    d = "model.decoder."
    t = {d + "embed_tokens.weight": rand(V, E), d + "embed_positions.weight": rand(T_MAX + 2, C)}
    if E != C:
        t |= {d + "project_in.weight": rand(C, E), d + "project_out.weight": rand(E, C)}
    if cfg["do_layer_norm_before"]:
        t |= {d + "final_layer_norm.weight": 1 + rand(C), d + "final_layer_norm.bias": rand(C)}
    for i in range(L):
        p = f"{d}layers.{i}."
        for n, shape in (("self_attn.q_proj", (C, C)), ("self_attn.k_proj", (C, C)), ("self_attn.v_proj", (C, C)),
                         ("self_attn.out_proj", (C, C)), ("fc1", (H, C)), ("fc2", (C, H))):
            t |= {p + n + ".weight": rand(*shape), p + n + ".bias": rand(shape[0])}
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            t |= {p + n + ".weight": 1 + rand(C), p + n + ".bias": rand(C)}
    return t


def write_dir(path, config, tensors, shard_bytes=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if shard_bytes is None:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return [path / "model.safetensors"]
    return save_sharded(tensors, path, shard_bytes, metadata={"format": "pt"})


def ref_inv_freq(d, theta, scaling=None):
    """RoPE frequencies theta^(-2i/d), i < d/2, each rescaled per Llama 3's definition when scaling is given."""
    out = []
    for i in range(d // 2):
        f = theta ** (-2 * i / d)
        if scaling is not None:
            orig, factor = scaling["original_max_position_embeddings"], scaling["factor"]
            low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
            wavelen = 2 * math.pi / f
            if wavelen < orig / high:
                pass  # high frequencies are kept
            elif wavelen > orig / low:
                f = f / factor  # low frequencies are stretched by factor
            else:
                smooth = (orig / wavelen - low) / (high - low)
                f = (1 - smooth) * f / factor + smooth * f
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)


def ref_rope(x, inv_freq):
    """Rotate each pair (x_i, x_{i+d/2}) at position p by the angle p * inv_freq_i. x: (B, nh, T, d)."""
    T, half = x.shape[2], x.shape[3] // 2
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, d/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def ref_attention(q, k, v):
    """Causal softmax(q k^T / sqrt(d)) v with an explicit mask; k/v may have fewer heads (GQA: head j uses j // rep)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    T = q.shape[2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
    return scores.softmax(-1) @ v


def ref_linear(t, x, name):
    y = x @ t[name + ".weight"].T
    return y + t[name + ".bias"] if name + ".bias" in t else y


def ref_layer_norm(t, x, name, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * t[name + ".weight"] + t[name + ".bias"]


def ref_rms_norm(t, x, name, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * t[name + ".weight"]


def llama_reference(tensors, cfg, idx, scaling="from-config"):
    """Llama / Mistral / Qwen2 forward in float64: RMSNorm, RoPE, GQA, SwiGLU; tied head when lm_head is absent."""
    t = {k: v.double() for k, v in tensors.items()}
    nh, nkv, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    hd = cfg.get("head_dim") or C // nh
    theta = cfg["rope_parameters"]["rope_theta"] if "rope_parameters" in cfg else cfg["rope_theta"]
    inv_freq = ref_inv_freq(hd, theta, cfg.get("rope_scaling") if scaling == "from-config" else scaling)
    B, T = idx.shape
    x = t["model.embed_tokens.weight"][idx]  # (B, T, C)
    for i in range(L):
        p = f"model.layers.{i}."
        h = ref_rms_norm(t, x, p + "input_layernorm", eps)
        q = ref_linear(t, h, p + "self_attn.q_proj").view(B, T, nh, hd).transpose(1, 2)
        k = ref_linear(t, h, p + "self_attn.k_proj").view(B, T, nkv, hd).transpose(1, 2)
        v = ref_linear(t, h, p + "self_attn.v_proj").view(B, T, nkv, hd).transpose(1, 2)
        y = ref_attention(ref_rope(q, inv_freq), ref_rope(k, inv_freq), v).transpose(1, 2).reshape(B, T, nh * hd)
        x = x + ref_linear(t, y, p + "self_attn.o_proj")
        h = ref_rms_norm(t, x, p + "post_attention_layernorm", eps)
        gate = ref_linear(t, h, p + "mlp.gate_proj")
        x = x + ref_linear(t, gate * torch.sigmoid(gate) * ref_linear(t, h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = ref_rms_norm(t, x, "model.norm", eps)
    return x @ t.get("lm_head.weight", t["model.embed_tokens.weight"]).T


def opt_reference(tensors, cfg, idx):
    """OPT forward in float64: positions p use row p + 2; LayerNorm before (pre) or after (post) each residual add."""
    t = {k: v.double() for k, v in tensors.items()}
    pre, d = cfg["do_layer_norm_before"], "model.decoder."
    B, T = idx.shape
    hd = C // NH
    x = t[d + "embed_tokens.weight"][idx]  # (B, T, E)
    if d + "project_in.weight" in t:
        x = ref_linear(t, x, d + "project_in")  # (B, T, C)
    x = x + t[d + "embed_positions.weight"][torch.arange(T) + 2]
    for i in range(L):
        p = f"{d}layers.{i}."
        h = ref_layer_norm(t, x, p + "self_attn_layer_norm") if pre else x
        q, k, v = (ref_linear(t, h, p + f"self_attn.{n}_proj").view(B, T, NH, hd).transpose(1, 2) for n in "qkv")
        x = x + ref_linear(t, ref_attention(q, k, v).transpose(1, 2).reshape(B, T, C), p + "self_attn.out_proj")
        if not pre:
            x = ref_layer_norm(t, x, p + "self_attn_layer_norm")
        h = ref_layer_norm(t, x, p + "final_layer_norm") if pre else x
        x = x + ref_linear(t, ref_linear(t, h, p + "fc1").clamp(min=0), p + "fc2")
        if not pre:
            x = ref_layer_norm(t, x, p + "final_layer_norm")
    if pre:
        x = ref_layer_norm(t, x, d + "final_layer_norm")
    if d + "project_out.weight" in t:
        x = ref_linear(t, x, d + "project_out")
    return x @ t[d + "embed_tokens.weight"].T  # OPT's head is tied to the token embedding


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
# name -> (config.json, weights written in shards of this many bytes or None, sequence length)
REFERENCE_CASES = {
    # GQA (2 KV heads for 4), head_dim 12 (4 * 12 != hidden 32), untied head, 5+ shards with an index
    "llama-gqa": (llama_config(num_key_value_heads=2, head_dim=12, rope_theta=500000.0), 12_000, 20),
    # q/k/v biases, tied head (no lm_head in the file); a sliding window that use_sliding_window switches off
    "qwen2-tied": (llama_config("qwen2", num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
                                sliding_window=4, use_sliding_window=False), None, 20),
    # Llama 3 frequency scaling with positions up to 40, beyond the original 16
    "llama3-scaling": (llama_config(rope_theta=10000.0, rope_scaling=LLAMA3_SCALING, num_key_value_heads=1), None, 40),
    # transformers 5's nested rope_parameters; sliding_window equal to the context is plain attention
    "mistral": ({k: v for k, v in llama_config("mistral", num_key_value_heads=2, sliding_window=T_MAX).items()
                 if k != "rope_theta"} | {"rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}}, None, 20),
    "opt-pre": (opt_config(), None, 20),
    # opt-350m's shape: post-LN, 16-wide embeddings around 32-wide blocks, no final layer norm
    "opt-post": (opt_config(do_layer_norm_before=False, word_embed_proj_dim=16), None, 20),
    # post-LN OPT has no final layer norm anyway, so transformers' _remove_final_layer_norm changes nothing
    "opt-post-removed-final": (opt_config(do_layer_norm_before=False, _remove_final_layer_norm=True), None, 20),
}


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_hand_written_checkpoint_matches_reference_forward(case, tmp_path):
    cfg, shard_bytes, T = REFERENCE_CASES[case]
    opt = cfg["model_type"] == "opt"
    tensors = (opt_tensors if opt else llama_tensors)(cfg, seed=len(case))
    written = write_dir(tmp_path / "ckpt", cfg, tensors, shard_bytes)
    if shard_bytes is not None:
        assert len(written) >= 5 and os.path.basename(written[-1]) == "model.safetensors.index.json"
    model = GPT.from_pretrained(tmp_path / "ckpt")
    c = model.config
    assert (c.model_type, c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size) == (cfg["model_type"], L, NH, C,
                                                                                          V, T_MAX)
    assert model.num_parameters() == sum(t.numel() for t in tensors.values())  # every tensor used, none made up
    if opt:
        assert (c.pre_norm, c.embed_dim, c.mlp_width) == (cfg["do_layer_norm_before"], cfg["word_embed_proj_dim"], H)
        assert model.lm_head.weight is model.transformer.wte.weight
    else:
        assert (c.kv_heads, c.head_size, c.mlp_width) == (cfg["num_key_value_heads"], cfg.get("head_dim") or C // NH, H)
        assert c.tie_word_embeddings == cfg["tie_word_embeddings"] and c.qkv_bias == (cfg["model_type"] == "qwen2")
        assert (model.lm_head.weight is model.transformer.wte.weight) == cfg["tie_word_embeddings"]
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    reference = opt_reference(tensors, cfg, idx) if opt else llama_reference(tensors, cfg, idx)
    ours = logits(model, idx)
    assert ours.shape == (2, T, V)
    torch.testing.assert_close(ours.double(), reference, atol=1e-4, rtol=1e-4)
    if cfg.get("rope_scaling"):  # the scaling matters at these positions: without it the logits differ
        assert (llama_reference(tensors, cfg, idx, scaling=None) - reference).abs().max() > 1e-2
    # written back, the directory holds the same HF tensors (a tied head stays absent)
    model.save_pretrained(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert set(saved) == set(tensors) and ("lm_head.weight" in saved) == (not c.tie_word_embeddings)
    for k, t in saved.items():
        assert torch.equal(t, tensors[k]), k


# ---- 3. tiny Llama-family and OPT models: generation, cache, merge, adapters, checkpoints ------

TINY = {
    "llama": lambda: GPTConfig.from_name("tiny-llama"),  # GQA: 2 KV heads for 4, untied head
    "qwen2": lambda: GPTConfig.from_name("tiny-llama", model_type="qwen2", qkv_bias=True, tie_word_embeddings=True,
                                         rope_scaling=dict(LLAMA3_SCALING)),
    "opt": lambda: GPTConfig(model_type="opt", n_layer=2, n_head=4, n_embd=32, intermediate_size=64, block_size=64,
                             vocab_size=257, tokenizer="byte", pre_norm=False, word_embed_proj_dim=16),
}
PROMPTS = [[5, 9, 200, 17, 3, 99, 42], [8, 1], [250, 4, 4, 60], [7]]


def peaked(config, seed=0):
    """Weights larger than the init (norms and biases away from 1 and 0): varied greedy tokens, so a wrong
    mask, position or adapter row shows up as other tokens. OPT's post-LN ReLU blocks saturate sooner
    (at 0.3 every row repeats one or two tokens), so they get smaller weights."""
    std, bias_std = (0.3, 0.2) if config.family == "llama" else (0.1, 0.02)
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
            elif ".ln_" in n and n.endswith(".weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, bias_std)
    return model


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    return request.param, peaked(TINY[request.param]())


def targets_of(model):
    return LLAMA_TARGETS if model.config.family == "llama" else OPT_TARGETS


def random_lora(model, name, r, targets, seed):
    apply_lora(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_A.{name}." in n or f"lora_B.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def test_cached_equals_uncached_with_left_padded_prompts(tiny):
    _, model = tiny
    cached = generate(model, PROMPTS, 12, temperature=0, use_cache=True, return_logits=True)
    plain = generate(model, PROMPTS, 12, temperature=0, use_cache=False, return_logits=True)
    assert cached.tokens == plain.tokens
    for a, b in zip(cached.logits, plain.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert len({t for row in cached.tokens for t in row}) > 8  # varied tokens: the comparison has teeth
    # the same batch as one left-padded (B, T) tensor with its mask
    T = max(map(len, PROMPTS))
    idx = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    assert generate(model, idx, 12, temperature=0, attention_mask=mask).tokens == cached.tokens
    for i, p in enumerate(PROMPTS):  # padding changes nothing: each row is what its prompt gives alone
        assert generate(model, [p], 12, temperature=0).tokens[0] == cached.tokens[i]


def test_kv_cache_holds_only_the_key_value_heads(tiny):
    _, model = tiny
    c = model.config
    model.setup_kv_cache(3, 20)
    try:
        for block in model.transformer.h:
            assert block.attn.kv_cache.k.shape == block.attn.kv_cache.v.shape == (3, c.kv_heads, 20, c.head_size)
    finally:
        model.clear_kv_cache()
    assert c.kv_heads == (2 if c.family == "llama" else c.n_head)
    with torch.device("meta"):
        big = GPT(GPTConfig.from_name("llama3-8b"))
    big.setup_kv_cache(1, 128)
    assert big.transformer.h[0].attn.kv_cache.k.shape == (1, 8, 128, 128)  # 8 KV heads of Llama 3 8B's 32


def test_merged_equals_unmerged_on_every_linear(tiny):
    _, base = tiny
    targets = targets_of(base)
    model = random_lora(copy.deepcopy(base), "default", 4, targets, seed=3)
    assert len(list(lora_layers(model))) == base.config.n_layer * len(targets)
    idx = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(2))
    unmerged = logits(model, idx)
    assert (unmerged - logits(base, idx)).abs().max() > 1e-1  # the adapter matters
    layer = model.get_submodule(f"transformer.h.1.mlp.{targets[-1]}")
    W, A, B = (t.detach().clone() for t in (layer.base_layer.weight, layer.lora_A["default"].weight,
                                            layer.lora_B["default"].weight))
    plain = merge_and_unload(model)
    torch.testing.assert_close(plain.get_submodule(f"transformer.h.1.mlp.{targets[-1]}").weight, W + 2.0 * B @ A,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(plain, idx), unmerged, atol=1e-4, rtol=1e-5)
    fresh = GPT(base.config)
    fresh.load_state_dict(plain.state_dict(), strict=True)


def test_mixed_adapter_batch_equals_each_adapter_alone(tiny):
    _, base = tiny
    targets = targets_of(base)
    multi = random_lora(copy.deepcopy(base), "a", 2, targets, seed=4)
    multi = random_lora(multi, "b", 4, targets[:2] + targets[-1:], seed=5)  # another rank, some modules only
    names = ["a", "__base__", "b", "a"]
    out = generate(multi, PROMPTS, 6, temperature=0, adapter_names=names, return_logits=True)
    for i, (p, n) in enumerate(zip(PROMPTS, names)):
        if n == "__base__":
            alone = generate(base, [p], 6, temperature=0, return_logits=True)
        else:
            one = copy.deepcopy(multi)
            set_adapter(one, n)
            alone = generate(one, [p], 6, temperature=0, return_logits=True)
        assert out.tokens[i] == alone.tokens[0], (i, n)
        torch.testing.assert_close(out.logits[i], alone.logits[0], atol=1e-4, rtol=1e-5)
    assert out.tokens[0] != generate(base, [PROMPTS[0]], 6, temperature=0).tokens[0]  # adapters change answers


@pytest.mark.parametrize("shard", [None, 40_000])
def test_save_pretrained_round_trip_and_hf_config(tiny, shard, tmp_path):
    kind, model = tiny
    model.save_pretrained(tmp_path / "m", **({} if shard is None else {"max_shard_size": shard}))
    files = sorted(os.listdir(tmp_path / "m"))
    if shard is None:
        assert files == ["config.json", "model.safetensors"]
        tensors = load_file(tmp_path / "m" / "model.safetensors")
    else:
        shards = [f for f in files if f.startswith("model-")]
        assert len(shards) >= 3 and files == ["config.json", *shards, "model.safetensors.index.json"]
        index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(shards)
        tensors = {k: t for f in shards for k, t in load_file(tmp_path / "m" / f).items()}
        assert set(index["weight_map"]) == set(tensors)
    c = model.config
    # HF tensor names, no tied head
    stem = "model.decoder.layers.0." if kind == "opt" else "model.layers.0."
    assert stem + "self_attn.q_proj.weight" in tensors and not any(k.startswith("transformer.") for k in tensors)
    assert ("lm_head.weight" in tensors) == (not c.tie_word_embeddings)
    loaded = GPT.from_pretrained(tmp_path / "m")
    # config.json states head_dim; ours left it None (n_embd // n_head): the same model
    assert dataclasses.replace(loaded.config, head_dim=c.head_dim) == c and loaded.config.head_size == c.head_size
    sd, want = loaded.state_dict(), model.state_dict()
    assert sd.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(sd[k], v), k
    idx = torch.tensor([PROMPTS[0]])
    assert torch.equal(logits(loaded, idx), logits(model, idx))
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf["model_type"] == kind and not set(GPT2_FIELDS) & set(hf)
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]) == (c.n_embd, c.n_layer, c.n_head)
    if kind == "opt":
        assert (hf["ffn_dim"], hf["word_embed_proj_dim"], hf["do_layer_norm_before"]) == (64, 16, False)
        assert hf["max_position_embeddings"] == 64 and hf["tie_word_embeddings"] is True
    else:
        assert (hf["num_key_value_heads"], hf["rope_theta"], hf["tie_word_embeddings"]) == (2, 10000.0,
                                                                                          c.tie_word_embeddings)
        assert hf["rope_scaling"] == c.rope_scaling and hf["intermediate_size"] == 88


def test_bf16_load_is_bf16_and_close_to_fp32(tiny, tmp_path):
    _, model = tiny
    model.save_pretrained(tmp_path / "m")
    fp32 = GPT.from_pretrained(tmp_path / "m")
    bf16 = GPT.from_pretrained(tmp_path / "m", dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    idx = torch.tensor([PROMPTS[0]])
    want, got = logits(fp32, idx), logits(bf16, idx)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want).abs().max()
    assert 0 < err < 0.05 * want.abs().max()
    assert (got.float().argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


# ---- 4. refusals: one line naming the field ----------------------------------------------------

@pytest.mark.parametrize("config,field", [
    (llama_config("mistral", sliding_window=16), "sliding_window"),
    (llama_config(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
     "rope_scaling"),
    (llama_config(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling"),
    (llama_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_parameters"),
    (llama_config(hidden_act="gelu"), "hidden_act"),
    (llama_config(model_type="llama") | {"model_type": "bert"}, "model_type"),
    (opt_config(_remove_final_layer_norm=True), "_remove_final_layer_norm"),
])
def test_unsupported_configs_are_refused_by_name(config, field, tmp_path):
    write_dir(tmp_path / "m", config, {"x": torch.zeros(1)})
    with pytest.raises(MiniloraError) as e:
        GPT.from_pretrained(tmp_path / "m")
    msg = str(e.value)
    assert field in msg and "config.json" in msg and "\n" not in msg


@pytest.mark.parametrize("config,missing", [
    (llama_config(num_key_value_heads=2), "model.layers.1.mlp.up_proj.weight"),
    (llama_config("qwen2", tie_word_embeddings=True), "model.layers.0.self_attn.k_proj.bias"),
    (opt_config(do_layer_norm_before=False, word_embed_proj_dim=16), "model.decoder.project_in.weight"),
    (opt_config(), "model.decoder.final_layer_norm.bias"),
])
def test_missing_tensor_is_named_by_its_hf_name(config, missing, tmp_path):
    tensors = (opt_tensors if config["model_type"] == "opt" else llama_tensors)(config, seed=0)
    del tensors[missing]
    write_dir(tmp_path / "m", config, tensors, shard_bytes=20_000)  # through an index too
    with pytest.raises(MiniloraError, match=f"missing tensors: {missing}$") as e:
        GPT.from_pretrained(tmp_path / "m")
    assert "\n" not in str(e.value)
