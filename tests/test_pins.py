"""Pins on behaviour that a restructuring could silently break, each checked against an independent reference.

Only the package face (`from minilora import ...`) and the scripts (serve.py as a subprocess) are
used, so these tests survive modules moving. Every test was checked to fail with a specific bug
injected (named in its docstring):

- a mixed-adapter batch keeps each row's own adapter after finished rows are dropped;
- serve.py scales an rsLoRA adapter by alpha/sqrt(r), as merge_and_unload does;
- save_adapter/load_adapter use PEFT's literal key names and config values;
- serve.py's n > 1 with a seed gives choice i the draws of seed + i;
- serve.py never lets a reused row see a previous request's stale KV-cache entries;
- apply_lora's dropout follows the model's eval mode, for a first adapter (whose LoRALinear is
  new) and a second one.
"""

import copy
import json
import os
import struct
import urllib.request

import pytest
import torch

from minilora import (GPT, GPTConfig, LoraConfig, LoRALinear, apply_lora, generate, get_tokenizer, load_adapter,
                      merge_and_unload, save_adapter, set_adapter)

from scripts import peaked_tiny, serve_process
TOK = get_tokenizer("byte")
BASE = "__base__"


def peaked_base(seed=0):
    """A tiny GPT with peaked, varied logits (see scripts.peaked_tiny)."""
    return peaked_tiny(seed)


def strengthen(model, seed, a_std=None, b_std=0.5):
    """Overwrite every adapter's lora_B (and, with a_std, lora_A) weights with seeded N(0, std^2)
    values: a trained adapter's strength, so it visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
            elif ".lora_A." in n and a_std is not None:
                p.copy_(torch.randn(p.shape, generator=g) * a_std)
    return model


def merged(model, adapter):
    """A deep copy of `model` with only `adapter` active, folded into the weights: the reference."""
    m = copy.deepcopy(model)
    set_adapter(m, adapter)
    return merge_and_unload(m).eval()


def greedy(model, prompt, n, eot_token=TOK.eot_token):
    """One prompt alone, greedy, stopping at <|endoftext|> (as the server does) -> Generation."""
    return generate(model, [TOK.encode(prompt)], n, temperature=0, eot_token=eot_token, tokenizer=TOK)


# ---- 1. a mixed-adapter batch: each row keeps its adapter when finished rows are dropped ---------

def test_mixed_adapter_batch_keeps_each_rows_adapter_after_rows_finish():
    """Bug caught: after compaction the adapter list is indexed by batch position instead of by each
    surviving row's prompt (generation `_forward`: adapter_names[:len(rows)])."""
    base = peaked_base()
    model = copy.deepcopy(base)
    for name in ("a", "b"):
        apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc_in"]), adapter_name=name)
    strengthen(model, seed=1)
    refs = {"a": merged(model, "a"), "b": merged(model, "b"), BASE: base}
    prompts = [TOK.encode(s) for s in ("Hello", "Hi there", "abc", "The quick brown", "xyz!")]
    names = ["a", "b", BASE, "b", "a"]
    N = 20

    # The adapters are strong: every prompt gets a different greedy answer from a, b and the base.
    for p in prompts:
        alone = [tuple(generate(refs[n], [p], N, temperature=0).tokens[0]) for n in ("a", "b", BASE)]
        assert len(set(alone)) == 3, "adapters too weak: the test could not tell them apart"

    # Pick an eot token and a stop string that end some rows early, from a run without either: the
    # token row 0 produces 4th, and the first printable ASCII character row 3 produces.
    full = generate(model, prompts, N, temperature=0, adapter_names=names, tokenizer=TOK)
    eot = full.tokens[0][3]
    stop = next(chr(t) for t in full.tokens[3] if 33 <= t < 127 and t != eot)

    out = generate(model, prompts, N, temperature=0, adapter_names=names, eot_token=eot, tokenizer=TOK, stop=[stop])
    for row, (prompt, name) in enumerate(zip(prompts, names)):
        ref = generate(refs[name], [prompt], N, temperature=0, eot_token=eot, tokenizer=TOK, stop=[stop])
        assert out.tokens[row] == ref.tokens[0], f"row {row} (adapter {name!r}) lost its adapter"
        assert out.finish_reasons[row] == ref.finish_reasons[0] and out.texts[row] == ref.texts[0]

    # The batch really was compacted under rows still running on different adapters: rows 0 and 3
    # finished within 4 tokens (by eot and by the stop string) while rows 1, 2 and 4, on b, the base
    # and a, went on for 8 tokens or more.
    lengths = [len(t) for t in out.tokens]
    assert out.finish_reasons[0] == out.finish_reasons[3] == "stop" and max(lengths[0], lengths[3]) < 5, lengths
    assert {names[r] for r in (1, 2, 4) if lengths[r] >= 8} == {"a", "b", BASE}, (out.finish_reasons, lengths)


# ---- serve.py as a subprocess ------------------------------------------------------------------------

def start_server(root, *args):
    """serve.py on 127.0.0.1, any free port, one thread -> (Popen, base URL .../v1)."""
    return serve_process(root, *args)


def complete(url, **body):
    """POST /v1/completions -> the parsed JSON answer (a non-200 answer raises)."""
    req = urllib.request.Request(url + "/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)


def rs_adapter(base, use_rslora):
    """The same rsLoRA-shaped adapter (r=4, alpha=16, strong random A and B) with or without rsLoRA's scaling."""
    m = apply_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=16, use_rslora=use_rslora,
                                                   target_modules=["q_proj", "v_proj", "fc_in"]))
    return strengthen(m, seed=11, a_std=0.2, b_std=0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One serve.py with ONE row (--max-num-seqs 1, so every request reuses row 0 and its stale cache),
    serving the base as "base", an rsLoRA adapter "rs" and two plain adapters "A" and "B"."""
    root = tmp_path_factory.mktemp("pins_serve")
    base = peaked_base()
    base.save_pretrained(root / "base")
    rs = rs_adapter(base, use_rslora=True)
    save_adapter(rs, root / "rs")
    ab = {}
    for i, name in enumerate(("A", "B")):
        m = apply_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc_in"]))
        strengthen(m, seed=20 + i, a_std=0.2)
        save_adapter(m, root / name)
        ab[name] = merge_and_unload(m).eval()
    proc, url = start_server(root, "--init_from", str(root / "base"), "--served-model-name", "base",
                             "--max-num-seqs", "1", "--lora-modules", f"rs={root / 'rs'}", f"A={root / 'A'}",
                             f"B={root / 'B'}")
    try:
        yield dict(url=url, base=base, rs=rs, A=ab["A"], B=ab["B"])
    finally:
        proc.kill()
        proc.communicate(timeout=30)


# ---- 2. rsLoRA scaling in the server ------------------------------------------------------------

def test_served_rslora_adapter_matches_merge_and_unload(server):
    """Bug caught: the server's adapter reader scaling by alpha/r whatever use_rslora says."""
    prompt, n = "Hello there", 16
    want = greedy(merge_and_unload(copy.deepcopy(server["rs"])).eval(), prompt, n)
    wrong = greedy(merge_and_unload(rs_adapter(server["base"], use_rslora=False)).eval(), prompt, n)
    assert want.texts[0] != wrong.texts[0], "alpha/r and alpha/sqrt(r) must give different greedy texts here"
    assert want.finish_reasons == ["length"]
    out = complete(server["url"], model="rs", prompt=prompt, max_tokens=n, temperature=0)
    assert out["choices"][0]["text"] == want.texts[0]
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == n


# ---- 4. seeded n > 1 -----------------------------------------------------------------------------

def test_served_seeded_n_choices_are_the_draws_of_seed_plus_index(server):
    """Bug caught: every choice of a request seeded with `seed` instead of `seed + index` (serving `_prefill`)."""
    body = dict(model="A", prompt="Once upon", temperature=1.0, max_tokens=16)
    choices = complete(server["url"], n=3, seed=7, **body)["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    texts = [c["text"] for c in choices]
    assert len(set(texts)) > 1, texts
    for i, c in enumerate(choices):
        alone = complete(server["url"], n=1, seed=7 + i, **body)["choices"][0]
        assert (c["text"], c["finish_reason"]) == (alone["text"], alone["finish_reason"]), i


# ---- 5. a reused row never sees the previous request's cache -------------------------------------

def test_reused_row_ignores_stale_kv_entries(server):
    """Bug caught: a decode (or prefill) mask that lets a row see cache slots beyond its own tokens,
    where an earlier, longer request on the same row left its keys and values."""
    url = server["url"]
    long_prompt = "The quick brown fox jumps over the"  # 34 tokens + 28 new: slots 0..61 of 64 written
    first = complete(url, model="A", prompt=long_prompt, max_tokens=28, temperature=0, ignore_eos=True)
    assert first["usage"]["completion_tokens"] == 28
    assert first["choices"][0]["text"] == greedy(server["A"], long_prompt, 28, eot_token=None).texts[0]
    for model, ref in (("B", server["B"]), ("base", server["base"])):
        want = greedy(ref, "Hi", 10)  # 2 + 10 tokens: every later slot still holds the long request's entries
        out = complete(url, model=model, prompt="Hi", max_tokens=10, temperature=0)["choices"][0]
        assert (out["text"], out["finish_reason"]) == (want.texts[0], want.finish_reasons[0]), model


# ---- 3. PEFT's literal file format ------------------------------------------------------------------

def read_safetensors(path):
    """{name: (dtype, shape, raw bytes)} and the metadata, parsed by hand: an 8-byte little-endian
    header length, that many bytes of JSON, then the tensor data at the header's offsets."""
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    body = data[8 + n:]
    return {k: (v["dtype"], v["shape"], body[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in header.items()}, meta


def write_safetensors(path, tensors):
    """{name: list of rows of floats} -> a safetensors file written by hand, F32 little-endian."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, rows in tensors.items():
        flat = [x for row in rows for x in row]
        blob = struct.pack(f"<{len(flat)}f", *flat)
        header[name] = {"dtype": "F32", "shape": [len(rows), len(rows[0])], "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header with spaces to a multiple of 8
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_save_adapter_writes_peft_literal_keys_and_config(tmp_path):
    """Bug caught: any change to the key prefix (adapter_files PREFIX), the key layout or the config keys."""
    torch.manual_seed(0)
    model = apply_lora(GPT(GPTConfig.from_name("tiny")), LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1,
                                                                     target_modules=["q_proj", "v_proj"],
                                                                     task_type="CAUSAL_LM"))
    save_adapter(model, tmp_path / "ad")
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors, meta = read_safetensors(tmp_path / "ad" / "adapter_model.safetensors")
    assert set(tensors) == {
        "base_model.model.transformer.h.0.attn.q_proj.lora_A.weight",
        "base_model.model.transformer.h.0.attn.q_proj.lora_B.weight",
        "base_model.model.transformer.h.0.attn.v_proj.lora_A.weight",
        "base_model.model.transformer.h.0.attn.v_proj.lora_B.weight",
        "base_model.model.transformer.h.1.attn.q_proj.lora_A.weight",
        "base_model.model.transformer.h.1.attn.q_proj.lora_B.weight",
        "base_model.model.transformer.h.1.attn.v_proj.lora_A.weight",
        "base_model.model.transformer.h.1.attn.v_proj.lora_B.weight",
    }
    assert meta == {"format": "pt"}
    for key, (dtype, shape, raw) in tensors.items():
        assert dtype == "F32" and shape == ([2, 32] if ".lora_A." in key else [32, 2]) and len(raw) == 4 * 64
    a = tensors["base_model.model.transformer.h.1.attn.v_proj.lora_A.weight"][2]
    assert list(struct.unpack("<64f", a)) == model.transformer.h[1].attn.v_proj.lora_A["default"].weight.flatten().tolist()

    config = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 2 and config["lora_alpha"] == 4 and config["lora_dropout"] == 0.1
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False and config["use_rslora"] is False
    assert config["modules_to_save"] is None and config["use_dora"] is False


def test_load_adapter_reads_a_hand_written_peft_directory(tmp_path):
    """Bug caught: as above, from the reading side: an adapter written as PEFT writes it, key by literal key."""
    d = tmp_path / "peft"
    d.mkdir()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "revision": None,
              "inference_mode": True, "r": 2, "lora_alpha": 6, "target_modules": ["q_proj", "v_proj"],
              "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "use_rslora": False,
              "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
              "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}
    (d / "adapter_config.json").write_text(json.dumps(config, indent=2))

    def a(k):  # (r=2, in=32), a distinct, recognisable pattern per tensor
        return [[k * 0.01 * (r + 1) + c * 0.001 for c in range(32)] for r in range(2)]

    def b(k):  # (out=32, r=2)
        return [[-k * 0.02 + o * 0.003 - r * 0.5 for r in range(2)] for o in range(32)]

    values = {
        "base_model.model.transformer.h.0.attn.q_proj.lora_A.weight": a(1),
        "base_model.model.transformer.h.0.attn.q_proj.lora_B.weight": b(2),
        "base_model.model.transformer.h.0.attn.v_proj.lora_A.weight": a(3),
        "base_model.model.transformer.h.0.attn.v_proj.lora_B.weight": b(4),
        "base_model.model.transformer.h.1.attn.q_proj.lora_A.weight": a(5),
        "base_model.model.transformer.h.1.attn.q_proj.lora_B.weight": b(6),
        "base_model.model.transformer.h.1.attn.v_proj.lora_A.weight": a(7),
        "base_model.model.transformer.h.1.attn.v_proj.lora_B.weight": b(8),
    }
    write_safetensors(d / "adapter_model.safetensors", values)

    torch.manual_seed(0)
    model = load_adapter(GPT(GPTConfig.from_name("tiny")), d)
    assert model.peft_config["default"].r == 2 and model.peft_config["default"].lora_alpha == 6
    h = model.transformer.h
    live = {
        "base_model.model.transformer.h.0.attn.q_proj.lora_A.weight": h[0].attn.q_proj.lora_A["default"].weight,
        "base_model.model.transformer.h.0.attn.q_proj.lora_B.weight": h[0].attn.q_proj.lora_B["default"].weight,
        "base_model.model.transformer.h.0.attn.v_proj.lora_A.weight": h[0].attn.v_proj.lora_A["default"].weight,
        "base_model.model.transformer.h.0.attn.v_proj.lora_B.weight": h[0].attn.v_proj.lora_B["default"].weight,
        "base_model.model.transformer.h.1.attn.q_proj.lora_A.weight": h[1].attn.q_proj.lora_A["default"].weight,
        "base_model.model.transformer.h.1.attn.q_proj.lora_B.weight": h[1].attn.q_proj.lora_B["default"].weight,
        "base_model.model.transformer.h.1.attn.v_proj.lora_A.weight": h[1].attn.v_proj.lora_A["default"].weight,
        "base_model.model.transformer.h.1.attn.v_proj.lora_B.weight": h[1].attn.v_proj.lora_B["default"].weight,
    }
    for key, weight in live.items():
        assert torch.equal(weight, torch.tensor(values[key])), key
    for i in range(2):  # nothing else was wrapped
        assert not isinstance(h[i].attn.k_proj, LoRALinear) and not isinstance(h[i].mlp.fc_in, LoRALinear)
    # and the update the layer applies is alpha / r = 3 times B @ A
    layer, x = h[1].attn.v_proj, torch.randn(1, 3, 32)
    delta = 3 * torch.tensor(values["base_model.model.transformer.h.1.attn.v_proj.lora_B.weight"]) \
        @ torch.tensor(values["base_model.model.transformer.h.1.attn.v_proj.lora_A.weight"])
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ delta.t(), rtol=1e-5, atol=1e-5)


# ---- 6. dropout follows the model's mode ----------------------------------------------------------------

def dropout_model(first_dropout):
    """A tiny eval-mode GPT with adapter "first" (q_proj, v_proj), then strong random weights."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny")).eval()
    return apply_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=first_dropout), adapter_name="first")


def assert_dropout_off_in_eval(model, adapter):
    """Two eval forwards are identical and equal to the same weights without any dropout; in train
    mode the dropout is real (so the first check could fail)."""
    strengthen(model, seed=3)
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, LoRALinear):
            m.lora_dropout[adapter] = torch.nn.Identity()
    idx = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        first, second = model(idx, all_logits=True)[0], model(idx, all_logits=True)[0]
        assert torch.equal(first, second)
        assert torch.equal(first, plain(idx, all_logits=True)[0])  # eval: as if there were no dropout at all
        model.train()
        assert not torch.equal(model(idx, all_logits=True)[0], first)


def test_a_second_adapter_added_to_an_eval_model_has_its_dropout_off():
    """Bug caught: LoRALinear.add_adapter leaving its new Dropout in train mode (new modules start in train
    mode) instead of following its layer's mode."""
    model = dropout_model(first_dropout=0.0).eval()
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5), adapter_name="second", activate=True)
    assert_dropout_off_in_eval(model, "second")


def test_apply_lora_on_an_eval_model_has_its_dropout_off():
    """The same for the first adapter, whose LoRALinear is new (it starts in train mode unless apply_lora says)."""
    model = dropout_model(first_dropout=0.5)
    assert_dropout_off_in_eval(model, "first")
