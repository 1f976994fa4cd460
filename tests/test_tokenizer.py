"""Tokenizers: GPT-2 ids match the reference, round trips are exact, and loading is offline."""

import hashlib
import random
import shutil
import socket

import pytest

from minilora import tokenizer as tk
from minilora.errors import MiniloraError
from minilora.tokenizer import get_tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. 0123456789 !@#$%^&*()",
    "naïve café — 日本語 🙂",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\ttabbed\n\n\n   \n",
    "",
]


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


def test_vendored_file_matches_pinned_hash():
    data = tk.GPT2_RANKS_PATH.read_bytes()
    assert hashlib.sha256(data).hexdigest() == tk.GPT2_RANKS_SHA256
    assert (tk.GPT2_RANKS_PATH.parent / "gpt2.tiktoken.LICENSE").is_file()


def test_gpt2_known_ids(gpt2):
    assert gpt2.name == "gpt2"
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.n_vocab == 50257
    assert gpt2.eot_token == 50256


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_round_trip(gpt2, text):
    ids = gpt2.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert gpt2.decode(ids) == text


def test_gpt2_endoftext(gpt2):
    assert gpt2.decode([50256]) == "<|endoftext|>"
    # By default the literal text is just text: untrusted input cannot inject a boundary.
    plain = gpt2.encode("<|endoftext|>")
    assert plain != [50256] and 50256 not in plain
    assert gpt2.decode(plain) == "<|endoftext|>"
    assert gpt2.encode("<|endoftext|>", allow_special=True) == [50256]
    ids = gpt2.encode("a<|endoftext|>b", allow_special=True)
    assert ids.count(50256) == 1 and gpt2.decode(ids) == "a<|endoftext|>b"


def test_gpt2_decode_out_of_range(gpt2):
    for bad in (50257, -1, 10**9):
        with pytest.raises(MiniloraError, match=str(bad)):
            gpt2.decode([15496, bad])


def test_byte_tokenizer_basics():
    tok = get_tokenizer("byte")
    assert tok.name == "byte" and tok.n_vocab == 257 and tok.eot_token == 256
    assert tok.encode("Hi") == [72, 105]
    assert tok.encode("é") == [0xC3, 0xA9]


@pytest.mark.parametrize("text", TEXTS + ["<|endoftext|>"])
def test_byte_round_trip(text):
    tok = get_tokenizer("byte")
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_round_trip_random_unicode():
    tok = get_tokenizer("byte")
    rng = random.Random(0)
    # Every code point except the surrogates, which cannot appear in valid UTF-8.
    points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for _ in range(200):
        s = "".join(chr(rng.choice(points)) for _ in range(rng.randrange(0, 40)))
        assert tok.decode(tok.encode(s)) == s


def test_byte_endoftext_and_invalid_bytes():
    tok = get_tokenizer("byte")
    ids = tok.encode("a<|endoftext|>b", allow_special=True)
    assert ids == [97, 256, 98]
    assert tok.decode(ids) == "a<|endoftext|>b"
    assert tok.decode([256]) == "<|endoftext|>"
    # Sampled bytes need not be valid UTF-8: decode must not raise.
    assert tok.decode([0xFF, 104, 0xC3]) == "\ufffdh\ufffd"
    with pytest.raises(MiniloraError, match="257"):
        tok.decode([257])


def test_unknown_name_lists_known():
    with pytest.raises(MiniloraError, match="gpt2.*byte|byte.*gpt2"):
        get_tokenizer("gpt-4")


def test_gpt2_builds_offline(monkeypatch):
    tk._gpt2_encoding.cache_clear()

    def no_network(*args, **kwargs):
        raise OSError("network disabled in test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"


def test_corrupted_ranks_file_refused(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    shutil.copyfile(tk.GPT2_RANKS_PATH, bad)
    lines = bad.read_bytes().splitlines(keepends=True)
    token, rank = lines[1000].split()
    lines[1000] = token + b" " + str(int(rank) + 1).encode() + b"\n"  # one swapped rank
    bad.write_bytes(b"".join(lines))

    with pytest.raises(MiniloraError, match="sha256"):
        tk.load_gpt2_ranks(bad)
    monkeypatch.setattr(tk, "GPT2_RANKS_PATH", bad)
    with pytest.raises(MiniloraError, match="sha256"):
        get_tokenizer("gpt2")
    with pytest.raises(MiniloraError, match="cannot read"):
        tk.load_gpt2_ranks(tmp_path / "missing.tiktoken")
