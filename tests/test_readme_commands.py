"""Every command in README.md, pasted as a newcomer would after the quickstart, does what the README says.

The commands are read from README.md itself, never copied here, by one rule:
- in a fenced block tagged bash, sh, shell, console or text, or untagged: each line (lines ending in a
  backslash joined to the next) that starts with python, python3, torchrun, curl or cp, after an optional
  `$ ` prompt; the lines after a `$ ` command, up to the next command, are what it prints;
- in the prose: each inline code span that runs a script (`python X.py ...`, `python -m minilora.X ...`).
Each command matches exactly one entry of RUN or NOT_RUN below (a regex over its text), and every entry
matches a command: a new README command fails test_every_readme_command_is_run_or_listed until it is run
here or listed with the reason it is not.

test_readme_commands_run runs them in README order in a directory whose out/quickstart is a copy of one
tiny `python -m minilora.quickstart --quick` run (conftest.quick_quickstart), as a newcomer would, except:
- python X.py and python -m minilora.X run in this process (the script's main() under its main_guard,
  as tests/scripts.run_script_here does), since a torch start-up per command costs ~3 s; the quickstart's
  stages too (it starts one interpreter per stage only so that each stage's peak RSS is its own). The
  words are the shell's: bash splits, unquotes and expands ($(...)) each command line;
- where a README run is too long for a test, options are appended (the last occurrence of an option
  wins: --max_iters 2, the quickstart's tiny sizes, ...);
- serve.py runs as a real server process on a free port (--port 0 appended); a curl command goes to the
  server the last serve.py command started (localhost:8000 -> its port), sent with urllib.
"""

import dataclasses
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request

import torch

import minilora.quickstart
from minilora import GPT
from minilora.cli import main_guard
from minilora.safetensors import load_file

from scripts import ROOT, TINY, start_serve, wait_serving

README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "text"}
COMMAND = re.compile(r"(\$ )?((?:python3?|torchrun|curl|cp) .*)")
SPAN = re.compile(r"`([^`]+)`")
INLINE_COMMAND = re.compile(r"^python3? (-m minilora\.|\S+\.py\b)|\| python3? \S+\.py\b")


@dataclasses.dataclass
class Command:
    line: int            # where it starts in README.md
    text: str            # continuation lines joined
    expected: list       # the lines the README shows it printing (after a `$ ` command)


def readme_commands(text):
    """[Command] of README.md's text, in order (the rule in the module's docstring)."""
    found, prose = [], text
    for m in FENCE.finditer(text):
        prose = prose[:m.start()] + re.sub(r"[^\n]", " ", m.group()) + prose[m.end():]  # same offsets, no fences
        if m.group(1) not in SHELL_FENCES:
            continue
        first, lines, i, shown = text.count("\n", 0, m.start(2)) + 1, m.group(2).split("\n"), 0, None
        while i < len(lines):
            start, line = i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1].rstrip() + " " + lines[i].strip()
            i += 1
            c = COMMAND.fullmatch(re.sub(r"\s+# .*", "", line.strip()))  # a trailing comment is not the command's
            if c:
                found.append(Command(first + start, c.group(2), []))
                shown = found[-1] if c.group(1) else None
            elif shown is not None and line.strip():
                shown.expected.append(line.strip())
    for m in SPAN.finditer(prose):
        span = " ".join(m.group(1).split())
        if INLINE_COMMAND.search(span):
            found.append(Command(text.count("\n", 0, m.start()) + 1, span, []))
    return sorted(found, key=lambda c: c.line)


# ---- what this test does not run, and why ------------------------------------------------------------

HUB = ("GPT-2's weights come from the hub (no network in CI) and notes.txt is your own text; the same options "
       "run here on the quickstart's base, and tests/test_hub.py reads HF GPT-2 checkpoints")
NOT_RUN = {
    r"-e \. && python -m minilora\.quickstart$": "the install and the whole quickstart (7-15 minutes): its --quick "
                                                 "output is what every command here runs on",
    r"-e \"\.\[dev\]\" && python -m pytest": "the test suite itself",
    r"--init_from gpt2 (--data|--quantize|--prompt)|--adapter out/notes": HUB,
    r"HuggingFaceTB/SmolLM2|facebook/opt-350m|opt350m-quotes":
        "a hub model (no network in CI; quotes.jsonl is yours); the same options run here on the quickstart's "
        "base, and tests/test_from_peft.py runs the guide's recipe on tiny OPT and Llama checkpoints",
    r"^torchrun ": "4 processes; tests/test_train_cli.py checks 2-process DDP against one process",
    r"^printf '\.\.\.": "'...' stands for the measured conversation's turns, on a 124M-parameter random model "
                        "(~10 s); the KV-cache reuse it measures is tests/test_generate_chat.py's",
    r"minilora\.convert DIR": "placeholders (DIR, NEW); tests/test_step_checkpoints.py runs python -m minilora.convert",
    r"bench\.py": "the benchmark (minutes); tests/test_bench.py runs it at a tiny size",
    r"^python -m minilora\.params --memory$": "the planner on its default model; its llama2-7b command below runs "
                                              "here and prints the README's table",
    r"^python -m minilora\.analyze( --json)?$": "the module's name in a sentence: its full command runs here",
    r"^python -m minilora\.quickstart --tasks sql --(use_dora|loraplus_lr_ratio 16)$":
        "the quickstart's sql task with DoRA / LoRA+ (~3 s each here): tests/test_quickstart.py runs both options "
        "together on the same tiny quickstart",
    r"^python -m minilora\.quickstart --tasks chat$":
        "the chat task: the session's tiny quickstart (conftest.py) runs it beside sql and dates",
}


# ---- what it runs, with what it appends and what it checks ---------------------------------------------

@dataclasses.dataclass
class Run:
    extra: tuple = ()    # appended to the README's command (the last occurrence of an option wins)
    check: object = None  # check(Ran) asserts what the README says the command prints or writes
    stdin: str = ""
    same_options: str = None  # `<same options>` stands for this (run) command's options


@dataclasses.dataclass
class Ran:
    command: Command
    out: str
    err: str


SHORT = ("--max_iters", "2", "--batch_size", "4", "--eval_iters", "1")
QUICK = (*TINY, "--n_val", "2", "--n_examples", "1")  # the fixture's sizes (so its base is reused), fewer scored


def printed(*lines):
    def check(ran):
        for line in lines:
            assert line in ran.out, f"README says it prints {line!r}"
    return check


def files(*paths):
    def check(ran):
        for path in paths:
            assert os.path.exists(path), f"README says it writes {path}"
            if path.endswith(".png"):
                with open(path, "rb") as f:
                    assert f.read(4) == b"\x89PNG", f"{path} is no PNG"
    return check


def both(*checks):
    def check(ran):
        for c in checks:
            c(ran)
    return check


def run_dir(path, kind):
    """A train.py output directory, as README's Training section lists it."""
    product = ["adapter_config.json", "adapter_model.safetensors"] if kind == "lora" else ["config.json", "model.safetensors"]
    files(*(os.path.join(path, f) for f in [*product, "minilora.json", "log.jsonl", "checkpoint"]))(None)
    with open(os.path.join(path, "minilora.json")) as f:
        assert json.load(f)["kind"] == kind


def trained(path, kind, *also):
    def check(ran):
        run_dir(path, kind)
        assert f"saved {'adapter' if kind == 'lora' else 'model'} to {path}" in ran.out
        for extra in also:
            extra(ran)
    return check


def adapter_config(path, **want):
    def check(ran):
        with open(os.path.join(path, "adapter_config.json")) as f:
            config = json.load(f)
        assert {k: config[k] for k in want} == want
    return check


def readme_rows(after):
    """Every row of the first README table after the text `after` is printed as it stands there."""
    def check(ran):
        text = open(README, encoding="utf-8").read()
        lines = text[text.index(after):].splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("|"))
        table = [line for line in lines[start:] if line.startswith("|") or lines.index(line) < start][2:]
        table = table[:next((i for i, line in enumerate(table) if not line.startswith("|")), len(table))]
        missing = [row for row in table if row not in ran.out]
        assert table and not missing, f"rows not printed: {missing}"
    return check


def best_checkpoint(ran):
    out = "out/sql-best"
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    for d in ("checkpoint-2", "checkpoint-4"):
        assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "minilora.json"} <= \
            set(os.listdir(os.path.join(out, d)))
    best = re.search(r"the output is (\S+)'s weights", ran.out).group(1)
    got, want = load_file(f"{out}/adapter_model.safetensors"), load_file(f"{best}/adapter_model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)


def generated(prompt, samples=1):
    def check(ran):
        assert ran.out.startswith(prompt) and ran.out.count("\n---------------\n") == samples
        assert "prefill:" in ran.err and "decode:" in ran.err  # README: tokens/s, prefill and decode timed apart
    return check


def merged(path, dtype):
    def check(ran):
        assert re.search(r"max \|Δlogit\| \S+ \(\S+ of the logit scale\) \| wrote " + re.escape(path), ran.out)
        model = GPT.from_pretrained(path)  # a plain model: no adapter, no minilora.json needed
        assert "lora" not in " ".join(n for n, _ in model.named_parameters())
        assert {t.dtype for t in load_file(f"{path}/model.safetensors").values()} == {dtype}
    return check


def resumed(ran):
    with open("out/sql_full/log.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert steps == [1, 2, 3] and "step 3/3" in ran.out  # it continued at step 3, not from the start


def quickstart(*paths):
    return files(*(os.path.join("out/quickstart", p) for p in paths))


def chat_replied(ran):
    assert "turn 1:" in ran.err and "chat: 1 turn(s)" in ran.err


RUN = {
    r"^python -m minilora\.quickstart -h$": Run(check=printed("--quick", "--lora_r", "--tasks")),
    r"^python -m minilora\.quickstart --lora_r 0$": Run(QUICK, both(quickstart("runs/sql-full/model.safetensors",
                                                                              "results_full.json", "loss_sql.png"),
                                                                   printed("| full | 859,008 (100.00%) |"))),
    r"^python -m minilora\.params --table$": Run(check=readme_rows("## Parameter savings")),
    r"^python -m minilora\.params --model gpt2 --r 8 --target_modules q_proj v_proj$":
        Run(check=printed("trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364")),
    r"--out_dir out/base$": Run(SHORT, trained("out/base", "full")),
    r"--max_iters 800 --batch_size 16 --out_dir out/sql$": Run(SHORT, trained("out/sql", "lora")),
    r"--out_dir out/sql_full$": Run(SHORT, trained("out/sql_full", "full")),
    r"^python train\.py --dry_run --init_from gpt2 --lora_r 8 --target_modules q_proj v_proj$":
        Run(check=printed("trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364")),
    r"^python train\.py <same options> --resume$": Run(("--max_iters", "3"), resumed, same_options=r"--out_dir out/sql_full$"),
    r"^python train\.py -h$": Run(check=printed("--save_steps", "--init_from", "--target_modules")),
    r"--out_dir out/sql-best ": Run(("--max_iters", "4", "--eval_interval", "2", "--save_steps", "2", "--batch_size", "4",
                                     "--eval_iters", "1"), trained("out/sql-best", "lora", best_checkpoint)),
    r"--adapter out/quickstart/adapters/sql --prompt": Run(("--max_new_tokens", "8"),
                                                           generated("Request: list the names of users who live in Lima\nSQL: ")),
    r"--adapter_weights 0\.7 0\.3 --prompt \"\.\.\.\"$": Run(("--max_new_tokens", "4"), generated("...")),
    r"--prompt_adapter sql dates __base__": Run(("--max_new_tokens", "4"), generated("...", samples=3)),
    r"^python merge\.py --adapter out/quickstart/adapters/sql --out out/sql-merged": Run(check=merged("out/sql-merged",
                                                                                                     torch.float32)),
    r"^python merge\.py --base out/quickstart/base .* --dtype bf16$": Run(check=merged("out/sql-bf16", torch.bfloat16)),
    r"^python serve\.py --init_from out/quickstart/base ": Run(),  # checked by the curl commands that follow
    r"^curl ": Run(),
    r"--data chat\.jsonl --lora_r 8 --out_dir out/chat": Run(SHORT, trained("out/chat", "lora",
                                                                           files("out/chat/chat_template.jinja"))),
    r"^python generate\.py --adapter out/chat --chat$": Run(("--max_new_tokens", "4"), chat_replied,
                                                            stdin="Capital of Peru?\n"),
    r"^python train\.py --dry_run --init_from (opt-350m|llama2-7b) ": Run(),  # prints the lines the README shows
    r"^python -m minilora\.quickstart --arch llama$": Run(QUICK, files("out/quickstart-llama/adapters/sql/adapter_model.safetensors",
                                                                      "out/quickstart-llama/adapters/dates/minilora.json")),
    r"^python -m minilora\.quickstart --quantize nf4 --tasks sql$": Run(QUICK, both(
        quickstart("adapters/sql-nf4/adapter_config.json", "results_lora-nf4.json"),
        printed("| qlora r=8 all-linear (nf4 base) |"))),  # "a QLoRA row beside the LoRA one"
    r"^python -m minilora\.params --memory --model llama2-7b": Run(check=readme_rows("### What fits")),
    r"--out_dir out/sql-dora": Run(SHORT, trained("out/sql-dora", "lora", adapter_config("out/sql-dora", use_dora=True))),
    r"^python -m minilora\.plot RUN_DIR": Run(check=files("loss.png")),
    r"^python -m minilora\.quickstart --tasks sql$": Run(QUICK, adapter_config("out/quickstart/adapters/sql", r=8)),
    r"^cp -r out/quickstart/adapters/sql ": Run(),
    r"^python -m minilora\.quickstart --tasks sql --lora_r 64 --lora_alpha 64$": Run(QUICK, adapter_config(
        "out/quickstart/adapters/sql", r=64, lora_alpha=64)),
    r"^python -m minilora\.analyze --adapter ": Run(check=quickstart("analysis.json", "analysis/spectrum.png", "analysis/phi.png")),
}
# README placeholders and what this test puts there
PLACEHOLDERS = {" [--gradient_checkpointing]": "", "RUN_DIR [RUN_DIR ...]": "out/sql out/sql_full"}


def entry(command):
    """The one RUN or NOT_RUN key matching `command`."""
    keys = [k for k in [*RUN, *NOT_RUN] if re.search(k, command.text)]
    assert len(keys) == 1, (f"README.md line {command.line}: {command.text!r} matches {len(keys)} entries of RUN/NOT_RUN "
                            f"in tests/test_readme_commands.py ({keys}); run it there, or list it with the reason it "
                            "is not run")
    return keys[0]


def test_every_readme_command_is_run_or_listed():
    commands = readme_commands(open(README, encoding="utf-8").read())
    used = {entry(c) for c in commands}
    assert used == set(RUN) | set(NOT_RUN), f"entries matching no README command: {(set(RUN) | set(NOT_RUN)) - used}"
    # the rule finds what it should: fenced and inline commands, joined lines, the output shown after `$ `
    texts = [c.text for c in commands]
    assert any(t.startswith("python -m minilora.params --table") for t in texts)  # inline
    assert any(t.startswith("curl ") and '"stream": true' in t for t in texts)  # joined continuation lines
    shown = [c for c in commands if c.expected]
    assert len(shown) == 2 and all(c.expected[0].startswith("trainable params:") for c in shown)


# ---- running them ---------------------------------------------------------------------------------------

def workspace(src, root):
    """A copy of the quickstart's out_dir at root/out/quickstart, with the absolute paths its JSON files
    record (the base an adapter names, the settings the base was pretrained with) moved along."""
    dst = os.path.join(root, "out", "quickstart")
    shutil.copytree(src, dst)
    for folder, _, names in os.walk(dst):
        for name in names:
            if name.endswith(".json"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text.replace(str(src), dst))
    return root


def words(text, cwd):
    """The words bash makes of a command line: split, unquoted, $(...) expanded, comments dropped."""
    proc = subprocess.run(["bash", "-c", "printf '%s\\0' " + text], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\0")[:-1]


_SCRIPTS = {}


def python_main(argv):
    """main(argv) of `python SCRIPT.py ...` or `python -m MODULE ...` -> (main, its arguments)."""
    if argv[0] == "-m":
        return importlib.import_module(argv[1]).main, argv[2:]
    if argv[0] not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(argv[0].removesuffix(".py") + "_readme", os.path.join(ROOT, argv[0]))
        _SCRIPTS[argv[0]] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_SCRIPTS[argv[0]])
    return _SCRIPTS[argv[0]].main, argv[1:]


def run_here(argv, capsys, monkeypatch, stdin):
    """`python ARGV...` in this process -> (exit status, stdout, stderr)."""
    main, args = python_main(argv)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    try:
        main_guard(lambda: main(list(args)))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def curl(argv, url):
    """curl's -X, -H, -d and -N, sent with urllib to the server at `url` (.../v1) -> (README's URL, status, body)."""
    method, headers, data, target, args = None, {}, None, None, iter(argv)
    for arg in args:
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            key, value = next(args).split(":", 1)
            headers[key.strip()] = value.strip()
        elif arg == "-d":
            data = next(args).encode()
        elif arg == "-N":
            pass  # curl's unbuffered output; urllib reads the stream to its end
        else:
            assert not arg.startswith("-"), f"curl option {arg} is not translated here"
            target = arg
    host = url.removeprefix("http://").removesuffix("/v1")
    request = urllib.request.Request("http://" + target.replace("localhost:8000", host), data=data, headers=headers,
                                     method=method or ("POST" if data else "GET"))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, never a proxy
    with opener.open(request, timeout=120) as response:
        return target, response.status, response.read().decode()


def check_reply(target, body, served):
    """What each route answers (OpenAI's, vLLM's and TGI's shapes)."""
    if body.startswith("data:"):  # a stream of server-sent events
        events = [line.removeprefix("data: ") for line in body.splitlines() if line.startswith("data:")]
        if "/v1/" in target:
            assert events[-1] == "[DONE]" and len(events) > 2
        else:
            assert "generated_text" in json.loads(events[-1])
    elif target.endswith("/v1/models"):
        assert {m["id"] for m in json.loads(body)["data"]} >= served
    elif "lora_adapter" in target:
        assert body.startswith("Success")
    elif target.endswith("/v1/completions"):
        choice = json.loads(body)["choices"][0]
        assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    else:  # TGI's /generate
        reply = json.loads(body)
        assert isinstance(reply[0]["generated_text"], str) and reply[0]["details"]["generated_tokens"] >= 1


class Servers:
    """The serve.py commands. Each starts ahead of its turn when the files it reads exist already (its torch
    start-up then overlaps the commands before it) and is waited for at its turn, stopping the one before
    (a newcomer's Ctrl-C: they all want port 8000); the curl commands go to the newest."""

    def __init__(self, tmp_path, root):
        self.tmp_path, self.root, self.started, self.current = tmp_path, root, {}, None

    def start(self, line, argv):
        logs = self.tmp_path / f"serve{line}"
        logs.mkdir()
        self.started[line] = (start_serve(str(logs), *argv[2:], cwd=self.root), str(logs))

    def start_early(self, line, argv):
        paths = [w.split("=", 1)[-1] for w in argv[2:] if "/" in w]
        if all(os.path.exists(os.path.join(self.root, p)) for p in paths):
            self.start(line, argv)

    def switch(self, line, argv):
        self.stop(self.current and self.current[0])
        if line not in self.started:
            self.start(line, argv)
        proc, logs = self.started.pop(line)
        self.current = (*wait_serving(proc, logs), set(re.findall(r"(\w+)=\S+", " ".join(argv[2:]))))

    def stop(self, proc):
        if proc is not None:
            proc.kill()
            proc.wait(timeout=30)

    def close(self):
        for proc, _ in self.started.values():
            self.stop(proc)
        self.stop(self.current and self.current[0])


def command_words(command, spec, done, root):
    """The words of a README command as this test runs it: placeholders filled, the spec's options appended."""
    line = command.text
    for old, new in PLACEHOLDERS.items():
        line = line.replace(old, new)
    if spec.same_options:
        line = line.replace("<same options>", " ".join(done[k] for k in done if re.search(spec.same_options, k)))
    return words(line, root) + list(spec.extra)


def test_readme_commands_run(quick_quickstart, tmp_path, capsys, monkeypatch):
    root = workspace(quick_quickstart[0], str(tmp_path / "work"))
    monkeypatch.chdir(root)
    monkeypatch.setattr(minilora.quickstart, "in_fresh_process", lambda fn, *args: fn(*args))
    text = open(README, encoding="utf-8").read()
    with open("chat.jsonl", "w", encoding="utf-8") as f:  # "save lines like this one as chat.jsonl"
        f.write(re.search(r"```json\n(\{\"messages\".*?\n)```", text, re.S).group(1))
    commands = [(c, RUN[entry(c)]) for c in readme_commands(text) if entry(c) in RUN]
    servers, done = Servers(tmp_path, root), {}
    try:
        for command, spec in commands:
            if command.text.startswith("python serve.py "):
                servers.start_early(command.line, command_words(command, spec, done, root))
        for command, spec in commands:
            if command.text in done:  # the same command again, further down
                continue
            argv, where = command_words(command, spec, done, root), f"README.md line {command.line}: {command.text}"
            if argv[0] == "curl":
                assert servers.current is not None, f"{where}: no serve.py command before it"
                target, status, out = curl(argv[1:], servers.current[1])
                err = ""
                assert status == 200, where
            elif argv[:2] == ["python", "serve.py"]:
                servers.switch(command.line, argv)
                out, err = "", ""
            elif argv[0] == "python":
                code, out, err = run_here(argv[1:], capsys, monkeypatch, spec.stdin)
                assert code == 0, f"{where}\n{out[-2000:]}{err[-2000:]}"
            else:
                proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=60)
                assert proc.returncode == 0, f"{where}\n{proc.stderr}"
                out, err = proc.stdout, proc.stderr
            try:
                for expected in command.expected:
                    assert expected in out, f"README shows it printing {expected!r}"
                if argv[0] == "curl":
                    check_reply(target, out, servers.current[2])
                if spec.check:
                    spec.check(Ran(command, out, err))
            except AssertionError as e:
                raise AssertionError(f"{where}: {e}\n{out[-2000:]}{err[-2000:]}") from None
            done[command.text] = shlex.join(argv[2:]) if argv[0] == "python" else ""
    finally:
        servers.close()
