"""merge.py end to end: merged == unmerged == reloaded from disk, refusals leave disk untouched, bf16 output."""

import copy
import json
import os
import shutil

import pytest
import torch

from minilora import GPT, GPTConfig
from minilora import chat
from minilora.chat import load_chat_template
from minilora.generation import generate
from minilora import LoraConfig, apply_lora, disable_adapter, merge_and_unload, save_adapter
from minilora.safetensors import read_header

from scripts import run_script, run_script_here

PROMPTS = [[10, 20, 30], [40, 50, 60, 70, 80, 90]]  # two lengths: the padded batch path too


def run(*args):
    return run_script("merge.py", *args)


def run_here(capsys, *args):
    return run_script_here(capsys, "merge.py", *args)


def greedy(model, n=20):
    return generate(model, PROMPTS, n, temperature=0).tokens


def snapshot(path):
    """Every file under `path` with its bytes: equal snapshots = an untouched directory."""
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), path)] = f.read()
    return files


def assert_no_leftovers(parent):
    """atomic_directory builds in hidden siblings; a refused or failed merge must leave none."""
    assert [n for n in os.listdir(parent) if n.startswith(".")] == []


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base in the HF layout and a clearly non-zero adapter (random B) that records that base."""
    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    with torch.no_grad():  # peaked logits, so greedy tokens are varied and the adapter visibly changes them
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    base = str(root / "base")
    model.save_pretrained(base)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc_in"],
                                 init_lora_weights=False))
    adapter = str(root / "adapter")
    save_adapter(model, adapter, base_model_name_or_path=base)
    return model.eval(), base, adapter


def test_merged_unmerged_and_written_model_give_identical_greedy_tokens(saved, tmp_path):
    model, base, adapter = saved
    unmerged = greedy(model)
    with disable_adapter(model):
        assert greedy(model) != unmerged  # the adapter changes the answer, so agreement below means something
    merged = merge_and_unload(copy.deepcopy(model), safe_merge=True)
    assert greedy(merged) == unmerged

    out = str(tmp_path / "merged")
    r = run("--adapter", adapter, "--out", out)  # the base comes from the adapter's adapter_config.json
    assert r.returncode == 0, r.stderr
    assert "verify merged vs unmerged, fp32" in r.stdout and " ok" in r.stdout
    assert f"into {base}" in r.stdout and "r=4 lora_alpha=8 targets=q_proj,v_proj,fc_in (6 layers)" in r.stdout
    assert "max |Δlogit|" in r.stdout and "MB" in r.stdout
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["minilora"]["tokenizer"] == "byte"  # the tokenizer travels with the weights
    reloaded = GPT.from_pretrained(out)
    assert reloaded.config == model.config
    # the subprocess merged exactly as in this process (fp32 delta, deterministic), so the weights are equal
    for name, t in merged.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], t), name
    assert greedy(reloaded) == unmerged


def test_existing_out_is_refused_untouched_and_replaced_with_force(saved, tmp_path, capsys):
    model, base, adapter = saved
    out = str(tmp_path / "out")
    GPT.from_pretrained(base).save_pretrained(out)  # a model directory that is not the merge
    before = snapshot(out)
    r = run("--adapter", adapter, "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert snapshot(out) == before
    assert_no_leftovers(tmp_path)
    # the check comes before any work: a bad adapter is not even looked at
    code, _, err = run_here(capsys, "--adapter", str(tmp_path / "missing"), "--out", out)
    assert code == 2 and "already exists" in err

    code, stdout, err = run_here(capsys, "--adapter", adapter, "--out", out, "--force")
    assert code == 0, err
    merged = merge_and_unload(copy.deepcopy(model))
    assert torch.equal(GPT.from_pretrained(out).transformer.h[0].attn.q_proj.weight,
                       merged.transformer.h[0].attn.q_proj.weight)
    assert_no_leftovers(tmp_path)

    # --force replaces only a directory of a saved model's own files, never anything else
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    before = snapshot(out)
    code, _, err = run_here(capsys, "--adapter", adapter, "--out", out, "--force")
    assert code == 2 and "notes.txt" in err and snapshot(out) == before


def test_nan_adapter_is_refused_and_nothing_is_written(saved, tmp_path, capsys):
    model, base, _ = saved
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.transformer.h[1].attn.v_proj.lora_B["default"].weight[3, 0] = float("nan")
    adapter = str(tmp_path / "nan_adapter")
    save_adapter(bad, adapter, base_model_name_or_path=base)
    out = str(tmp_path / "merged")
    code, _, err = run_here(capsys, "--adapter", adapter, "--out", out)
    assert code == 2 and "lora_B.weight has NaN or inf values" in err  # the reader refuses it: nothing merged
    assert not os.path.exists(out)
    # finite weights whose product overflows: safe_merge refuses the merged weights
    huge = copy.deepcopy(model)
    with torch.no_grad():
        huge.transformer.h[1].attn.v_proj.lora_A["default"].weight.fill_(1e25)
        huge.transformer.h[1].attn.v_proj.lora_B["default"].weight[3, :] = 1e25
    adapter = str(tmp_path / "huge_adapter")
    save_adapter(huge, adapter, base_model_name_or_path=base)
    code, _, err = run_here(capsys, "--adapter", adapter, "--out", out)
    assert code == 2 and "safe_merge" in err and "non-finite" in err
    assert not os.path.exists(out)
    # without safe_merge the logit check still refuses: NaN logits never pass a tolerance
    code, stdout, err = run_here(capsys, "--adapter", adapter, "--out", out, "--no-safe-merge")
    assert code == 2 and "FAILED" in stdout and "nothing was written" in err
    assert not os.path.exists(out)
    assert_no_leftovers(tmp_path)


def test_a_failed_tolerance_check_writes_nothing(saved, tmp_path, capsys):
    _, _, adapter = saved
    out = str(tmp_path / "merged")
    code, stdout, err = run_here(capsys, "--adapter", adapter, "--out", out, "--dtype", "fp16", "--tolerance", "1e-9")
    assert code == 2 and "written fp16 vs unmerged fp32" in stdout and "FAILED" in stdout
    assert "1e-09" in err and not os.path.exists(out)
    assert_no_leftovers(tmp_path)


def test_bf16_output_holds_bf16_tensors_cast_once_from_the_fp32_merge(saved, tmp_path, capsys):
    model, _, adapter = saved
    out = str(tmp_path / "merged_bf16")
    code, stdout, err = run_here(capsys, "--adapter", adapter, "--out", out, "--dtype", "bf16")
    assert code == 0, err
    assert "verify written bf16 vs unmerged fp32" in stdout
    header, _ = read_header(os.path.join(out, "model.safetensors"))
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    reloaded = GPT.from_pretrained(out, dtype=torch.bfloat16)
    # one rounding: every written weight is the fp32 merge cast to bf16, not a merge done in bf16
    merged = merge_and_unload(copy.deepcopy(model))
    for name, t in merged.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], t.to(torch.bfloat16)), name
    tokens, reference = greedy(reloaded), greedy(model)
    assert tokens == greedy(merged.to(torch.bfloat16))  # the file round trip itself is exact
    same = sum(a == b for x, y in zip(tokens, reference) for a, b in zip(x, y))
    print(f"bf16 merged model: {same}/{sum(map(len, reference))} greedy tokens equal to the fp32 unmerged model's")
    assert tokens[0][:4] == reference[0][:4]  # bf16 rounding may flip near-ties later, not the first steps here


def test_adapter_without_a_recorded_base_needs_base(saved, tmp_path, capsys):
    model, base, _ = saved
    adapter = str(tmp_path / "anonymous")
    save_adapter(model, adapter)  # no base_model_name_or_path
    out = str(tmp_path / "merged")
    code, _, err = run_here(capsys, "--adapter", adapter, "--out", out)
    assert code == 2 and "does not name its base model; pass --base" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out)
    code, stdout, err = run_here(capsys, "--base", base, "--adapter", adapter, "--out", out)
    assert code == 0, err
    assert greedy(GPT.from_pretrained(out)) == greedy(model)


@pytest.mark.parametrize("args, message", [
    (["--out", "x"], "--adapter"),
    (["--adapter", "/nonexistent/adapter", "--out", "/nonexistent/out"], "adapter"),
    (["--adapter", "a", "--out", "b", "--tolerance", "0"], "--tolerance"),
])
def test_bad_input_is_one_line_without_traceback(capsys, args, message):
    code, _, err = run_here(capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_the_adapters_chat_template_travels_to_the_merged_model(saved, tmp_path, capsys, where):
    """A template recorded only beside the adapter (what train.py writes there) is the merged model's too."""
    _, base, adapter = saved
    with_template = tmp_path / "adapter"
    shutil.copytree(adapter, with_template)
    source = ("{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")
    if where == "chat_template.jinja":
        (with_template / where).write_text(source, encoding="utf-8")
    else:
        (with_template / where).write_text(json.dumps({"chat_template": source}), encoding="utf-8")
    assert load_chat_template(None, dirs=[base]).name == "plain"  # the base has none of its own
    out = tmp_path / "merged"
    code, stdout, err = run_here(capsys, "--adapter", str(with_template), "--out", str(out))
    assert code == 0, err
    assert f"chat template: {with_template / where} -> {out / 'chat_template.jinja'}" in stdout
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == source  # the text as written
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    merged, trained = load_chat_template(None, dirs=[str(out)]), load_chat_template(None, dirs=[str(with_template)])
    assert merged.render(messages) == trained.render(messages)
    if chat.jinja2 is not None:  # without it both stand in with the built-in "plain" (still the same text)
        assert merged.render(messages) == "<user> hi\n<assistant> hello\n"
    # an adapter without one leaves the merged model to the base's tokenizer files, as before
    code, stdout, err = run_here(capsys, "--adapter", adapter, "--out", str(out), "--force")
    assert code == 0 and "chat template" not in stdout and not (out / "chat_template.jinja").exists()
