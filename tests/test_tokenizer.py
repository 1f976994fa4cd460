"""Tokenizers: GPT-2 ids match the reference, round trips are exact, and loading is offline."""

import hashlib
import json
import random
import re
import shutil
import socket
import unicodedata
from pathlib import Path

import pytest
import tiktoken

from minilora import tokenizer as tk
from minilora import tokenizer_json as tjson
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


# ---------------------------------------------------------------------------------------------
# tokenizer.json: parity with the tokenizers library, layouts, special tokens, configs, errors
# ---------------------------------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"


def load_fixture(kind):
    return json.loads((FIXTURES / kind / "tokenizer.json").read_text(encoding="utf-8"))


def write_tokenizer(folder, tj, **configs):
    """A model directory holding `tj` as tokenizer.json and each config as <name>.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    for name, cfg in configs.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg), encoding="utf-8")
    return folder


def bpe_parts(ranks, token, max_rank):
    """The two tokens tiktoken's BPE joins last to make `token`: its merge (how HF files are derived)."""
    parts = [bytes([b]) for b in token]
    while True:
        best = min(((r, i) for i in range(len(parts) - 1)
                    if (r := ranks.get(parts[i] + parts[i + 1])) is not None and r < max_rank), default=None)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def gpt2_style_json(ranks, pre_tokenizer=None, ignore_merges=False, all_splits=False):
    """A GPT-2 layout tokenizer.json from tiktoken ranks: vocab in GPT-2's byte spelling, merges rebuilt
    as GPT-2's file has them (one per token) or, all_splits, as Llama 3's (every split into two tokens)."""
    spell = lambda b: "".join(tjson.BYTE_TO_CHAR[x] for x in b)  # noqa: E731
    vocab = {spell(b): r for b, r in ranks.items()}
    merges = []
    for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if all_splits:
            merges += [[spell(b[:k]), spell(b[k:])] for k in range(1, len(b)) if b[:k] in ranks and b[k:] in ranks]
        elif len(b) > 1:
            merges.append([spell(p) for p in bpe_parts(ranks, b, r)])
    eot = len(vocab)
    vocab["<|endoftext|>"] = eot
    return {"version": "1.0", "added_tokens": [{"id": eot, "content": "<|endoftext|>", "special": True}],
            "normalizer": None,
            "pre_tokenizer": pre_tokenizer or {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "post_processor": {"type": "ByteLevel"}, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": vocab, "merges": merges, "ignore_merges": ignore_merges}}


def random_texts(n, seed=0):
    """Short strings over characters that exercise the split regexes: spaces, digits, contractions, unicode."""
    rng = random.Random(seed)
    alphabet = list("  \n\t\r abcXYZ019'sdmtllve.,!?-_()") + ["é", "日", "🙂", "\u00a0", "\u2003", "١", "Ⅻ", "’"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def small_ranks():
    """GPT-2's first 3,000 merges: a real, small byte-level BPE that builds in milliseconds."""
    return {b: r for b, r in tk.load_gpt2_ranks().items() if r < 3256}


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece"])
def test_fixture_parity_with_tokenizers_library(kind):
    tok = get_tokenizer(str(FIXTURES / kind))
    expected = json.loads((FIXTURES / kind / "expected.json").read_text(encoding="utf-8"))
    assert len(expected["cases"]) >= 10
    for case in expected["cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["decoded"], case["text"]
    # A tokenizer.json path works as well as its directory, and is its own name.
    path = str(FIXTURES / kind / "tokenizer.json")
    assert get_tokenizer(path).name == path and get_tokenizer(path).encode("Hello") == tok.encode("Hello")


def test_sentencepiece_whole_text_merge_matches_cached_words():
    """split=false makes the whole input one word; the per-word cut (and cache) must not change ids."""
    tok = get_tokenizer(str(FIXTURES / "sentencepiece"))
    whole = tjson._SentencePieceBPE(load_fixture("sentencepiece"), "fixture")
    assert tok._model.safe
    whole.safe = False
    expected = json.loads((FIXTURES / "sentencepiece" / "expected.json").read_text(encoding="utf-8"))
    text = " ".join(c["text"] for c in expected["cases"])
    assert whole.encode(text, False) == tok.encode(text)
    for case in expected["cases"]:
        assert whole.encode(case["text"], False) == case["ids"]


def test_sentencepiece_llama2_normalizer_layout(tmp_path):
    """Older Llama 2 files: normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer."""
    tj = load_fixture("sentencepiece")
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    tj["pre_tokenizer"] = None
    old = get_tokenizer(write_tokenizer(tmp_path / "old", tj))
    new = get_tokenizer(str(FIXTURES / "sentencepiece"))
    expected = json.loads((FIXTURES / "sentencepiece" / "expected.json").read_text(encoding="utf-8"))
    for case in expected["cases"]:
        if case["text"].startswith(" "):
            # The one real difference: Prepend always adds "▁", Metaspace not before a leading space.
            assert old.encode(case["text"]) == new.encode(" " + case["text"])
        else:
            assert old.encode(case["text"]) == case["ids"]
        assert old.decode(case["ids"]) == case["decoded"]


def test_sentencepiece_split_words_unk_and_fuse(tmp_path):
    tj = load_fixture("sentencepiece")
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}  # pre-0.14 file
    split = get_tokenizer(write_tokenizer(tmp_path / "split", tj))
    for text in TEXTS[:3] + ["a  b", "x\ny z"]:
        assert split.decode(split.encode(text)) == text
    # split=true (the default before prepend_scheme): "▁" starts a word and words never merge together.
    assert split.encode("can't  stop") == split.encode("can't") + split.encode(" ") + split.encode("stop")

    tj = load_fixture("sentencepiece")
    tj["model"]["byte_fallback"] = False
    fused = get_tokenizer(write_tokenizer(tmp_path / "fused", tj))
    assert fused.encode("") == [] and fused.encode("日本") == [360, 0]  # "▁", then one <unk> for both characters
    tj["model"]["fuse_unk"] = False
    assert get_tokenizer(write_tokenizer(tmp_path / "unfused", tj)).encode("日本") == [360, 0, 0]


def test_sentencepiece_merge_order_ignore_merges_and_merges_across_spaces(tmp_path):
    """A hand-made SentencePiece BPE: merges go by list index; a token its characters cannot be
    merged into comes whole only with ignore_merges; a merge that ends in "▁" turns off the word cut."""
    vocab = {t: i for i, t in enumerate(["<unk>", "▁", "a", "b", "c", "d", "bc", "ab", "cd", "abcd", "d▁"])}
    tj = {"model": {"type": "BPE", "vocab": vocab, "unk_token": "<unk>", "ignore_merges": False,
                    "merges": [["b", "c"], ["a", "b"], ["c", "d"], ["ab", "cd"]]},
          "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": False},
          "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never"}}
    tok = get_tokenizer(write_tokenizer(tmp_path / "a", tj))
    assert tok.encode("abcd") == [2, 6, 5] and tok.encode("cd ab") == [8, 1, 7]  # "b c" first: a bc d
    assert tok.decode([9, 1, 10]) == "abcd d "
    tj["model"]["ignore_merges"] = True
    assert get_tokenizer(write_tokenizer(tmp_path / "b", tj)).encode("abcd") == [9]
    tj["model"]["merges"].append(["d", "▁"])
    tok = get_tokenizer(write_tokenizer(tmp_path / "c", tj))
    assert not tok._model.safe and tok.encode("d d") == [10, 5]


def test_gpt2_tokenizer_json_matches_builtin_gpt2(tmp_path, gpt2):
    """A GPT-2 tokenizer.json written from the vendored ranks (merges rebuilt as HF's files have them)
    gives GPT2Tokenizer's ids: the rank order, byte spelling and regex all agree."""
    tok = get_tokenizer(write_tokenizer(tmp_path, gpt2_style_json(tk.load_gpt2_ranks())))
    assert tok._model.identity and tok.n_vocab == 50257
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    for text in TEXTS + random_texts(500) + [readme, Path(tk.__file__).read_text(encoding="utf-8")]:
        ids = tok.encode(text)
        assert ids == gpt2.encode(text), text[:80]
        assert tok.decode(ids) == text
    assert tok.encode("<|endoftext|>") == gpt2.encode("<|endoftext|>")
    assert tok.encode("a<|endoftext|>b", allow_special=True) == gpt2.encode("a<|endoftext|>b", allow_special=True)
    assert (tok.eot_token, tok.eos_token_ids, tok.bos_token, tok.add_bos) == (50256, [50256], None, False)


def test_llama3_split_layout_and_ignore_merges(tmp_path, small_ranks):
    """Sequence[Split(Regex), ByteLevel(use_regex=false)] (Llama 3, Qwen2), with either ignore_merges."""
    ref = tiktoken.Encoding("ref", pat_str=tk.GPT2_PAT_STR, mergeable_ranks=small_ranks, special_tokens={})
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": tjson.HF_GPT2_PAT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    for ignore, all_splits in ((False, False), (True, False), (True, True)):
        tj = gpt2_style_json(small_ranks, pre, ignore, all_splits)
        assert len(tj["model"]["merges"]) > 3000 if all_splits else len(tj["model"]["merges"]) == 3000
        tok = get_tokenizer(write_tokenizer(tmp_path / f"{ignore}{all_splits}", tj))
        for text in TEXTS + random_texts(200):
            assert tok.encode(text) == ref.encode_ordinary(text), text


def test_bytelevel_add_prefix_space(tmp_path, small_ranks):
    """ByteLevel(add_prefix_space): a space before each stretch of text that lacks one."""
    ref = tiktoken.Encoding("ref", pat_str=tk.GPT2_PAT_STR, mergeable_ranks=small_ranks, special_tokens={})
    tok = get_tokenizer(write_tokenizer(tmp_path, gpt2_style_json(small_ranks, {"type": "ByteLevel",
                                                                                "add_prefix_space": True})))
    assert tok.encode("Hello world") == tok.encode(" Hello world") == ref.encode_ordinary(" Hello world")
    eot = tok.n_vocab - 1
    assert tok.encode("a<|endoftext|>b", allow_special=True) == [*ref.encode_ordinary(" a"), eot,
                                                                *ref.encode_ordinary(" b")]


def test_split_pattern_keeps_text_between_matches(tmp_path, small_ranks):
    """"Isolated" keeps what the pattern does not match as pieces; tiktoken alone would drop it."""
    whole = tiktoken.Encoding("whole", pat_str=r"[\s\S]+", mergeable_ranks=small_ranks, special_tokens={})
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": "\n"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    tok = get_tokenizer(write_tokenizer(tmp_path, gpt2_style_json(small_ranks, pre)))
    for text in ["one line", "two\nlines here\n\nand more", "\n"] + random_texts(50):
        want = [i for piece in re.split("(\n)", text) if piece for i in whole.encode_ordinary(piece)]
        assert tok.encode(text) == want and tok.decode(want) == text


def split_digits(text, individual):
    """The Digits pre-tokenizer: numeric characters (Unicode category N) cut out, each or as runs."""
    pieces = []
    for c in text:
        numeric = unicodedata.category(c)[0] == "N"
        if pieces and numeric == pieces[-1][0] and (not numeric or not individual):
            pieces[-1][1] += c
        else:
            pieces.append([numeric, c])
    return [p for _, p in pieces]


@pytest.mark.parametrize("individual", [True, False])
def test_digits_then_bytelevel_layout(tmp_path, small_ranks, individual):
    """Sequence[Digits, ByteLevel(use_regex)] (SmolLM2): one regex, checked against the library's
    definition: cut out each digit (or run of digits), then GPT-2's regex on each piece."""
    ref = tiktoken.Encoding("ref", pat_str=tk.GPT2_PAT_STR, mergeable_ranks=small_ranks, special_tokens={})
    pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": individual},
                                                 {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}
    tok = get_tokenizer(write_tokenizer(tmp_path, gpt2_style_json(small_ranks, pre)))
    for text in ["a 12 b", "x  3  y", "1 2  3", "x\t4", "Ⅻ ١٢ 7"] + random_texts(300, seed=1):
        want = [i for piece in split_digits(text, individual) for i in ref.encode_ordinary(piece)]
        assert tok.encode(text) == want, text


def test_ignore_merges_false_never_shortcuts_an_unmergeable_token(tmp_path):
    """A token its own bytes cannot be merged into: whole with ignore_merges, in pieces without."""
    vocab = {tjson.BYTE_TO_CHAR[b]: b for b in range(256)}
    vocab.update({"bc": 256, "ab": 257, "cd": 258, "abcd": 259})
    merges = [["b", "c"], ["a", "b"], ["c", "d"], ["ab", "cd"]]  # "b c" comes first, so "abcd" -> a bc d
    for ignore, want in ((False, [97, 256, 100]), (True, [259])):
        tj = {"model": {"type": "BPE", "vocab": vocab, "merges": merges, "ignore_merges": ignore},
              "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}, "decoder": {"type": "ByteLevel"}}
        tok = get_tokenizer(write_tokenizer(tmp_path / str(ignore), tj))
        assert tok.encode("abcd") == want and tok.encode(" abcd")[1:] == [97, 256, 100]
        assert tok.encode("xab") == [120, 257] and tok.decode([259, 32]) == "abcd "


def test_special_tokens_only_when_allowed(tmp_path):
    tok = get_tokenizer(str(FIXTURES / "bytelevel"))
    plain = tok.encode("<|endoftext|>")
    assert 0 not in plain and tok.decode(plain) == "<|endoftext|>"
    assert tok.encode("<|endoftext|>", allow_special=True) == [0]
    ids = tok.encode("a<|endoftext|>b", allow_special=True)
    assert ids.count(0) == 1 and tok.decode(ids) == "a<|endoftext|>b"

    sp = get_tokenizer(str(FIXTURES / "sentencepiece"))
    assert not {1, 2} & set(sp.encode("<s>Hello</s>")) and sp.decode(sp.encode("<s>Hello</s>")) == "<s>Hello</s>"
    ids = sp.encode("<s>Hello</s>", allow_special=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == ids.count(2) == 1
    # prepend_scheme "first": no "▁" before text that follows a special token, so no space comes back.
    assert sp.decode(ids) == "<s>Hello</s>" and sp.decode([1] + sp.encode("Hello")) == "<s> Hello"
    # Byte tokens (<0x00> is id 3) that are not valid UTF-8 decode to one U+FFFD each, as in the library.
    assert sp.decode([3 + 0xE6, 3 + 0x97, sp._model.vocab["A"]]) == "\ufffd\ufffdA"

    # An added token that is not special always matches (as in the library); lstrip eats the space before.
    tj = load_fixture("bytelevel")
    tj["added_tokens"] += [{"id": 1000, "content": "<|tool|>", "special": False},
                           {"id": 1001, "content": "<mask>", "special": True, "lstrip": True}]
    tok = get_tokenizer(write_tokenizer(tmp_path, tj))
    assert tok.n_vocab == 1002 and 1000 in tok.encode("x<|tool|>y") and tok.decode([1000]) == "<|tool|>"
    assert tok.encode("a <mask>", allow_special=True) == tok.encode("a") + [1001]
    assert 1001 not in tok.encode("a <mask>")


def test_bos_eos_from_configs(tmp_path):
    sp = load_fixture("sentencepiece")
    tok = get_tokenizer(write_tokenizer(
        tmp_path / "a", sp,
        tokenizer_config={"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "add_bos_token": True},
        generation_config={"bos_token_id": 1, "eos_token_id": [2, 0]}))
    assert (tok.bos_token, tok.eos_token_ids, tok.eot_token, tok.add_bos) == (1, [2, 0], 2, True)
    assert tok.encode_document("Hi") == [1] + tok.encode("Hi") and 1 not in tok.encode("Hi")

    # Llama 3 style: no add_bos_token, a post_processor template that starts with the BOS.
    template = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    sp["post_processor"] = {"type": "Sequence", "processors": [{"type": "ByteLevel"}, template]}
    tok = get_tokenizer(write_tokenizer(tmp_path / "b", sp, config={"eos_token_id": 2}))
    assert (tok.bos_token, tok.eos_token_ids, tok.add_bos) == (1, [2], True)
    tok = get_tokenizer(write_tokenizer(tmp_path / "c", sp, tokenizer_config={"add_bos_token": False}))
    assert tok.add_bos is False and tok.encode_document("Hi") == tok.encode("Hi")

    bl = get_tokenizer(write_tokenizer(tmp_path / "d", load_fixture("bytelevel"),
                                       config={"bos_token_id": 0, "eos_token_id": 0}))
    assert (bl.bos_token, bl.eos_token_ids, bl.eot_token, bl.add_bos) == (0, [0], 0, False)
    # Without any config, a bare tokenizer.json still knows its end-of-text token.
    assert get_tokenizer(str(FIXTURES / "sentencepiece")).eos_token_ids == [2]

    for name in ("gpt2", "byte"):
        t = get_tokenizer(name)
        assert (t.bos_token, t.eos_token_ids, t.add_bos) == (None, [t.eot_token], False)
        assert t.encode_document("Hi") == t.encode("Hi")

    with pytest.raises(MiniloraError, match="eos_token '<nope>'"):
        get_tokenizer(write_tokenizer(tmp_path / "e", sp, tokenizer_config={"eos_token": "<nope>"}))
    with pytest.raises(MiniloraError, match="generation_config.json.*99999"):
        get_tokenizer(write_tokenizer(tmp_path / "f", sp, generation_config={"eos_token_id": [2, 99999]}))


def test_tokenizer_json_errors(tmp_path):
    with pytest.raises(MiniloraError, match="no such file or directory"):
        get_tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MiniloraError, match="has no tokenizer.json"):
        get_tokenizer(str(tmp_path / "empty"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MiniloraError, match="not valid JSON"):
        get_tokenizer(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(MiniloraError, match="no 'model' section"):
        get_tokenizer(str(bad))

    sp = load_fixture("sentencepiece")
    cases = [
        ({"model": {"type": "WordPiece", "vocab": {"a": 0}}}, "model type 'WordPiece' is not supported.*BPE"),
        ({"model": {"type": "Unigram", "vocab": [["a", -1.0]]}}, "model type 'Unigram' is not supported"),
        ({**sp, "pre_tokenizer": {"type": "Whitespace"}}, "pre_tokenizer 'Whitespace' is not supported"),
        ({**sp, "normalizer": {"type": "Lowercase"}}, "normalizer 'Lowercase' is not supported"),
        ({**sp, "decoder": {"type": "WordPiece"}}, "decoder 'WordPiece' is not supported"),
        ({**sp, "model": {**sp["model"], "merges": [["▁", "nope"]]}}, "missing from the vocabulary"),
        ({**sp, "model": {**sp["model"], "vocab": ["a"]}}, "vocab is not a token -> id mapping"),
        ({**load_fixture("bytelevel"), "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Isolated"},
            {"type": "Split", "pattern": {"Regex": "b"}, "behavior": "Isolated"},
            {"type": "ByteLevel", "use_regex": False}]}}, r"pre_tokenizer Sequence\[Split, Split, ByteLevel\]"),
        ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": {"type": "ByteLevel"},
          "decoder": {"type": "ByteLevel"}}, "no token for byte 0x00"),
        ({"model": {"type": "BPE"}}, "not a valid tokenizer.json"),
    ]
    for k, (tj, match) in enumerate(cases):
        with pytest.raises(MiniloraError, match=match):
            get_tokenizer(write_tokenizer(tmp_path / f"case{k}", tj))

    tok = get_tokenizer(str(FIXTURES / "sentencepiece"))
    with pytest.raises(MiniloraError, match="1256"):
        tok.decode([1, 1256])
    with pytest.raises(MiniloraError, match="must be a name or a path"):
        get_tokenizer(None)


def test_tokenizer_json_cached_per_file_and_reloaded_when_changed(tmp_path):
    folder = write_tokenizer(tmp_path / "m", load_fixture("bytelevel"))
    a, b = get_tokenizer(str(folder)), get_tokenizer(str(folder / "tokenizer.json"))
    assert a._model is b._model and (a.name, b.name) == (str(folder), str(folder / "tokenizer.json"))
    tj = load_fixture("bytelevel")
    tj["added_tokens"].append({"id": 1000, "content": "<|new|>", "special": True})
    write_tokenizer(folder, tj)
    c = get_tokenizer(str(folder))
    assert c._model is not a._model and c.n_vocab == 1001


def test_lone_surrogates_become_replacement_characters():
    for tok in (get_tokenizer(str(FIXTURES / "bytelevel")), get_tokenizer(str(FIXTURES / "sentencepiece"))):
        assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
