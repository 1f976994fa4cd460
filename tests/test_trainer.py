"""The training loop's pieces on tiny models: schedule, optimizer groups, accumulation, precision,
overfitting, exact resume, crash windows, non-finite loss, and what lands in out_dir."""

import copy
import dataclasses
import io
import json
import math
import os
import platform
import subprocess
import sys

import pytest
import torch

from minilora import GPT, GPTConfig, MiniloraError
from minilora import LoraConfig, apply_lora, load_adapter
from minilora.safetensors import load_file
from minilora import ops
from minilora.checkpoint import find_checkpoint
from minilora.progress import Progress
from minilora.runtime import Runtime, resolve_dtype, setup_runtime
from minilora.trainer import (TrainConfig, build_model, configure_optimizer, forward_backward, get_lr, load_data,
                              optimizer_step, total_iters, train)

from scripts import run_training

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7} times.\n" for i in range(400))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "task.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            f.write(json.dumps({"prompt": f"add {i} and {i % 9}: ", "completion": str(i + i % 9)}) + "\n")
    return str(path)


@pytest.fixture
def base_dir(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "base")
    GPT(GPTConfig.from_name("tiny")).save_pretrained(path)
    return path


def make_cfg(tmp_path, data, **kw):
    defaults = dict(init_from="scratch", model="tiny", lora_r=0, data=data, out_dir=str(tmp_path / "out"),
                    block_size=32, batch_size=4, max_iters=6, warmup_iters=2, learning_rate=3e-3,
                    eval_interval=0, eval_iters=2, eval_examples=0, checkpoint_interval=100, device="cpu",
                    dtype="fp32", seed=7)
    return TrainConfig(**{**defaults, **kw})


run = run_training  # train.py's flow, in process (tests/scripts.py)


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- schedule and optimizer ----------------------------------------------------------------------

def test_lr_schedule_warmup_and_cosine():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    assert get_lr(0, cfg) == pytest.approx(1e-3 / 11)          # warm-up start: never exactly 0
    assert get_lr(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert get_lr(10, cfg) == pytest.approx(1e-3)              # warm-up end: the peak
    assert get_lr(60, cfg) == pytest.approx(5.5e-4)            # half-way down the cosine
    assert get_lr(110, cfg) == pytest.approx(1e-4)             # after decay: min_lr
    assert get_lr(500, cfg) == pytest.approx(1e-4)
    assert get_lr(60, dataclasses.replace(cfg, decay_lr=False)) == pytest.approx(1e-3)
    assert get_lr(110, dataclasses.replace(cfg, min_lr=None)) == pytest.approx(1e-4)  # default lr/10
    assert get_lr(35, dataclasses.replace(cfg, lr_decay_iters=60)) == pytest.approx(5.5e-4)


def test_optimizer_groups_trainable_only_and_no_decay_on_vectors():
    model = GPT(GPTConfig.from_name("tiny"))
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], bias="all"))
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    assert len(decay["params"]) == 2 * 2 * 2  # A and B of q and v in 2 blocks
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_optimizer_is_fused_on_the_cpu_and_equals_the_per_tensor_update():
    """The fused CPU kernel (5.6x faster at gpt2's size) makes the same AdamW update as torch's default
    per-tensor path, to float rounding, weight decay and both groups included."""
    torch.manual_seed(0)
    fused = GPT(GPTConfig.from_name("tiny", dropout=0.0))
    plain, start = copy.deepcopy(fused), copy.deepcopy(fused)
    opt = configure_optimizer(fused, 0.1, 1e-2, (0.9, 0.95), "cpu")
    assert opt.defaults["fused"] is True
    groups = configure_optimizer(plain, 0.1, 1e-2, (0.9, 0.95), "cpu").param_groups  # the same groups, unfused:
    ref = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                            lr=1e-2, betas=(0.9, 0.95))
    assert not ref.defaults["fused"]
    x = torch.randint(0, fused.config.vocab_size, (4, 16))
    for _ in range(10):
        for model, o in ((fused, opt), (plain, ref)):
            model(x, x, loss_only=True)[1].backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        if not name.endswith("k_proj.bias"):  # softmax ignores it: its gradient is rounding noise, which Adam scales up
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(fused.parameters(), start.parameters())) > 1e-2  # it trained


# ---- one step ------------------------------------------------------------------------------------

def test_accumulation_equals_one_big_batch():
    """k micro-batches of B rows give the gradient of one batch of k*B rows, masks included."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", dropout=0.0))
    twin = copy.deepcopy(model)
    x = torch.randint(0, 257, (6, 16))
    y = torch.randint(0, 257, (6, 16))
    y[0, :12] = -100  # micro-batches with different numbers of target tokens
    y[3, :5] = -100
    rt = Runtime()
    big = forward_backward(model, [(x, y)], rt)
    small = forward_backward(twin, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 6, 2)], rt)
    assert small == pytest.approx(big, abs=1e-6)
    _, reference = model(x, y)  # the model's own mean loss over the whole batch
    assert big == pytest.approx(reference.item(), abs=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=0, msg=name)


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    x = torch.tensor([list(TEXT[i * 40:i * 40 + 33].encode()) for i in range(4)])
    batch = [(x[:, :-1], x[:, 1:])]
    opt = configure_optimizer(model, 0.0, 3e-3, (0.9, 0.99), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for _ in range(150):
        losses.append(forward_backward(model, batch, Runtime(), scaler))
        optimizer_step(opt, scaler, 1.0)
    assert losses[0] > 5.0  # about ln(257) at init
    assert losses[-1] < 0.5, losses[-1]


def test_bf16_autocast_on_cpu_trains_with_fp32_master_weights(tmp_path, text_file):
    model, result = run(make_cfg(tmp_path, text_file, dtype="bf16", max_iters=8))
    losses = list(result.losses.values())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_is_refused_on_cpu():
    with pytest.raises(MiniloraError, match="fp16 needs a CUDA GPU"):
        resolve_dtype("fp16", "cpu")
    assert resolve_dtype("auto", "cpu", (256, 32, 128))[0] == "fp32"  # tiny: never bf16 (tests/test_ops.py has the rest)


def test_epochs_count_optimizer_steps(tmp_path, jsonl_file):
    cfg = make_cfg(tmp_path, jsonl_file, epochs=2, grad_accum=2, batch_size=4, val_fraction=0.2)
    dataset = load_data(cfg, "byte", 64, Runtime())  # 48 training examples: 12 batches of 4 per epoch
    assert total_iters(cfg, dataset, Runtime()) == 12


# ---- resume --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["full", "lora"])
def test_resume_equals_uninterrupted(tmp_path, text_file, jsonl_file, base_dir, kind):
    """N steps in one go == N/2, then --resume to N: same losses and weights, bit for bit (fp32)."""
    if kind == "full":  # dropout on, so the restored RNG matters
        common = dict(data=text_file, dropout=0.1)
    else:
        common = dict(data=jsonl_file, init_from=base_dir, lora_r=4, lora_dropout=0.1, grad_accum=2)
    common.update(lr_decay_iters=8, eval_interval=2, log_interval=1)
    whole, whole_result = run(make_cfg(tmp_path / "a", max_iters=8, **common))
    run(make_cfg(tmp_path / "b", max_iters=4, **common))
    resumed, resumed_result = run(make_cfg(tmp_path / "b", max_iters=8, resume=True, **common))
    assert list(resumed_result.losses) == [5, 6, 7, 8]
    assert [resumed_result.losses[i] for i in range(5, 9)] == [whole_result.losses[i] for i in range(5, 9)]
    a, b = trainable_state(whole), trainable_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(tmp_path / "b" / "out" / "log.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert steps == list(range(1, 9))  # the log continues without gaps or repeats
    if kind == "lora":  # the checkpoint holds only what trains
        saved = load_file(os.path.join(tmp_path / "b" / "out" / "checkpoint", "model.safetensors"))
        assert saved and all(".lora_" in k for k in saved)


def test_resume_from_checkpoint_parked_by_a_kill(tmp_path, text_file):
    """A kill between atomic_directory's two renames leaves only .checkpoint.*.old/prev: still resumable."""
    cfg = make_cfg(tmp_path, text_file, max_iters=4, checkpoint_interval=2)
    run(cfg)
    out = cfg.out_dir
    parked = os.path.join(out, ".checkpoint.x.old")
    os.makedirs(parked)
    os.replace(os.path.join(out, "checkpoint"), os.path.join(parked, "prev"))
    assert find_checkpoint(out) == os.path.join(parked, "prev")
    _, result = run(dataclasses.replace(cfg, max_iters=6, resume=True))
    assert list(result.losses) == [5, 6]
    assert find_checkpoint(out) == os.path.join(out, "checkpoint") and not os.path.exists(parked)


def test_resume_refuses_a_different_model_and_fresh_run_refuses_old_checkpoint(tmp_path, text_file):
    cfg = make_cfg(tmp_path, text_file, max_iters=2)
    run(cfg)
    with pytest.raises(MiniloraError, match="already holds a checkpoint"):
        run(cfg)
    with pytest.raises(MiniloraError, match="--model 'tiny'"):
        run(dataclasses.replace(cfg, model="small", resume=True))


def test_non_finite_loss_stops_naming_the_step(tmp_path, text_file):
    cfg = make_cfg(tmp_path, text_file, max_iters=10, checkpoint_interval=2)
    rt = setup_runtime(cfg)
    model, info = build_model(cfg, rt)
    dataset = load_data(cfg, info.tokenizer, model.config.block_size, rt)
    calls = []

    def poison(module, args, output):  # the 5th forward (step 5) yields NaN hidden states, so a NaN loss
        calls.append(1)
        return output * float("nan") if len(calls) == 5 else output
    model.transformer.ln_f.register_forward_hook(poison)
    with pytest.raises(MiniloraError, match=r"non-finite loss \(nan\) at step 5.*last good checkpoint"):
        train(model, dataset, cfg, rt, stream=io.StringIO())
    state = torch.load(os.path.join(cfg.out_dir, "checkpoint", "state.pt"), weights_only=True)
    assert state["iter_num"] == 4


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])  # 0 = no clipping, but the norm is still checked
def test_non_finite_gradient_norm_stops_naming_the_step_and_skips_the_update(tmp_path, text_file, grad_clip):
    cfg = make_cfg(tmp_path, text_file, max_iters=10, checkpoint_interval=2, grad_clip=grad_clip)
    rt = setup_runtime(cfg)
    model, info = build_model(cfg, rt)
    dataset = load_data(cfg, info.tokenizer, model.config.block_size, rt)
    calls = []

    def poison(grad):  # step 5's gradient of one weight is NaN; its loss is finite
        calls.append(1)
        return grad * float("nan") if len(calls) == 5 else grad
    model.transformer.h[0].mlp.fc_in.weight.register_hook(poison)
    with pytest.raises(MiniloraError, match=r"non-finite gradient norm \(nan\) at step 5; stopping: the last good checkpoint"):
        train(model, dataset, cfg, rt, stream=io.StringIO())
    state = torch.load(os.path.join(cfg.out_dir, "checkpoint", "state.pt"), weights_only=True)
    assert state["iter_num"] == 4
    # the bad update was never applied: the weights are still step 4's, the ones the checkpoint holds
    saved = load_file(os.path.join(cfg.out_dir, "checkpoint", "model.safetensors"))
    current = dict(model.named_parameters())
    assert saved and all(torch.equal(current[k], v) for k, v in saved.items())


def test_grad_norm_is_logged_with_clipping_off(tmp_path, text_file):
    run(make_cfg(tmp_path, text_file, max_iters=2, grad_clip=0.0))
    with open(os.path.join(tmp_path, "out", "log.jsonl")) as f:
        norms = [r["grad_norm"] for r in map(json.loads, f) if "loss" in r]
    assert len(norms) == 2 and all(math.isfinite(n) and n > 0 for n in norms)


# ---- output directory and progress ---------------------------------------------------------------

def test_lora_output_dir_holds_peft_adapter_and_metadata(tmp_path, jsonl_file, base_dir):
    cfg = make_cfg(tmp_path, jsonl_file, init_from=base_dir, lora_r=4, lora_alpha=8, max_iters=4,
                   eval_examples=5, block_size=64)
    metrics = []
    model, result = run(cfg, eval_fn=lambda m: metrics.append(1) or {"accuracy": 0.25})
    out = cfg.out_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "minilora.json", "log.jsonl"} <= set(os.listdir(out))
    with open(os.path.join(out, "minilora.json")) as f:
        run_info = json.load(f)
    assert run_info["kind"] == "lora" and run_info["base_model"] == os.path.abspath(base_dir)
    assert run_info["tokenizer"] == "byte"
    with open(os.path.join(out, "adapter_config.json")) as f:
        peft = json.load(f)
    assert peft["r"] == 4 and peft["lora_alpha"] == 8 and peft["base_model_name_or_path"] == os.path.abspath(base_dir)
    assert result.metrics == {"accuracy": 0.25} and metrics  # the eval hook ran and was reported
    reloaded = load_adapter(GPT.from_pretrained(base_dir), out)
    x = torch.randint(0, 256, (2, 10))
    model.eval()
    torch.testing.assert_close(reloaded(x)[0], model(x)[0], atol=1e-6, rtol=0)
    # --init_from a LoRA dir continues that adapter on the base it names
    again, info = build_model(make_cfg(tmp_path, jsonl_file, init_from=out, lora_r=4), Runtime())
    assert info.base_model == os.path.abspath(base_dir)
    assert all(torch.equal(p, trainable_state(model)[n]) for n, p in trainable_state(again).items())


def test_full_output_dir_loads_with_from_pretrained(tmp_path, text_file):
    model, _ = run(make_cfg(tmp_path, text_file, max_iters=3))
    loaded = GPT.from_pretrained(os.path.join(tmp_path, "out"))
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
    with open(os.path.join(tmp_path, "out", "minilora.json")) as f:
        assert json.load(f)["kind"] == "full"


def test_progress_rewrites_one_line_on_a_terminal(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    stream = Tty()
    progress = Progress(str(tmp_path), True, stream=stream)
    progress.line("step 1/2")
    progress.line("step 2/2")
    progress.note("done")
    assert stream.getvalue() == "\rstep 1/2\033[K\rstep 2/2\033[K\ndone\n"
    plain = io.StringIO()
    Progress(str(tmp_path / "p"), True, stream=plain).line("step 1/2")
    assert plain.getvalue() == "step 1/2\n"


# ---- malloc: full training keeps freed memory -------------------------------------------------------

KEEP_PROBE = """
import sys, torch
from minilora.runtime import keep_freed_memory
def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
before = rss_kb()
x = torch.ones(2 ** 24)  # 64 MiB, touched
del x
print(int(applied), (rss_kb() - before) // 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_keeps_a_freed_block_for_the_next_allocation():
    """By default glibc unmaps a freed 64 MiB block at once (the next one page-faults in again); after
    keep_freed_memory() it stays in the process for the next step, unless the user set malloc up themselves."""
    kept = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    for mode, extra in (("default", {}), ("keep", {}), ("keep", {"MALLOC_MMAP_THRESHOLD_": "4194304"})):
        out = subprocess.run([sys.executable, "-c", KEEP_PROBE, mode], capture_output=True, text=True, check=True,
                             env={**env, **extra})
        kept[mode + "+env" * bool(extra)] = tuple(map(int, out.stdout.split()))
    assert kept["default"][0] == 0 and kept["default"][1] < 16
    assert kept["keep"][0] == 1 and kept["keep"][1] >= 60
    assert kept["keep+env"][0] == 0 and kept["keep+env"][1] < 16  # the user's own malloc setting stands


@pytest.mark.parametrize("lora_r", [0, 4])
def test_training_on_the_cpu_keeps_freed_memory(monkeypatch, tmp_path, text_file, base_dir, lora_r):
    calls = []
    monkeypatch.setattr("minilora.trainer.keep_freed_memory", lambda: calls.append(1) or True)
    run(make_cfg(tmp_path, text_file, init_from=base_dir, lora_r=lora_r, max_iters=1))
    assert calls == [1]


@pytest.mark.skipif(not ops._ONEDNN_PACK, reason="this torch build has no oneDNN layouts")
def test_lora_training_uses_the_heads_kept_layout_and_drops_it_at_the_end(monkeypatch, tmp_path, jsonl_file,
                                                                            base_dir):
    monkeypatch.setenv(ops.KERNEL_ENV, "onednn")
    monkeypatch.setattr(ops, "_choices", {})  # earlier tests' choices (MKL, untimed) are kept per process
    monkeypatch.setattr(ops, "_packed", ops.WeakIdKeyDictionary())
    kept = []
    packed_transpose = ops.packed_transpose
    monkeypatch.setattr(ops, "packed_transpose", lambda *a: kept.append(len(ops._packed)) or packed_transpose(*a))
    run(make_cfg(tmp_path, jsonl_file, init_from=base_dir, lora_r=4, max_iters=3))
    assert kept == [0, 1, 1]  # made at the first step, reused by the next two
    assert len(ops._packed) == 0
