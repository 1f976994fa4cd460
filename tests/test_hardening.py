"""Hardening: a failure caused by one request or one adapter affects only that request's rows, and
every bad input gets one clear error (a 4xx, or exit 2 with one line), never a 500, a hang or a traceback.

One test per finding; each was checked to fail with its fix reverted (named in its docstring).
Servers run in-process (Server(App(Engine(...))) on port 0) and scripts through their main_guard,
so the whole file takes about ten seconds.
"""

import copy
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from minilora import GPT, GPTConfig, LoraConfig, MiniloraError, apply_lora, load_adapter, save_adapter
import minilora.loading
from minilora.generation import generate, sample_next, stream_generate
from minilora.openai_server import App, Server
from minilora.registry import AdapterRegistry
from minilora.safetensors import load_file, read_header, save_file
from minilora.serving import Engine, Request, Sampling
from minilora.tokenizer import get_tokenizer

from scripts import ROOT, peaked_tiny, run_script_here

TOK = get_tokenizer("byte")
BASE = "tiny-base"


def tiny_base(seed=0):
    """A tiny GPT with peaked logits (larger weights than GPT-2's init), so greedy texts vary."""
    return peaked_tiny(seed)


def make_adapter(base, path, seed, r=4, **save):
    """A strong random adapter on q/v/fc_in saved to `path`."""
    m = apply_lora(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "fc_in"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(m, path, **save)
    return path


def edit_config(path, **changes):
    fp = os.path.join(path, "adapter_config.json")
    with open(fp) as f:
        config = json.load(f)
    config.update(changes)
    with open(fp, "w") as f:
        json.dump(config, f)


def serve(model, registry, runtime_dirs=(), max_num_seqs=8):
    engine = Engine(model, TOK, registry, max_num_seqs=max_num_seqs).start()
    return Server(App(engine, BASE, runtime_updates=bool(runtime_dirs), allowed_dirs=list(runtime_dirs)), port=0).start()


def call(server, method, path, body=None, timeout=30):
    """-> (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


def complete(server, timeout=30, **body):
    return call(server, "POST", "/v1/completions", {"max_tokens": 10, "temperature": 0, **body}, timeout=timeout)


def text_of(result):
    status, out = result
    assert status == 200, out
    return out["choices"][0]["text"]


def raw_status(server, data):
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(data)
        return int(sock.recv(4096).split(b" ")[1])


INNOCENTS = [dict(model="a", prompt="Hello there"), dict(model="b", prompt="SELECT name"),
             dict(model=BASE, prompt="abc"), dict(model="a", prompt="xyz!")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base, adapters a, b, c registered at start, an allowed dir for runtime loading, one server."""
    root = tmp_path_factory.mktemp("hardening")
    base = tiny_base()
    base.save_pretrained(root / "base")
    for i, name in enumerate("abc"):
        make_adapter(base, root / name, seed=10 + i, base_model_name_or_path=str(root / "base"))
    allowed = root / "allowed"
    allowed.mkdir()
    model = copy.deepcopy(base)
    reg = AdapterRegistry(model, max_loras=4, max_cpu_loras=8, max_lora_rank=8)
    for name in "abc":
        reg.add(name, root / name)
    server = serve(model, reg, runtime_dirs=[allowed], max_num_seqs=8)
    alone = [text_of(complete(server, **b)) for b in INNOCENTS]  # each innocent request served alone
    yield dict(root=root, base=base, allowed=allowed, server=server, alone=alone)
    server.close()


def with_innocents(server, extra, timeout=30):
    """Run `extra()` while the INNOCENTS requests run concurrently -> (extra's result, innocent results)."""
    with ThreadPoolExecutor(len(INNOCENTS) + 1) as pool:
        futures = [pool.submit(complete, server, timeout, **b) for b in INNOCENTS]
        mine = pool.submit(extra)
        return mine.result(), [f.result() for f in futures]


def assert_innocents_unaffected(world, results):
    assert [text_of(r) for r in results] == world["alone"]


# ---- 1. a tiny temperature ------------------------------------------------------------------------

def test_sample_next_tiny_temperature_is_the_argmax():
    """Reverted fix: sample_next dividing by a temperature that float32 rounds to 0 (1e-300: 0/0 = NaN),
    or before subtracting the max (1e-37 on logits near 100: inf - inf = NaN)."""
    logits = torch.randn(6, 257, generator=torch.Generator().manual_seed(0)) * 100
    g = torch.Generator().manual_seed(1)
    for t in (1e-37, 1e-39, 1e-45, 1e-300, 5e-324):
        assert torch.equal(sample_next(logits, t, generator=g), logits.argmax(-1)), t
        assert torch.equal(sample_next(logits, t, top_k=5, top_p=0.9, generator=g), logits.argmax(-1)), t


@pytest.mark.parametrize("temperature", [1e-39, 1e-300])
def test_tiny_temperature_request_is_greedy_and_fails_no_one(world, temperature):
    """Reverted fix: as above; the tiny-temperature request then failed with a 500 (NaN probabilities)."""
    s = world["server"]
    greedy = text_of(complete(s, model="c", prompt="Once upon", max_tokens=12))
    mine, others = with_innocents(s, lambda: complete(s, model="c", prompt="Once upon", max_tokens=12,
                                                      temperature=temperature))
    assert text_of(mine) == greedy
    assert_innocents_unaffected(world, others)


# ---- 2. an adapter whose scaling overflows ---------------------------------------------------------

def test_runtime_adapter_with_huge_lora_alpha_is_refused(world):
    """Reverted fix: adapter_files._check_finite's B * scaling test (finite weights, lora_alpha 1e300):
    the load succeeded and every request on it got NaN logits."""
    path = make_adapter(world["base"], world["allowed"] / "huge", seed=5)
    edit_config(path, lora_alpha=1e300)
    s = world["server"]
    (status, out), others = with_innocents(s, lambda: call(s, "POST", "/v1/load_lora_adapter",
                                                           {"lora_name": "huge", "lora_path": str(path)}))
    assert status == 400 and "overflows float32" in out["error"]["message"], out
    assert_innocents_unaffected(world, others)
    assert complete(s, model="huge", prompt="x")[0] == 404
    with pytest.raises(MiniloraError, match="overflows float32"):
        load_adapter(copy.deepcopy(world["base"]), path)


# ---- 3. an evicted adapter whose files changed ------------------------------------------------------

@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_evicted_adapter_whose_files_went_bad_fails_only_its_request(world, tmp_path, damage):
    """Reverted fix: Engine._admit's `except MiniloraError` around registry.acquire: the re-read error
    reached the scheduler loop, which failed every running request and retried the bad one forever."""
    for name in ("gone", "b", "c"):
        shutil.copytree(world["root"] / ("a" if name == "gone" else name), tmp_path / name)
    model = copy.deepcopy(world["base"])
    reg = AdapterRegistry(model, max_loras=2, max_cpu_loras=2, max_lora_rank=8)
    for name in ("gone", "b", "c"):
        reg.add(name, tmp_path / name)
    assert "gone" not in reg.cpu  # evicted from the CPU cache: the next request re-reads it
    if damage == "delete":
        shutil.rmtree(tmp_path / "gone")
    else:
        fp = tmp_path / "gone" / "adapter_model.safetensors"
        fp.write_bytes(fp.read_bytes()[:200])
    server = serve(model, reg, max_num_seqs=4)
    try:
        jobs = [dict(model="b", prompt="SELECT name"), dict(model="c", prompt="Hello"), dict(model=BASE, prompt="abc")]
        alone = [text_of(complete(server, **j)) for j in jobs]
        t0 = time.time()
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(complete, server, 10, **j) for j in jobs]
            status, out = complete(server, 10, model="gone", prompt="x")
            assert [text_of(f.result()) for f in futures] == alone
        assert status >= 400 and "gone" in out["error"]["message"] and time.time() - t0 < 5
        assert [text_of(complete(server, 10, **j)) for j in jobs] == alone  # and the engine goes on serving
    finally:
        server.close()


def test_evicted_runtime_adapter_replaced_by_a_symlink_out_is_refused_on_reread(world, tmp_path):
    """Reverted fix: the registry passing the server's check refusal (an ApiError, no MiniloraError) on
    to the scheduler loop: every running request failed and the request hung."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    for name in ("r", "b", "c"):
        shutil.copytree(world["root"] / ("a" if name == "r" else name), allowed / name)
    shutil.copytree(world["root"] / "a", outside / "r")  # a valid adapter, but outside the allowed dir
    model = copy.deepcopy(world["base"])
    reg = AdapterRegistry(model, max_loras=2, max_cpu_loras=2, max_lora_rank=8)
    server = serve(model, reg, runtime_dirs=[allowed], max_num_seqs=4)
    try:
        for name in ("r", "b", "c"):
            assert call(server, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(allowed / name)})[0] == 200
        assert "r" not in reg.cpu and "r" not in reg.slot_of  # the next request re-reads it
        shutil.rmtree(allowed / "r")
        os.symlink(outside / "r", allowed / "r")
        jobs = [dict(model="b", prompt="SELECT name"), dict(model="c", prompt="Hello"), dict(model=BASE, prompt="abc")]
        alone = [text_of(complete(server, **j)) for j in jobs]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(complete, server, 10, **j) for j in jobs]
            status, out = complete(server, 10, model="r", prompt="x")
            assert [text_of(f.result()) for f in futures] == alone
        assert status >= 400 and "outside the directories" in out["error"]["message"], out
        assert "r" not in reg.cpu
        assert [text_of(complete(server, 10, **j)) for j in jobs] == alone
    finally:
        server.close()


# ---- 4. many clients at once -------------------------------------------------------------------------

def test_64_concurrent_clients_are_all_served(world):
    """Reverted fix: Server.request_queue_size (http.server's listen backlog of 5): connections past it
    were dropped or reset under a burst."""
    s, n = world["server"], 64
    start = threading.Barrier(n)

    def client(i):
        start.wait()
        try:
            return complete(s, 20, model="ab"[i % 2], prompt=f"hi {i}", max_tokens=1)[0]
        except OSError as e:  # ConnectionResetError, BrokenPipeError, timeouts
            return type(e).__name__

    t0 = time.time()
    with ThreadPoolExecutor(n) as pool:
        statuses = list(pool.map(client, range(n)))
    assert statuses == [200] * n, statuses
    assert time.time() - t0 < 5


# ---- 5. malformed requests: 4xx, never 500 -------------------------------------------------------

@pytest.mark.parametrize("route", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"], ids=["route_load", "route_unload"])
@pytest.mark.parametrize("body", [[], None, "x"], ids=["list", "null", "string"])
def test_load_unload_non_object_bodies_are_4xx(world, route, body):
    """Reverted fix: App.load / App.unload calling body.get on a list, null or string (a 500)."""
    conn = http.client.HTTPConnection(*world["server"].server_address[:2], timeout=10)
    conn.request("POST", route, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    status = conn.getresponse().status
    conn.close()
    assert 400 <= status < 500


def test_lora_path_with_nul_or_under_proc_is_4xx_and_says_nothing_about_existence(world):
    """Reverted fix: the NUL test in App.load (os.path.realpath raising ValueError: a 500), and App._allowed
    refusing before it looks at the path (the answer told whether a /proc path exists)."""
    s = world["server"]
    status, out = call(s, "POST", "/v1/load_lora_adapter", {"lora_name": "n", "lora_path": str(world["allowed"]) + "/a\u0000b"})
    assert status == 400, out
    answers = {}
    for path in ("/proc/self", "/proc/self/no_such_file", "/proc/1/root"):
        status, out = call(s, "POST", "/v1/load_lora_adapter", {"lora_name": "p", "lora_path": path})
        assert status == 403, out
        answers[path] = out["error"]["message"].replace(path, "PATH")
    assert len(set(answers.values())) == 1, answers


def test_non_ascii_digit_content_length_is_400(world):
    """Reverted fix: Handler._json's isascii/isdigit test ("²".isdigit() is True, int("²") raises: a 500).
    Header bytes are read as latin-1: b"\\xb2" is "²", and "²" typed in UTF-8 arrives as "Â²"."""
    for route in (b"/v1/completions", b"/v1/load_lora_adapter"):
        for size in (b"\xb2", "²".encode()):
            head = b"POST " + route + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
            assert raw_status(world["server"], head + size + b"\r\n\r\n{}") == 400, (route, size)


# ---- 6. adapter files with non-float tensors ------------------------------------------------------

@pytest.mark.parametrize("dtype,header", [(torch.float8_e4m3fn, "F8_E4M3"), (torch.int32, "I32"), (torch.bool, "BOOL")])
def test_non_float_adapter_tensors_are_refused_naming_the_dtype(world, tmp_path, dtype, header):
    """Reverted fix: read_adapter's dtype test (copy_ silently cast ints, bools and float8 into the weights)."""
    path = tmp_path / "ad"
    shutil.copytree(world["root"] / "a", path)
    fp = path / "adapter_model.safetensors"
    tensors = load_file(fp)
    save_file({k: (t * 4).round().to(dtype) if dtype != torch.bool else t > 0 for k, t in tensors.items()}, fp)
    assert {v["dtype"] for v in read_header(fp)[0].values() if isinstance(v, dict) and "dtype" in v} == {header}
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(MiniloraError) as direct:
        load_adapter(copy.deepcopy(world["base"]), path)
    reg = AdapterRegistry(copy.deepcopy(world["base"]), max_loras=1, max_lora_rank=8)
    with pytest.raises(MiniloraError) as served:
        reg.add("bad", path)
    message = str(direct.value)
    assert message == str(served.value) and "\n" not in message
    assert f"is {name} " in message and "expected float16, bfloat16, float32 or float64" in message
    assert reg.names() == []


# ---- 7. a scheduler error is logged --------------------------------------------------------------------

def test_scheduler_error_is_logged_with_a_traceback(world, capsys):
    """Reverted fix: Engine._loop's traceback.print_exc() (the error was swallowed: nothing to debug with)."""
    model = copy.deepcopy(world["base"])
    engine = Engine(model, TOK, AdapterRegistry(model, max_loras=1), max_num_seqs=2).start()
    real, raised = engine._step, []

    def step_once_broken():
        if not raised:
            raised.append(1)
            raise RuntimeError("injected scheduler failure")
        return real()

    engine._step = step_once_broken
    try:
        req = engine.submit(Request("__base__", [TOK.encode("hi")], Sampling(max_tokens=4, temperature=0)))
        while (event := req.events.get(timeout=10))[0] == "delta":  # the prefill ran: its first token came
            pass
        kind, status, message = event
        assert (kind, status) == ("error", 500) and "injected scheduler failure" in message
        after = engine.submit(Request("__base__", [TOK.encode("hi")], Sampling(max_tokens=4, temperature=0)))
        assert [e[0] for e in after][-1] == "done"  # the engine goes on
    finally:
        engine.stop()
    err = capsys.readouterr().err
    assert "minilora scheduler error" in err and "Traceback (most recent call last)" in err
    assert "RuntimeError: injected scheduler failure" in err and "step_once_broken" in err


# ---- 8. an adapter naming a base it must not be loaded from -----------------------------------------------

@pytest.mark.parametrize("script", ["generate.py", "merge.py"])
@pytest.mark.parametrize("named", ["gpt3-175b", "scratch:gpt2-xl", 12, ["x"]], ids=["gpt3", "scratch", "int", "list"])
def test_adapter_naming_a_preset_or_non_string_base_is_refused(world, tmp_path, capsys, monkeypatch, script, named):
    """Reverted fix: loading.adapter_base's preset/scratch test (gpt3-175b built a 175B random model) and its
    string test (12 or ["x"] reached load_model: a TypeError traceback)."""
    path = tmp_path / "ad"
    shutil.copytree(world["root"] / "a", path)
    edit_config(path, base_model_name_or_path=named)

    def no_load(*args, **kwargs):
        raise AssertionError(f"load_model{args} was called: a model would be built")
    monkeypatch.setattr(minilora.loading, "load_model", no_load)
    args = ["--adapter", str(path)] + (["--out", str(tmp_path / "o")] if script == "merge.py" else ["--max_new_tokens", "2"])
    code, _, err = run_script_here(capsys, script, *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert ("random-weight preset" if isinstance(named, str) else "must be a string") in err
    assert not os.path.exists(tmp_path / "o")


# ---- 9. merge.py --out on an input ------------------------------------------------------------------------

def tree(path):
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


@pytest.mark.parametrize("where", ["base", "inside base", "adapter", "symlink to base"])
def test_merge_out_on_an_input_is_refused_and_the_base_is_untouched(world, tmp_path, capsys, where):
    """Reverted fix: merge.check_out's input test (--force replaced the base with the merged model)."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(world["root"] / "base", base)
    shutil.copytree(world["root"] / "a", adapter)
    out = {"base": base, "inside base": base / "merged", "adapter": adapter, "symlink to base": tmp_path / "link"}[where]
    if where == "symlink to base":
        os.symlink(base, out)
    before = (tree(base), tree(adapter))
    code, _, err = run_script_here(capsys, "merge.py", "--adapter", str(adapter), "--base", str(base), "--out", str(out),
                                   "--force")
    assert code == 2 and err.count("\n") == 1 and "would overwrite the input" in err, err
    assert (tree(base), tree(adapter)) == before


# ---- 10. tracebacks unreachable ---------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build's answer to --device cuda")
def test_serve_device_cuda_without_cuda_is_one_line(capsys):
    """Reverted fix: serve.py's CUDA test (model.to('cuda') raised AssertionError: a traceback)."""
    code, _, err = run_script_here(capsys, "serve.py", "--init_from", "tiny", "--port", "0", "--device", "cuda")
    assert code == 2 and err.count("\n") == 1 and "CUDA is not available" in err, err


@pytest.mark.parametrize("kind", ["not utf-8", "directory"])
def test_generate_bad_prompt_file_is_one_line(tmp_path, capsys, kind):
    """Reverted fix: generate.py's UnicodeDecodeError handler, and IsADirectoryError in cli.main_guard."""
    path = tmp_path / "prompt"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"caf\xe9 \xff\xfe")
    code, _, err = run_script_here(capsys, "generate.py", "--init_from", "tiny", "--prompt_file", str(path),
                                   "--max_new_tokens", "2")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(path) in err, err


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished 2-step tiny train.py run with its out_dir/checkpoint."""
    root = tmp_path_factory.mktemp("train")
    (root / "corpus.txt").write_text("".join(f"line {i}: the quick brown fox.\n" for i in range(200)))
    args = ["--init_from", "scratch", "--model", "tiny", "--lora_r", "0", "--data", str(root / "corpus.txt"),
            "--block_size", "16", "--batch_size", "2", "--checkpoint_interval", "1", "--eval_interval", "0",
            "--eval_examples", "0", "--device", "cpu", "--dtype", "fp32"]
    return root, args


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty"])
def test_resume_from_a_damaged_state_pt_is_one_line(checkpointed, tmp_path, capsys, damage):
    """Reverted fix: load_checkpoint's handler around torch.load (UnpicklingError, EOFError, RuntimeError tracebacks)."""
    root, args = checkpointed
    out = tmp_path / "run"
    code, _, err = run_script_here(capsys, "train.py", *args, "--out_dir", str(out), "--max_iters", "2")
    assert code == 0, err
    state = out / "checkpoint" / "state.pt"
    data = state.read_bytes()
    state.write_bytes({"truncated": data[:len(data) // 2], "random bytes": os.urandom(len(data)), "empty": b""}[damage])
    code, _, err = run_script_here(capsys, "train.py", *args, "--out_dir", str(out), "--max_iters", "4", "--resume")
    assert code == 2 and err.count("\n") == 1 and str(state) in err and "Traceback" not in err, err


def test_params_table_into_a_closed_pipe_is_quiet():
    """`python -m minilora.params --table | head -1`, with the reader gone before anything is written,
    stdout block-buffered (a terminal user's default) and unbuffered (PYTHONUNBUFFERED=1).
    Reverted fix: cli.main_guard's BrokenPipeError handler (unbuffered: a traceback), and its flush
    inside the guard with stdout then sent to /dev/null (buffered: "Exception ignored ... BrokenPipeError", exit 120)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    procs = [subprocess.Popen([sys.executable, "-m", "minilora.params", "--table"], cwd=ROOT, env={**env, **extra},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for extra in ({}, {"PYTHONUNBUFFERED": "1"})]
    for proc in procs:  # both at once: each spends seconds importing torch
        proc.stdout.close()
    for proc in procs:
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.wait(timeout=60) == 0 and err == "", err


# ---- 11. the error names the missing directory ---------------------------------------------------------------

def test_missing_adapter_or_model_directory_is_named(tmp_path, capsys, monkeypatch):
    """Reverted fix: adapter_base's directory test (merge.py said the adapter has no adapter_config.json),
    and load_model's hub-branch message (generate.py reported only the failed download)."""
    code, _, err = run_script_here(capsys, "merge.py", "--adapter", str(tmp_path / "nonexistent_dir"),
                                   "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "nonexistent_dir does not exist" in err, err
    monkeypatch.setenv("MINILORA_HUB_URL", "http://127.0.0.1:9")  # nothing listens: no download
    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path / "cache"))
    code, _, err = run_script_here(capsys, "generate.py", "--init_from", "out/no_such_dir", "--max_new_tokens", "2")
    assert code == 2 and err.count("\n") == 1 and "no directory 'out/no_such_dir' here" in err, err


# ---- 12. generate() on a model a serving engine holds -------------------------------------------------------

def test_generate_on_a_served_model_is_refused_and_the_engine_keeps_serving(world):
    """Reverted fix: model.setup_kv_cache's in-use test (generate() replaced, then freed, the engine's cache),
    and GenerationStream's, which refuses at the call, before the first event."""
    model = copy.deepcopy(world["base"])
    engine = Engine(model, TOK, AdapterRegistry(model, max_loras=1), max_num_seqs=2).start()
    ids = TOK.encode("Hello")

    def served():
        req = engine.submit(Request("__base__", [ids], Sampling(max_tokens=12, temperature=0)))
        events = list(req)
        assert events[-1][0] == "done", events
        return "".join(v for k, _, v in events if k == "delta")

    try:
        before = served()
        with pytest.raises(MiniloraError, match="KV cache is in use"):
            generate(model, [ids], 12, temperature=0)
        with pytest.raises(MiniloraError, match="KV cache is in use"):
            stream_generate(model, [ids], 12, temperature=0)  # at the call, not at the first next()
        assert served() == before
    finally:
        engine.stop()
    out = generate(model, [ids], 12, temperature=0, eot_token=TOK.eot_token, tokenizer=TOK)
    assert out.texts[0] == before


def test_misleading_errors_name_the_real_problem_and_the_flag(tmp_path, capsys):
    """Issue 13.13's leftovers: an --out_dir that is a file, held-out data too short, a pickle adapter."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    corpus = tmp_path / "c.txt"
    corpus.write_text("tiny text\n" * 3)
    code, _, err = run_script_here(capsys, "train.py", "--lora_r", "0", "--data", str(corpus), "--out_dir", str(afile))
    assert code == 2 and "--out_dir" in err and "is a file" in err and "Errno" not in err
    code, _, err = run_script_here(capsys, "train.py", "--lora_r", "0", "--data", str(corpus), "--block_size", "8",
                                   "--val_fraction", "0.001", "--out_dir", str(tmp_path / "o"))
    assert code == 2 and "--val_data" in err and "--val_fraction" in err
    model = GPT(GPTConfig.from_name("tiny"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    apply_lora(model, LoraConfig(r=2))
    save_adapter(model, tmp_path / "ok")
    (pickled / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    torch.save({}, pickled / "adapter_model.bin")
    with pytest.raises(MiniloraError, match="convert it to adapter_model.safetensors"):
        load_adapter(GPT(GPTConfig.from_name("tiny")), pickled)


def test_template_that_does_not_fit_a_line_and_a_tokenizer_too_big_for_the_model_are_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"q": {"a": 1}, "completion": "x"}) for _ in range(4)) + "\n")
    base = tmp_path / "base"
    tiny_base().save_pretrained(base)
    code, _, err = run_script_here(capsys, "train.py", "--init_from", str(base), "--data", str(data), "--template",
                                   "Q {q:>5} ", "--out_dir", str(tmp_path / "o1"))
    assert code == 2 and "d.jsonl:1" in err and "does not fit" in err and "Traceback" not in err
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "minilora": {**cfg["minilora"], "tokenizer": "gpt2"}}))
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    code, _, err = run_script_here(capsys, "train.py", "--init_from", str(base), "--lora_r", "0", "--data", str(text),
                                   "--out_dir", str(tmp_path / "o2"))
    assert code == 2 and "vocab_size" in err and "50257" in err and "Traceback" not in err
