"""serve.py, the script: flags, one-line errors, and a real server process answering on 127.0.0.1."""

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from minilora import GPT, GPTConfig, MiniloraError
from minilora import LoraConfig, apply_lora, save_adapter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import serve  # noqa: E402  (the script, imported for its functions)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("serve_cli")
    base = GPT(GPTConfig.from_name("tiny"))
    base.save_pretrained(root / "base")
    apply_lora(base, LoraConfig(r=4, lora_alpha=8))
    save_adapter(base, root / "sql")
    return root


def run(*args, timeout=60):
    return subprocess.run([sys.executable, str(ROOT / "serve.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_lora_modules_accepts_vllm_forms():
    assert serve.lora_modules(["sql=out/sql", '{"name": "q", "path": "out/q"}']) == {"sql": "out/sql", "q": "out/q"}
    for bad in (["sql"], ["=x"], ["a=x", "a=y"], ['{"name": "q"}']):
        with pytest.raises(MiniloraError, match="--lora-modules"):
            serve.lora_modules(bad)


@pytest.mark.parametrize("args,words", [
    (["--lora-modules", "sql"], "write name=path"),
    (["--max-lora-rank", "2", "--lora-modules", "sql={sql}"], "rank 4, above the server's max_lora_rank 2"),
    (["--enable-runtime-lora-updating"], "--allowed-lora-dir"),
    (["--max-loras", "0"], "max_loras must be a positive int"),
    (["--lora-modules", "sql={base}"], "adapter_config.json is missing"),
])
def test_bad_flags_raise_one_clear_error(dirs, args, words):
    args = [a.format(sql=dirs / "sql", base=dirs / "base") for a in args]
    with pytest.raises(MiniloraError, match=words):
        serve.main(["--init_from", str(dirs / "base"), "--port", "0", *args])


def test_bad_flag_exits_with_one_line_and_no_traceback(dirs):
    out = run("--init_from", str(dirs / "base"), "--lora-modules", "oops")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr and "name=path" in out.stderr


def test_server_process_serves_and_stops_on_ctrl_c(dirs):
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--init_from", str(dirs / "base"),
                             "--lora-modules", f"sql={dirs / 'sql'}", "--port", "0", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert "serving" in line and "127.0.0.1" in line, proc.stderr.read() if not line else line
        url = line.split(" on ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        models = json.load(urllib.request.urlopen(url + "/models", timeout=30))
        assert [m["id"] for m in models["data"]] == [str(dirs / "base"), "sql"]
        body = json.dumps({"model": "sql", "prompt": "hi", "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/completions", body, {"Content-Type": "application/json"})
        out = json.load(urllib.request.urlopen(req, timeout=30))
        from minilora import generate, get_tokenizer  # the same request by hand: sql's B is zero, so the base
        tok = get_tokenizer("byte")
        want = generate(GPT.from_pretrained(dirs / "base"), [tok.encode("hi")], 4, temperature=0,
                        eot_token=tok.eot_token, tokenizer=tok)
        assert out["choices"][0]["finish_reason"] == want.finish_reasons[0] and out["usage"]["prompt_tokens"] == 2
        assert out["choices"][0]["text"] == want.texts[0]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err
