"""Chat templates (built-ins, a checkpoint's Jinja, the fallback without jinja2) and conversational training data."""

import json

import pytest

import minilora.chat as chat
from minilora.chat import ChatError, chat_tokens, load_chat_template, stop_tokens
from minilora.data import DataError, load_dataset
from minilora.tokenizer import get_tokenizer

BYTE = get_tokenizer("byte")
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]

# Reference renderings, written out by hand from each format's definition (eos = the byte tokenizer's <|endoftext|>)
REFERENCE = {
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
               "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"),
    "llama2": "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! <|endoftext|>[INST] 2+2? [/INST] 4 <|endoftext|>",
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
               "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"),
    "plain": "Be brief.\n\nUser: Hi\nAssistant: Hello!<|endoftext|>\nUser: 2+2?\nAssistant: 4<|endoftext|>\n",
}
GENERATION_PROMPT = {"chatml": "<|im_start|>assistant\n", "llama2": "", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                     "plain": "Assistant:"}

# How checkpoints spell ChatML and Llama 3 (other whitespace and control flow than the built-ins' Jinja, same text)
QWEN_STYLE = ("{% for message in messages %}\n{{ '<|im_start|>' + message['role'] + '\\n' }}{{ message['content'] }}"
              "{{ '<|im_end|>\\n' }}{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_STYLE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' ~ message.role ~ '<|end_header_id|>\\n\\n' }}"
                "{{ message.content | trim }}{{ '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.mark.parametrize("name", list(chat.BUILTIN))
def test_builtins_render_the_reference_strings_in_python_and_in_jinja(name):
    t = load_chat_template(name, tokenizer=BYTE)
    assert t.builtin == name and t.render(CONV) == REFERENCE[name]
    head = CONV[:4]
    assert t.render(head, add_generation_prompt=True) == t.render(head) + GENERATION_PROMPT[name]
    jinja = chat.ChatTemplate("j", chat.JINJA[name], t.bos_token, t.eos_token, t.end_of_turn)  # rendered by jinja2
    for messages in (CONV, CONV[1:], head, CONV[1:2]):
        for gen in (False, True):
            assert jinja.render(messages, gen) == t.render(messages, gen)


def test_llama_family_bos_in_the_built_ins():
    t = chat._builtin("llama2", None)
    t.bos_token, t.eos_token = "<s>", "</s>"
    assert t.render(CONV[1:3]) == "<s>[INST] Hi [/INST] Hello! </s>"
    with pytest.raises(ChatError, match="alternate"):
        t.render([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("source, builtin", [(QWEN_STYLE, "chatml"), (LLAMA3_STYLE, "llama3")])
def test_checkpoint_jinja_from_tokenizer_config_renders_as_the_builtin(tmp_path, source, builtin):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": source, "bos_token": "<s>"}))
    t = load_chat_template(None, dirs=[tmp_path / "missing", tmp_path], tokenizer=BYTE)
    assert t.builtin is None and t.name.endswith("tokenizer_config.json")  # jinja2 rendered it
    ref = load_chat_template(builtin, tokenizer=BYTE)
    assert t.end_of_turn == ref.end_of_turn
    for messages in (CONV, CONV[:4]):
        for gen in (False, True):
            assert t.render(messages, gen) == ref.render(messages, gen)
    assert chat_tokens(BYTE, t, CONV) == chat_tokens(BYTE, ref, CONV)


def test_without_jinja2_the_builtin_stands_in(tmp_path, monkeypatch, capsys):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN_STYLE}))
    monkeypatch.setattr(chat, "jinja2", None)  # as if jinja2 were not installed
    t = load_chat_template(None, dirs=[tmp_path], tokenizer=BYTE)
    assert t.builtin == "chatml" and "jinja2 is not installed" in capsys.readouterr().err
    assert t.render(CONV) == REFERENCE["chatml"]
    assert load_chat_template("llama3", tokenizer=BYTE).render(CONV) == REFERENCE["llama3"]  # built-ins need no jinja2


def test_override_by_file_and_errors(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(QWEN_STYLE)
    assert load_chat_template(str(f), tokenizer=BYTE).render(CONV) == REFERENCE["chatml"]
    assert load_chat_template(None, tokenizer=BYTE).builtin == "plain"  # byte tokenizer: no chat tokens
    with pytest.raises(ChatError, match="not a built-in"):
        load_chat_template("nope", tokenizer=BYTE)
    f.write_text("{% for %}")
    with pytest.raises(ChatError, match="not valid Jinja"):
        load_chat_template(str(f), tokenizer=BYTE)
    t = load_chat_template("plain", tokenizer=BYTE)
    for bad, match in (([{"role": "bot", "content": "x"}], "role 'bot'"), ([{"role": "user"}], "no 'content'"), ([], "non-empty")):
        with pytest.raises(ChatError, match=match):
            t.render(bad)


def special_tokenizer(tmp_path):
    """The byte-level BPE fixture with ChatML's tokens added as specials, and a Jinja template in its config."""
    tj = json.loads(open("tests/fixtures/tokenizers/bytelevel/tokenizer.json").read())
    n = len(tj["model"]["vocab"])
    for k, text in enumerate(("<|im_start|>", "<|im_end|>")):
        tj["added_tokens"].append({"id": n + k, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                                   "normalized": False, "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN_STYLE, "eos_token": "<|endoftext|>"}))
    return get_tokenizer(str(tmp_path)), n


def test_end_of_turn_is_one_token_where_the_tokenizer_has_it(tmp_path):
    tok, n = special_tokenizer(tmp_path)
    t = load_chat_template(None, dirs=[tmp_path], tokenizer=tok)
    ids, mask = chat_tokens(tok, t, CONV)
    assert ids.count(n + 1) == 5 and ids.count(n) == 5  # <|im_end|>, <|im_start|>: one id each
    answers = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(answers) == "Hello!<|im_end|>4<|im_end|>"
    eos, stops = stop_tokens(tok, t)
    assert eos == [tok.eot_token, n + 1] and stops == []
    assert stop_tokens(BYTE, load_chat_template("chatml", tokenizer=BYTE)) == ([BYTE.eot_token], ["<|im_end|>"])


# ----------------------------------------------------------------------------- conversational data

def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loss_mask_covers_exactly_the_assistant_tokens(tmp_path):
    data = write(tmp_path / "chat.jsonl", [{"messages": CONV}])
    ds = load_dataset(data, BYTE, 256, val_fraction=0, chat_template=load_chat_template("chatml", tokenizer=BYTE))
    x, y = ds.next_batch(1)
    pieces = [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
              ("Hello!<|im_end|>", True),
              ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
              ("4<|im_end|>", True), ("\n", False)]
    ids = [b for text, _ in pieces for b in text.encode()]
    labels = [b if learn else -100 for text, learn in pieces for b in text.encode()]
    assert x[0].tolist() == ids[:-1]  # token by token: the input, and the target of every position
    assert y[0].tolist() == labels[1:]
    assert ds.val_examples is None and ds.num_train_examples == 1


def test_bad_lines_are_named_and_long_ones_truncated(tmp_path, capsys):
    t = load_chat_template("plain", tokenizer=BYTE)
    for row, match in (({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
                       ({"messages": [{"role": "user"}]}, "no 'content'"),
                       ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
                       ({"prompt": "x", "completion": "y"}, "missing field 'messages'")):
        path = write(tmp_path / "bad.jsonl", [{"messages": CONV}, row])
        with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{match}"):
            load_dataset(path, BYTE, 256, val_fraction=0, chat_template=t)
    long = [{"role": "user", "content": "q" * 40}, {"role": "assistant", "content": "a" * 40}]
    path = write(tmp_path / "long.jsonl", [{"messages": CONV}, {"messages": long}, {"messages": [long[0]] * 2 + long}])
    with pytest.raises(DataError, match="long.jsonl:2: conversation is"):
        load_dataset(path, BYTE, 64, val_fraction=0, chat_template=t, on_too_long="error")
    ds = load_dataset(path, BYTE, 64, val_fraction=0, chat_template=t)
    assert ds.num_train_examples == 2 and "truncated 1 of 3" in capsys.readouterr().err  # the third: no answer in context
    assert [len(ids) for ids, _ in ds.train] == [64, 65]
    _, labels = ds.train[1]
    assert (labels[:len("User: " + "q" * 40 + "\nAssistant:")] == -100).all() and labels[57] == ord(" ") and (labels[58:] == ord("a")).all()
