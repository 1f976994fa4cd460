"""Data: token cache, LM blocks, prompt masking, padding/packing, determinism, resume, ranks, errors."""

import json

import numpy as np
import pytest
import torch

from minilora.data import DataError, load_dataset, token_dtype, tokenize_files
from minilora.tokenizer import get_tokenizer

BYTE = get_tokenizer("byte")
EOT = BYTE.eot_token


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n):
    return [{"prompt": f"Q{i}: {'x' * (i % 4)}?", "completion": f" a{i}"} for i in range(n)]


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(4):
        (d / f"doc{i}.txt").write_text(f"document number {i}. " * 20)
    (d / "notes.md").write_text("not text data")  # only *.txt are read
    return d


def take(ds, n, batch_size=4):
    return [ds.next_batch(batch_size) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ----------------------------------------------------------------------------- plain text

def test_token_cache_created_then_reused(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = load_dataset(corpus, BYTE, 16, cache_dir=cache, val_fraction=0)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".uint16"
    expected = b"".join((corpus / f"doc{i}.txt").read_bytes() + bytes([0]) for i in range(4))
    tokens = np.fromfile(files[0], dtype=np.uint16)
    assert len(tokens) == ds.num_train_tokens == len(expected)
    assert (tokens == EOT).sum() == 4  # one end-of-text after each document, in sorted order
    assert BYTE.decode(tokens[:tokens.tolist().index(EOT)]) == (corpus / "doc0.txt").read_text()

    tok = get_tokenizer("byte")
    monkeypatch.setattr(tok, "encode", lambda *a, **k: pytest.fail("encode called on a cached corpus"))
    again = load_dataset(corpus, tok, 16, cache_dir=cache, val_fraction=0)
    assert np.array_equal(np.asarray(again.train), tokens)
    assert list(cache.iterdir()) == files

    (corpus / "doc3.txt").write_text("edited")  # new contents -> new cache, stale one never read
    load_dataset(corpus, BYTE, 4, cache_dir=cache, val_fraction=0)
    assert len(list(cache.iterdir())) == 2


class BigVocab:
    name, n_vocab, eot_token, add_bos = "big", 100_000, 99_999, False

    def encode(self, text):
        return [70_000 + ord(ch) for ch in text]

    encode_document = encode


def test_token_dtype_uint16_or_uint32(tmp_path):
    assert token_dtype(257) == np.uint16 and token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    f = tmp_path / "a.txt"
    f.write_text("hi")
    tokens, _ = tokenize_files([f], BigVocab(), tmp_path / "cache")
    assert tokens.dtype == np.uint32 and tokens.tolist() == [70_104, 70_105, 99_999]
    tokens, _ = tokenize_files([f], get_tokenizer("gpt2"), tmp_path / "cache")
    assert tokens.dtype == np.uint16 and tokens.tolist() == [5303, 50256]


def test_lm_batch_shapes_and_shift(corpus, tmp_path):
    ds = load_dataset(corpus, BYTE, 16, cache_dir=tmp_path / "c")
    stream = np.asarray(ds.train).tolist()
    x, y = ds.next_batch(8)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        i = next(i for i in range(len(stream) - 16) if stream[i:i + 16] == row_x)
        assert stream[i + 1:i + 17] == row_y


def test_text_split_by_tokens_and_documents(corpus, tmp_path):
    total = load_dataset(corpus, BYTE, 16, cache_dir=tmp_path / "c", val_fraction=0).num_train_tokens
    ds = load_dataset(corpus, BYTE, 16, cache_dir=tmp_path / "c", val_fraction=0.25)
    assert ds.num_val_tokens == total // 4 and ds.num_train_tokens + ds.num_val_tokens == total
    docs = load_dataset(corpus, BYTE, 16, cache_dir=tmp_path / "c", val_fraction=0.25, val_split="documents")
    assert docs.val[-1] == EOT and (np.asarray(docs.val) == EOT).sum() == 1  # exactly the last file
    assert docs.train[-1] == EOT
    batches = docs.val_batches(2)
    assert_same(batches, docs.val_batches(2))
    x, y = batches[0]
    assert torch.equal(x[0], torch.from_numpy(np.asarray(docs.val[:16]).astype(np.int64)))
    assert torch.equal(x[1, 0], y[0, -1])  # consecutive, non-overlapping blocks
    assert sum(len(x) for x, _ in batches) == (docs.num_val_tokens - 1) // 16


def test_text_determinism_resume_epoch_and_ranks(corpus, tmp_path):
    kw = dict(cache_dir=tmp_path / "c")
    a = load_dataset(corpus, BYTE, 8, **kw)
    first = take(a, 5)
    state = a.state_dict()
    rest = take(a, 5)
    assert len({tuple(x.flatten().tolist()) for x, _ in first + rest}) == 10  # each batch is new
    assert_same(first + rest, take(load_dataset(corpus, BYTE, 8, **kw), 10))
    assert not torch.equal(first[0][0], load_dataset(corpus, BYTE, 8, seed=7, **kw).next_batch(4)[0])
    resumed = load_dataset(corpus, BYTE, 8, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # state survives a JSON round trip
    assert_same(rest, take(resumed, 5))
    assert a.epoch == pytest.approx(10 * 4 * 8 / a.num_train_tokens)
    assert a.batches_per_epoch(4) == -(-a.num_train_tokens // 32)

    whole = load_dataset(corpus, BYTE, 8, **kw).next_batch(4)
    parts = [load_dataset(corpus, BYTE, 8, rank=r, world_size=2, **kw).next_batch(4) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])


# ----------------------------------------------------------------------------- JSON Lines

def test_prompt_mask_exact_and_eot_trained(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "cd"}])
    ds = load_dataset(f, BYTE, 16, val_fraction=0)
    x, y = ds.next_batch(1)
    assert x.tolist() == [[97, 98, 99, 100]]            # a b c d
    assert y.tolist() == [[-100, 99, 100, EOT]]         # predict c, d, then end-of-text
    assert ds.num_train_tokens == 5 and ds.num_train_examples == 1


def test_template_and_text_field(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1", "answer": "2", "quote": "hi"}])
    ds = load_dataset(f, BYTE, 32, template="Q: {question}\nA: ", completion_field="answer", val_fraction=0)
    x, y = ds.next_batch(1)
    prompt = list(b"Q: 1+1\nA: ")
    assert x[0].tolist() == prompt + [ord("2")]
    assert y[0].tolist() == [-100] * (len(prompt) - 1) + [ord("2"), EOT]
    ds = load_dataset(f, BYTE, 32, text_field="quote", val_fraction=0)
    x, y = ds.next_batch(1)
    assert x.tolist() == [[ord("h"), ord("i")]] and y.tolist() == [[ord("i"), EOT]]  # all trained
    assert ds.val_examples is None


def test_padding_right_with_eot_and_ignored_labels(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "long answer"},
                                           {"prompt": "p", "completion": "ab"}])
    ds = load_dataset(f, BYTE, 32, val_fraction=0)
    x, y = ds.next_batch(2)
    assert x.shape == y.shape == (2, 12)
    short = int(torch.argmin((y != -100).sum(1)))
    assert y[short].tolist() == [ord("a"), ord("b"), EOT] + [-100] * 9
    assert x[short, 3:].tolist() == [EOT] * 9


def test_packing_keeps_every_token(tmp_path):
    rows = qa_rows(9)
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    padded = load_dataset(f, BYTE, 16, val_fraction=0)
    packed = load_dataset(f, BYTE, 16, val_fraction=0, packing=True)
    total = sum(len(r["prompt"]) + len(r["completion"]) + 1 for r in rows)
    assert packed.num_train_tokens == total
    n_rows = packed.batches_per_epoch(1)
    assert n_rows == -(-(total - 1) // 16)
    x, y = packed.next_batch(n_rows)                    # exactly one epoch
    assert x.shape == (n_rows, 16) and packed.epoch == 1.0
    stream = x.flatten()[:total - 1].tolist() + [int(y.flatten()[total - 2])]
    expected = sorted(sum((list(f"{r['prompt']}{r['completion']}".encode()) + [EOT] for r in rows), []))
    assert sorted(stream) == expected                   # every token once, in some example order
    assert (x.flatten()[total - 1:] == EOT).all() and (y.flatten()[total - 1:] == -100).all()
    targets = sum(len(r["completion"]) + 1 for r in rows)  # completions + eot; prompts stay masked
    _, py = padded.next_batch(9)
    assert (y != -100).sum() == (py != -100).sum() == targets


@pytest.mark.parametrize("packing", [False, True])
def test_jsonl_determinism_resume_and_ranks(tmp_path, packing):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(23))
    kw = dict(packing=packing, val_fraction=0.1)
    a = load_dataset(f, BYTE, 12, **kw)
    first = take(a, 5)
    state = a.state_dict()
    rest = take(a, 5)
    assert_same(first + rest, take(load_dataset(f, BYTE, 12, **kw), 10))
    other = take(load_dataset(f, BYTE, 12, seed=1, **kw), 5)
    assert any(xa.shape != xb.shape or not torch.equal(xa, xb) for (xa, _), (xb, _) in zip(first, other))
    resumed = load_dataset(f, BYTE, 12, **kw)
    resumed.load_state_dict(state)
    assert_same(rest, take(resumed, 5))
    with pytest.raises(DataError, match="seed"):
        load_dataset(f, BYTE, 12, seed=1, **kw).load_state_dict(state)

    whole = take(load_dataset(f, BYTE, 12, **kw), 3)
    parts = [take(load_dataset(f, BYTE, 12, rank=r, world_size=2, **kw), 3) for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(DataError, match="multiple of world_size"):
        load_dataset(f, BYTE, 12, rank=0, world_size=2, **kw).next_batch(3)


def test_epoch_wraps_around_with_each_example_once(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": c} for c in "abcde"])
    ds = load_dataset(f, BYTE, 8, val_fraction=0)
    assert ds.batches_per_epoch(2) == 3 and ds.epoch == 0.0
    seen = [chr(row[1]) for _ in range(3) for row in ds.next_batch(2)[0].tolist()]
    assert ds.epoch == pytest.approx(1.2)
    assert sorted(seen[:5]) == list("abcde")            # the first epoch is a permutation
    seen += [chr(row[1]) for _ in range(2) for row in ds.next_batch(2)[0].tolist()]
    assert sorted(seen[5:10]) == list("abcde") and seen[:5] != seen[5:10]  # reshuffled per epoch
    assert ds.epoch == pytest.approx(2.0)


def test_val_examples_and_val_batches(tmp_path):
    rows = qa_rows(20)
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = load_dataset(f, BYTE, 16, val_fraction=0.2, packing=True)
    assert ds.num_train_examples == 16
    assert ds.val_examples == [(r["prompt"], r["completion"]) for r in rows[16:]]
    batches = ds.val_batches(3)
    assert [len(x) for x, _ in batches] == [3, 1]
    assert_same(batches, ds.val_batches(3))
    assert len(ds.val_batches(1, max_batches=2)) == 2
    v = write_jsonl(tmp_path / "v.jsonl", rows[:2])
    ds = load_dataset(f, BYTE, 16, val_path=v)
    assert ds.num_train_examples == 20 and ds.val_examples == [(r["prompt"], r["completion"]) for r in rows[:2]]


# ----------------------------------------------------------------------------- bad data

@pytest.mark.parametrize("content, match", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', r"d\.jsonl:2: invalid JSON"),
    ('{"prompt": "a", "completion": "b"}\n\n["a", "b"]\n', r"d\.jsonl:3: expected a JSON object, got an array"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "answer": "b"}\n',
     r"d\.jsonl:2: missing field 'completion'.*this line has fields: 'prompt', 'answer'"),
    ('{"prompt": "a", "completion": 3}\n', r"d\.jsonl:1: field 'completion' must be a string, got a number"),
    ("", r"d\.jsonl: no examples \(the file is empty\)"),
    ("\n  \n", r"d\.jsonl: no examples"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n'.encode("latin-1"), r"d\.jsonl:2: not valid UTF-8"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, match):
    f = tmp_path / "d.jsonl"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match):
        load_dataset(f, BYTE, 16)


def test_template_missing_field(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "completion": "c"}, {"completion": "c"}])
    with pytest.raises(DataError, match=r":2: missing field 'question' \(from template\)"):
        load_dataset(f, BYTE, 16, template="Q: {question}")
    with pytest.raises(DataError, match="positional"):
        load_dataset(f, BYTE, 16, template="Q: {}")


def test_too_long_truncated_with_count_or_refused(tmp_path, capsys):
    rows = [{"prompt": "ab", "completion": "c" * 20}, {"prompt": "ab", "completion": "c"},
            {"prompt": "p" * 12, "completion": "c"}, {"prompt": "ab", "completion": "c" * 9}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = load_dataset(f, BYTE, 10, val_fraction=0)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated 2 of 4 examples" in err and "skipped 1" in err
    assert ds.num_train_examples == 3
    x, y = ds.next_batch(3)
    assert x.shape == (3, 10)
    assert sorted((y != -100).sum(1).tolist()) == [2, 9, 9]  # "c"+eot kept; the long ones cut at 10
    with pytest.raises(DataError, match=r"d\.jsonl:1: example is 23 tokens .* block_size \+ 1 = 11"):
        load_dataset(f, BYTE, 10, on_too_long="error")
    load_dataset(f, BYTE, 10, rank=1, world_size=2)
    assert capsys.readouterr().err == ""  # only rank 0 prints
    long_prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p" * 12, "completion": "c"}])
    with pytest.raises(DataError, match="no usable examples"):
        load_dataset(long_prompts, BYTE, 10)


def test_path_errors(tmp_path, corpus):
    (tmp_path / "d.parquet").write_text("a,b\n")
    with pytest.raises(DataError, match=r"d\.parquet: unknown data format '\.parquet'"):
        load_dataset(tmp_path / "d.parquet", BYTE, 8)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.jsonl", BYTE, 8)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty\.txt: the file is empty"):
        load_dataset(tmp_path / "empty.txt", BYTE, 8, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="fewer than block_size"):
        load_dataset(corpus, BYTE, 10_000, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="jsonl data"):
        load_dataset(corpus, BYTE, 8, cache_dir=tmp_path / "c", val_path=write_jsonl(tmp_path / "v.jsonl", []))
