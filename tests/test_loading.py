"""minilora.loading: one reading of a model argument for every script, and the same adapter file
served with the same greedy text as generate.py reads it (one reader for everyone)."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest
import torch

from minilora import GPT, GPTConfig, LoraConfig, MiniloraError, apply_lora, generate, get_tokenizer, save_adapter
from minilora.loading import adapter_base, load_model, model_config, model_source
from minilora.trainer import TrainConfig, dry_run

from scripts import ROOT, run_script


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny base (HF layout), a LoRA run-style adapter on it, and the same adapter in HF GPT-2's c_attn layout."""
    root = tmp_path_factory.mktemp("loading")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    with torch.no_grad():  # peaked logits: greedy text is varied and the adapter visibly changes it
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.save_pretrained(root / "base")
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "out_proj"],
                                 init_lora_weights=False))
    save_adapter(model, root / "peft", base_model_name_or_path=str(root / "base"))
    save_adapter(model, root / "hf", base_model_name_or_path=str(root / "base"), format="hf-gpt2")
    return root, model.eval()


@pytest.mark.parametrize("arg,kind,name", [("tiny", "preset", "tiny"), ("scratch:small", "preset", "small"),
                                           ("scratch", "preset", "tiny"), ("gpt2", "hub", "gpt2"),
                                           ("org/model", "hub", "org/model")])
def test_model_source_reads_every_form_the_same_way(arg, kind, name):
    src = model_source(arg)
    assert (src.kind, src.name) == (kind, name)


def test_directories_presets_and_hub_names_resolve_without_downloads(dirs):
    root, _ = dirs
    assert model_source(str(root / "base")).kind == "dir"
    assert model_config(str(root / "base")) == GPTConfig.from_name("tiny")
    assert model_config("gpt2") == GPTConfig.from_name("gpt2")  # a hub GPT-2 name: its shape needs no download
    with pytest.raises(MiniloraError, match="unknown model preset 'nope'"):
        model_source("scratch:nope")
    with pytest.raises(MiniloraError, match="is a file"):
        model_source(str(root / "base" / "config.json"))
    # --dry_run goes through the same reading: a preset that is no hub name never tries a download
    assert "trainable params:" in dry_run(TrainConfig(init_from="tiny", lora_r=2))


def test_random_weights_are_seeded_without_touching_the_global_rng():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, base = load_model("tiny", seed=5)
    after = torch.rand(3)
    b, _ = load_model("tiny", seed=5)
    assert base == "scratch:tiny" and torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_adapter_base_trusts_only_hub_names_and_directories(tmp_path):
    for bad in ("gpt3-175b", "scratch:gpt2-xl", "tiny", 12, ["x"]):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": bad}))
        with pytest.raises(MiniloraError, match="base"):
            adapter_base(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "gpt2"}))
    assert adapter_base(str(tmp_path)) == "gpt2"


def test_every_script_accepts_the_same_model_forms(dirs):
    root, _ = dirs
    base = str(root / "base")
    for arg in ("tiny", "scratch:tiny", base):
        r = run_script("generate.py", "--init_from", arg, "--prompt", "a", "--max_new_tokens", "2", "--temperature", "0")
        assert r.returncode == 0, (arg, r.stderr)
        r = run_script("train.py", "--dry_run", "--init_from", arg, "--lora_r", "2")
        assert r.returncode == 0 and "trainable params:" in r.stdout, (arg, r.stderr)
    r = run_script("merge.py", "--base", base, "--adapter", str(root / "peft"), "--out", str(root / "merged"))
    assert r.returncode == 0, r.stderr


def test_hf_gpt2_adapter_is_served_with_generate_pys_greedy_text(dirs):
    """An adapter in HF GPT-2's fused c_attn layout goes through the one reader everywhere:
    generate.py --adapter and serve.py --lora-modules give the same greedy text as the model in memory."""
    root, model = dirs
    tok = get_tokenizer("byte")
    want = generate(model, [tok.encode("Hello")], 16, temperature=0, eot_token=tok.eot_token, tokenizer=tok).texts[0]
    r = run_script("generate.py", "--adapter", str(root / "hf"), "--prompt", "Hello", "--max_new_tokens", "16",
                   "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n---------------")[0] == "Hello" + want
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--init_from", str(root / "base"), "--port", "0",
                             "--lora-modules", f"hf={root / 'hf'}", f"peft={root / 'peft'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert " on http://" in line, proc.stderr.read()
        url = line.split(" on ")[1].split()[0]
        for name in ("hf", "peft"):
            body = json.dumps({"model": name, "prompt": "Hello", "max_tokens": 16, "temperature": 0}).encode()
            req = urllib.request.Request(url + "/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                assert json.loads(resp.read())["choices"][0]["text"] == want, name
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_run_directory_whose_base_leads_back_to_itself_is_one_clear_error(tmp_path):
    (tmp_path / "minilora.json").write_text(json.dumps({"kind": "lora", "base_model": str(tmp_path), "tokenizer": "byte"}))
    with pytest.raises(MiniloraError, match="leads back to itself"):
        load_model(str(tmp_path))


def test_an_adapter_on_another_base_of_the_same_shape_warns(dirs, tmp_path, capsys):
    root, _ = dirs
    other = tmp_path / "other"
    GPT(GPTConfig.from_name("tiny")).save_pretrained(other)
    load_model(str(other), adapter=str(root / "peft"))
    assert "was trained on" in capsys.readouterr().err
    load_model(str(root / "base"), adapter=str(root / "peft"))
    assert "was trained on" not in capsys.readouterr().err


def test_a_moved_base_names_the_adapter_it_came_from(dirs, tmp_path):
    root, _ = dirs
    moved = tmp_path / "adapter"
    moved.mkdir()
    cfg = json.loads((root / "peft" / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "gone")}))
    (moved / "adapter_model.safetensors").write_bytes((root / "peft" / "adapter_model.safetensors").read_bytes())
    r = run_script("generate.py", "--adapter", str(moved), "--prompt", "a", "--max_new_tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--init_from" in r.stderr
    assert "adapter_config.json records" in r.stderr and len(r.stderr.strip().splitlines()) == 1
