"""serve.py under load and abuse, on 127.0.0.1 only, bounded in count and time.

One real server process (a tiny base + an adapter, runtime updating on, one allowed directory)
takes a soak from 16 concurrent clients mixing valid requests (plain and streamed) with malformed,
oversized, slow (byte-at-a-time) and disconnecting ones. Afterwards: zero 5xx, every bad request a
4xx, /health answers, no handler thread left behind, RSS back near its starting level, and every
valid greedy answer identical to the same request served alone. Runtime adapter loading refuses
paths outside --allowed-lora-dir ('..', absolute paths elsewhere, symlinks out).
MINILORA_SOAK=1 (or `pytest --soak`): 10x the requests (a few thousand).
"""

import copy
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from minilora import GPT, GPTConfig
from minilora.cli import parse_args
from minilora import LoraConfig, apply_lora, save_adapter

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
    b'{"model": "base", "prompt": "x", "stream": "yes"}', b'{"model": "base", "prompt": "x", "logprobs": 5}',
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
    out, err = root / "stdout", root / "stderr"  # files, not pipes: an undrained pipe would block the server
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--init_from", str(root / "base"),
                                 "--served-model-name", "base", "--lora-modules", f"sql={root / 'sql'}", "--port", "0",
                                 "--threads", "1", "--max-num-seqs", "8", "--enable-runtime-lora-updating",
                                 "--allowed-lora-dir", str(allowed)],
                                cwd=ROOT, stdout=fo, stderr=fe, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while " on http://" not in out.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    line = out.read_text()
    if " on http://" not in line:
        proc.kill()
        pytest.fail(f"serve.py did not start: {line}{err.read_text()[-2000:]}")
    url = line.split(" on ")[1].split()[0]  # http://127.0.0.1:PORT/v1
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
