"""A Llama-family checkpoint from the hub's layout through every script: train (LoRA and full), generate, merge, serve.

The base is the transformers-made Llama fixture (GQA, untied head, six shards + index) with a byte-level
tokenizer.json beside it and a tokenizer_config.json that asks for a BOS token, as Llama's does.
"""

import json
import os
import shutil
import signal
import urllib.request

import pytest
import torch

from minilora import GPT
from minilora.data import tokenize_files
from minilora.generation import generate
from minilora.loading import load_model
from minilora.safetensors import read_header
from minilora.tokenizer import get_tokenizer

from scripts import run_script_here, serve_process

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
LLAMA_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def hub_dir(root, kind):
    """A fixture model as the hub ships it: weights, config, tokenizer.json, tokenizer_config.json."""
    path = root / kind
    shutil.copytree(os.path.join(FIXTURES, "hf", kind, "model"), path)
    shutil.copy(os.path.join(FIXTURES, "tokenizers", "bytelevel", "tokenizer.json"), path)  # 1000 ids, as the model
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": True}))
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return hub_dir(tmp_path_factory.mktemp("hub"), "llama")


def test_the_guides_opt350m_recipe_on_a_post_ln_opt(tmp_path, capsys):
    """The guide's LoraConfig (r=16, alpha 32, q/v, dropout 0.05) and dataset_text_field="quote", on OPT post-LN."""
    base = hub_dir(tmp_path, "opt-post")
    with open(tmp_path / "quotes.jsonl", "w") as f:
        for q in ("Be yourself; everyone else is already taken.", "So many books, so little time."):
            f.write(json.dumps({"quote": q, "author": "someone"}) + "\n")
    out = str(tmp_path / "out")
    code, _, err = run_script_here(capsys, "train.py", "--init_from", base, "--data", str(tmp_path / "quotes.jsonl"),
                                   "--text_field", "quote", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout",
                                   "0.05", "--target_modules", "q_proj", "v_proj", "--max_iters", "2", "--batch_size",
                                   "2", "--learning_rate", "2e-4", "--eval_interval", "0", "--out_dir", out)
    assert code == 0, err
    keys = read_header(os.path.join(out, "adapter_model.safetensors"))[0]
    assert len(keys) == 2 * 2 * 2 and all(k.startswith("base_model.model.model.decoder.layers.") for k in keys)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], sorted(cfg["target_modules"])) == (16, 32, 0.05, ["q_proj", "v_proj"])


def write_data(path, n=8):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Request {i}: list users\nSQL: ", "completion": f"SELECT * FROM users{i};"}) + "\n")
    return str(path)


def greedy_text(model, tok, prompt, n=6):
    out = generate(model, [tok.encode_document(prompt)], n, temperature=0, eot_token=tok.eos_token_ids)
    return tok.decode(out.tokens[0])


def test_documents_start_with_bos_and_end_with_eos(llama_dir, tmp_path):
    tok = get_tokenizer(llama_dir)
    assert tok.add_bos and tok.bos_token == 0 and tok.eos_token_ids[0] == 0 and 2 in tok.eos_token_ids
    (tmp_path / "a.txt").write_text("Hello world")
    tokens, _ = tokenize_files([tmp_path / "a.txt"], tok, tmp_path / "cache")
    assert list(tokens) == [tok.bos_token, *tok.encode("Hello world"), tok.eot_token]


def test_lora_run_merge_and_generate(llama_dir, tmp_path, capsys):
    data, out, merged = write_data(tmp_path / "d.jsonl"), str(tmp_path / "lora"), str(tmp_path / "merged")
    code, _, err = run_script_here(capsys, "train.py", "--init_from", llama_dir, "--data", data, "--lora_r", "4",
                                   "--target_modules", "all-linear", "--max_iters", "2", "--batch_size", "2",
                                   "--learning_rate", "1e-2", "--eval_interval", "0", "--out_dir", out)
    assert code == 0, err
    keys = read_header(os.path.join(out, "adapter_model.safetensors"))[0]
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)  # PEFT's names: vLLM loads it
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert set(cfg["target_modules"]) == LLAMA_NAMES and cfg["base_model_name_or_path"] == os.path.abspath(llama_dir)

    tuned, _ = load_model(out)
    tok = get_tokenizer(llama_dir)
    want = greedy_text(tuned, tok, "Request 3: list users\nSQL: ")
    base_text = greedy_text(GPT.from_pretrained(llama_dir), tok, "Request 3: list users\nSQL: ")
    assert want != base_text  # the adapter changed something: the comparisons below can fail

    code, gen_out, err = run_script_here(capsys, "generate.py", "--init_from", out, "--prompt",
                                         "Request 3: list users\nSQL: ", "--max_new_tokens", "6", "--temperature", "0")
    assert code == 0 and want in gen_out, err

    code, _, err = run_script_here(capsys, "merge.py", "--adapter", out, "--out", merged)
    assert code == 0, err
    hf = json.load(open(os.path.join(merged, "config.json")))
    assert hf["model_type"] == "llama" and hf["num_key_value_heads"] == 2 and "n_embd" not in hf
    assert os.path.isfile(os.path.join(merged, "tokenizer.json"))  # the directory stands alone
    assert greedy_text(GPT.from_pretrained(merged), get_tokenizer(merged), "Request 3: list users\nSQL: ") == want


def test_full_finetune_writes_the_llama_layout(llama_dir, tmp_path, capsys):
    data, out = write_data(tmp_path / "d.jsonl"), str(tmp_path / "full")
    code, _, err = run_script_here(capsys, "train.py", "--init_from", llama_dir, "--data", data, "--lora_r", "0",
                                   "--max_iters", "1", "--batch_size", "2", "--eval_interval", "0", "--out_dir", out)
    assert code == 0, err
    hf = json.load(open(os.path.join(out, "config.json")))
    assert hf["model_type"] == "llama" and hf["tie_word_embeddings"] is False
    model = GPT.from_pretrained(out)
    before = GPT.from_pretrained(llama_dir)
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert "transformer.h.0.attn.o_proj.weight" in changed and "lm_head.weight" in changed


def test_server_answers_with_the_adapter(llama_dir, tmp_path, capsys):
    data, out = write_data(tmp_path / "d.jsonl"), str(tmp_path / "lora")
    code, _, err = run_script_here(capsys, "train.py", "--init_from", llama_dir, "--data", data, "--lora_r", "4",
                                   "--target_modules", "q_proj", "v_proj", "--max_iters", "2", "--batch_size", "2",
                                   "--learning_rate", "5e-2", "--eval_interval", "0", "--out_dir", out)
    assert code == 0, err
    tuned, _ = load_model(out)
    prompt = "Request 5: list users\nSQL: "
    want = greedy_text(tuned, get_tokenizer(llama_dir), prompt)
    proc, url = serve_process(str(tmp_path), "--init_from", llama_dir, "--lora-modules", f"sql={out}")
    try:
        body = json.dumps({"model": "sql", "prompt": prompt, "max_tokens": 6, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/completions", body, {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(req, timeout=60))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert answer["choices"][0]["text"] == want
