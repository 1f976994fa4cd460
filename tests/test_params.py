"""The parameter-savings figures of the LoRA paper, computed on the meta device, and the CLI."""

import subprocess
import sys

import pytest
import torch

from minilora import GPT, GPTConfig, MiniloraError
from minilora import LoraConfig, apply_lora, print_trainable_parameters
from minilora.params import TABLE, build_meta_model, format_table, main, parameter_report

QV = ["q_proj", "v_proj"]


def report(model, r, targets=QV):
    return parameter_report(model, LoraConfig(r=r, lora_alpha=r, target_modules=targets))


def test_gpt2_r8_q_v_is_pefts_figure():
    rep = report("gpt2", 8)
    assert (rep["trainable"], rep["total"], rep["base"]) == (294_912, 124_734_720, 124_439_808)
    assert f"{rep['percent']:.4f}" == "0.2364"
    assert rep["adapter_bytes_fp32"] == 4 * 294_912 and rep["adapter_bytes_bf16"] == 2 * 294_912
    assert rep["checkpoint_bytes_fp32"] == 4 * 124_439_808


def test_paper_figures():
    assert report("gpt2-medium", 4)["trainable"] == 393_216  # the paper's Table 3 says 0.35M; 0.39M is the arithmetic
    assert report("gpt3-175b", 8)["trainable"] == 37_748_736  # Table 4: 37.7M
    assert report("gpt3-175b", 1)["trainable"] == 4_718_592  # Table 4: 4.7M


def test_single_4096_matrix():
    rep = report("linear4096", 8, ["proj"])
    assert (rep["trainable"], rep["base"], rep["ratio"]) == (65_536, 16_777_216, 256.0)


def test_report_takes_a_config_and_builds_nothing_real():
    rep = parameter_report(GPTConfig(n_layer=2, n_head=4, n_embd=8, vocab_size=11, block_size=8), LoraConfig(r=8))
    assert rep["trainable"] == 512 and rep["model"] == "custom"
    with pytest.raises(MiniloraError, match="unknown model 'gpt5'"):
        report("gpt5", 8)


def test_cli_prints_peft_line_and_sizes(capsys):
    main(["--model", "gpt2", "--r", "8", "--target_modules", "q_proj", "v_proj"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"
    assert out[1].startswith("adapter: 294,912 params = 1.12 MiB fp32, 576 KiB bf16")
    assert out[2].startswith("full checkpoint: 124,439,808 params = 475 MiB fp32, 237 MiB bf16 (422x")
    main(["--model", "gpt2", "--target_modules", "q_proj,v_proj"])  # the comma form gives the same line
    assert capsys.readouterr().out.splitlines()[0] == out[0]
    main(["--model", "linear4096"])
    assert "trainable params: 65,536 ||" in capsys.readouterr().out


def test_table_has_every_row():
    table = format_table()
    for figure in ("294,912", "393,216", "37,748,736", "4,718,592", "65,536", "256x", "0.2364"):
        assert figure in table
    assert len(table.splitlines()) == 2 + len(TABLE)


def test_cli_bad_input_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "minilora.params", "--model", "gpt2", "--target_modules", "q_prj"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "q_proj, k_proj, v_proj, out_proj, fc_in, fc_out, lm_head" in proc.stderr


def test_meta_models_hold_no_storage():
    assert all(p.is_meta for p in build_meta_model("gpt2").parameters())
    assert torch.device("meta") == next(build_meta_model("linear4096").parameters()).device


# PEFT's print_trainable_parameters on the HF models (LoraConfig(r, target_modules=["q_proj", "v_proj"])).
PEFT_LINES = {
    ("opt-350m", 16): "trainable params: 1,572,864 || all params: 332,769,280 || trainable%: 0.4727",
    ("opt-125m", 8): "trainable params: 294,912 || all params: 125,534,208 || trainable%: 0.2349",
    ("llama2-7b", 8): "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622",
    ("llama3-8b", 8): "trainable params: 3,407,872 || all params: 8,033,669,120 || trainable%: 0.0424",
    ("mistral-7b", 8): "trainable params: 3,407,872 || all params: 7,245,139,968 || trainable%: 0.0470",
    ("qwen2.5-0.5b", 8): "trainable params: 540,672 || all params: 494,573,440 || trainable%: 0.1093",
    ("smollm2-135m", 8): "trainable params: 460,800 || all params: 134,975,808 || trainable%: 0.3414",
    ("tinyllama-1.1b", 8): "trainable params: 1,126,400 || all params: 1,101,174,784 || trainable%: 0.1023",
}


@pytest.mark.parametrize("name,r", PEFT_LINES)
def test_family_presets_print_pefts_exact_line(name, r, capsys):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name(name))
    apply_lora(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=QV))
    trainable, total = print_trainable_parameters(model)
    assert capsys.readouterr().out == PEFT_LINES[name, r] + "\n"
    assert all(p.is_meta for p in model.parameters())
    assert parameter_report(name, LoraConfig(r=r, target_modules=QV))["total"] == total  # the CLI's figure too
