"""The continuous-batching engine and the OpenAI-compatible server, with a real HTTP client on 127.0.0.1."""

import copy
import http.client
import json
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from minilora import GPT, GPTConfig, MiniloraError
from minilora.generation import generate
from minilora import merge_and_unload
from minilora.registry import AdapterRegistry
from minilora.openai_server import App, Server
from minilora.serving import Engine, Request, Sampling
from minilora.tokenizer import get_tokenizer

from scripts import random_adapter

TOK = get_tokenizer("byte")


def make_adapter(base, path, r, seed, targets=("q_proj", "v_proj", "fc_in")):
    """Save a random (non-zero B) adapter for `base` to `path`; return base + adapter merged."""
    return merge_and_unload(random_adapter(base, path, r, seed, targets)).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_name("tiny")).eval()
    root = tmp_path_factory.mktemp("serve")
    allowed = root / "allowed"
    merged = {"sql": make_adapter(base, root / "sql", 4, 1), "quotes": make_adapter(base, root / "quotes", 8, 2),
              "poems": make_adapter(base, allowed / "poems", 2, 3, ("v_proj",)),
              "poems2": make_adapter(base, allowed / "poems2", 2, 4, ("v_proj",))}
    model = copy.deepcopy(base)
    reg = AdapterRegistry(model, max_loras=2, max_cpu_loras=4, max_lora_rank=8)
    reg.add("sql", root / "sql")
    reg.add("quotes", root / "quotes")
    engine = Engine(model, TOK, reg, max_num_seqs=16).start()
    server = Server(App(engine, "tiny-base", runtime_updates=True, allowed_dirs=[allowed]), port=0).start()
    off = Server(App(engine, "tiny-base"), port=0).start()  # the same engine, runtime updating off
    yield dict(base=base, merged=merged, root=root, allowed=allowed, engine=engine, server=server, off=off)
    off.shutdown()
    off.server_close()
    server.close()


def call(server, method, path, body=None, raw=None, headers=None):
    """-> (status, parsed JSON or text). `raw` sends bytes as they are."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


def raw_status(server, data):
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(data)
        return sock.recv(4096).split(b" ")[1]


def complete(server, **body):
    return call(server, "POST", "/v1/completions", {"max_tokens": 8, "temperature": 0, **body})


def reference(model, prompt, n):
    """Greedy tokens from minilora.generation on a model with the adapter merged: what one request alone gets."""
    ids = TOK.encode(prompt)
    out = generate(model, [ids], n, temperature=0, eot_token=TOK.eot_token, tokenizer=TOK)
    return out.texts[0]


# ---- routing, shapes, streaming ------------------------------------------------------------------

def test_models_lists_base_and_adapters(setup):
    status, out = call(setup["server"], "GET", "/v1/models")
    assert status == 200 and out["object"] == "list"
    cards = {c["id"]: c for c in out["data"]}
    assert cards["tiny-base"]["parent"] is None
    assert cards["sql"]["parent"] == cards["quotes"]["parent"] == "tiny-base"
    assert call(setup["server"], "GET", "/health")[0] == 200


def test_routing_by_model_matches_each_adapter_merged(setup):
    texts = {}
    for model, ref_model in (("tiny-base", setup["base"]), ("sql", setup["merged"]["sql"]),
                             ("quotes", setup["merged"]["quotes"])):
        status, out = complete(setup["server"], model=model, prompt="SELECT", max_tokens=12)
        assert status == 200, out
        assert out["object"] == "text_completion" and out["model"] == model and out["id"].startswith("cmpl-")
        choice = out["choices"][0]
        want = generate(ref_model, [TOK.encode("SELECT")], 12, temperature=0, eot_token=TOK.eot_token, tokenizer=TOK)
        assert choice["index"] == 0 and choice["logprobs"] is None
        assert choice["finish_reason"] == want.finish_reasons[0]  # "length" unless <|endoftext|> came first
        assert out["usage"]["prompt_tokens"] == 6
        assert out["usage"]["completion_tokens"] == want.stats.new_tokens  # the eot counts, as it was sampled
        assert out["usage"]["total_tokens"] == 6 + out["usage"]["completion_tokens"]
        assert choice["text"] == reference(ref_model, "SELECT", 12) == want.texts[0]
        texts[model] = choice["text"]
    assert len(set(texts.values())) == 3  # each model answered with its own weights


def test_unknown_model_is_404_in_openai_shape(setup):
    status, out = complete(setup["server"], model="nope", prompt="x")
    assert status == 404
    err = out["error"]
    assert set(err) >= {"message", "type", "code"} and err["code"] == "model_not_found"
    assert "tiny-base" in err["message"] and "sql" in err["message"] and "quotes" in err["message"]


def test_prompt_list_n_stop_and_seed(setup):
    s = setup["server"]
    status, out = complete(s, model="sql", prompt=["ab", "cd"], n=2)
    assert status == 200 and [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["choices"][0]["text"] == out["choices"][1]["text"] == complete(s, model="sql", prompt="ab")[1]["choices"][0]["text"]
    full = complete(s, model="quotes", prompt="hi", max_tokens=12)[1]["choices"][0]["text"]
    stop = full[3:5]
    cut = complete(s, model="quotes", prompt="hi", max_tokens=12, stop=stop)[1]["choices"][0]
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"
    sampled = [complete(s, model="sql", prompt="hi", temperature=1.0, seed=7)[1]["choices"][0]["text"] for _ in range(2)]
    assert sampled[0] == sampled[1]
    ids = complete(s, model="sql", prompt=TOK.encode("SELECT"))[1]  # token ids work as a prompt too
    assert ids["choices"][0]["text"] == complete(s, model="sql", prompt="SELECT")[1]["choices"][0]["text"]


def test_streaming_sends_sse_ending_in_done(setup):
    s = setup["server"]
    conn = http.client.HTTPConnection(*s.server_address[:2], timeout=30)
    body = {"model": "quotes", "prompt": "hi", "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = [line[len("data: "):] for line in resp.read().decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == "quotes" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] >= 1 and chunks[-1]["choices"] == []
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    want = generate(setup["merged"]["quotes"], [TOK.encode("hi")], 10, temperature=0, eot_token=TOK.eot_token)
    assert chunks[-2]["choices"][0]["finish_reason"] == want.finish_reasons[0]
    assert chunks[-1]["usage"]["completion_tokens"] == want.stats.new_tokens
    assert text == complete(s, model="quotes", prompt="hi", max_tokens=10)[1]["choices"][0]["text"]


# ---- runtime adapter loading ---------------------------------------------------------------------

def test_load_unload_round_trip(setup):
    s, allowed = setup["server"], setup["allowed"]
    status, msg = call(s, "POST", "/v1/load_lora_adapter", {"lora_name": "poems", "lora_path": str(allowed / "poems")})
    assert status == 200 and "poems" in msg
    assert "poems" in {c["id"] for c in call(s, "GET", "/v1/models")[1]["data"]}
    first = complete(s, model="poems", prompt="roses", max_tokens=10)[1]["choices"][0]["text"]
    assert first == reference(setup["merged"]["poems"], "roses", 10)
    assert call(s, "POST", "/v1/load_lora_adapter", {"lora_name": "poems", "lora_path": str(allowed / "poems")})[0] == 400
    assert call(s, "POST", "/v1/unload_lora_adapter", {"lora_name": "poems"}) == (200, "Success: LoRA adapter 'poems' removed successfully.")
    assert complete(s, model="poems", prompt="roses")[0] == 404
    assert call(s, "POST", "/v1/unload_lora_adapter", {"lora_name": "poems"})[0] == 404
    # the same name again, other weights: served with the new ones
    assert call(s, "POST", "/v1/load_lora_adapter", {"lora_name": "poems", "lora_path": str(allowed / "poems2")})[0] == 200
    second = complete(s, model="poems", prompt="roses", max_tokens=10)[1]["choices"][0]["text"]
    assert second == reference(setup["merged"]["poems2"], "roses", 10) and second != first
    assert call(s, "POST", "/v1/unload_lora_adapter", {"lora_name": "poems"})[0] == 200


def test_load_refuses_paths_outside_the_allowed_dirs(setup):
    s, allowed, root = setup["server"], setup["allowed"], setup["root"]
    for path in (root / "sql", allowed / ".." / "sql"):
        status, out = call(s, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(path)})
        assert status == 403 and "outside" in out["error"]["message"]
    link = allowed / "link"
    if not link.exists():
        os.symlink(root / "sql", link)
    assert call(s, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(link)})[0] == 403
    status, out = call(s, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(allowed / "missing")})
    assert status == 400 and "does not exist" in out["error"]["message"]
    assert call(setup["off"], "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(allowed / "poems")})[0] == 404
    assert "x" not in setup["engine"].registry.names()
    with pytest.raises(MiniloraError, match="--allowed-lora-dir"):
        App(setup["engine"], "b", runtime_updates=True)


# ---- bad input -----------------------------------------------------------------------------------

BAD_BODIES = [
    ({"model": "sql", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "sql", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "sql", "prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ({"model": "sql", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "sql", "prompt": 5}, 400, "prompt"),
    ({"model": "sql", "prompt": [300]}, 400, "vocabulary"),
    ({"model": "sql"}, 400, "prompt"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": 3, "prompt": "x"}, 400, "model"),
    ({"model": "sql", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "sql", "prompt": "x", "stop": [""]}, 400, "stop"),
    ({"model": "sql", "prompt": "x", "n": 0}, 400, "'n'"),
    ({"model": "sql", "prompt": "x" * 60, "max_tokens": 8}, 400, "maximum context length is 64"),
    ({"model": "sql", "prompt": "x", "logprobs": 99}, 400, "logprobs"),
    (["not", "an", "object"], 400, "JSON object"),
]


@pytest.mark.parametrize("body,status,words", BAD_BODIES)
def test_bad_bodies_get_4xx(setup, body, status, words):
    got, out = call(setup["server"], "POST", "/v1/completions", body)
    assert got == status and words in out["error"]["message"], out


def test_bad_requests_get_4xx(setup):
    s = setup["server"]
    got, out = call(s, "POST", "/v1/completions", raw=b"{not json")
    assert got == 400 and "not valid JSON" in out["error"]["message"]
    assert call(s, "POST", "/v1/completions", raw=b"\xff\xfe")[0] == 400
    # an oversized body is refused from its Content-Length, before a byte of it is read
    assert raw_status(s, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n{") == b"413"
    assert call(s, "GET", "/v1/completions")[0] == 405
    assert call(s, "GET", "/v2/nothing")[0] == 404
    # no Content-Length at all: a raw socket, since http.client always adds one
    assert raw_status(s, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n") == b"411"
    assert complete(s, model="sql", prompt="still up")[0] == 200


def test_client_disconnect_mid_stream_frees_its_row(setup):
    s, engine = setup["server"], setup["engine"]
    body = {"model": "sql", "prompt": "a", "max_tokens": 60, "temperature": 0}
    whole = complete(s, **body)[1]
    assert whole["usage"]["completion_tokens"] == 60  # left alone, this request takes 60 steps
    steps = engine.steps
    raw = json.dumps({**body, "stream": True}).encode()
    # Pause the engine right after its first step with the request in a row: a fast machine would
    # otherwise stream all 60 tokens before the client thread even runs again.
    paused, resume = threading.Event(), threading.Event()

    def step_then_pause():
        type(engine)._step(engine)
        if not paused.is_set():
            paused.set()
            resume.wait(10)
    engine._step = step_then_pause
    try:
        with socket.create_connection(s.server_address[:2], timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
            assert paused.wait(10)
        time.sleep(0.5)  # then hang up: the handler notices the closed connection while the engine is paused
    finally:
        resume.set()
        del engine._step
    deadline = time.time() + 20
    while engine.running or engine.waiting:
        assert time.time() < deadline, "the disconnected request still holds its row"
        time.sleep(0.01)
    assert engine.steps - steps < 50  # dropped early, not run to its 60 tokens
    assert len(engine.free_rows) == engine.max_num_seqs and not any(engine.registry.users)


# ---- continuous batching -------------------------------------------------------------------------

def test_concurrent_clients_get_the_same_answers_as_alone(setup):
    s, engine = setup["server"], setup["engine"]
    rng = random.Random(0)
    jobs = []
    for i in range(48):
        if i % 10 == 3:
            jobs.append(("bad", rng.choice([{"model": "sql", "prompt": "x", "max_tokens": -3},
                                            {"model": "nope", "prompt": "x"}, {"model": "sql", "prompt": None}])))
        else:
            model = rng.choice(["tiny-base", "sql", "quotes"])
            jobs.append(("ok", {"model": model, "prompt": rng.choice(["SELECT ", "Once", "a", "the quick"]),
                                "max_tokens": rng.randint(2, 16), "temperature": 0}))
    alone = {}
    for kind, body in jobs:  # served one at a time first
        key = json.dumps(body, sort_keys=True)
        if kind == "ok" and key not in alone:
            alone[key] = call(s, "POST", "/v1/completions", body)[1]["choices"][0]["text"]
    steps = engine.steps

    def client(k):
        results = []
        for kind, body in jobs[k::16]:
            status, out = call(s, "POST", "/v1/completions", body)
            results.append((kind, body, status, out))
        return results

    with ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(client, range(16)) for r in rs]
    assert len(results) == 48
    assert all(status < 500 for _, _, status, _ in results)
    for kind, body, status, out in results:
        if kind == "bad":
            assert 400 <= status < 500
        else:
            assert status == 200 and out["choices"][0]["text"] == alone[json.dumps(body, sort_keys=True)]
    assert engine.steps - steps < sum(b["max_tokens"] for k, b in jobs if k == "ok")  # rows really were batched


def test_engine_defers_when_adapters_outnumber_slots(setup):
    """Three adapters, one slot: requests wait for the slot instead of borrowing another's weights."""
    base, merged = setup["base"], setup["merged"]
    model = copy.deepcopy(base)
    reg = AdapterRegistry(model, max_loras=1)
    for name in ("sql", "quotes"):
        reg.add(name, setup["root"] / name)
    reg.add("poems", setup["allowed"] / "poems")
    engine = Engine(model, TOK, reg, max_num_seqs=4).start()
    try:
        reqs = [engine.submit(Request(name, [TOK.encode("go")], Sampling(max_tokens=6, temperature=0)))
                for name in ("sql", "quotes", "poems", "__base__", "sql")]
        texts = []
        for req in reqs:
            events = list(req)
            assert events[-1][0] == "done"
            texts.append("".join(v for k, _, v in events if k == "delta"))
        for name, text in zip(("sql", "quotes", "poems", "__base__", "sql"), texts):
            assert text == reference(base if name == "__base__" else merged[name], "go", 6)
    finally:
        engine.stop()
