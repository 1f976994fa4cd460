"""serve.py under load and abuse, on 127.0.0.1 only, bounded in count and time.

One real server process (a tiny base + an adapter, runtime updating on, one allowed directory)
takes a soak from 16 concurrent clients mixing valid requests (plain and streamed) with malformed,
oversized, slow (byte-at-a-time) and disconnecting ones. Afterwards: zero 5xx, every bad request a
4xx, /health answers, no handler thread left behind, RSS back near its starting level, and every
valid greedy answer identical to the same request served alone. Runtime adapter loading refuses
paths outside --allowed-lora-dir ('..', absolute paths elsewhere, symlinks out).
A second server (3 adapters, --max-loras 2 --max-cpu-loras 2: evicted and re-read all along) takes 64 clients
mixing innocent greedy requests with poisoned ones (tiny temperatures, a lora_alpha=1e300 runtime load, an
adapter whose files vanished after it was evicted, malformed bodies): innocent answers must not change.
MINILORA_SOAK=1 (or `pytest --soak`): 10x the requests (a few thousand).
"""

import copy
import json
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from minilora import GPT, GPTConfig
from minilora.cli import parse_args
from minilora import LoraConfig, apply_lora, save_adapter

from scripts import random_adapter, serve_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import serve  # noqa: E402  (the script, for its defaults)

SOAK = 10 if os.environ.get("MINILORA_SOAK", "0") not in ("", "0") else 1
REQUESTS, CLIENTS = 480 * SOAK, 16

VALID = [  # greedy, so each has exactly one right answer
    {"model": "base", "prompt": "Hello", "max_tokens": 8, "temperature": 0},
    {"model": "sql", "prompt": "SELECT name FROM", "max_tokens": 8, "temperature": 0},
    {"model": "sql", "prompt": "a", "max_tokens": 12, "temperature": 0, "stream": True},
    {"model": "base", "prompt": ["The quick brown fox", "12345"], "max_tokens": 6, "temperature": 0},
    {"model": "sql", "prompt": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0, "n": 2},
    {"model": "base", "prompt": "stop at a space please", "max_tokens": 10, "temperature": 0, "stop": [" "],
     "stream": True},
]
BAD_BODIES = [  # each must get a 4xx, never reach the model, never a 5xx
    b"{", b"[]", b"null", b'"text"', b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b'{"prompt": "x"}', b'{"model": 1, "prompt": "x"}', b'{"model": "nope", "prompt": "x"}',
    b'{"model": "base", "prompt": "x", "max_tokens": -1}', b'{"model": "base", "prompt": "x", "max_tokens": 1e9}',
    b'{"model": "base", "prompt": "x", "max_tokens": 99999999999999999999999}',
    b'{"model": "base", "prompt": "' + b"y" * 200 + b'"}', b'{"model": "base", "prompt": [300, 1]}',
    b'{"model": "base", "prompt": "x", "temperature": "hot"}', b'{"model": "base", "prompt": "x", "n": 1000}',
    b'{"model": "base", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', b'{"model": "base", "prompt": []}',
    b'{"model": "base", "prompt": "x", "stream": "yes"}', b'{"model": "base", "prompt": "x", "logprobs": 500}',
    b'{"model": "base", "prompt": "x", "seed": -5}', b'{"model": "base", "prompt": {"a": 1}}',
]


def request(method, path, body=b"", headers=None):
    head = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def exchange(port, data, slow=0.0, read=True, timeout=30):
    """Send raw bytes (one at a time with `slow` seconds between them); -> (status, body) or None if not read."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            if slow:
                for i in range(len(data)):
                    s.sendall(data[i:i + 1])
                    time.sleep(slow)
            else:
                s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413, 431) and closed before taking everything: read that answer
        if not read:
            return None
        chunks = []
        while chunk := s.recv(65536):  # the server speaks HTTP/1.0: the response ends when it closes
            chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.startswith(b"HTTP/"):  # http.server answers an HTTP/0.9-style request line with a bare HTML page
        return int(re.search(rb"Error code: (\d+)", raw)[1]), raw
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def answer(body):
    """The texts and finish reasons of a JSON or server-sent-events completion: comparable across both."""
    if body.startswith(b"data: "):
        events = [line[6:] for line in body.decode().split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]", "a stream must end with data: [DONE]"
        texts, finish = {}, {}
        for chunk in map(json.loads, events[:-1]):
            for c in chunk["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                finish[c["index"]] = c["finish_reason"] or finish.get(c["index"])
        return [(texts[i], finish[i]) for i in sorted(texts)]
    return [(c["text"], c["finish_reason"]) for c in json.loads(body)["choices"]]


def proc_status(pid):
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])  # MiB, count


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak")
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_name("tiny"))
    base.save_pretrained(root / "base")
    allowed, outside = root / "allowed", root / "outside"
    for path, r, targets in ((root / "sql", 4, ["q_proj", "v_proj", "fc_in"]), (allowed / "poem", 2, ["v_proj"]),
                             (outside / "evil", 2, ["q_proj"]), (allowed / "nan", 2, ["q_proj"])):
        model = apply_lora(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                           init_lora_weights=False))
        if path.name == "nan":  # well-formed, but every logit it touches turns NaN
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))
        save_adapter(model, path)
    os.symlink(outside / "evil", allowed / "link")  # a directory symlink pointing out
    os.makedirs(allowed / "sneaky")  # a real directory inside whose weights are a symlink out
    (allowed / "sneaky" / "adapter_config.json").write_bytes((outside / "evil" / "adapter_config.json").read_bytes())
    os.symlink(outside / "evil" / "adapter_model.safetensors", allowed / "sneaky" / "adapter_model.safetensors")
    proc, url = serve_process(root, "--init_from", str(root / "base"), "--served-model-name", "base",
                              "--lora-modules", f"sql={root / 'sql'}", "--max-num-seqs", "8",
                              "--enable-runtime-lora-updating", "--allowed-lora-dir", str(allowed))
    err = root / "stderr"
    assert url.startswith("http://127.0.0.1:"), "the server must bind loopback by default"
    yield dict(port=int(url.split(":")[2].split("/")[0]), pid=proc.pid, root=root, allowed=allowed, outside=outside,
               stderr=err)
    proc.kill()
    proc.communicate(timeout=30)


def post(server, path, body, **kw):
    return exchange(server["port"], request("POST", path, json.dumps(body).encode()), **kw)


def test_defaults_are_loopback_and_runtime_updates_off():
    args = parse_args(serve.ServeArgs, ["--init_from", "x"])
    assert args.host == "127.0.0.1" and args.enable_runtime_lora_updating is False and args.allowed_lora_dir == []


def test_runtime_loading_refuses_paths_outside_the_allowed_dir(server):
    allowed, outside = server["allowed"], server["outside"]
    for path in [str(allowed / ".." / "outside" / "evil"), str(outside / "evil"), str(allowed / "link"),
                 str(allowed / "sneaky"), "/", "/etc", os.path.relpath(outside / "evil", ROOT), str(allowed) + "/../../"]:
        status, body = post(server, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path})
        assert status == 403 and b"outside the directories" in body, (path, status, body)
    status, body = exchange(server["port"], request("GET", "/v1/models"))
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["base", "sql"]
    # inside is fine, and unloading really removes it
    status, body = post(server, "/v1/load_lora_adapter", {"lora_name": "poem", "lora_path": str(allowed / "poem")})
    assert status == 200, body
    assert post(server, "/v1/completions", {"model": "poem", "prompt": "hi", "max_tokens": 3})[0] == 200
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "poem"})[0] == 200
    assert post(server, "/v1/completions", {"model": "poem", "prompt": "hi", "max_tokens": 3})[0] == 404


def test_runtime_loading_refuses_a_nan_adapter(server):
    """Served, its NaN logits would fail sampling for every request in the batch, not just its own."""
    status, body = post(server, "/v1/load_lora_adapter", {"lora_name": "nan", "lora_path": str(server["allowed"] / "nan")})
    assert status == 400 and b"NaN" in body, (status, body)


def test_a_slow_client_does_not_hold_the_batch(server):
    port, body = server["port"], json.dumps(VALID[0]).encode()
    alone = exchange(port, request("POST", "/v1/completions", body))
    data = request("POST", "/v1/completions", body)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
        slow.sendall(data[:-10])  # headers and most of the body, then it stalls mid-request
        assert exchange(port, request("POST", "/v1/completions", json.dumps(VALID[1]).encode()))[0] == 200
        slow.sendall(data[-10:])
        raw = b""
        while chunk := slow.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.0 200") and answer(raw.partition(b"\r\n\r\n")[2]) == answer(alone[1])


def one_client(port, seed, count, reference):
    """`count` requests of mixed kinds -> [(kind, status or None, ok)]."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        kind = rng.choices(["valid", "slow", "bad_body", "protocol", "oversized", "disconnect"],
                           weights=[40, 3, 25, 12, 8, 12])[0]
        i = rng.randrange(len(VALID))
        valid = request("POST", "/v1/completions", json.dumps(VALID[i]).encode())
        if kind in ("valid", "slow"):
            status, body = exchange(port, valid, slow=0.002 if kind == "slow" else 0.0)
            out.append((kind, status, status == 200 and answer(body) == reference[i]))
        elif kind == "bad_body":
            status, _ = exchange(port, request("POST", "/v1/completions", rng.choice(BAD_BODIES)))
            out.append((kind, status, 400 <= status < 500))
        elif kind == "protocol":
            data = rng.choice([
                request("POST", "/v1/completions", b"{}", {"Content-Length": None}),  # no length: 411
                request("POST", "/v1/completions", b"", {"Content-Length": None, "Transfer-Encoding": "chunked"}),
                request("POST", "/v1/completions", b"{}", {"Content-Length": "abc"}),
                request("GET", "/v1/completions"), request("POST", "/v1/models", b"{}"), request("GET", "/nope"),
                request("DELETE", "/v1/completions"), b"HELLO\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                request("POST", "/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "/etc"}')])
            status, _ = exchange(port, data)
            out.append((kind, status, 400 <= status < 500))
        elif kind == "oversized":
            data = rng.choice([
                request("POST", "/v1/completions", b"{" * 1000, {"Content-Length": str(64 << 20)}),  # body over the cap
                request("GET", "/health", b"", {"X-Big": "x" * 70_000}),  # one header line over http.server's limit
                request("GET", "/health", b"", {f"X-H{j}": "1" for j in range(150)}),  # too many headers
                ("GET /" + "a" * 70_000 + " HTTP/1.1\r\n\r\n").encode()])  # request line over the limit
            status, _ = exchange(port, data)
            out.append((kind, status, 400 <= status < 500))
        else:  # hang up: mid-headers, right after a full request, or after the first streamed event
            how = rng.randrange(3)
            if how < 2:
                exchange(port, valid[:rng.randrange(len(valid))] if how == 0 else valid, read=False)
            else:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                    s.sendall(request("POST", "/v1/completions", json.dumps(VALID[2]).encode()))
                    s.recv(200)
            out.append((kind, None, True))
    return out


def test_soak_16_clients_mixing_valid_and_abusive_requests(server):
    port, pid = server["port"], server["pid"]
    body = lambda i: request("POST", "/v1/completions", json.dumps(VALID[i]).encode())
    reference = [answer(exchange(port, body(i))[1]) for i in range(len(VALID))]  # each served alone
    assert all(text for ans in reference for text, _ in ans), "references should be non-empty greedy text"
    rss0, threads0 = proc_status(pid)

    t0 = time.time()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(lambda c: one_client(port, f"client-{c}", REQUESTS // CLIENTS, reference),
                                        range(CLIENTS)) for r in rs]
    took = time.time() - t0

    assert exchange(port, request("GET", "/health"))[0] == 200
    again = [answer(exchange(port, body(i))[1]) for i in range(len(VALID))]
    deadline = time.time() + 20  # handler threads of hung-up clients end once they notice
    while proc_status(pid)[1] > threads0 and time.time() < deadline:
        time.sleep(0.1)
    rss1, threads1 = proc_status(pid)

    counts = {}
    for kind, status, _ in results:
        counts.setdefault(kind, {}).setdefault(status, 0)
        counts[kind][status] += 1
    fivexx = [(kind, status) for kind, status, _ in results if status is not None and status >= 500]
    wrong = [(kind, status) for kind, status, ok in results if not ok and (kind, status) not in fivexx]
    print(f"\n[soak] {len(results)} requests from {CLIENTS} clients in {took:.1f} s, by kind and status: {counts}; "
          f"{len(fivexx)} 5xx; RSS {rss0:.0f} -> {rss1:.0f} MiB; server threads {threads0} -> {threads1}")
    assert not fivexx and not wrong, f"5xx: {fivexx[:10]}; wrong answer or status (kind, status): {wrong[:10]}"
    assert again == reference, "answers after the soak differ from before it"
    assert threads1 <= threads0, "handler threads were left behind"
    assert "Traceback" not in server["stderr"].read_text(), "the server printed tracebacks (clients hanging up?)"
    assert rss1 < rss0 * 1.5 + 64, f"RSS grew from {rss0:.0f} to {rss1:.0f} MiB"


# ---- many adapters under eviction, with poisoned requests in the mix --------------------------------------------

ADAPTERS = ["sql", "sql_orders", "text2sql"]  # served from the start; --max-cpu-loras 2, --max-loras 2: evicted, re-read
LORA_CLIENTS, PER_CLIENT, REQUEST_TIMEOUT = 64, 3 * SOAK, 30.0
LORA_VALID = [  # greedy: exactly one right answer each, the same whatever else shares the batch
    dict(prompt="SELECT name FROM users WHERE", max_tokens=10),
    dict(prompt="Hello", max_tokens=8, stream=True),
    dict(prompt=["SELECT *", "12345"], max_tokens=6),
    dict(prompt="SELECT id FROM orders", max_tokens=12, stream=True),
]
LORA_VALID = [{"model": m, **v, "temperature": 0} for m in ["base", *ADAPTERS] for v in LORA_VALID]
LORA_BAD = [  # each a 4xx
    b"{", b"null", b'{"model": "sql", "prompt": "x", "temperature": NaN}',
    b'{"model": "sql", "prompt": "x", "temperature": -Infinity}', b'{"model": "sql", "prompt": "x", "temperature": 1e39}', b'{"model": "sql", "prompt": "x", "temperature": -1e-39}',
    b'{"model": "sql", "prompt": "x", "max_tokens": 0}', b'{"model": "sql_order", "prompt": "x"}', b'{"model": "sql", "prompt": [257]}',
]
LORA_BAD_ADMIN = [  # runtime (un)loading abused: each a 4xx
    ("/v1/load_lora_adapter", b'{"lora_name": "x"}'), ("/v1/load_lora_adapter", b'{"lora_name": "sql", "lora_path": "ALLOWED/huge"}'),
    ("/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "ALLOWED/no_such_adapter"}'),
    ("/v1/load_lora_adapter", b'{"lora_name": "a.b", "lora_path": "ALLOWED/huge"}'),
    ("/v1/unload_lora_adapter", b'{"lora_name": "no_such_adapter"}'), ("/v1/unload_lora_adapter", b"[]"),
]


def strong_adapter(base, path, seed, alpha=None):
    """A random adapter on q/v/fc_in with A and B ~ N(0, 0.3): strong enough to change greedy text."""
    random_adapter(base, path, 4, seed)
    if alpha is not None:  # finite weights, but B * lora_alpha / r overflows float32
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    """serve.py with 3 adapters, 2 CPU-cache entries and 2 slots, runtime loading from one allowed directory."""
    root = tmp_path_factory.mktemp("lora_soak")
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_name("tiny"))
    with torch.no_grad():  # peaked logits (larger weights than GPT-2's init), so greedy texts vary
        for p in base.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    base.save_pretrained(root / "base")
    allowed = root / "allowed"
    for i, name in enumerate(ADAPTERS):
        strong_adapter(base, root / name, seed=100 + i)
    strong_adapter(base, allowed / "gone", seed=200)
    strong_adapter(base, allowed / "huge", seed=300, alpha=1e300)
    proc, url = serve_process(root, "--init_from", str(root / "base"), "--served-model-name", "base",
                              "--lora-modules", *[f"{n}={root / n}" for n in ADAPTERS], "--max-num-seqs", "8",
                              "--max-loras", "2", "--max-cpu-loras", "2", "--enable-runtime-lora-updating",
                              "--allowed-lora-dir", str(allowed))
    err = root / "stderr"
    port = int(url.split(":")[2].split("/")[0])
    yield dict(port=port, pid=proc.pid, allowed=allowed, stderr=err)
    proc.kill()
    proc.communicate(timeout=30)


def deadline_exchange(port, data, timeout=REQUEST_TIMEOUT):
    """Like exchange, but nothing is swallowed and the whole request has one deadline:
    -> (status, body, seconds) or (an error name: 'hang', 'reset', ..., None, seconds)."""
    t0 = time.time()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(data)
            chunks = []
            while True:
                left = t0 + timeout - time.time()
                if left <= 0:
                    raise TimeoutError
                s.settimeout(left)
                if not (chunk := s.recv(65536)):
                    break
                chunks.append(chunk)
    except (TimeoutError, socket.timeout):
        return "hang", None, time.time() - t0
    except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError, ConnectionAbortedError) as e:
        return f"reset ({type(e).__name__})", None, time.time() - t0
    raw = b"".join(chunks)
    if not raw.startswith(b"HTTP/"):
        return f"not HTTP: {raw[:60]!r}", None, time.time() - t0
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body, time.time() - t0


def completion(body):
    return request("POST", "/v1/completions", json.dumps(body).encode())


def stream_error(body):
    """The error object of a server-sent-events stream that carries one (and no text), else None."""
    if not body.startswith(b"data: "):
        return None
    events = [e[6:] for e in body.decode().split("\n\n") if e.startswith("data: ")]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    errors = [c["error"] for c in chunks if "error" in c]
    texts = [ch["text"] for c in chunks for ch in c.get("choices", [])]
    return errors[0] if errors and not "".join(texts) and events[-1] == "[DONE]" else None


def lora_client(port, allowed, c, reference, start):
    """PER_CLIENT requests mixing innocent greedy ones and poisoned ones -> [(kind, status, ok, seconds)]."""
    rng = random.Random(f"lora-client-{c}")
    start.wait()
    out = []
    for j in range(PER_CLIENT):
        kind = rng.choices(["innocent", "tiny_temperature", "huge_alpha", "vanished", "malformed"],
                           weights=[50, 16, 8, 10, 16])[0]
        i = rng.randrange(len(LORA_VALID))
        if kind in ("innocent", "tiny_temperature"):
            body = dict(LORA_VALID[i])
            if kind == "tiny_temperature":
                body["temperature"] = rng.choice([1e-39, 1e-300])  # float32 rounds it to 0: must still be greedy
            status, raw, took = deadline_exchange(port, completion(body))
            try:
                ok = status == 200 and answer(raw) == reference[i]
            except (ValueError, KeyError, AssertionError):  # a stream carrying an error event instead of text
                ok = False
        elif kind == "huge_alpha":  # a unique name: were one accepted, the next must not be refused as a duplicate
            status, raw, took = deadline_exchange(port, request("POST", "/v1/load_lora_adapter", json.dumps(
                {"lora_name": f"huge_{c}_{j}", "lora_path": str(allowed / "huge")}).encode()))
            ok = status == 400 and b"overflows float32" in raw
        elif kind == "vanished":  # evicted, then its files deleted: an error for this request, quickly, never a hang
            stream = rng.random() < 0.3
            status, raw, took = deadline_exchange(port, completion({**LORA_VALID[i], "model": "gone", "stream": stream}))
            kind += "_stream" if stream else ""
            ok = (isinstance(status, int) and status >= 400 and b"gone" in raw) or \
                 (stream and status == 200 and "gone" in (stream_error(raw) or {}).get("message", ""))
        else:
            if rng.random() < 0.5:
                data = request("POST", "/v1/completions", rng.choice(LORA_BAD))
            else:
                path, body = rng.choice(LORA_BAD_ADMIN)
                data = request("POST", path, body.replace(b"ALLOWED", str(allowed).encode()))
            status, raw, took = deadline_exchange(port, data)
            ok = isinstance(status, int) and 400 <= status < 500
        out.append((kind, status, ok, took))
    return out


def test_soak_64_clients_over_evicted_adapters_with_poisoned_requests(lora_server):
    """64 clients at once, each on its own connections: innocent greedy requests on the base and 3 adapters
    (2 CPU-cache entries, 2 slots: adapters are evicted and re-read from disk all along), interleaved with
    tiny temperatures (200, greedy), runtime loads of a lora_alpha=1e300 adapter (400), requests for an
    adapter whose files were deleted after it was loaded and evicted (an error, the only 5xx allowed) and
    malformed bodies (4xx). Every innocent answer must equal the same request served alone."""
    port, allowed = lora_server["port"], lora_server["allowed"]
    status, raw, _ = deadline_exchange(port, request("POST", "/v1/load_lora_adapter", json.dumps(
        {"lora_name": "gone", "lora_path": str(allowed / "gone")}).encode()))
    assert status == 200, raw
    reference = []  # each alone; this also pushes 'gone' (never used, so in no slot) out of the 2-entry CPU cache
    for body in LORA_VALID:
        status, raw, _ = deadline_exchange(port, completion(body))
        assert status == 200, (body, raw)
        reference.append(answer(raw))
    assert all(text for ans in reference for text, _ in ans), "references should be non-empty greedy text"
    per_model = {m: [r for b, r in zip(LORA_VALID, reference) if b["model"] == m] for m in ["base", *ADAPTERS]}
    changed = [m for m in ADAPTERS if per_model[m] != per_model["base"]]
    assert len(changed) >= 2, f"adapters too weak to change greedy text: only {changed} do"
    shutil.rmtree(allowed / "gone")
    status, raw, took = deadline_exchange(port, completion({**LORA_VALID[0], "model": "gone"}))
    assert isinstance(status, int) and status >= 400 and b"gone" in raw and took < 5, (status, raw, took)

    start = threading.Barrier(LORA_CLIENTS, timeout=60)
    t0 = time.time()
    with ThreadPoolExecutor(LORA_CLIENTS) as pool:
        results = [r for rs in pool.map(lambda c: lora_client(port, allowed, c, reference, start), range(LORA_CLIENTS))
                   for r in rs]
    took = time.time() - t0
    health = deadline_exchange(port, request("GET", "/health"))[0]
    again = [answer(deadline_exchange(port, completion(b))[1]) for b in LORA_VALID]

    counts, slowest = {}, {}
    for kind, status, _, seconds in results:
        counts.setdefault(kind, {}).setdefault(status, 0)
        counts[kind][status] += 1
        slowest[kind] = max(slowest.get(kind, 0), seconds)
    vanished = ("vanished", "vanished_stream")
    broken = [(k, s) for k, s, _, _ in results if not isinstance(s, int)]  # resets, refusals, hangs, garbage
    fivexx = [(k, s) for k, s, _, _ in results if isinstance(s, int) and s >= 500 and k not in vanished]
    wrong = [(k, s) for k, s, ok, _ in results if not ok and isinstance(s, int)]
    print(f"\n[lora soak] {len(results)} requests from {LORA_CLIENTS} clients in {took:.1f} s; by kind and status: "
          f"{counts}; slowest (s): { {k: round(v, 2) for k, v in slowest.items()} }; "
          f"{sum(1 for k, s, _, _ in results if k in vanished and isinstance(s, int) and s >= 500)} vanished-adapter 5xx, "
          f"{len(fivexx)} other 5xx, {len(broken)} resets/refusals/hangs; adapters changing the base's greedy text: {changed}")
    assert {"innocent", "tiny_temperature", "huge_alpha", "malformed"} <= set(counts) and set(vanished) & set(counts)
    assert not broken, f"connection resets, refusals or hangs: {broken[:10]}"
    assert not fivexx, f"5xx other than the vanished adapter's: {fivexx[:10]}"
    assert not wrong, f"wrong answer or status (kind, status): {wrong[:10]}"
    assert health == 200
    assert again == reference, "answers after the soak differ from before it"
    assert "Traceback" not in lora_server["stderr"].read_text(), "the server printed tracebacks"
