"""Tokenizers: GPT-2 BPE (through tiktoken, fully offline), bytes, and a model's own tokenizer.json.

    tok = get_tokenizer("gpt2")          # or "byte", or a model directory, or a tokenizer.json path
    ids = tok.encode("Hello world")      # [15496, 995]
    tok.decode(ids)                      # "Hello world"
    tok.eot_token, tok.n_vocab           # 50256, 50257
    tok.bos_token, tok.eos_token_ids, tok.add_bos   # None, [50256], False
    tok.encode_document(text)            # [bos] + encode(text) for models that expect a BOS

GPT-2's merge ranks ship inside the package (assets/gpt2.tiktoken, licence beside it) and are
checked against a pinned sha256 on every load, so training never depends on a download and a
damaged file can never silently change every token id. `tiktoken.get_encoding("gpt2")` is
deliberately not used: it fetches the ranks from the network on first use.

A tokenizer.json (the format the `tokenizers` library writes; read here without it) is one of
two kinds, each giving the library's ids exactly (tests/fixtures/tokenizers holds its output):
- byte-level BPE (GPT-2, OPT, Llama 3, Qwen2, SmolLM2): turned into a tiktoken Encoding, so it
  encodes at tiktoken's speed;
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, TinyLlama): a small pure-Python
  encoder, a heap of candidate merges over a linked list of symbols, with a per-word cache.
BOS/EOS come from the directory's tokenizer_config.json, generation_config.json and config.json
(read beside a tokenizer.json path too). `encode` never adds BOS; `encode_document` does, when
the model expects one (`add_bos`).

Special tokens: `encode` treats the literal text of a special token ("<|endoftext|>", "<s>") as
ordinary text unless asked (`allow_special=True`), so untrusted input (a dataset, a chat request)
can never inject a document boundary. `decode` renders special tokens as their text.
"""

import base64
import functools
import hashlib
import os
from pathlib import Path

import tiktoken

from minilora.errors import MiniloraError
from minilora.tokenizer_json import load_model, no_surrogates, special_ids

ENDOFTEXT = "<|endoftext|>"

# Module-level so tests (or a user with their own copy) can point at another file; the hash
# check below still applies to whatever file is named here.
GPT2_RANKS_PATH = Path(__file__).parent / "assets" / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# GPT-2's split regex as tiktoken writes it for r50k_base (equivalent to the original
# release's pattern, but with possessive quantifiers so it runs faster).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer:
    """Shared interface: name, encode, decode, eot_token, n_vocab, bos_token, eos_token_ids, add_bos."""

    name: str
    eot_token: int          # the first EOS id: what separates documents and ends generation
    n_vocab: int
    bos_token = None        # id, or None when the tokenizer has none
    eos_token_ids = ()      # every id generation should stop at
    add_bos = False         # whether each sequence the model sees starts with bos_token

    def encode(self, text, allow_special=False):
        raise NotImplementedError

    def decode(self, ids):
        raise NotImplementedError

    def encode_document(self, text):
        """`encode(text)`, after BOS when the model expects one: what callers feed the model."""
        ids = self.encode(text)
        return [self.bos_token] + ids if self.add_bos else ids

    def _check_ids(self, ids):
        # Sampling bugs (a model with a padded vocab, a wrong tokenizer) show up here as ids the
        # tokenizer has never heard of; name the id instead of failing deep inside tiktoken.
        ids = [int(i) for i in ids]  # also accepts tensors / numpy arrays element-wise
        for i in ids:
            if not 0 <= i < self.n_vocab:
                raise MiniloraError(
                    f"token id {i} is out of range for tokenizer {self.name!r} "
                    f"(valid ids are 0..{self.n_vocab - 1})"
                )
        return ids

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, n_vocab={self.n_vocab})"


def load_gpt2_ranks(path=None):
    """Read a .tiktoken ranks file ("base64(token) rank" per line) after checking its sha256."""
    path = Path(GPT2_RANKS_PATH if path is None else path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MiniloraError(f"cannot read GPT-2 ranks file {path}: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise MiniloraError(
            f"GPT-2 ranks file {path} has sha256 {digest}, expected {GPT2_RANKS_SHA256}; "
            "the file is damaged or not the GPT-2 vocabulary (reinstall minilora)"
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=None)
def _gpt2_encoding(path):
    """Build (once per path) the tiktoken Encoding; parsing 50k ranks is worth caching."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=load_gpt2_ranks(path),
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,  # tiktoken asserts ranks + specials add up to exactly this
    )


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE (50257 ids, <|endoftext|> = 50256)."""

    def __init__(self, path=None):
        self._enc = _gpt2_encoding(str(GPT2_RANKS_PATH if path is None else path))
        self.name = "gpt2"
        self.eot_token = self._enc.eot_token
        self.eos_token_ids = [self.eot_token]
        self.n_vocab = self._enc.n_vocab

    def encode(self, text, allow_special=False):
        if allow_special:
            return self._enc.encode(text, allowed_special={ENDOFTEXT})
        # disallowed_special=() makes tiktoken encode "<|endoftext|>" as plain text instead of
        # raising; with allowed_special empty that is exactly "never a special token".
        return self._enc.encode(text, disallowed_special=())

    def decode(self, ids):
        # errors="replace": a sampled id sequence may cut a multi-byte character in half.
        return self._enc.decode(self._check_ids(ids), errors="replace")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, plus end-of-text = 256 (n_vocab 257).

    Lossless: decode(encode(s)) == s for every valid str, with no vocabulary file at all,
    which makes it the tokenizer for tiny CPU models and tests. Decoding renders id 256 as the
    literal "<|endoftext|>" (like GPT-2's decode) so a sample's document boundaries stay visible,
    and decodes each run of bytes with errors="replace", since sampled bytes need not be UTF-8.
    """

    def __init__(self):
        self.name = "byte"
        self.eot_token = 256
        self.eos_token_ids = [256]
        self.n_vocab = 257

    @staticmethod
    def _utf8(text):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates cannot be UTF-8; replace them with U+FFFD as tiktoken does.
            return no_surrogates(text).encode("utf-8")

    def encode(self, text, allow_special=False):
        if not allow_special:
            return list(self._utf8(text))
        ids = []
        for k, part in enumerate(text.split(ENDOFTEXT)):
            if k:
                ids.append(self.eot_token)
            ids.extend(self._utf8(part))
        return ids

    def decode(self, ids):
        out, run = [], bytearray()
        for i in self._check_ids(ids):
            if i == self.eot_token:
                out.append(run.decode("utf-8", errors="replace"))
                out.append(ENDOFTEXT)
                run = bytearray()
            else:
                run.append(i)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class JsonTokenizer(Tokenizer):
    """A model's tokenizer.json (see the module docstring), named by the path it was loaded from."""

    def __init__(self, name, path):
        path = Path(path)
        st = path.stat()
        self._model = load_model(str(path.resolve()), (st.st_mtime_ns, st.st_size))
        self.name = name
        self.n_vocab = self._model.n_vocab
        self.bos_token, self.eos_token_ids, self.add_bos = special_ids(self._model, path.parent)
        self.eot_token = self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text, allow_special=False):
        return self._model.encode(text, allow_special)

    def decode(self, ids):
        ids = self._check_ids(ids)
        holes = [i for i in ids if self._model.id_to_token[i] is None]
        if holes:
            raise MiniloraError(f"token id {holes[0]} is not a token of tokenizer {self.name!r} (a gap in its ids)")
        return self._model.decode(ids)


_TOKENIZERS = {"gpt2": GPT2Tokenizer, "byte": ByteTokenizer}


def get_tokenizer(name):
    """The tokenizer called `name` ("gpt2" or "byte"), or a model directory's / tokenizer.json's."""
    if not isinstance(name, (str, os.PathLike)):
        raise MiniloraError(f"tokenizer must be a name or a path, not {type(name).__name__}")
    if name in _TOKENIZERS:  # a name wins over a directory of the same name
        return _TOKENIZERS[name]()
    path = Path(name)
    if not path.exists():
        raise MiniloraError(f"unknown tokenizer {str(name)!r}: not a known name ({', '.join(_TOKENIZERS)}) "
                            "and no such file or directory")
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise MiniloraError(f"model directory {name} has no tokenizer.json (the only tokenizer format read; "
                                "save the tokenizer with the tokenizers library to make one)")
        path = path / "tokenizer.json"
    return JsonTokenizer(str(name), path)
