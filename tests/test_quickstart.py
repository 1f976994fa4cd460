import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from minilora.chat import JINJA
from minilora.errors import MiniloraError
from minilora import ops, quickstart
from minilora.ops import KERNEL_ENV
from minilora.quickstart import (LIBRARY_NAMES, QUICK, Args, apply_quick, base_key, base_status, comparison_table,
                                  fp32_library, main, time_libraries)
from minilora.safetensors import load_file

from scripts import ROOT, TINY, run_quickstart


@pytest.fixture(scope="module")
def lora_run(quick_quickstart):
    return quick_quickstart  # conftest.py: one tiny --quick run per session (sql, dates, chat), shared with test_readme_commands.py


def test_quick_run_writes_adapters_base_and_results(lora_run):
    out, stdout = lora_run
    for task in ("sql", "dates"):
        adapter = out / "adapters" / task
        assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors", "minilora.json"]
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["r"] == 8 and config["target_modules"] == "all-linear"
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
        run = json.loads((adapter / "minilora.json").read_text())
        assert run["kind"] == "lora" and run["base_model"] == str(out / "base")
        rows = [json.loads(line) for line in open(out / "data" / f"{task}_train.jsonl")]
        assert len(rows) == 16 and set(rows[0]) == {"prompt", "completion"}
    assert os.path.isfile(out / "base" / "model.safetensors")
    results = json.loads((out / "results_lora.json").read_text())
    assert [r["task"] for r in results["finetune"]] == ["sql", "dates", "chat"]
    for r in results["finetune"]:
        assert 0.0 <= r["base_accuracy"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
        assert r["precision"] == "fp32"  # pinned (--dtype fp32 by default): train.py's auto is a timing, run to run
        assert r["fp32_kernel"] in ("mkl", "onednn")  # one library for every stage, said up front
        assert f"fp32 matmuls: {LIBRARY_NAMES[r['fp32_kernel']]} for every product of every stage (" in stdout
        # all-linear: 4 layers x r x (in + out) of q, k, v, out_proj (128 -> 128), fc_in (128 -> 512), fc_out (512 -> 128)
        assert r["trainable_params"] == 4 * 8 * (4 * (128 + 128) + 2 * (128 + 512))
        assert r["train_state_bytes"] == 16 * r["trainable_params"] + 4 * (r["total_params"] - r["trainable_params"])
    # "chat": TRL conversations, trained through the chat path, the template recorded beside the adapter
    rows = [json.loads(line) for line in open(out / "data" / "chat_train.jsonl")]
    assert len(rows) == 16 and set(rows[0]) == {"messages"} and rows[0]["messages"][-1]["role"] == "assistant"
    assert sorted(os.listdir(out / "adapters" / "chat")) == ["adapter_config.json", "adapter_model.safetensors",
                                                            "chat_template.jinja", "minilora.json"]
    assert (out / "adapters" / "chat" / "chat_template.jinja").read_text() == JINJA["plain"]  # the byte base's
    chat = results["finetune"][2]
    assert chat["n_val"] == 4 and len(chat["examples"]) == 2
    assert chat["examples"][0]["prompt"].startswith("user: Book ") and "| assistant: Booked: " in chat["examples"][0]["prompt"]
    assert "== 4. task 'chat'" in stdout and "--- chat: lora r=8 all-linear ---" in stdout
    # what the quickstart promises to print
    for line in ["trainable params: 73,728 || all params:", "held-out exact match before fine-tuning",
                 "step 2/2 | loss", "held-out exact match (4 examples): base", "adapter on disk:",
                 "examples (held out, greedy):", "quickstart done in"]:
        assert line in stdout, line


def test_second_run_reuses_the_base_and_full_finetuning_compares(lora_run):
    out, _ = lora_run
    before = os.path.getmtime(out / "base" / "model.safetensors")
    proc = run_quickstart(out, "--lora_r", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing the base model" in proc.stdout
    assert os.path.getmtime(out / "base" / "model.safetensors") == before
    full = json.loads((out / "results_full.json").read_text())["finetune"]
    assert [r["task"] for r in full] == ["sql"] and full[0]["trainable_params"] == full[0]["total_params"]
    assert os.path.isfile(out / "runs" / "sql-full" / "model.safetensors")
    assert "full model on disk" in proc.stdout and "| full |" in proc.stdout  # the comparison table
    table = comparison_table(str(out))
    assert table.count("\n") == 3 and "lora r=8 all-linear" in table
    assert f"loss curves: {out / 'loss_sql.png'}" in proc.stdout  # matplotlib is in the dev extra
    assert (out / "loss_sql.png").read_bytes()[:4] == b"\x89PNG"


def test_dora_and_loraplus_add_a_row(lora_run):
    out, _ = lora_run
    proc = run_quickstart(out, "--tasks", "sql", "--use_dora", "--loraplus_lr_ratio", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "adapters" / "sql-dora-loraplus" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert os.path.isfile(out / "results_lora-dora-loraplus.json") and os.path.isfile(out / "results_lora.json")
    table = comparison_table(str(out))
    assert table.count("\n") == 4 and "| dora r=8 all-linear lora+ x4 |" in table


def test_base_is_reused_only_with_the_same_settings(lora_run):
    out, _ = lora_run
    args = apply_quick(Args(out_dir=str(out), corpus_chars=20000, pretrain_iters=4, pretrain_batch_size=4))
    paths = {"base": str(out / "base"), "corpus": str(out / "data" / "stdlib.txt")}
    assert base_status(paths, base_key(args, paths)) == "reuse"
    assert base_status(paths, base_key(dataclasses.replace(args, pretrain_iters=5), paths)) == "stale"
    assert base_status(paths, base_key(dataclasses.replace(args, corpus_chars=30000), paths)) == "stale"
    assert base_status({"base": str(out / "nothing")}, {}) == "new"


def test_quick_fills_only_the_options_left_at_their_defaults():
    args = apply_quick(Args(n_train=100))
    assert args.n_train == 100 and args.pretrain_iters == QUICK["pretrain_iters"]


def test_bad_options_fail_with_one_line(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "minilora.quickstart", "--tasks", "poetry", "--out_dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "unknown task" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "base").mkdir()
    with pytest.raises(MiniloraError, match="not written by the quickstart"):
        main(["--out_dir", str(tmp_path), *TINY])


@pytest.mark.parametrize("times, expected", [({"mkl": 1.3, "onednn": 1.0}, "onednn"),
                                             ({"mkl": 1.1, "onednn": 1.0}, "mkl"), ({"mkl": 0.7, "onednn": 1.0}, "mkl")])
def test_one_fp32_library_for_the_whole_run_taken_by_a_margin(monkeypatch, times, expected):
    """oneDNN only where a step of the base measured LIBRARY_MARGIN (1.2x) faster on it: near a tie the two
    would trade places from run to run, and with them the rounding the exact-match figures move with."""
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(quickstart, "in_fresh_process", lambda fn, *args: times)
    kernel, why = fp32_library(Args())
    assert kernel == expected and f"{times['mkl'] / times['onednn']:.2f}x as fast on oneDNN as on MKL" in why


def test_the_environment_pins_the_library_without_timing(monkeypatch):
    monkeypatch.setattr(quickstart, "in_fresh_process", lambda *a: pytest.fail("timed although pinned"))
    monkeypatch.setenv(KERNEL_ENV, "onednn")
    assert fp32_library(Args()) == ("onednn", f"{KERNEL_ENV} is set")
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.raises(MiniloraError, match=f"{KERNEL_ENV}='fastest': set it to mkl or onednn"):
        fp32_library(Args())


def test_timing_the_libraries_leaves_the_process_as_it_was(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(ops, "_choices", {("forward", (1, 1)): dict(kernel="onednn", reason="earlier")})
    times = time_libraries(Args(model="tiny", pretrain_batch_size=2, pretrain_block_size=16))
    assert set(times) == {"mkl", "onednn"} and all(t > 0 for t in times.values())
    assert KERNEL_ENV not in os.environ and list(ops._choices) == [("forward", (1, 1))]  # restored
