import datetime
import json
import re

import pytest
import torch

from minilora import GPT, GPTConfig
from minilora.data import load_dataset, read_jsonl
from minilora.errors import MiniloraError
from minilora.chat import chat_tokens, load_chat_template
from minilora.tasks import (CHAT_CITIES, CHAT_DAYS, CHAT_MAX_TOKENS, CHAT_NAMES, MONTHS, SQL_SCHEMA, exact_match_accuracy, greedy_completions, make_task,
                            task_answer, task_prompt,
                            stdlib_corpus, write_corpus, write_jsonl)
from minilora.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus()


def test_corpus_is_large_deterministic_and_truncates(corpus, tmp_path):
    assert len(corpus) > 500_000  # pydoc topics alone are ~465k characters
    assert 'The "if" statement' in corpus  # from pydoc_data.topics
    assert "Return a new deque object" in corpus or "deque" in corpus  # a stdlib docstring
    assert stdlib_corpus() == corpus
    assert stdlib_corpus(max_chars=1000) == corpus[:1000]
    path = tmp_path / "corpus.txt"
    assert write_corpus(path, max_chars=5000) == 5000
    assert path.read_text(encoding="utf-8") == corpus[:5000]


@pytest.mark.parametrize("name", ["sql", "dates"])
def test_make_task_deterministic_and_disjoint(name):
    train, val = make_task(name, 300, 50, seed=3)
    assert (len(train), len(val)) == (300, 50)
    assert make_task(name, 300, 50, seed=3) == (train, val)
    assert make_task(name, 300, 50, seed=4)[0] != train
    prompts = [ex["prompt"] for ex in train + val]
    assert len(set(prompts)) == len(prompts)  # no prompt twice, so none in both splits
    for ex in train + val:
        assert set(ex) == {"prompt", "completion"} and ex["completion"] == ex["completion"].strip()


def test_sql_completions_follow_the_schema():
    train, val = make_task("sql", 1000, 0, seed=0)
    tables = dict(re.findall(r"(\w+)\(([^)]*)\)", SQL_SCHEMA))
    columns = {c.strip() for cols in tables.values() for c in cols.split(",")}
    for ex in train:
        req, sql = ex["prompt"], ex["completion"]
        assert req.startswith("Request: ") and req.endswith("\nSQL: ")
        assert sql.startswith("SELECT ") and sql.endswith(";") and sql.count(";") == 1
        assert set(re.findall(r"(?:FROM|JOIN) (\w+)", sql)) <= set(tables)
        # keywords are upper case; every lower-case identifier outside quotes is a table or column
        assert set(re.findall(r"\b[a-z_]+\b", re.sub(r"'[^']*'", "", sql))) <= set(tables) | columns
        # numbers and quoted names are copied from the request, never invented
        for value in re.findall(r"'(\w+)'|\b(\d+)\b", sql):
            assert (value[0] or value[1]) in req
    text = " ".join(ex["completion"] for ex in train)
    for clause in ["COUNT(*)", "ORDER BY age DESC", "LIMIT", "JOIN orders", "SUM(amount)", "AVG(age)", "user_id ="]:
        assert clause in text  # every template family shows up


def test_dates_completions_parse():
    train, _ = make_task("dates", 500, 0, seed=1)
    directions = set()
    for ex in train:
        iso = re.search(r"\d{4}-\d{2}-\d{2}", ex["prompt"] + " " + ex["completion"]).group()
        words = re.search(r"([A-Z][a-z]+) (\d{1,2}), (\d{4})", ex["prompt"] + " " + ex["completion"])
        month, day, year = MONTHS.index(words[1]) + 1, int(words[2]), int(words[3])
        assert datetime.date.fromisoformat(iso) == datetime.date(year, month, day)
        directions.add("ISO" in ex["prompt"])
    assert directions == {True, False}


def test_make_task_rejects_bad_input():
    with pytest.raises(MiniloraError, match="unknown task"):
        make_task("poetry", 1, 1)
    with pytest.raises(MiniloraError, match=">= 0"):
        make_task("sql", -1, 1)


def test_write_jsonl_round_trip_and_loads_as_prompt_completion(tmp_path):
    train, _ = make_task("sql", 20, 0, seed=0)
    path = write_jsonl(train, tmp_path / "data" / "sql.jsonl")
    assert [json.loads(line) for line in open(path)] == train
    assert [rec for _, rec in read_jsonl(path)] == train
    tok = get_tokenizer("byte")
    ds = load_dataset(str(path), tok, 256, val_fraction=0.0)
    x, y = ds.next_batch(4)
    assert x.shape == y.shape and (y == -100).any() and (y != -100).any()


def _manual_greedy(model, tok, prompt, max_new_tokens):
    """The obvious reference: re-run the whole sequence, append the argmax, stop at eot."""
    return _manual_greedy_ids(model, tok, tok.encode(prompt), max_new_tokens)


def _manual_greedy_ids(model, tok, ids, max_new_tokens):
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(torch.tensor([ids + new]))
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.eot_token:
                break
            new.append(nxt)
    return tok.decode(new)


def test_exact_match_accuracy_equals_a_manual_greedy_comparison():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny")).eval()
    with torch.no_grad():  # make end-of-text likely, so some rows stop early and some do not
        model.transformer.wte.weight[256] *= 8
    tok = get_tokenizer("byte")
    _, val = make_task("dates", 0, 12, seed=0)
    refs = [_manual_greedy(model, tok, ex["prompt"], 12) for ex in val]
    assert len({len(r) for r in refs}) > 1
    assert greedy_completions(model, tok, [ex["prompt"] for ex in val], 12, batch_size=5) == refs
    # half the examples get the model's own greedy output as reference (padded with spaces, which
    # the comparison strips), the other half a wrong one
    examples = [{"prompt": ex["prompt"], "completion": (f" {r} " if i % 2 else r + "x")}
                for i, (ex, r) in enumerate(zip(val, refs))]
    acc = exact_match_accuracy(model, tok, examples, max_new_tokens=12, batch_size=5)
    assert isinstance(acc, float) and acc == 0.5
    with pytest.raises(MiniloraError, match="no examples"):
        exact_match_accuracy(model, tok, [], max_new_tokens=12)


NAME, CITY, DAY = r"(?P<name>[A-Z][a-z]+)", r"(?P<city>[A-Z][a-z]+)", r"(?P<day>[A-Z][a-z]{2})"
ASKS = [rf"Book {NAME} in {CITY} on {DAY}\.", rf"Book {CITY} on {DAY} for {NAME}\.",  # details in any order
        rf"On {DAY}, book {CITY} for {NAME}\."]
CHANGES = {"name": r"Now for ([A-Z][a-z]+)\.", "city": r"Now in ([A-Z][a-z]+)\.", "day": r"Now on ([A-Z][a-z]{2})\."}


def test_chat_conversations_are_deterministic_answerable_and_masked_to_the_answers(tmp_path):
    train, val = make_task("chat", 300, 50, seed=3)
    assert make_task("chat", 300, 50, seed=3) == (train, val) and make_task("chat", 300, 50, seed=4)[0] != train
    prompts = [json.dumps(task_prompt(ex)) for ex in train + val]
    assert len(set(prompts)) == len(prompts)  # no conversation in both splits
    tok = get_tokenizer("byte")
    template = load_chat_template(None, tokenizer=tok)  # what training picks for the byte-level base
    assert template.name == "plain"
    changed = set()
    for ex in train + val:
        m = ex["messages"]
        assert [x["role"] for x in m] == ["user", "assistant", "user", "assistant"]
        booking = next(match.groupdict() for p in ASKS if (match := re.fullmatch(p, m[0]["content"])))
        assert booking["name"] in CHAT_NAMES and booking["city"] in CHAT_CITIES and booking["day"] in CHAT_DAYS
        assert m[1]["content"] == "Booked: {name}, {city}, {day}.".format(**booking)
        key, value = next((k, match[1]) for k, p in CHANGES.items() if (match := re.fullmatch(p, m[2]["content"])))
        assert value != booking[key]
        # the final answer: the first turn's booking with the one change (so it needs both turns)
        assert task_answer(ex) == "Booked: {name}, {city}, {day}.".format(**{**booking, key: value})
        changed.add(key)
        assert len(chat_tokens(tok, template, m)[0]) <= CHAT_MAX_TOKENS  # inside the base's trained positions
    assert changed == {"name", "city", "day"}

    # through the conversational data path: the loss sees the two answers (and their end of turn), nothing else
    path = write_jsonl(train[:8], tmp_path / "chat.jsonl")
    ds = load_dataset(str(path), tok, 256, val_fraction=0.0)
    eos = tok.decode([tok.eot_token])
    for ex, (ids, labels) in zip(train[:8], ds.train):
        assert tok.decode(list(ids)) == template.render(ex["messages"])
        runs, run = [], []
        for label in list(labels) + [-100]:
            if label != -100:
                run.append(int(label))
            elif run:
                runs, run = runs + [tok.decode(run)], []
        assert runs == [f" {ex['messages'][1]['content']}{eos}", f" {task_answer(ex)}{eos}"]


@pytest.mark.parametrize("preset, seed", [("tiny", 1), ("tiny-llama", 0)])  # seeds where some rows stop early
def test_greedy_completions_answer_a_conversation_as_rendered_for_training(preset, seed):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_name(preset, block_size=160)).eval()
    with torch.no_grad():  # make end-of-text likely, so some rows stop early and some do not
        model.transformer.wte.weight[256] *= 8
    tok = get_tokenizer("byte")
    template = load_chat_template("plain", tokenizer=tok)
    _, val = make_task("chat", 0, 6, seed=0)
    refs = []
    for ex in val:  # the reference: the prompt's training tokens, then argmax until end of text
        ids, _ = chat_tokens(tok, template, task_prompt(ex), add_generation_prompt=True)
        refs.append(_manual_greedy_ids(model, tok, ids, 12))
    assert len({len(r) for r in refs}) > 1  # some stop early, some run to the limit: both paths compared
    assert greedy_completions(model, tok, [task_prompt(ex) for ex in val], 12, batch_size=4, chat_template=template) == refs
    examples = [{"messages": task_prompt(ex) + [{"role": "assistant", "content": r if i % 2 else r + "x"}]}
                for i, (ex, r) in enumerate(zip(val, refs))]
    assert exact_match_accuracy(model, tok, examples, 12, batch_size=4, chat_template=template) == 0.5
    with pytest.raises(MiniloraError, match="chat_template"):
        greedy_completions(model, tok, [task_prompt(val[0])], 12)
