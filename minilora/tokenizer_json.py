"""A model's tokenizer.json, read without the tokenizers library: the two kinds of BPE it holds.

    model = load_model(path, stamp)                  # parsed once per file version (lru_cache)
    model.encode(text, allow_special), model.decode(ids), model.n_vocab
    bos, eos_ids, add_bos = special_ids(model, folder)

- byte-level BPE (GPT-2, OPT, Llama 3, Qwen2, SmolLM2): vocabulary + merges + the pre-tokenizer's
  split regex become a tiktoken Encoding, so encoding runs at tiktoken's speed;
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, TinyLlama): a small pure-Python
  encoder, a heap of candidate merges over a linked list of symbols, with a per-word cache.

tokenizer.py wraps these in the Tokenizer interface (get_tokenizer); tests/fixtures/tokenizers
holds the reference library's ids that both must reproduce exactly.
"""

import functools
import heapq
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import tiktoken

from minilora.errors import MiniloraError


def no_surrogates(text):
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# ---------------------------------------------------------------------------------------------
# tokenizer.json: shared pieces (reading, normalizers, added tokens)
# ---------------------------------------------------------------------------------------------

SUPPORTED = ("BPE with a ByteLevel pre-tokenizer (GPT-2, Llama 3, Qwen2) or SentencePiece-style BPE "
             "with Metaspace / byte fallback (Llama 2, Mistral)")

# The pre-tokenizer regex of HF's ByteLevel(use_regex=true): GPT-2's original pattern.
HF_GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _gpt2_digits_pattern(individual):
    """Digits then ByteLevel(use_regex) (SmolLM2, StarCoder) as one regex: a digit (or a run of them
    unless individual) is always its own piece, and a whitespace run that stops at a digit ends a
    piece there, so it is kept whole where (?!\\S) alone would hold its last space back for the digit."""
    return (HF_GPT2_PAT.replace(r" ?\p{N}+", r"\p{N}" if individual else r"\p{N}+")
            .replace(r"\s+(?!\S)", r"\s+(?![^\s\p{N}])"))


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table: vocab strings spell bytes with it ("Ġ" = space)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _read_json(path, what):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise MiniloraError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MiniloraError(f"{path} is not valid JSON ({e}); re-download or re-save the {what}") from e


def _merge_pairs(merges, where):
    """Merges as (left, right) pairs: newer files write ["a", "b"], older ones "a b"."""
    pairs = []
    for m in merges:
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise MiniloraError(f"{where}: merge {m!r} is not a pair of tokens; the file is damaged")
        pairs.append(tuple(pair))
    return pairs


def _normalizer(spec, where):
    """The normalizer as a list of str -> str steps (HF applies them to each added-token-free segment)."""
    if spec is None:
        return []
    kind = spec.get("type")
    if kind == "Sequence":
        return [step for s in spec["normalizers"] for step in _normalizer(s, where)]
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return [functools.partial(unicodedata.normalize, kind)]
    if kind == "Prepend":
        prefix = spec["prepend"]
        return [lambda s: prefix + s if s else s]
    if kind == "Replace" and "String" in spec.get("pattern", {}):
        old, new = spec["pattern"]["String"], spec["content"]
        return [lambda s: s.replace(old, new)]
    raise MiniloraError(f"{where}: normalizer {kind!r} is not supported (supported: NFC, NFD, NFKC, NFKD, "
                        "Prepend, Replace of a string, Sequence of these)")


def _regex_escape(s):
    # The metacharacters of Rust's regex crate (tiktoken's fancy-regex parses the pattern).
    return "".join("\\" + c if c in r"\.+*?()|[]{}^$#&-~" else c for c in s)


def _template_bos(spec):
    """The id a post_processor puts first (Llama's "<s> $A"), or None: the model expects a BOS."""
    if not spec:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        return next((i for p in spec.get("processors", []) if (i := _template_bos(p)) is not None), None)
    if kind == "TemplateProcessing":
        single = spec.get("single") or []
        if single and "SpecialToken" in single[0]:
            return spec["special_tokens"][single[0]["SpecialToken"]["id"]]["ids"][0]
    if kind in ("RobertaProcessing", "BertProcessing"):
        return spec["cls"][1]
    return None


class _JsonModel:
    """What both kinds share: the vocabulary, added tokens and the split of text around them.

    Subclasses provide `_encode_segment(text, first)` (ids of added-token-free text; `first` is
    whether it starts the input, which Metaspace's prepend_scheme "first" needs) and `decode`.
    Added tokens are found in the raw text; the library looks for those marked normalized=true
    after normalizing, which differs only where a normalizer changes their text.
    """

    def __init__(self, tj, where):
        model = tj["model"]
        self.vocab = model["vocab"]
        if not isinstance(self.vocab, dict):
            raise MiniloraError(f"{where}: model.vocab is not a token -> id mapping; the file is damaged")
        self.added = {t["content"]: t["id"] for t in tj.get("added_tokens") or []}
        self.n_vocab = max([*self.vocab.values(), *self.added.values()]) + 1
        self.id_to_token = [None] * self.n_vocab
        for table in (self.vocab, self.added):
            for tok, i in table.items():
                self.id_to_token[i] = tok
        self.template_bos = _template_bos(tj.get("post_processor"))
        self.normalize = _normalizer(tj.get("normalizer"), where)
        # The text of a special token is text unless asked; other added tokens (the tokenizers
        # library's "special": false) always match, as the library does.
        specs = tj.get("added_tokens") or []
        self._split_plain = self._added_regex([t for t in specs if not t.get("special")])
        self._split_all = self._added_regex(specs)

    @staticmethod
    def _added_regex(specs):
        if not specs:
            return None
        parts = []
        # Longest first: the library matches leftmost-longest, Python's alternation leftmost-first.
        for t in sorted(specs, key=lambda t: -len(t["content"])):
            p = "(" + re.escape(t["content"]) + ")"
            if t.get("single_word"):
                p = r"(?<![^\W_])" + p + r"(?![^\W_])"
            parts.append((r"\s*" if t.get("lstrip") else "") + p + (r"\s*" if t.get("rstrip") else ""))
        return re.compile("|".join(parts))

    def token_id(self, text):
        return self.added.get(text, self.vocab.get(text))

    def encode(self, text, allow_special):
        if not text:
            return []
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates cannot be UTF-8: U+FFFD, as tiktoken does
                text = no_surrogates(text)
        split = self._split_all if allow_special else self._split_plain
        if split is None:
            return self._encode_segment(text, True)
        ids, pos = [], 0
        for m in split.finditer(text):
            if m.start() > pos:
                ids += self._encode_segment(text[pos:m.start()], pos == 0)
            ids.append(self.added[m.group(m.lastindex)])
            pos = m.end()
        if pos < len(text):
            ids += self._encode_segment(text[pos:], pos == 0)
        return ids

    def _normalized(self, text):
        for step in self.normalize:
            text = step(text)
        return text


# ---------------------------------------------------------------------------------------------
# Byte-level BPE through tiktoken
# ---------------------------------------------------------------------------------------------

def _byte_level_pattern(spec, where):
    """(split regex, add_prefix_space) for the ByteLevel pre-tokenizer layouts in use."""
    steps = spec["pretokenizers"] if spec.get("type") == "Sequence" else [spec]
    kinds = [s.get("type") for s in steps]
    last = steps[-1]
    if kinds == ["ByteLevel"]:
        return (HF_GPT2_PAT if last.get("use_regex", True) else r"[\s\S]+"), last.get("add_prefix_space", True)
    if (kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True) and not last.get("add_prefix_space")
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        pattern = steps[0]["pattern"]
        p = pattern["Regex"] if "Regex" in pattern else _regex_escape(pattern["String"])
        # "Isolated" keeps the text between matches as pieces too, where tiktoken would drop it:
        # the second branch takes such a gap whole, up to where the pattern matches again.
        return f"(?:{p})|(?:(?!(?:{p}))[\\s\\S])+", False
    if kinds == ["Digits", "ByteLevel"] and last.get("use_regex", True) and not last.get("add_prefix_space"):
        return _gpt2_digits_pattern(steps[0].get("individual_digits", False)), False
    raise MiniloraError(f"{where}: pre_tokenizer Sequence[{', '.join(map(str, kinds))}] with these options is "
                        "not supported (supported: ByteLevel, Sequence[Split(Regex), ByteLevel(use_regex=false)], "
                        "Sequence[Digits, ByteLevel], Metaspace)")


def _to_bytes(token):
    """A vocab string's bytes (GPT-2's printable spelling), or its UTF-8 when it is not spelled so."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return None


class _ByteLevelBPE(_JsonModel):
    """tokenizer.json byte-level BPE as a tiktoken Encoding, ranks mapped back to the file's ids.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; the library merges
    the pair with the lowest merge-list index. Ranking single bytes 0..255 and then each merge's
    result in merge-list order makes the two orders agree. What tiktoken does differently:
    - it takes a whole piece that is a token as is. That is the file's ignore_merges=true (Llama 3);
      with ignore_merges=false the merges decide, which differs only for a token its own bytes
      cannot be merged into. Those are found below and left out of the ranks (decode only).
    - it merges any adjacent pair whose concatenation is a token, the library only listed pairs.
      For merges learned by BPE training or derived from tiktoken ranks (every file in the
      families above) no other pair can meet; tests/test_tokenizer.py checks parity on GPT-2.
    """

    def __init__(self, tj, where):
        super().__init__(tj, where)
        model = tj["model"]
        self.pat_str, self.add_prefix_space = _byte_level_pattern(tj["pre_tokenizer"], where)
        decoder = (tj.get("decoder") or {}).get("type")
        if decoder != "ByteLevel":
            raise MiniloraError(f"{where}: a byte-level BPE needs the ByteLevel decoder, not {decoder!r}")
        vocab, special = self.vocab, {t["content"] for t in tj.get("added_tokens") or [] if t.get("special")}
        ranks, rank_ids = {}, []
        for b in range(256):
            if BYTE_TO_CHAR[b] not in vocab:
                raise MiniloraError(f"{where}: the byte-level vocabulary has no token for byte 0x{b:02X} "
                                    f"({BYTE_TO_CHAR[b]!r}); a byte-level BPE needs all 256")
        # Single bytes are never merge results, so their ranks only need to be 0..255: in id order.
        for b in sorted(range(256), key=lambda b: vocab[BYTE_TO_CHAR[b]]):
            ranks[bytes([b])] = len(rank_ids)
            rank_ids.append(vocab[BYTE_TO_CHAR[b]])
        for left, right in _merge_pairs(model["merges"], where):
            token = left + right
            if left not in vocab or right not in vocab or token not in vocab:
                raise MiniloraError(f"{where}: merge {left!r} + {right!r} uses a token missing from the vocabulary")
            b = _to_bytes(token)
            if b is None:
                raise MiniloraError(f"{where}: merge {left!r} + {right!r} is not spelled in byte-level characters")
            if b not in ranks:  # a token made by several merges ranks at its first
                ranks[b] = len(rank_ids)
                rank_ids.append(vocab[token])
        n_merged = len(rank_ids)
        if model.get("ignore_merges"):
            # Tokens no merge makes are still taken whole (ignore_merges); they rank after all merges.
            for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
                b = _to_bytes(token)
                if b is not None and b not in ranks and token not in special:
                    ranks[b] = len(rank_ids)
                    rank_ids.append(i)
        self.enc = tiktoken.Encoding(name=where, pat_str=self.pat_str, mergeable_ranks=ranks, special_tokens={})
        if not model.get("ignore_merges"):
            unreachable = _unmergeable(self.enc, ranks, n_merged)
            if unreachable:
                for b in unreachable:
                    del ranks[b]
                self.enc = tiktoken.Encoding(name=where, pat_str=self.pat_str, mergeable_ranks=ranks, special_tokens={})
        self.rank_to_id = np.array(rank_ids, dtype=np.int64)
        # rank == id for files made from tiktoken ranks (GPT-2, Llama 3, Qwen2): no lookup needed.
        self.identity = bool(np.array_equal(self.rank_to_id, np.arange(len(rank_ids))))
        # Decoding is bytes joined: the ByteLevel decoder maps each token's characters back to
        # bytes, or takes the token's UTF-8 when it is not spelled in them (an added token with a space).
        self.id_bytes = [None if t is None else (_to_bytes(t) or t.encode()) for t in self.id_to_token]
        for t, i in self.added.items():
            self.id_bytes[i] = _to_bytes(t) or t.encode()

    def _encode_segment(self, text, first):
        text = self._normalized(text)
        if self.add_prefix_space and not text.startswith(" "):
            text = " " + text
        if self.identity:
            return self.enc.encode_ordinary(text)
        return self.rank_to_id[self.enc.encode_to_numpy(text, disallowed_special=())].tolist()

    def decode(self, ids):
        return b"".join([self.id_bytes[i] for i in ids]).decode("utf-8", errors="replace")


def _unmergeable(enc, ranks, n_merged):
    """Merged tokens (ranks 256..n_merged-1) that BPE on their own bytes does not rebuild.

    tiktoken returns a piece that is a token without running its merges, so run them on the
    token's bytes plus one byte that is never the right half of a merge (it cannot join the
    piece): the result is [token, that byte] exactly when the merges rebuild the token.
    """
    inner = set()
    for b in ranks:
        inner.update(b[1:])
    free = next((x for x in range(256) if x not in inner), None)
    if free is None:  # every byte ends some merge (no vocabulary in use does): skip the check
        return []
    tail = bytes([free])
    want = ranks[tail]
    return [b for b, r in ranks.items() if 256 <= r < n_merged and enc._encode_single_piece(b + tail) != [r, want]]


# ---------------------------------------------------------------------------------------------
# SentencePiece-style BPE (metaspace, byte fallback), in Python
# ---------------------------------------------------------------------------------------------

def _decoder(spec, where):
    """The decoder as a list of list[str] -> list[str] steps, as the library chains them."""
    kind = spec.get("type")
    if kind == "Sequence":
        return [step for d in spec["decoders"] for step in _decoder(d, where)]
    if kind == "Replace" and "String" in spec.get("pattern", {}):
        old, new = spec["pattern"]["String"], spec["content"]
        return [lambda toks: [t.replace(old, new) for t in toks]]
    if kind == "ByteFallback":
        return [_byte_fallback]
    if kind == "Fuse":
        return [lambda toks: ["".join(toks)]]
    if kind == "Strip":
        return [functools.partial(_strip, spec["content"], spec.get("start", 0), spec.get("stop", 0))]
    if kind == "Metaspace":
        rep, keep_first = spec.get("replacement", "▁"), _prepend_scheme(spec) == "never"
        # The library's Metaspace decoder drops every replacement char of the first token when it prepends.
        return [lambda toks: [t.replace(rep, " " if k or keep_first else "") for k, t in enumerate(toks)]]
    raise MiniloraError(f"{where}: decoder {kind!r} is not supported (supported: Replace, ByteFallback, Fuse, "
                        "Strip, Metaspace, Sequence of these; ByteLevel for byte-level BPE)")


def _byte_fallback(tokens):
    """Runs of <0xNN> tokens become their UTF-8 text, or one U+FFFD per byte when not valid UTF-8."""
    out, run = [], []
    for t in tokens + [None]:
        if t is not None and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            try:
                run.append(int(t[3:5], 16))
                continue
            except ValueError:
                pass
        if run:
            try:
                out.append(bytes(run).decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" * len(run))
            run = []
        if t is not None:
            out.append(t)
    return out


def _strip(content, start, stop, tokens):
    out = []
    for t in tokens:
        a, b = 0, len(t)
        while a < min(start, len(t)) and t[a] == content:
            a += 1
        while len(t) - b < stop and b > a and t[b - 1] == content:
            b -= 1
        out.append(t[a:b])
    return out


def _prepend_scheme(spec):
    if "prepend_scheme" in spec:
        return spec["prepend_scheme"]
    return "always" if spec.get("add_prefix_space", True) else "never"  # files before tokenizers 0.14


class _SentencePieceBPE(_JsonModel):
    """BPE over characters, with merges by list index, byte fallback and unk (Llama 2, Mistral)."""

    CACHE_MAX = 100_000    # cached words (cleared when full): repeated words cost a dict lookup
    CACHE_WORD_MAX = 64    # longer words are merged but not cached

    def __init__(self, tj, where):
        super().__init__(tj, where)
        model = tj["model"]
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise MiniloraError(f"{where}: BPE with {key} {model[key]!r} is not supported ({SUPPORTED})")
        pre = tj.get("pre_tokenizer")
        if pre is not None and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
            pre = pre["pretokenizers"][0]
        if pre is not None and pre.get("type") != "Metaspace":
            raise MiniloraError(f"{where}: pre_tokenizer {pre.get('type')!r} is not supported ({SUPPORTED})")
        self.metaspace = pre
        self.rep = pre.get("replacement", "▁") if pre else "▁"
        self.prepend = _prepend_scheme(pre) if pre else "never"
        self.split = bool(pre and pre.get("split", True))
        decoder = tj.get("decoder")
        self.decode_steps = None if decoder is None else _decoder(decoder, where)

        vocab = self.vocab
        self.ignore_merges = bool(model.get("ignore_merges"))
        self.fuse_unk = bool(model.get("fuse_unk"))
        unk = model.get("unk_token")
        if unk is not None and unk not in vocab:
            raise MiniloraError(f"{where}: unk_token {unk!r} is not in the vocabulary; the file is damaged")
        self.unk_id = vocab.get(unk)
        self.byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)] if model.get("byte_fallback") else None
        # (left id, right id) -> (merge index, merged id), keyed as one int: hashing is faster.
        self.width = self.n_vocab
        self.merges = {}
        crossing = re.compile(f"[^{re.escape(self.rep)}]{re.escape(self.rep)}")
        crosses = False
        for k, (left, right) in enumerate(_merge_pairs(model["merges"], where)):
            token = left + right
            if left not in vocab or right not in vocab or token not in vocab:
                raise MiniloraError(f"{where}: merge {left!r} + {right!r} uses a token missing from the vocabulary")
            self.merges[vocab[left] * self.width + vocab[right]] = (k, vocab[token])
            crosses = crosses or crossing.search(token) is not None
        # With split=false a whole input is one word, but when no merge makes a token with "▁"
        # after another character, nothing merges across such a place: cut words there and cache.
        # (split=true already cuts a word before every "▁".)
        self.safe = self.split or not crosses
        r = re.escape(self.rep)
        self.word_re = re.compile(f"{r}[^{r}]*|[^{r}]+")          # split=true: "▁" starts a word
        self.piece_re = re.compile(f"{r}+[^{r}]*|[^{r}]+")        # safe cut: before "▁" after another char
        self.cache = {}

    def _encode_segment(self, text, first):
        text = self._normalized(text)
        rep = self.rep
        if self.metaspace is not None:
            text = text.replace(" ", rep)
            if (self.prepend == "always" or (self.prepend == "first" and first)) and not text.startswith(rep):
                text = rep + text
        if not text:
            return []
        out, vocab, cache = [], self.vocab, self.cache
        for word in (self.word_re.findall(text) if self.split else (text,)):
            if self.ignore_merges and word in vocab:
                out.append(vocab[word])
                continue
            for piece in (self.piece_re.findall(word) if self.safe else (word,)):
                ids = cache.get(piece)
                if ids is None:
                    ids = self._merge(self._symbols(piece))
                    if len(piece) <= self.CACHE_WORD_MAX:
                        if len(cache) >= self.CACHE_MAX:
                            cache.clear()
                        cache[piece] = ids
                out += ids
        return out

    def _symbols(self, word):
        """One id per character: the vocab's, else its UTF-8 bytes' <0xNN> ids, else unk."""
        ids, unk, vocab = [], False, self.vocab
        for ch in word:
            i = vocab.get(ch)
            if i is not None:
                if unk:
                    ids.append(self.unk_id)
                    unk = False
                ids.append(i)
                continue
            if self.byte_ids is not None:
                b = [self.byte_ids[x] for x in ch.encode("utf-8")]
                if None not in b:
                    ids += b  # the library leaves a pending unk for later here too
                    continue
            if self.unk_id is None:
                raise MiniloraError(f"character {ch!r} is not in the vocabulary and the tokenizer has no unk_token")
            if unk and not self.fuse_unk:
                ids.append(self.unk_id)
            unk = True
        if unk:
            ids.append(self.unk_id)
        return ids

    def _merge(self, sym):
        """Apply merges lowest index first (then leftmost), as the library does: a heap of candidate
        pairs over a linked list of symbols, so a long word costs O(n log n)."""
        n = len(sym)
        if n < 2:
            return sym
        merges, w = self.merges, self.width
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        nxt[-1] = -1
        heap = [(m[0], i, m[1]) for i in range(n - 1) if (m := merges.get(sym[i] * w + sym[i + 1]))]
        heapq.heapify(heap)
        while heap:
            _, i, new = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j < 0:
                continue
            m = merges.get(sym[i] * w + sym[j])
            if m is None or m[1] != new:  # stale: one of the two symbols merged since
                continue
            sym[i], alive[j] = new, False
            k = nxt[j]
            nxt[i] = k
            if k >= 0:
                prv[k] = i
                if m := merges.get(new * w + sym[k]):
                    heapq.heappush(heap, (m[0], i, m[1]))
            p = prv[i]
            if p >= 0 and (m := merges.get(sym[p] * w + new)):
                heapq.heappush(heap, (m[0], p, m[1]))
        return [s for s, a in zip(sym, alive) if a]

    def decode(self, ids):
        tokens = [self.id_to_token[i] for i in ids]
        if self.decode_steps is None:
            return " ".join(tokens)  # no decoder: the library joins tokens with spaces
        for step in self.decode_steps:
            tokens = step(tokens)
        return "".join(tokens)


# ---------------------------------------------------------------------------------------------
# Loading: the file, BOS/EOS from the configs beside it, the cache
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def load_model(path, stamp):
    """Parse (once per path and mtime/size) a tokenizer.json: 128k-token vocabularies take a while."""
    tj = _read_json(path, "tokenizer file")
    try:
        if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
            raise MiniloraError(f"{path} has no 'model' section; it is not a tokenizer.json")
        model = tj["model"]
        kind = model.get("type") or ("BPE" if "merges" in model else None)
        if kind != "BPE":
            raise MiniloraError(f"{path}: model type {kind!r} is not supported (supported: {SUPPORTED})")
        pre = tj.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        if any(s.get("type") == "ByteLevel" for s in steps):
            return _ByteLevelBPE(tj, str(path))
        return _SentencePieceBPE(tj, str(path))
    except MiniloraError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise MiniloraError(f"{path} is not a valid tokenizer.json ({type(e).__name__}: {e})") from e


def _config(path):
    """A JSON config beside tokenizer.json, or None when there is none."""
    if not path.is_file():
        return None
    data = _read_json(path, "config")
    if not isinstance(data, dict):
        raise MiniloraError(f"{path} is not a JSON object; re-save the config")
    return data


# When there is no config at all (a bare tokenizer.json), the first of these added tokens is the EOS.
EOS_GUESSES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def special_ids(model, folder):
    """(bos_token, eos_token_ids, add_bos) from tokenizer_config.json, generation_config.json,
    config.json and the post_processor, in that order of trust."""
    tcfg, gcfg, mcfg = (_config(folder / f) for f in ("tokenizer_config.json", "generation_config.json",
                                                       "config.json"))

    def named(key):  # tokenizer_config's "bos_token": "<s>" or {"content": "<s>", ...}
        value = (tcfg or {}).get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value is None:
            return []
        if not isinstance(value, str) or model.token_id(value) is None:
            raise MiniloraError(f"{folder / 'tokenizer_config.json'}: {key} {value!r} is not a token of this "
                                "tokenizer; fix the config or use the matching tokenizer.json")
        return [model.token_id(value)]

    def ids(cfg, name, key):  # config's "eos_token_id": 2 or [128001, 128009] or null
        value = (cfg or {}).get(key)
        value = [] if value is None else value if isinstance(value, list) else [value]
        for i in value:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < model.n_vocab:
                raise MiniloraError(f"{folder / name}: {key} {i!r} is not a token id of this tokenizer "
                                    f"(0..{model.n_vocab - 1}); fix the config")
        return value

    bos = named("bos_token") + ids(gcfg, "generation_config.json", "bos_token_id") + ids(mcfg, "config.json",
                                                                                          "bos_token_id")
    eos = named("eos_token") + ids(gcfg, "generation_config.json", "eos_token_id") + ids(mcfg, "config.json",
                                                                                          "eos_token_id")
    eos = list(dict.fromkeys(eos))
    if not eos and tcfg is None and gcfg is None and mcfg is None:
        eos = [model.added[t] for t in EOS_GUESSES if t in model.added][:1]
    add_bos = (tcfg or {}).get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = model.template_bos is not None
    bos = bos[0] if bos else model.template_bos
    if add_bos and bos is None:
        raise MiniloraError(f"{folder}: the tokenizer config asks for a BOS token but names none; "
                            "set bos_token in tokenizer_config.json")
    return bos, eos, add_bos
