"""train.py as a user runs it: --dry_run, -h, errors, a SIGKILL mid-run, and 2-process DDP."""

import dataclasses
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from minilora import GPT, GPTConfig
from minilora.cli import main_guard
from minilora.safetensors import load_file
from minilora.checkpoint import find_checkpoint
from minilora.runtime import setup_runtime
from minilora.trainer import TrainConfig, build_model, load_data, save_output, train
from scripts import run_script_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}  # 2 shared cores: no thread contention
TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7} times.\n" for i in range(400))


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("train_script", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("base") / "base")
    GPT(GPTConfig.from_name("tiny")).save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def args_for(cfg):
    """TrainConfig -> the train.py command line that means the same."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, bool):
            out.append(f"--{f.name}" if value else f"--no-{f.name}")
        elif isinstance(value, list):
            out += [f"--{f.name}", *value]
        elif value is not None:
            out += [f"--{f.name}", str(value)]
    return out


def run_in_process(cfg):
    torch.set_num_threads(1)
    rt = setup_runtime(cfg)
    model, info = build_model(cfg, rt)
    dataset = load_data(cfg, info.tokenizer, model.config.block_size, rt)
    result = train(model, dataset, cfg, rt, stream=io.StringIO())
    save_output(model, cfg, info, rt, result)
    return result


def test_dry_run_prints_peft_line_for_gpt2_without_download(tmp_path):
    env = {**ENV, "MINILORA_HUB_URL": "http://127.0.0.1:9", "MINILORA_CACHE": str(tmp_path)}  # any fetch would fail
    proc = subprocess.run([sys.executable, TRAIN_PY, "--dry_run", "--init_from", "gpt2", "--lora_r", "8",
                           "--target_modules", "q_proj", "v_proj"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"
    assert not os.listdir(tmp_path)


def test_help_lists_every_option_with_its_default(train_script, capsys):
    with pytest.raises(SystemExit) as e:
        train_script.main(["-h"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    blocks = {}
    for block in re.split(r"\n  (?=--)", text):  # one block per option
        blocks[block.split()[0].rstrip(",")] = " ".join(block.split())
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        block = blocks.get(f"--{f.name}")
        assert block is not None, f"--{f.name} missing from -h"
        if isinstance(default, bool):  # --flag / --no-flag: "(the default)" marks the one that is
            off = blocks.get(f"--no-{f.name.replace('_', '-')}")
            assert off is not None and ("(the default)" in block) == default and ("(the default)" in off) != default
        else:
            assert f"(default: {default})" in block or "default" in block.split(" ", 2)[-1], block
        assert block.count("default") <= 1, f"--{f.name}'s default is said twice: {block}"


def test_bad_input_is_one_line_not_a_traceback(train_script, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main_guard(lambda: train_script.main(["--lora_r", "0", "--data", str(tmp_path / "missing.txt"),
                                              "--out_dir", str(tmp_path / "out"), "--device", "cpu"]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "missing.txt" in err


def test_sigkill_mid_run_leaves_a_resumable_checkpoint(tmp_path, text_file):
    cfg = TrainConfig(init_from="scratch", model="tiny", lora_r=0, data=text_file, out_dir=str(tmp_path / "killed"),
                      block_size=16, batch_size=2, max_iters=150, checkpoint_interval=1, eval_interval=0,
                      eval_examples=0, device="cpu", dtype="fp32", dropout=0.1, seed=3)
    proc = subprocess.Popen([sys.executable, TRAIN_PY, *args_for(cfg)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = os.path.join(cfg.out_dir, "log.jsonl")
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(log) and sum(1 for _ in open(log)) >= 10:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"train.py ended before the kill: {proc.stderr.read().decode()[-500:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    # the last good checkpoint loads: weights and state
    ckpt = find_checkpoint(cfg.out_dir)
    assert ckpt is not None
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    assert 5 <= state["iter_num"] < cfg.max_iters  # the log can be a step ahead of the checkpoint
    assert load_file(os.path.join(ckpt, "model.safetensors"))
    # --resume finishes the run with the weights an uninterrupted run ends with
    # (in process, checkpointing only at the end: where checkpoints are written never changes the weights)
    resumed = run_in_process(dataclasses.replace(cfg, resume=True, checkpoint_interval=1000))
    assert min(resumed.losses) == state["iter_num"] + 1
    run_in_process(dataclasses.replace(cfg, out_dir=str(tmp_path / "whole"), checkpoint_interval=1000))
    a = load_file(os.path.join(tmp_path, "killed", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "whole", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("setup", ["full", "qlora+checkpointing"])
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path, text_file, base_dir, setup):
    """...also with gradient checkpointing under DDP (recomputed blocks inside DDP's backward), on an NF4 base
    with LoRA: the one process runs without checkpointing, so the recomputation is checked too."""
    common = dict(init_from="scratch", model="tiny", lora_r=0, data=text_file, block_size=16, max_iters=4,
                  grad_accum=2, eval_interval=2, eval_iters=2, eval_examples=0, device="cpu", dtype="fp32", seed=5)
    ddp_only = {}
    if setup != "full":
        common.update(init_from=base_dir, lora_r=4, quantize="nf4")
        ddp_only = dict(gradient_checkpointing=True)
    ddp = TrainConfig(**common, **ddp_only, batch_size=2, out_dir=str(tmp_path / "ddp"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           TRAIN_PY, *args_for(ddp)], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 processes" in proc.stdout
    run_in_process(TrainConfig(**common, batch_size=4, out_dir=str(tmp_path / "single")))

    def records(name):
        with open(tmp_path / name / "log.jsonl") as f:
            return [json.loads(line) for line in f]
    ddp_log, single_log = records("ddp"), records("single")
    assert [r["step"] for r in ddp_log] == [r["step"] for r in single_log] == [1, 2, 2, 3, 4, 4]
    for r, s in zip(ddp_log, single_log):
        key = "loss" if "loss" in r else "val_loss"
        assert r[key] == pytest.approx(s[key], abs=1e-5)
    weights = "model.safetensors" if setup == "full" else "adapter_model.safetensors"
    a, b = (load_file(os.path.join(tmp_path, run, weights)) for run in ("ddp", "single"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
    assert not any(name.startswith(".") and name != ".cache" for name in os.listdir(tmp_path / "ddp"))


@pytest.mark.parametrize("flag, value", [
    ("--learning_rate", "-1"), ("--learning_rate", "0"), ("--learning_rate", "nan"), ("--learning_rate", "inf"),
    ("--beta1", "2"), ("--beta2", "1"), ("--beta1", "-0.1"), ("--min_lr", "-1"), ("--min_lr", "1"),
    ("--warmup_iters", "-1"), ("--weight_decay", "-1"), ("--grad_clip", "-1"), ("--grad_clip", "nan"),
    ("--lora_alpha", "0"), ("--lora_alpha", "inf"), ("--lora_dropout", "1"), ("--dropout", "-0.5"),
    ("--lr_decay_iters", "0"), ("--val_fraction", "1"), ("--val_fraction", "-0.1")])
def test_bad_training_options_are_refused_up_front_naming_the_flag(capsys, tmp_path, flag, value):
    code, out, err = run_script_here(capsys, "train.py", flag, value, "--data", str(tmp_path / "none.txt"),
                                     "--out_dir", str(tmp_path / "out"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {flag} must be"), err  # not "no such file", not a traceback
    assert not os.path.exists(tmp_path / "out")


def test_huge_lora_alpha_stops_on_the_non_finite_gradient_norm(capsys, tmp_path, text_file, base_dir):
    """alpha/r = 1.25e29 overflows the gradient norm at step 1 (the loss itself is still finite, as B starts at 0);
    without the check, AdamW's overflowing second moment turns every update into 0 and "saved adapter" follows."""
    for grad_clip in ("1.0", "0"):  # clipping off still computes the norm for the check
        out_dir = tmp_path / f"clip{grad_clip}"
        code, out, err = run_script_here(capsys, "train.py", "--init_from", base_dir, "--data", text_file,
                                         "--out_dir", str(out_dir), "--lora_alpha", "1e30", "--grad_clip", grad_clip,
                                         "--max_iters", "3", "--block_size", "16", "--batch_size", "2",
                                         "--device", "cpu", "--dtype", "fp32", "--eval_examples", "0")
        assert code == 2 and "saved adapter" not in out
        assert err.count("\n") == 1 and "non-finite gradient norm (inf) at step 1; stopping" in err, err
        assert "--lora_alpha" in err and not os.path.exists(out_dir / "adapter_model.safetensors")


def test_lora_rank_above_a_layers_dimensions_is_refused_at_once(capsys, tmp_path, text_file, base_dir):
    for extra in ([], ["--dry_run"]):
        code, out, err = run_script_here(capsys, "train.py", "--init_from", base_dir, "--data", text_file, "--out_dir",
                                         str(tmp_path / "out"), "--lora_r", "100000", "--device", "cpu",
                                         "--max_iters", "1", "--block_size", "16", *extra)
        assert code == 2 and err.count("\n") == 1, err
        assert "LoRA rank 100000 exceeds transformer.h.0.attn.q_proj's min(in_features 32, out_features 32)" in err
        assert not os.path.exists(tmp_path / "out")


def test_lora_on_lm_head_trains_saves_and_generates(capsys, tmp_path, text_file, base_dir):
    """The chunked loss reads a plain head weight; a LoRA-wrapped head takes the logits path instead."""
    out_dir = str(tmp_path / "head")
    code, out, err = run_script_here(capsys, "train.py", "--init_from", base_dir, "--data", text_file, "--out_dir",
                                     out_dir, "--target_modules", "lm_head", "--lora_r", "4", "--max_iters", "3",
                                     "--warmup_iters", "0", "--block_size", "16", "--batch_size", "2", "--device", "cpu",
                                     "--dtype", "fp32", "--eval_examples", "0")
    assert code == 0, err
    assert f"saved adapter to {out_dir}" in out
    weights = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
    assert sorted(weights) == ["base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"]
    assert weights["base_model.model.lm_head.lora_B.weight"].abs().sum() > 0  # it trained
    code, out, err = run_script_here(capsys, "generate.py", "--adapter", out_dir, "--prompt", "Line",
                                     "--max_new_tokens", "4", "--device", "cpu")
    assert code == 0, err
    # merging is refused, in one line: GPT-2's head is tied to the input embedding
    code, out, err = run_script_here(capsys, "generate.py", "--adapter", out_dir, "--merge", "--max_new_tokens", "2",
                                     "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and "tied" in err and "keep this adapter unmerged" in err
