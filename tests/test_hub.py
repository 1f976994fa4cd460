"""HF-format GPT-2 checkpoints: hand-written HF layout in, identical HF layout out, loopback download.

The HF checkpoints here are written by hand from the GPT-2 layout (Conv1D (in, out) weights, fused
c_attn, causal-mask buffers), and their logits come from an independent GPT-2 forward written
directly on those tensors, so a mapping mistake cannot cancel itself out on the way in and out.
"""

import functools
import http.server
import io
import json
import math
import os
import socket
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minilora import GPT, GPTConfig, MiniloraError
from minilora.hub import TOKENIZER_FILES, write_checkpoint
from minilora.safetensors import load_file, load_sharded, read_header, save_file, save_sharded

CFG = dict(n_layer=2, n_head=2, n_embd=8, n_positions=16, vocab_size=29)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test may reach the real hub: a closed local port unless a test serves its own."""
    monkeypatch.setenv("MINILORA_HUB_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path / "cache"))
    for var in ("no_proxy", "NO_PROXY"):  # a proxy from the environment must not see loopback requests
        monkeypatch.setenv(var, "*")


def hf_config(**overrides):
    """config.json as the hub ships GPT-2 (no "minilora" block)."""
    return {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
            "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": CFG["n_positions"], **CFG,
            "resid_pdrop": 0.1, **overrides}


def hf_tensors(prefix="transformer.", seed=0):
    """GPT-2 tensors in HF layout, by hand: Conv1D weights (in, out), c_attn = [q | k | v] columns."""
    g = torch.Generator().manual_seed(seed)
    C, T, V = CFG["n_embd"], CFG["n_positions"], CFG["vocab_size"]
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    t = {"wte.weight": rand(V, C), "wpe.weight": rand(T, C), "ln_f.weight": 1 + rand(C), "ln_f.bias": rand(C)}
    for i in range(CFG["n_layer"]):
        h = f"h.{i}."
        t |= {h + "ln_1.weight": 1 + rand(C), h + "ln_1.bias": rand(C),
              h + "attn.c_attn.weight": rand(C, 3 * C), h + "attn.c_attn.bias": rand(3 * C),
              h + "attn.c_proj.weight": rand(C, C), h + "attn.c_proj.bias": rand(C),
              h + "ln_2.weight": 1 + rand(C), h + "ln_2.bias": rand(C),
              h + "mlp.c_fc.weight": rand(C, 4 * C), h + "mlp.c_fc.bias": rand(4 * C),
              h + "mlp.c_proj.weight": rand(4 * C, C), h + "mlp.c_proj.bias": rand(C),
              # the causal-mask buffers older checkpoints carry; a loader must drop them
              h + "attn.bias": torch.tril(torch.ones(T, T)).view(1, 1, T, T), h + "attn.masked_bias": torch.tensor(-1e4)}
    return {prefix + k: v for k, v in t.items()}


def write_hf(path, tensors, config=None, fmt="safetensors", shard_bytes=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config() if config is None else config))
    if shard_bytes is not None:  # model-0000i-of-0000n.safetensors + model.safetensors.index.json
        save_sharded(tensors, path, shard_bytes, metadata={"format": "pt"})
    elif fmt == "safetensors":
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    else:
        torch.save(tensors, path / "pytorch_model.bin")
    return path


def reference_logits(t, idx):
    """GPT-2's forward written straight on the HF tensors: x @ W + b Conv1Ds, explicit masked softmax."""
    t = {k.removeprefix("transformer."): v.double() for k, v in t.items()}
    C, nh = CFG["n_embd"], CFG["n_head"]
    B, T = idx.shape
    ln = lambda x, n: F.layer_norm(x, (C,), t[n + ".weight"], t[n + ".bias"], 1e-5)  # noqa: E731
    conv1d = lambda x, n: x @ t[n + ".weight"] + t[n + ".bias"]  # noqa: E731
    x = t["wte.weight"][idx] + t["wpe.weight"][:T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(CFG["n_layer"]):
        h = f"h.{i}."
        q, k, v = conv1d(ln(x, h + "ln_1"), h + "attn.c_attn").split(C, dim=-1)
        q, k, v = (z.view(B, T, nh, C // nh).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1) / math.sqrt(C // nh)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + conv1d((att @ v).transpose(1, 2).reshape(B, T, C), h + "attn.c_proj")
        m = conv1d(ln(x, h + "ln_2"), h + "mlp.c_fc")
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m**3)))  # gelu_new
        x = x + conv1d(m, h + "mlp.c_proj")
    return ln(x, "ln_f") @ t["wte.weight"].T  # tied head


IDX = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])


@pytest.mark.parametrize("prefix,fmt", [("transformer.", "safetensors"), ("", "safetensors"),
                                        ("transformer.", "bin")])
def test_load_maps_every_tensor_and_matches_reference_forward(tmp_path, prefix, fmt):
    t = hf_tensors(prefix)
    model = GPT.from_pretrained(write_hf(tmp_path / "ckpt", t, fmt=fmt))
    C, p = CFG["n_embd"], prefix
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (2, 2, 8, 16, 29)
    assert (cfg.tokenizer, cfg.bias, cfg.dropout) == ("gpt2", True, 0.0)  # plain GPT-2 config.json
    for i, blk in enumerate(model.transformer.h):
        h = f"{p}h.{i}."
        w, b = t[h + "attn.c_attn.weight"], t[h + "attn.c_attn.bias"]
        for j, proj in enumerate((blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj)):
            assert torch.equal(proj.weight, w[:, j * C:(j + 1) * C].T)  # Conv1D columns -> Linear rows
            assert torch.equal(proj.bias, b[j * C:(j + 1) * C])
        assert torch.equal(blk.attn.out_proj.weight, t[h + "attn.c_proj.weight"].T)
        assert torch.equal(blk.mlp.fc_in.weight, t[h + "mlp.c_fc.weight"].T)
        assert torch.equal(blk.mlp.fc_out.weight, t[h + "mlp.c_proj.weight"].T)
        assert torch.equal(blk.mlp.fc_out.bias, t[h + "mlp.c_proj.bias"])
        assert torch.equal(blk.ln_2.weight, t[h + "ln_2.weight"]) and torch.equal(blk.ln_1.bias, t[h + "ln_1.bias"])
    assert torch.equal(model.transformer.wpe.weight, t[p + "wpe.weight"])
    assert torch.equal(model.transformer.ln_f.bias, t[p + "ln_f.bias"])
    assert model.lm_head.weight is model.transformer.wte.weight  # re-tied after assign=True
    assert torch.equal(model.lm_head.weight, t[p + "wte.weight"])
    assert not any(p.is_meta for p in model.parameters()) and all(p.is_contiguous() for p in model.parameters())
    assert model.num_parameters() == sum(v.numel() for k, v in t.items() if not k.endswith((".attn.bias", "masked_bias")))
    assert not model.training
    logits, _ = model(IDX, all_logits=True)
    torch.testing.assert_close(logits.double(), reference_logits(t, IDX), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_save_writes_back_the_same_hf_tensors_and_logits(tmp_path, prefix):
    t = hf_tensors(prefix, seed=1)
    t[prefix + "lm_head.weight"] = t[prefix + "wte.weight"].clone()  # GPT2LMHeadModel files may carry the tied head
    model = GPT.from_pretrained(write_hf(tmp_path / "in", t))
    model.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    saved = load_file(tmp_path / "out" / "model.safetensors")
    want = {"transformer." + k.removeprefix(prefix): v for k, v in t.items()
            if not k.endswith((".attn.bias", "masked_bias", "lm_head.weight"))}
    assert sorted(saved) == sorted(want)  # always the prefix, no buffers, no lm_head (tied)
    for k in want:
        assert saved[k].shape == want[k].shape and torch.equal(saved[k], want[k]), k
    assert read_header(tmp_path / "out" / "model.safetensors")[1] == {"format": "pt"}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        assert cfg[k] == CFG[k], k
    assert cfg["n_ctx"] == CFG["n_positions"] and cfg["model_type"] == "gpt2"
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["activation_function"] == "gelu_new"
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == 50256 and cfg["torch_dtype"] == "float32"
    assert cfg["minilora"] == {"tokenizer": "gpt2", "bias": True, "dropout": 0.0}
    again = GPT.from_pretrained(tmp_path / "out")
    assert torch.equal(again(IDX, all_logits=True)[0], model(IDX, all_logits=True)[0])


@pytest.mark.parametrize("bias", [True, False])
def test_our_model_round_trips_exactly(tmp_path, bias):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", bias=bias, dropout=0.1)).eval()
    model.save_pretrained(tmp_path / "m")
    keys = set(load_file(tmp_path / "m" / "model.safetensors"))
    assert any(k.endswith(".bias") for k in keys) == bias  # bias=False: no bias tensors at all
    assert "transformer.h.1.attn.c_attn.weight" in keys and "lm_head.weight" not in keys
    loaded = GPT.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config  # tokenizer "byte", bias and dropout travel in the minilora block
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    idx = torch.randint(0, 257, (2, 12))
    assert torch.equal(loaded(idx, all_logits=True)[0], model(idx, all_logits=True)[0])
    assert GPT.from_pretrained(tmp_path / "m", dropout=0.0).config.dropout == 0.0


def test_dtype_and_overwrite_in_place(tmp_path):
    src = write_hf(tmp_path / "m", hf_tensors())
    model = GPT.from_pretrained(src, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(src)  # replaces the directory it was memory-mapped from
    assert {v.dtype for v in load_file(src / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((src / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert torch.equal(GPT.from_pretrained(src, dtype="bfloat16").transformer.wte.weight, model.transformer.wte.weight)
    with pytest.raises(MiniloraError, match="dtype"):
        GPT.from_pretrained(src, dtype=torch.int64)


def test_mismatched_tensors_are_all_named(tmp_path):
    t = hf_tensors()
    del t["transformer.h.1.ln_2.bias"]
    t["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
    t["transformer.h.0.mlp.c_fc.weight"] = t["transformer.h.0.mlp.c_fc.weight"].T.contiguous()  # Linear orientation
    t["transformer.wpe.weight"] = torch.zeros(16, 8, dtype=torch.int32)
    with pytest.raises(MiniloraError) as e:
        GPT.from_pretrained(write_hf(tmp_path / "m", t))
    msg = str(e.value)
    assert "missing tensors: transformer.h.1.ln_2.bias" in msg
    assert "unexpected tensors: transformer.h.0.attn.rotary.weight" in msg
    assert "transformer.h.0.mlp.c_fc.weight [32, 8] float32 (expected [8, 32] float)" in msg
    assert "transformer.wpe.weight [16, 8] int32" in msg and "\n" not in msg


def test_wrong_config_and_untied_head_are_refused(tmp_path):
    t = hf_tensors()
    with pytest.raises(MiniloraError, match=r"missing tensors: .*h\.2\.ln_1\.weight"):  # config says 3 layers
        GPT.from_pretrained(write_hf(tmp_path / "a", t, hf_config(n_layer=3)))
    t["lm_head.weight"] = torch.zeros_like(t["transformer.wte.weight"])
    with pytest.raises(MiniloraError, match="lm_head.weight differs from wte.weight"):
        GPT.from_pretrained(write_hf(tmp_path / "b", t))


@pytest.mark.parametrize("config,match", [
    (hf_config(n_embd=None), "field 'n_embd' must be int"),
    ({k: v for k, v in hf_config().items() if k != "n_head"}, "missing field 'n_head'"),
    (hf_config(n_layer="2"), "field 'n_layer' must be int"),
    (hf_config(vocab_size=True), "field 'vocab_size' must be int"),
    (hf_config(activation_function="relu"), "field 'activation_function' is 'relu'"),
    (hf_config(model_type="bert"), "model_type 'bert' is not supported"),
    (hf_config(n_embd=9), "n_embd .9. must be divisible by n_head"),
    (hf_config(minilora={"tokenizer": "klingon"}), "unknown tokenizer 'klingon'"),
    (hf_config(minilora={"bias": "yes"}), "'minilora'.*field 'bias' must be bool"),
    ([1, 2], "must hold a JSON object"),
])
def test_bad_config_json_names_the_field(tmp_path, config, match):
    with pytest.raises(MiniloraError, match=match):
        GPT.from_pretrained(write_hf(tmp_path / "m", hf_tensors(), config))


def test_bad_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MiniloraError, match="needs config.json"):
        GPT.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(MiniloraError, match="not valid JSON"):
        GPT.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(hf_config()))
    with pytest.raises(MiniloraError, match="has no model.safetensors, model.safetensors.index.json or pytorch_model.bin$"):
        GPT.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "pytorch_model.bin.index.json").write_text("{}")
    with pytest.raises(MiniloraError, match="sharded pytorch_model.bin checkpoints are not supported"):
        GPT.from_pretrained(tmp_path / "empty")
    os.remove(tmp_path / "empty" / "pytorch_model.bin.index.json")
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(MiniloraError, match="cannot read .*pytorch_model.bin"):
        GPT.from_pretrained(tmp_path / "empty")
    with pytest.raises(MiniloraError, match="is a file"):
        GPT.from_pretrained(tmp_path / "empty" / "config.json")
    for bad in ("./no/such/dir", "a/b/c", "../gpt2", ""):
        with pytest.raises(MiniloraError, match="neither an existing directory nor a model name"):
            GPT.from_pretrained(bad)


class FakeLoRA(nn.Module):
    """Stands in for minilora.lora.LoRALinear: what save_pretrained must detect is `base_layer`."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base

    def forward(self, x):
        return self.base_layer(x)


def test_save_refuses_lora_layers_and_foreign_files(tmp_path):
    model = GPT(GPTConfig.from_name("tiny"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(MiniloraError, match="holds files save_pretrained did not write .notes.txt"):
        model.save_pretrained(tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    model.transformer.h[1].attn.v_proj = FakeLoRA(model.transformer.h[1].attn.v_proj)
    with pytest.raises(MiniloraError, match=r"LoRA layers \(transformer.h.1.attn.v_proj\).*merge_and_unload"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- the loopback hub ----------------------------------------------------------------------------

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An http.server on 127.0.0.1 serving {name}/resolve/main/{file} from a directory; counts requests."""
    root = tmp_path / "hub"
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if "/broken/" in self.path and self.path.endswith(".safetensors") and (root / self.path.lstrip("/")).is_file():
                data = (root / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))  # promise everything, send half, hang up
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    # a short poll interval: shutdown() waits up to one interval, 0.5 s by default, in every test's teardown
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    monkeypatch.setenv("MINILORA_HUB_URL", f"http://127.0.0.1:{server.server_address[1]}/")

    def publish(name, tensors, shard_bytes=None):
        return write_hf(root / name / "resolve" / "main", tensors, shard_bytes=shard_bytes)

    yield publish, requests
    server.shutdown()
    server.server_close()


def cache_files(tmp_path):
    return sorted(str(p.relative_to(tmp_path / "cache")) for p in (tmp_path / "cache").rglob("*") if p.is_file())


OPTIONAL = TOKENIZER_FILES  # fetched when the hub has them; 404 is fine


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_download_then_reuse_cache(tmp_path, hub, monkeypatch):
    publish, requests = hub
    t = hf_tensors("")  # the hub's gpt2 file has GPT2Model names, no "transformer."
    publish("tiny-test/model", t)
    stderr = FakeTTY()
    monkeypatch.setattr("sys.stderr", stderr)
    model = GPT.from_pretrained("tiny-test/model")
    assert requests == [f"/tiny-test/model/resolve/main/{f}" for f in ("config.json", *OPTIONAL, "model.safetensors")]
    assert cache_files(tmp_path) == ["tiny-test/model/config.json", "tiny-test/model/model.safetensors"]
    size = os.path.getsize(tmp_path / "cache/tiny-test/model/model.safetensors")
    assert stderr.getvalue().endswith(f"\rdownloading model.safetensors: {size / 1e6:.1f}/{size / 1e6:.1f} MB\n")
    torch.testing.assert_close(model(IDX, all_logits=True)[0].double(), reference_logits(t, IDX), atol=1e-5, rtol=1e-5)
    again = GPT.from_pretrained("tiny-test/model")
    assert len(requests) == 2 + len(OPTIONAL)  # served from the cache: no request at all, not even for the files the hub lacks
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)


def test_download_errors_leave_no_partial_files(tmp_path, hub):
    publish, requests = hub
    with pytest.raises(MiniloraError, match="no such model on the hub: tiny-test/missing"):
        GPT.from_pretrained("tiny-test/missing")
    assert cache_files(tmp_path) == []
    publish("tiny-test/broken", hf_tensors())
    with pytest.raises(MiniloraError, match=r"model.safetensors was cut short \(\d+ of \d+ bytes\)"):
        GPT.from_pretrained("tiny-test/broken")
    assert cache_files(tmp_path) == ["tiny-test/broken/config.json"]  # the torn weights never reach the cache
    publish("tiny-test/badconfig", hf_tensors())
    (tmp_path / "hub/tiny-test/badconfig/resolve/main/config.json").write_text(json.dumps(hf_config(n_head=3)))
    n = len(requests)
    with pytest.raises(MiniloraError, match="n_embd .8. must be divisible by n_head .3."):
        GPT.from_pretrained("tiny-test/badconfig")
    assert requests[n:] == ["/tiny-test/badconfig/resolve/main/config.json"]  # weights not fetched


def test_unreachable_hub(monkeypatch):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MINILORA_HUB_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(MiniloraError, match="cannot reach .*set MINILORA_HUB_URL or pass a local directory"):
        GPT.from_pretrained("gpt2")
    monkeypatch.setenv("MINILORA_HUB_URL", "ftp://example.org")
    with pytest.raises(MiniloraError, match="MINILORA_HUB_URL must start with http"):
        GPT.from_pretrained("gpt2")


# ---- sharded checkpoints -------------------------------------------------------------------------

SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_sharded_checkpoint_loads_the_same_state_dict(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    write_checkpoint(model.config, model.state_dict(), tmp_path / "one")
    write_checkpoint(model.config, model.state_dict(), tmp_path / "many")
    weights = tmp_path / "many" / "model.safetensors"
    tensors = load_file(weights)
    os.remove(weights)
    written = save_sharded(tensors, tmp_path / "many", sum(t.nbytes for t in tensors.values()) // 3,
                           metadata={"format": "pt"})
    assert len(written) >= 4 and written[-1].endswith("model.safetensors.index.json")  # 3+ shards and the index
    sd, want = GPT.from_pretrained(tmp_path / "many").state_dict(), GPT.from_pretrained(tmp_path / "one").state_dict()
    assert sd.keys() == want.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v) and torch.equal(want[k], v), k
    (tmp_path / "many" / written[0]).unlink()  # a shard gone: named, not a confusing "missing tensors"
    with pytest.raises(MiniloraError, match=r"shard file.s. missing from .*many: model-00001-of-0000\d.safetensors"):
        GPT.from_pretrained(tmp_path / "many")


def test_download_sharded_model(tmp_path, hub):
    publish, requests = hub
    t = hf_tensors()
    src = publish("tiny-test/sharded", t, shard_bytes=4000)
    assert sorted(os.listdir(src)) == ["config.json", *SHARDS, "model.safetensors.index.json"]  # no model.safetensors
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    model = GPT.from_pretrained("tiny-test/sharded")
    base = "/tiny-test/sharded/resolve/main/"
    assert requests == [base + f for f in ("config.json", *OPTIONAL, "model.safetensors",  # 404 -> the index
                                           "model.safetensors.index.json", *SHARDS)]
    cache = tmp_path / "cache" / "tiny-test" / "sharded"
    assert cache_files(tmp_path) == sorted(f"tiny-test/sharded/{f}" for f in (
        "config.json", "tokenizer_config.json", "model.safetensors.index.json", *SHARDS))
    assert json.loads((cache / "tokenizer_config.json").read_text()) == {"eos_token": "<|endoftext|>"}
    cached = load_sharded(cache / "model.safetensors.index.json")
    assert cached.keys() == t.keys() and all(torch.equal(cached[k], v) for k, v in t.items())
    torch.testing.assert_close(model(IDX, all_logits=True)[0].double(), reference_logits(t, IDX), atol=1e-5, rtol=1e-5)
    n = len(requests)
    GPT.from_pretrained("tiny-test/sharded")
    assert len(requests) == n  # everything from the cache


def test_missing_shard_on_the_hub_then_resume(tmp_path, hub):
    publish, requests = hub
    src = publish("tiny-test/gap", hf_tensors(), shard_bytes=4000)
    saved = (src / SHARDS[1]).read_bytes()
    (src / SHARDS[1]).unlink()
    with pytest.raises(MiniloraError, match=f"hub model tiny-test/gap: model.safetensors.index.json names {SHARDS[1]}, "
                                            f"but .*/{SHARDS[1]} returned 404"):
        GPT.from_pretrained("tiny-test/gap")
    assert cache_files(tmp_path) == sorted(f"tiny-test/gap/{f}" for f in (
        "config.json", "model.safetensors.index.json", SHARDS[0]))  # nothing partial, no temporary file
    (src / SHARDS[1]).write_bytes(saved)
    n = len(requests)
    GPT.from_pretrained("tiny-test/gap")
    # complete files are skipped, the cached index stands for model.safetensors; optional 404s are asked again
    assert [r.rsplit("/", 1)[1] for r in requests[n:]] == [*OPTIONAL, *SHARDS[1:]]


def test_interrupted_shard_leaves_no_partial_file(tmp_path, hub):
    publish, _ = hub
    publish("sharded/broken", hf_tensors(), shard_bytes=4000)  # the server cuts every .safetensors in half
    with pytest.raises(MiniloraError, match=f"{SHARDS[0]} was cut short"):
        GPT.from_pretrained("sharded/broken")
    assert cache_files(tmp_path) == ["sharded/broken/config.json", "sharded/broken/model.safetensors.index.json"]


def test_hub_index_naming_a_path_fetches_nothing_outside(tmp_path, hub):
    publish, requests = hub
    src = publish("tiny-test/evil", hf_tensors(), shard_bytes=4000)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.wte.weight"] = "../../../escape.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MiniloraError, match="maps to '../../../escape.safetensors', which is not a plain"):
        GPT.from_pretrained("tiny-test/evil")
    assert requests[-1].endswith("/model.safetensors.index.json")  # no shard was requested
    assert not any(".safetensors" in p.name and "index" not in p.name for p in (tmp_path / "cache").rglob("*"))


def test_hub_without_safetensors_weights(tmp_path, hub):
    publish, _ = hub
    src = publish("tiny-test/binonly", hf_tensors())
    (src / "model.safetensors").unlink()
    with pytest.raises(MiniloraError, match="hub model tiny-test/binonly has neither model.safetensors nor "
                                            "model.safetensors.index.json"):
        GPT.from_pretrained("tiny-test/binonly")
