"""train.py says everything LoraConfig says: --bias, --modules_to_save, --task_type, --layers_to_transform,
--init_lora_weights, --use_rslora, and one --target_modules rule (names, q_proj,v_proj, all-linear, a regex)."""

import json
import os

import pytest
import torch

from minilora import GPT, GPTConfig, MiniloraError
from minilora.cli import parse_args
from minilora.loading import load_model
from minilora.params import Args as ParamsArgs
from minilora.safetensors import read_header
from minilora.targets import target_modules_arg
from minilora.trainer import TrainConfig, lora_config

from scripts import run_script_here


def test_one_parsing_rule_for_target_modules():
    for typed in (["q_proj,v_proj"], ["q_proj", "v_proj"], ["q_proj,", "v_proj"], ["q_proj, v_proj"]):
        assert target_modules_arg(typed) == ["q_proj", "v_proj"]
        # train.py and params.py read the option the same way
        assert lora_config(parse_args(TrainConfig, ["--target_modules", *typed])).target_modules == ["q_proj", "v_proj"]
        assert target_modules_arg(parse_args(ParamsArgs, ["--target_modules", *typed]).target_modules) == ["q_proj", "v_proj"]
    assert target_modules_arg(["all-linear"]) == "all-linear"
    assert target_modules_arg(["attn.q_proj"]) == ["attn.q_proj"]  # a dotted suffix is a name
    assert target_modules_arg([r".*\.(q_proj|v_proj)"]) == r".*\.(q_proj|v_proj)"
    assert target_modules_arg(["h\\.[01]\\.attn\\.q_proj,x{1,2}"]) == "h\\.[01]\\.attn\\.q_proj,x{1,2}"  # commas stay a regex's
    with pytest.raises(MiniloraError, match="must come alone"):
        target_modules_arg(["q_proj", ".*v_proj"])
    with pytest.raises(MiniloraError, match="block indices"):
        TrainConfig(layers_to_transform=["one"])


def test_train_py_writes_every_lora_option(tmp_path, capsys):
    torch.manual_seed(0)
    GPT(GPTConfig.from_name("tiny")).save_pretrained(tmp_path / "base")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"line {i} of the data"}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    code, _, err = run_script_here(
        capsys, "train.py", "--init_from", str(tmp_path / "base"), "--data", str(tmp_path / "d.jsonl"), "--text_field",
        "text", "--target_modules", r"transformer\.h\.\d\.(attn\.q_proj|mlp\.fc_in)", "--layers_to_transform", "1",
        "--bias", "lora_only", "--modules_to_save", "ln_f", "--init_lora_weights", "gaussian", "--use_rslora",
        "--max_iters", "2", "--batch_size", "2", "--eval_interval", "0", "--out_dir", str(out))
    assert code == 0, err
    cfg = json.load(open(out / "adapter_config.json"))
    assert (cfg["task_type"], cfg["bias"], cfg["modules_to_save"], cfg["layers_to_transform"], cfg["init_lora_weights"],
            cfg["use_rslora"]) == ("CAUSAL_LM", "lora_only", ["ln_f"], [1], "gaussian", True)
    keys = set(read_header(out / "adapter_model.safetensors")[0])
    lora = {k for k in keys if "lora_" in k}
    assert lora == {f"base_model.model.transformer.h.1.{m}.lora_{ab}.weight"
                    for m in ("attn.q_proj", "mlp.fc_in") for ab in "AB"}  # the regex, in block 1 only
    assert sorted(keys - lora) == [  # PEFT's keys for lora_only biases and modules_to_save
        "base_model.model.transformer.h.1.attn.q_proj.base_layer.bias",
        "base_model.model.transformer.h.1.mlp.fc_in.base_layer.bias",
        "base_model.model.transformer.ln_f.bias", "base_model.model.transformer.ln_f.weight"]
    model, _ = load_model(str(out))  # minilora.json: base + this adapter, as generate.py loads it
    assert model.peft_config["default"].bias == "lora_only"
    # resume refuses a changed model option by name
    code, _, err = run_script_here(capsys, "train.py", "--init_from", str(tmp_path / "base"), "--data",
                                   str(tmp_path / "d.jsonl"), "--text_field", "text", "--bias", "none", "--resume",
                                   "--max_iters", "3", "--out_dir", str(out))
    assert code == 2 and "--bias 'lora_only'" in err
    assert os.path.isdir(out / "checkpoint")
