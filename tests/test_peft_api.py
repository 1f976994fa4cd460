"""PEFT/TRL-shaped names (minilora.peft_api), each checked against the minilora function it wraps."""

import copy
import dataclasses
import json
import os
import shutil

import pytest
import torch

from minilora import (GPT, GPTConfig, LoraConfig, MiniloraError, PeftModel, SFTTrainer, TrainingArguments, apply_lora,
                      generate, generate_ids, get_peft_model, get_tokenizer, load_adapter, lora_layers, merge_and_unload,
                      print_trainable_parameters, save_adapter)
from minilora.loading import load_model
from minilora.runtime import Runtime
from minilora.trainer import load_data, train

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
IDX = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
QUOTES = [{"quote": q, "author": "someone"} for q in
          ("Be yourself; everyone else is already taken.", "So many books, so little time.",
           "A room without books is like a body without a soul.", "You only live once, but if you do it right, once is enough.")]


def base():
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("tiny")).eval()


def config(**kw):
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw})


def logits(model):
    with torch.no_grad():
        return model(IDX, all_logits=True)[0]


def adapter_dir(path, seed, **kw):
    model = base()
    torch.manual_seed(seed)
    save_adapter(apply_lora(model, config(**kw)), path)
    return path


def test_get_peft_model_is_apply_lora(capsys):
    torch.manual_seed(1)
    peft = get_peft_model(base(), config())
    torch.manual_seed(1)
    plain = apply_lora(base(), config())
    assert isinstance(peft, PeftModel) and peft.base_model.peft_config == plain.peft_config
    assert peft.print_trainable_parameters() == print_trainable_parameters(plain) == peft.get_nb_trainable_parameters()
    first, second = capsys.readouterr().out.splitlines()
    assert first == second and first.startswith("trainable params: 1,024 || all params:")
    assert torch.equal(logits(peft), logits(plain))
    assert peft.config is peft.base_model.config and peft.active_adapter == "default"  # attributes read through


def test_from_pretrained_is_load_adapter_and_a_second_adapter_stays_inactive(tmp_path):
    a, b = adapter_dir(tmp_path / "a", 1), adapter_dir(tmp_path / "b", 2, target_modules=["v_proj", "fc_in"])
    peft = PeftModel.from_pretrained(base(), a)
    assert torch.equal(logits(peft), logits(load_adapter(base(), a)))
    peft.load_adapter(b, adapter_name="b")  # PEFT: loading a second adapter does not activate it
    assert peft.active_adapter == "default" and torch.equal(logits(peft), logits(load_adapter(base(), a)))
    peft.add_adapter("c", config(r=2))  # nor does adding one
    assert peft.active_adapters == ["default"] and set(peft.peft_config) == {"default", "b", "c"}
    peft.set_adapter("b")
    assert torch.equal(logits(peft), logits(load_adapter(base(), b)))
    with peft.disable_adapter():
        assert torch.equal(logits(peft), logits(base()))
    peft.delete_adapter("c")
    assert set(peft.peft_config) == {"default", "b"}
    assert not any("c" in layer.lora_A for _, layer in lora_layers(peft.base_model))


def test_merge_and_unload_and_save_pretrained(tmp_path):
    peft = PeftModel.from_pretrained(base(), adapter_dir(tmp_path / "a", 1))
    peft.load_adapter(adapter_dir(tmp_path / "b", 2), adapter_name="b")
    peft.save_pretrained(tmp_path / "saved")  # PEFT's layout: default at the top, the others in subdirectories
    assert sorted(os.listdir(tmp_path / "saved")) == ["adapter_config.json", "adapter_model.safetensors", "b"]
    again = PeftModel.from_pretrained(base(), tmp_path / "saved")
    again.load_adapter(tmp_path / "saved" / "b", "b")
    assert torch.equal(logits(again), logits(peft))
    twin = copy.deepcopy(peft.base_model)
    merged = peft.merge_and_unload()
    assert type(merged) is GPT and not list(lora_layers(merged))
    assert torch.equal(logits(merged), logits(merge_and_unload(twin)))


def test_generate_returns_the_prompt_then_the_new_ids():
    torch.manual_seed(3)
    peft = get_peft_model(base(), config())
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    ref = generate(peft.base_model, prompt, 6, temperature=0, eot_token=[256])  # the tiny preset's byte eot
    out = peft.generate(input_ids=prompt, max_new_tokens=6)
    assert out.shape[0] == 2 and torch.equal(out[:, :3], prompt)
    for row, tokens, why in zip(out.tolist(), ref.tokens, ref.finish_reasons):
        tail = tokens + ([256] if why == "stop" else [])
        assert row[3:3 + len(tail)] == tail and set(row[3 + len(tail):]) <= {256}  # padded with EOS, as transformers
    # a row that stops early keeps its EOS and is padded: eos = the first greedy token of row 0
    eos = ref.tokens[0][0]
    early = generate_ids(peft.base_model, prompt[:1], 6, eos_token_id=eos, pad_token_id=0)
    assert early.tolist() == [[5, 6, 7, eos]]
    with pytest.raises(MiniloraError, match="do_sample=True"):
        peft.generate(input_ids=prompt, max_new_tokens=2, temperature=0.7)
    sampled = peft.generate(input_ids=prompt, max_new_tokens=4, do_sample=True, temperature=0.7, seed=1)
    again = generate(peft.base_model, prompt, 4, temperature=0.7, seed=1, eot_token=[256])
    assert sampled[0, 3:3 + len(again.tokens[0])].tolist() == again.tokens[0]


def hub_dir(root):
    path = root / "opt-post"
    shutil.copytree(os.path.join(FIXTURES, "hf", "opt-post", "model"), path)
    shutil.copy(os.path.join(FIXTURES, "tokenizers", "bytelevel", "tokenizer.json"), path)
    return str(path)


def test_sft_trainer_is_the_training_loop(tmp_path):
    """The guide's SFTTrainer call on an OPT (post-LN) fixture: the same losses as trainer.train on the same
    config, an adapter that generate's loader finds its base from, and the trained weights in it."""
    model_dir = hub_dir(tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=2,
                             logging_dir=str(tmp_path / "logs"), logging_steps=1, learning_rate=2e-3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    torch.manual_seed(0)  # LoRA's A init
    trainer = SFTTrainer(model=GPT.from_pretrained(model_dir), args=args, train_dataset=QUOTES, peft_config=lora,
                         dataset_text_field="quote")
    result = trainer.train()
    trainer.save_model()

    # the wrapped function: trainer.train on the config TrainingArguments maps to, from the same start
    torch.manual_seed(0)
    ref_model = apply_lora(GPT.from_pretrained(model_dir), lora).train()
    cfg = dataclasses.replace(trainer._config(), out_dir=str(tmp_path / "ref"))
    rt = Runtime()
    ref = train(ref_model, load_data(cfg, get_tokenizer(model_dir), ref_model.config.block_size, rt), cfg, rt)
    assert result.losses == ref.losses and len(result.losses) == 3

    saved = json.load(open(tmp_path / "sft" / "adapter_config.json"))
    assert saved["base_model_name_or_path"] == os.path.abspath(model_dir) and saved["task_type"] == "CAUSAL_LM"
    reloaded, _ = load_model(str(tmp_path / "sft"))  # minilora.json: the base, then the adapter
    assert torch.equal(logits_of(reloaded), logits_of(trainer.model.eval()))


def logits_of(model):
    with torch.no_grad():
        return model(IDX % 1000, all_logits=True)[0]


def test_training_arguments_refuse_what_they_do_not_implement():
    with pytest.raises(TypeError, match="report_to"):
        TrainingArguments(output_dir="x", report_to="wandb")
    with pytest.raises(MiniloraError, match="'linear' is not implemented"):
        TrainingArguments(output_dir="x", lr_scheduler_type="linear")
    with pytest.raises(MiniloraError, match="list of dicts"):
        SFTTrainer(model=base(), args=TrainingArguments(output_dir="x"), train_dataset=[1, 2])._config()
