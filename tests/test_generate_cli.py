"""generate.py end to end in a subprocess: random tiny weights, a saved base + adapter, bad input."""


import pytest
import torch

from minilora import GPT, GPTConfig
from minilora.generation import generate
from minilora import LoraConfig, apply_lora, disable_adapter, save_adapter
from minilora.tokenizer import get_tokenizer

from scripts import run_script, run_script_here


def run(*args):
    return run_script("generate.py", *args)


def run_here(capsys, *args):
    return run_script_here(capsys, "generate.py", *args)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base in the HF layout and a non-zero LoRA adapter that names it as its base."""
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    with torch.no_grad():  # peaked logits, so greedy text is varied and the adapter visibly changes it
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    base = str(root / "base")
    model.save_pretrained(base)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = str(root / "adapter")
    save_adapter(model, adapter, base_model_name_or_path=base)
    return model.eval(), base, adapter


def test_random_tiny_model_prints_the_sample_and_speed():
    r = run("--init_from", "tiny", "--prompt", "Hello", "--max_new_tokens", "12", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and "---------------" in r.stdout
    assert "prefill: 5 tokens" in r.stderr and "decode: 12 tokens" in r.stderr and "tok/s" in r.stderr
    r = run("--init_from", "tiny", "--top_p", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "top_p" in r.stderr


def test_adapter_alone_finds_its_base_and_matches_in_process_generation(saved):
    model, base, adapter = saved
    tok = get_tokenizer("byte")
    expected = generate(model, [tok.encode("Hi")], 16, temperature=0, eot_token=tok.eot_token, tokenizer=tok).texts[0]
    with disable_adapter(model):
        base_text = generate(model, [tok.encode("Hi")], 16, temperature=0, eot_token=tok.eot_token, tokenizer=tok).texts[0]
    assert expected != base_text  # the adapter changes the output, so the check below means something
    common = ["--prompt", "Hi", "--max_new_tokens", "16", "--temperature", "0"]
    for extra in ([], ["--merge", "--stream"]):
        r = run("--adapter", adapter, *common, *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0] == ("Hi" + expected).splitlines()[0], extra
    r = run("--init_from", base, *common)
    assert r.returncode == 0 and r.stdout.splitlines()[0] == ("Hi" + base_text).splitlines()[0]


def test_seeded_samples_reproduce_and_no_cache_agrees(capsys):
    args = ["--init_from", "tiny", "--max_new_tokens", "10", "--num_samples", "3", "--seed", "7"]
    code, a, err = run_here(capsys, *args)
    assert code == 0, err
    assert a.count("---------------") == 3 and len(set(a.split("---------------"))) == 4  # 3 different samples
    assert run_here(capsys, *args)[1] == a
    assert run_here(capsys, *args, "--no_cache")[1] == a


@pytest.mark.parametrize("args, message", [
    (["--init_from", "tiny", "--max_new_tokens", "100"], "exceeds the model's context (block_size=64)"),
    (["--init_from", "tiny", "--top_p", "2"], "top_p"),
    (["--init_from", "tiny", "--stream", "--num_samples", "2"], "--num_samples 1"),
    (["--prompt", "x"], "--init_from"),
    (["--adapter", "/nonexistent/adapter"], "adapter"),
])
def test_bad_input_is_one_line_without_traceback(capsys, args, message):
    code, _, err = run_here(capsys, *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
