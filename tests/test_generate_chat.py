"""generate.py --chat / --messages (the conversation kept in the KV cache) and several adapters
(--adapter NAME=PATH with --adapter_weights or --prompt_adapter, --allow_pickle)."""

import copy
import io
import json
import os
import re
import shutil
import sys

import pytest
import torch

from minilora import GPT, GPTConfig, add_weighted_adapter, disable_adapter, load_adapter, set_adapter
from minilora.chat import chat_tokens, load_chat_template, stop_tokens
from minilora.chat_session import ChatSession
from minilora.generation import generate
from minilora.safetensors import load_file
from minilora.tokenizer import get_tokenizer

from scripts import random_adapter, run_script_here

TOK = get_tokenizer("byte")
N = 10  # new tokens per answer


def peaked(preset):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(preset, block_size=256)).eval()  # room for a few turns in bytes
    with torch.no_grad():  # peaked logits: greedy text is varied and adapters visibly change it
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("genchat")
    base = peaked("tiny")
    base.save_pretrained(root / "base")
    random_adapter(base, root / "a", 4, 1, ("q_proj", "v_proj"))
    random_adapter(base, root / "b", 2, 2, ("q_proj", "v_proj", "fc_in"))
    return base, str(root)


def run_here(capsys, *args):
    return run_script_here(capsys, "generate.py", *args)


def reference(model, template, messages, n=N):
    ids, _ = chat_tokens(TOK, template, messages, add_generation_prompt=True)
    eos, stops = stop_tokens(TOK, template)
    return generate(model, [ids], n, temperature=0, eot_token=eos, stop=stops, tokenizer=TOK).texts[0]


def with_adapters(base, root, names):
    model = copy.deepcopy(base)
    for name in names:
        load_adapter(model, os.path.join(root, name), adapter_name=name)
    return model


# ---- the conversation in the KV cache -------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_session_answers_like_generate_and_reuses_the_cache_between_turns(preset):
    model = peaked(preset)
    template = load_chat_template("chatml", tokenizer=TOK)
    with ChatSession(model, TOK, template, temperature=0, max_new_tokens=N) as chat:
        first = "".join(chat.say("Hi"))
        second = "".join(chat.say("Why?"))
        third = "".join(chat.say("Ok."))
        conversation = chat.messages
        turns = chat.turns
    assert model.kv_cache_kind is None  # the session released the cache
    # each answer is what a fresh generate() on the whole rendered conversation gives (greedy)
    assert first == reference(model, template, conversation[:1])
    assert second == reference(model, template, conversation[:3])
    assert third == reference(model, template, conversation[:5])
    assert turns[0].reused == 0 and all(t.reused > 0 for t in turns[1:])
    assert all(t.reused + t.prefilled == t.prompt_tokens for t in turns)
    assert sum(t.prefilled for t in turns) < sum(t.prompt_tokens for t in turns)


def test_messages_one_shot_prints_what_generate_gives(saved, capsys, tmp_path):
    base, root = saved
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    code, out, err = run_here(capsys, "--init_from", f"{root}/base", "--messages", str(tmp_path / "m.json"),
                              "--temperature", "0", "--max_new_tokens", str(N), "--chat_template", "chatml")
    assert code == 0, err
    assert out == reference(base, load_chat_template("chatml", tokenizer=TOK), messages) + "\n"
    assert "turn 1:" in err and "0 reused" in err


def test_interactive_loop_second_answer_equals_a_fresh_one_shot_with_less_prefill(saved, capsys, tmp_path, monkeypatch):
    base, root = saved
    common = ["--init_from", f"{root}/base", "--temperature", "0", "--max_new_tokens", str(N)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n\nWhy?\n/exit\nnever read\n"))
    code, out, err = run_here(capsys, *common, "--chat", "--messages_out", str(tmp_path / "talk.json"))
    assert code == 0, err
    talk = json.loads((tmp_path / "talk.json").read_text())
    assert [m["role"] for m in talk] == ["user", "assistant", "user", "assistant"]
    loop_turn2 = [int(x) for x in re.search(r"turn 2: (\d+) prompt tokens, (\d+) reused.*?(\d+) prefilled", err).groups()]
    (tmp_path / "m.json").write_text(json.dumps(talk[:3]))
    code, fresh, err = run_here(capsys, *common, "--messages", str(tmp_path / "m.json"),
                                "--messages_out", str(tmp_path / "fresh.json"))
    assert code == 0, err
    assert out.endswith(fresh) and json.loads((tmp_path / "fresh.json").read_text()) == talk
    total, reused, prefilled = loop_turn2
    assert f"turn 1: {total} prompt tokens, 0 reused" in err  # the same prompt, all of it prefilled fresh
    assert reused > 0 and prefilled == total - reused


# ---- several adapters ---------------------------------------------------------------------------

def test_adapter_weights_equal_add_weighted_adapter(saved, capsys):
    base, root = saved
    code, out, err = run_here(capsys, "--init_from", f"{root}/base", "--adapter", f"sql={root}/a", f"dates={root}/b",
                              "--adapter_weights", "0.3", "0.7", "--prompt", "Hi", "--max_new_tokens", str(N),
                              "--temperature", "0")
    assert code == 0, err
    model = with_adapters(base, root, ["a", "b"])
    add_weighted_adapter(model, ["a", "b"], [0.3, 0.7], "w", combination_type="cat")
    texts = {}
    for name in ("w", "a", "b"):
        set_adapter(model, name)
        texts[name] = generate(model, [TOK.encode("Hi")], N, temperature=0, eot_token=TOK.eos_token_ids,
                               tokenizer=TOK).texts[0]
    assert out.split("\n---------------\n")[0] == "Hi" + texts["w"]
    assert texts["w"] not in (texts["a"], texts["b"])  # the combination is neither adapter alone


def test_prompt_adapter_mixed_batch_equals_each_adapter_alone(saved, capsys):
    base, root = saved
    code, out, err = run_here(capsys, "--init_from", f"{root}/base", "--adapter", f"sql={root}/a", f"dates={root}/b",
                              "--prompt_adapter", "sql", "__base__", "dates", "--prompt", "Hi",
                              "--max_new_tokens", str(N), "--temperature", "0")
    assert code == 0, err
    samples = out.split("\n---------------\n")[:3]
    model = with_adapters(base, root, ["a", "b"])
    alone = []
    for name in ("a", None, "b"):
        kw = dict(temperature=0, eot_token=TOK.eos_token_ids, tokenizer=TOK)
        if name is None:
            with disable_adapter(model):
                alone.append(generate(model, [TOK.encode("Hi")], N, **kw).tokens[0])
        else:
            set_adapter(model, name)
            alone.append(generate(model, [TOK.encode("Hi")], N, **kw).tokens[0])
    assert samples == ["Hi" + TOK.decode(t) for t in alone]
    assert len({tuple(t) for t in alone}) == 3  # three different answers: a mix-up would show


def test_allow_pickle_reads_an_older_adapter_bin(saved, capsys, tmp_path):
    base, root = saved
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(f"{root}/a/adapter_config.json", old)
    torch.save(load_file(f"{root}/a/adapter_model.safetensors"), old / "adapter_model.bin")
    common = ["--init_from", f"{root}/base", "--prompt", "Hi", "--max_new_tokens", str(N), "--temperature", "0"]
    code, _, err = run_here(capsys, *common, "--adapter", str(old))
    assert code == 2 and "allow_pickle" in err
    code, out, err = run_here(capsys, *common, "--adapter", str(old), "--allow_pickle")
    assert code == 0, err
    code, expected, err = run_here(capsys, *common, "--adapter", f"{root}/a")
    assert out == expected


@pytest.mark.parametrize("args, message", [
    (["--adapter", "A", "B"], "need a name each"),
    (["--adapter", "x=A", "y=B"], "--adapter_weights, or choose per sample"),
    (["--adapter", "x=A", "y=B", "--adapter_weights", "1"], "one weight per named adapter"),
    (["--adapter", "x=A", "--prompt_adapter", "z"], "no adapter of that name"),
    (["--adapter", "x=A", "y=B", "--prompt_adapter", "x", "y", "--stream"], "--stream"),
])
def test_bad_adapter_arguments_are_one_line_errors(capsys, args, message):
    code, _, err = run_here(capsys, "--init_from", "tiny", *args)
    assert code == 2 and message in err and "Traceback" not in err
