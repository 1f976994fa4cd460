"""Records from .jsonl, .json (an array) and .csv read alike: the guide's quotes example from each."""

import csv
import json

import pytest
import torch

from minilora.data import DataError, load_dataset, read_records
from minilora.tokenizer import get_tokenizer

QUOTES = [{"quote": "Be yourself; everyone else is already taken.", "author": "Oscar Wilde"},
          {"quote": "So many books, so little time.", "author": "Frank Zappa"},
          {"quote": "A room without books is like a body without a soul, \"said\" he.", "author": "Cicero"},
          {"quote": "You only live once,\nbut if you do it right, once is enough.", "author": "Mae West"}]


def write_all(tmp_path, records=QUOTES):
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "q.json").write_text(json.dumps(records, indent=2))
    with open(tmp_path / "q.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return [tmp_path / f"q.{ext}" for ext in ("jsonl", "json", "csv")]


def test_the_quotes_example_reads_the_same_from_jsonl_json_and_csv(tmp_path):
    tok = get_tokenizer("byte")
    batches = []
    for path in write_all(tmp_path):
        assert [r for _, r in read_records(path)] == QUOTES
        ds = load_dataset(path, tok, 64, text_field="quote", val_fraction=0.25, seed=3, cache_dir=tmp_path / "c")
        batches.append([ds.next_batch(2) for _ in range(3)])
    for other in batches[1:]:
        for (x, y), (x2, y2) in zip(batches[0], other):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_line_numbers_in_json_arrays_and_csv(tmp_path):
    json_path = tmp_path / "q.json"
    json_path.write_text(json.dumps([{"quote": "a"}, {"text": "b"}], indent=2))  # record 2 starts on line 5
    with pytest.raises(DataError, match=r"q\.json:5: missing field 'quote'"):
        load_dataset(json_path, get_tokenizer("byte"), 64, text_field="quote")
    (tmp_path / "bad.json").write_text('[{"quote": "a"},\n 3]')
    with pytest.raises(DataError, match=r"bad\.json:2: expected a JSON object in the array, got a number"):
        read_records(tmp_path / "bad.json")
    (tmp_path / "bad.csv").write_text("quote,author\nfine,me\ntoo,many,cells\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: the row's cells do not match the header's 2 columns"):
        read_records(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("quote\n")
    with pytest.raises(DataError, match="no examples"):
        read_records(tmp_path / "empty.csv")
