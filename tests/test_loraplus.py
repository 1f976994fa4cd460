"""LoRA+ (--loraplus_lr_ratio) parameter groups, and --use_dora through train.py's loop."""

import io
import json
import os

import pytest
import torch

from minilora import GPT, GPTConfig, LoraConfig, MiniloraError, apply_lora
from minilora.runtime import setup_runtime
from minilora.trainer import TrainConfig, build_model, configure_optimizer, get_lr, load_data, save_output, train


def ids(params):
    return {id(p) for p in params}


def test_groups_follow_peft_create_loraplus_optimizer():
    model = GPT(GPTConfig.from_name("tiny"))
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "fc_in"], bias="lora_only", use_dora=True))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.99), "cpu", loraplus_lr_ratio=16)
    a, b, vec = opt.param_groups
    assert ids(a["params"]) == ids(p for n, p in named.items() if ".lora_A." in n)
    assert ids(b["params"]) == ids(p for n, p in named.items() if ".lora_B." in n)
    assert ids(vec["params"]) == ids(p for n, p in named.items() if p.dim() == 1)  # biases and DoRA magnitudes
    assert any("lora_magnitude_vector" in n for n, p in named.items() if id(p) in ids(vec["params"]))
    assert (a["lr"], b["lr"], vec["lr"]) == (1e-3, pytest.approx(1.6e-2), pytest.approx(1.6e-2))  # B: ratio x A
    assert (a["weight_decay"], b["weight_decay"], vec["weight_decay"]) == (0.1, 0.1, 0.0)
    plain = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.99), "cpu")
    assert [g["lr_scale"] for g in plain.param_groups] == [1.0, 1.0]
    with pytest.raises(MiniloraError, match="needs LoRA"):
        TrainConfig(lora_r=0, loraplus_lr_ratio=16)
    with pytest.raises(MiniloraError, match="positive and finite"):
        TrainConfig(loraplus_lr_ratio=0)


def test_training_loop_applies_the_ratio_and_dora_trains(tmp_path):
    torch.manual_seed(0)
    base = str(tmp_path / "base")
    GPT(GPTConfig.from_name("tiny")).save_pretrained(base)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus 1: ", "completion": str(i + 1)}) + "\n" for i in range(40)))
    cfg = TrainConfig(init_from=base, lora_r=2, use_dora=True, loraplus_lr_ratio=4, data=str(data),
                      out_dir=str(tmp_path / "out"), block_size=32, batch_size=4, max_iters=3, warmup_iters=1,
                      eval_interval=0, eval_iters=1, eval_examples=0, device="cpu", dtype="fp32")
    rt = setup_runtime(cfg)
    model, info = build_model(cfg, rt)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "magnitude" in n}
    result = train(model, load_data(cfg, info.tokenizer, 32, rt), cfg, rt, stream=io.StringIO())
    save_output(model, cfg, info, rt, result)
    state = torch.load(os.path.join(cfg.out_dir, "checkpoint", "state.pt"), weights_only=False)
    lrs = [g["lr"] for g in state["optimizer"]["param_groups"]]
    last = get_lr(2, cfg)
    assert lrs == [pytest.approx(last), pytest.approx(4 * last), pytest.approx(4 * last)]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "magnitude" in n)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
