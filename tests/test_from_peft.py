"""docs/from-peft.md cannot rot: every `python minilora` / `bash minilora` block runs, in page order, on tiny
fixtures (the page's table lists the substitutions, and this test makes exactly those)."""

import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "from-peft.md")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
BLOCK = re.compile(r"^```(python|bash) (minilora(?:-serve)?)\n(.*?)^```", re.M | re.S)
QUOTES = ["Be yourself; everyone else is already taken.", "So many books, so little time.",
          "A room without books is like a body without a soul.", "You only live once, but if you do it right, once is enough.",
          "Be the change that you wish to see in the world.", "In three words I can sum up everything I've learned about life."]


def blocks():
    """[(language, tag, code)] of the page's minilora blocks, in order."""
    return [m.groups() for m in BLOCK.finditer(open(PAGE, encoding="utf-8").read())]


def hub_dir(root, kind):
    path = os.path.join(root, "hub", kind)
    shutil.copytree(os.path.join(FIXTURES, "hf", kind, "model"), path)
    shutil.copy(os.path.join(FIXTURES, "tokenizers", "bytelevel", "tokenizer.json"), path)  # 1000 ids, as the model
    return path


SCRIPTS = ("train.py", "generate.py", "merge.py", "serve.py")


def script_main(name, argv):
    """A top-level script's main(argv) under its main_guard -> exit status."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py") + "_page", os.path.join(ROOT, name))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    try:
        script.main_guard(lambda: script.main(argv))
    except SystemExit as e:
        return e.code
    return 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_has_a_translation_for_every_guide_step():
    found = blocks()
    assert sum(lang == "python" for lang, _, _ in found) >= 6 and sum(lang == "bash" for lang, _, _ in found) >= 6
    text = open(PAGE, encoding="utf-8").read()
    for name in ("get_peft_model", "PeftModel.from_pretrained", "SFTTrainer(", "TrainingArguments(", "merge_and_unload()",
                 "add_adapter(", "set_adapter(", "adapter_names=", "serve.py", "curl", "merge.py", "generate.py"):
        assert name in text, name


def test_every_minilora_block_runs(tmp_path, monkeypatch):
    port = free_port()
    subs = {"facebook/opt-350m": hub_dir(tmp_path, "opt-post"), "meta-llama/Llama-2-7b-hf": hub_dir(tmp_path, "llama"),
            "8000": str(port)}
    work = tmp_path / "work"
    (work / "out" / "quickstart" / "data").mkdir(parents=True)
    (work / "english_quotes.jsonl").write_text("".join(json.dumps({"quote": q, "author": "someone"}) + "\n" for q in QUOTES))
    (work / "out" / "quickstart" / "data" / "sql_train.jsonl").write_text("".join(
        json.dumps({"prompt": f"list users in city {i}\nSQL: ", "completion": f"SELECT * FROM users WHERE city = {i};"}) + "\n"
        for i in range(8)))
    monkeypatch.chdir(work)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, NO_PROXY="*", no_proxy="*")

    def substitute(code):
        for old, new in subs.items():
            code = code.replace(old, new)
        return code

    def run_bash(code, where):
        """Each command of a block; `python SCRIPT.py ...` runs the script's main() in this process (as
        tests/scripts.run_script_here does: the same code, without a second torch start-up), the rest in bash."""
        out = ""
        scripts = re.search(r"^python (train|generate|merge|serve)\.py ", code, re.M)
        commands = code.replace("\\\n", " ").splitlines() if scripts else [code]  # curl's JSON spans lines
        for command in (c for c in commands if c.strip() and not c.lstrip().startswith("#")):
            argv = shlex.split(command)
            if argv[:1] == ["python"] and argv[1] in SCRIPTS:
                stdout, stderr = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                    code = script_main(argv[1], argv[2:])
                out += stdout.getvalue()
                assert code == 0, f"{where}\n{stdout.getvalue()[-2000:]}{stderr.getvalue()[-2000:]}"
            else:
                proc = subprocess.run(["bash", "-e", "-c", command], capture_output=True, text=True, env=env, timeout=300)
                assert proc.returncode == 0, f"{where}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
                out += proc.stdout
        return out

    namespace, servers = {}, []
    try:
        for i, (lang, tag, code) in enumerate(blocks()):
            code = substitute(code)
            where = f"block {i + 1} ({lang} {tag}):\n{code}"
            if lang == "python":
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(code, f"from-peft.md block {i + 1}", "exec"), namespace)
            elif tag == "minilora-serve":
                log = open(work / f"server{i}.log", "w+")
                code = code.replace("python serve.py", f"{sys.executable} {ROOT}/serve.py")
                servers.append(subprocess.Popen(["bash", "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env))
                deadline = time.time() + 120
                while " on http://" not in open(log.name).read():
                    assert servers[-1].poll() is None and time.time() < deadline, f"{where}\n{open(log.name).read()}"
                    time.sleep(0.05)
            else:
                out = run_bash(code, where)
                assert '"error"' not in out, f"{where}\n{out}"
                if "curl" in code:
                    assert json.loads(out)["choices"][0]["text"] is not None
    finally:
        for server in servers:
            server.kill()
            server.wait(timeout=30)
    # what the page says happened, happened
    assert namespace["model"].active_adapter == "quotes" and set(namespace["model"].peft_config) == {"default", "quotes"}
    assert namespace["quotes_ids"].shape[1] > namespace["inputs"].shape[1]
    for d in ("lora_finetuned_model", "lora_finetuned_model_cli", "sql_lora_adapter"):
        cfg = json.load(open(work / d / "adapter_config.json"))
        assert cfg["task_type"] == "CAUSAL_LM" and cfg["r"] in (8, 16)
    for d in ("merged_lora_model", "merged_lora_model_cli"):
        assert os.path.isfile(work / d / "config.json") and os.path.isfile(work / d / "tokenizer.json")


@pytest.fixture(autouse=True)
def _no_stray_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
