"""Crash safety: SIGKILL train.py and merge.py at random moments, checkpoint and output writes included.

Two ways to kill: from outside after a random delay (any moment at all), and from inside at the
k-th of the write path's events (os.fsync, os.replace, each tensor serialised), with k drawn from
the events an uninterrupted run goes through; so kills land mid-write, between atomic_directory's
two renames, and everywhere else. After each kill: train.py's out_dir holds a loadable last-good
checkpoint and --resume ends with the uninterrupted run's weights, bit for bit (fp32, one thread);
merge.py's --out is complete or absent. Also here: the guards that stop a run or a merge before
damage (non-finite loss, a base of another shape). MINILORA_SOAK=1 (or `pytest --soak`): 10x trials.
"""

import contextlib
import importlib.util
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from minilora import GPT, GPTConfig
from minilora import safetensors as st
from minilora.cli import main_guard
from minilora import LoraConfig, apply_lora, save_adapter
from minilora.safetensors import load_file
from minilora.checkpoint import find_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
SOAK = 10 if os.environ.get("MINILORA_SOAK", "0") not in ("", "0") else 1
MAX_ITERS = 12

# Runs a script, SIGKILLing itself at the KILL_AT-th write-path event (the same events `recording` counts).
KILLER = r"""
import os, runpy, signal, sys
kill_at, seen = int(os.environ["KILL_AT"]), [0]
def hook(fn):
    def wrapped(*args, **kwargs):
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapped
os.fsync, os.replace = hook(os.fsync), hook(os.replace)
import torch, minilora.safetensors as st
st._tensor_bytes, torch.save = hook(st._tensor_bytes), hook(torch.save)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@contextlib.contextmanager
def recording(monkeypatch, watch=None):
    """Record this process's write-path events as KILLER counts them: (name, does watch/checkpoint exist)."""
    events = []

    def hook(name, fn):
        def wrapped(*args, **kwargs):
            events.append((name, watch is not None and os.path.isdir(os.path.join(watch, "checkpoint"))))
            return fn(*args, **kwargs)
        return wrapped
    for owner, attr, name in ((os, "fsync", "fsync"), (os, "replace", "replace"), (st, "_tensor_bytes", "tensor"),
                              (torch, "save", "torch.save")):
        monkeypatch.setattr(owner, attr, hook(name, getattr(owner, attr)))
    yield events
    monkeypatch.undo()


def script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_here(name, args):
    """A script's main in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main_guard(lambda: script(name).main(args))
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def launch(name, args, kill_at=0):
    env = {**ENV, "KILL_AT": str(kill_at)}
    return subprocess.Popen([sys.executable, "-c", KILLER, os.path.join(ROOT, f"{name}.py"), *args], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(proc, timeout=120):
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode()


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny base (HF layout), a JSONL task, and a non-zero adapter recording the base."""
    root = tmp_path_factory.mktemp("crash")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    base = str(root / "base")
    model.save_pretrained(base)
    with open(root / "task.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"add {i} and {i % 9}: ", "completion": str(i + i % 9)}) + "\n")
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc_in"], init_lora_weights=False))
    adapter = str(root / "adapter")
    save_adapter(model, adapter, base_model_name_or_path=base)
    return root, base, str(root / "task.jsonl"), adapter


def train_args(work, out_dir):
    _, base, data, _ = work
    return ["--init_from", base, "--data", data, "--out_dir", out_dir, "--lora_r", "4", "--lora_dropout", "0.1",
            "--max_iters", str(MAX_ITERS), "--batch_size", "2", "--block_size", "32", "--warmup_iters", "2",
            "--checkpoint_interval", "1", "--eval_interval", "4", "--eval_iters", "2", "--eval_examples", "0",
            "--device", "cpu", "--dtype", "fp32", "--seed", "3"]


def test_train_killed_anywhere_resumes_to_the_uninterrupted_weights(work, tmp_path, monkeypatch):
    rng = random.Random("minilora-crash-train")
    ref = str(tmp_path / "ref")
    t0 = time.time()
    with recording(monkeypatch, watch=ref) as events:
        code, _, err = run_here("train", train_args(work, ref))
    assert code == 0, err
    took = time.time() - t0
    after_first = [i + 1 for i, (_, ckpt) in enumerate(events) if ckpt]  # events once a checkpoint exists
    assert len(after_first) > 50, "expected many checkpoint writes (--checkpoint_interval 1)"
    want = load_file(os.path.join(ref, "adapter_model.safetensors"))

    survived, mid_write, kills = 0, 0, []
    for trial in range(3 * SOAK):
        out = str(tmp_path / f"trial{trial}")
        if trial % 3 == 2:  # from outside, at a random moment once the first checkpoint exists
            proc = launch("train", train_args(work, out))
            while proc.poll() is None and not os.path.isdir(os.path.join(out, "checkpoint")):
                time.sleep(0.005)
            time.sleep(rng.uniform(0, took / 4))
            proc.send_signal(signal.SIGKILL)
            what = "signal"
        else:  # from inside, at a random write-path event
            k = rng.choice(after_first)
            proc = launch("train", train_args(work, out), kill_at=k)
            what = events[k - 1][0]
            mid_write += what in ("tensor", "torch.save", "fsync")
        code, err = finish(proc)
        if code == 0:
            continue  # the run finished before the signal: no kill to survive (rare; not counted)
        assert code == -signal.SIGKILL, err[-2000:]

        ckpt = find_checkpoint(out)
        assert ckpt is not None, f"trial {trial} ({what}): no checkpoint left in {os.listdir(out)}"
        weights = load_file(os.path.join(ckpt, "model.safetensors"))
        state = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=True)
        assert 1 <= state["iter_num"] <= MAX_ITERS and weights and all(".lora_" in k for k in weights)
        kills.append(f"{what}->step {state['iter_num']}")

        code, stdout, err = run_here("train", train_args(work, out) + ["--resume"])
        assert code == 0, err
        assert same_tensors(load_file(os.path.join(out, "adapter_model.safetensors")), want), f"trial {trial} ({what})"
        with open(os.path.join(out, "log.jsonl")) as f:
            logged = [r["step"] for r in map(json.loads, f) if "loss" in r]
        assert logged == list(range(1, MAX_ITERS + 1)), "the log continues without gaps or repeats"
        survived += 1
    print(f"\n[crash] train.py: {survived} SIGKILLs survived, {mid_write} inside a file write (killed at -> "
          f"checkpoint resumed from: {kills}); every resume bit-identical to the uninterrupted run")
    assert survived >= 2 * SOAK


def complete_or_absent(out, allowed):
    """--out must not exist, or hold exactly one of the `allowed` state dicts."""
    if not os.path.lexists(out):
        return "absent"
    sd = GPT.from_pretrained(out).state_dict()
    for name, want in allowed.items():
        if same_tensors(sd, want):
            return name
    raise AssertionError(f"{out} holds a model that is neither of {list(allowed)}")


def test_merge_killed_mid_write_leaves_out_complete_or_absent(work, tmp_path, monkeypatch):
    _, base, _, adapter = work
    rng = random.Random("minilora-crash-merge")
    ref = str(tmp_path / "ref")
    with recording(monkeypatch) as events:
        code, _, err = run_here("merge", ["--adapter", adapter, "--out", ref])
    assert code == 0, err
    merged, old = GPT.from_pretrained(ref).state_dict(), GPT.from_pretrained(base).state_dict()

    outcomes = []
    for trial in range(3 * SOAK):
        out = str(tmp_path / f"trial{trial}")
        force = trial % 3 == 2  # replacing an existing model: it must survive whole, or the new one
        if force:
            shutil.copytree(base, out)
        k = rng.randint(1, len(events))
        code, err = finish(launch("merge", ["--adapter", adapter, "--out", out] + ["--force"] * force, kill_at=k))
        assert code == -signal.SIGKILL, err[-2000:]
        state = complete_or_absent(out, {"new": merged, "old": old} if force else {"new": merged})
        outcomes.append(f"{events[k - 1][0]}->{state}")
        if state != "new":  # running it again finishes the job
            code, _, err = run_here("merge", ["--adapter", adapter, "--out", out] + ["--force"] * force)
            assert code == 0, err
            assert complete_or_absent(out, {"new": merged}) == "new"
    print(f"\n[crash] merge.py: {len(outcomes)} SIGKILLs survived (event killed at -> state of --out): {outcomes}")


# ---- guards that stop before damage ---------------------------------------------------------------

def test_non_finite_loss_stops_train_py_naming_the_step_and_keeps_the_last_checkpoint(work, tmp_path):
    out = str(tmp_path / "nan")
    args = train_args(work, out) + ["--learning_rate", "1e30", "--grad_clip", "0", "--warmup_iters", "0"]
    code, _, err = run_here("train", args)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "non-finite loss" in err and "at step 2" in err, err
    ckpt = find_checkpoint(out)
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    assert state["iter_num"] == 1  # the step before the bad one; a non-finite step is never saved
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(ckpt, "model.safetensors")).values())


def test_merge_onto_a_base_of_another_shape_is_refused_by_name(work, tmp_path):
    _, _, _, adapter = work
    other = str(tmp_path / "wide")
    GPT(GPTConfig.from_name("tiny", n_embd=64)).save_pretrained(other)
    out = str(tmp_path / "merged")
    code, _, err = run_here("merge", ["--base", other, "--adapter", adapter, "--out", out])
    assert code == 2 and err.count("\n") == 1
    assert "another shape" in err and "attn.q_proj is 64x64 here but 32x32" in err, err
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if n.startswith(".")]
