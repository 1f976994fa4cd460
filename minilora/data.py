"""Datasets for training: plain text for language modelling, JSONL for fine-tuning.

    ds = load_dataset(path, tokenizer, block_size, *, text_field=None, prompt_field="prompt",
                      completion_field="completion", template=None, val_fraction=0.1,
                      val_path=None, val_split="tokens", packing=False, seed=1337,
                      cache_dir=None, on_too_long="truncate", rank=0, world_size=1, chat_template=None)
    x, y = ds.next_batch(batch_size, device="cpu")    # int64 (b, T'); y == -100 is not a target
    for x, y in ds.val_batches(batch_size, device="cpu", max_batches=None): ...
    state = ds.state_dict(); ds.load_state_dict(state)  # the loader's position, for checkpoints
    ds.epoch                      # float: epochs of training data handed out so far
    ds.batches_per_epoch(batch_size)
    ds.num_train_tokens, ds.num_train_examples (None for plain text), ds.num_val_tokens
    ds.val_examples               # [(prompt, completion), ...] held out, or None
    ds.kind                       # "text" or "jsonl"

What `path` may be (chosen by extension; anything else raises DataError):
- `.txt` file, a directory (its `*.txt`, sorted, not recursive) or a list of those: plain text.
  Each file is one document; documents are joined with the end-of-text token. The whole corpus
  is tokenized once into a flat token cache (uint16, or uint32 when the vocabulary has more than
  65536 ids) named by sha256(tokenizer name + file contents) in `cache_dir` (default
  ~/.cache/minilora/tokens; train.py passes <out_dir>/.cache) and memory-mapped on later runs.
  The held-out split is the last `val_fraction` of the tokens (`val_split="tokens"`) or of the
  documents (`val_split="documents"`). Batches are random contiguous blocks
  x = tokens[i:i+T], y = tokens[i+1:i+T+1], which may span documents, as in GPT-2 pretraining.
- `.jsonl` (one object per line), `.json` (an array of objects; JSON Lines also read) or `.csv`
  (standard-library csv: a header row names the fields, each row is one example, every value a
  string): fine-tuning examples, read alike (read_records). With `text_field`
  the whole text is trained on. Otherwise each example is a prompt and a completion: the prompt
  is field `prompt_field`, or `template` filled from the line's fields ("Q: {question}\\nA: ");
  the completion is field `completion_field`. Prompt and completion are tokenized separately
  (so the prompt's tokens are exactly those it has at generation time), and end-of-text is
  appended: ids = prompt + completion + [eot]. Loss covers only the completion and the eot (so
  the model learns to stop): labels are -100 at prompt positions and at padding.
  The held-out split is the last `val_fraction` of the examples, or all of `val_path`.
  Conversations (TRL's format, chosen when the first line has "messages" and neither text_field nor
  template is set): {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} per
  line, rendered with `chat_template` (a chat.ChatTemplate; default: the built-in the tokenizer
  suggests). Labels cover only the assistant answers, each through its end-of-turn text
  (chat.chat_tokens); a line with a bad role, no content or no assistant turn is refused by file:line.
  `packing=False`: one example per row, right-padded to the longest in the global batch with
  x = eot, y = -100. `packing=True`: examples are concatenated (eot-separated) and cut into rows
  of exactly block_size; labels still mask prompts, but attention crosses example boundaries
  within a row (cheaper, slightly different from the padded loss). Validation batches are always
  padded, in file order.

Examples longer than the context (more than block_size + 1 tokens, i.e. more than block_size
input positions): by default (`on_too_long="truncate"`) the end of the completion is cut off and
one warning line on stderr gives the count; an example whose prompt alone fills the context has
nothing left to learn and is skipped (counted in the same line). `on_too_long="error"` refuses the
first such example, naming file:line and both lengths.

Determinism and resume: every batch is a pure function of (seed, loader position). Fine-tuning
examples are drawn epoch by epoch from a permutation seeded by (seed, epoch); a batch that runs
past the end of an epoch continues into the next. Text blocks are drawn with a generator seeded
by (seed, batch number). `state_dict()` holds that position (plain ints and strings), so a resumed
run sees exactly the batches an uninterrupted one would.

Distributed contract: with `rank`, `world_size` every rank draws the same global batch and keeps
its contiguous slice: `next_batch(global_batch_size)` returns rows
[rank*b, (rank+1)*b) with b = global_batch_size // world_size (which must divide). Concatenating
the ranks' batches in rank order gives exactly the single-process batch. `val_batches` is not
sharded: every rank gets the full, identical validation set.
"""

import csv
import hashlib
import io
import json
import math
import os
import string
import sys
from pathlib import Path

import numpy as np
import torch

from minilora.chat import ChatError, chat_tokens, load_chat_template
from minilora.errors import MiniloraError
from minilora.fileio import atomic_open

CACHE_FORMAT = "minilora-tokens-v1"  # bump to invalidate every cache if the layout changes


class DataError(MiniloraError):
    """A dataset minilora refuses: the message names the file (and line) and the fix."""


def token_dtype(n_vocab):
    """Smallest unsigned dtype that holds every id 0..n_vocab-1."""
    return np.dtype(np.uint16) if n_vocab <= 2**16 else np.dtype(np.uint32)


def default_cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minilora" / "tokens"


def _read(path):
    """File contents as str; a bad byte is reported by line, not as a codec traceback."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from e
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate the BOM some editors write
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from e


# ----------------------------------------------------------------------------- plain text

def _text_files(paths):
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise DataError(f"{p}: no *.txt files in this directory")
            files += found
        elif p.suffix.lower() == ".txt":
            files.append(p)
        else:
            raise DataError(f"{p}: plain-text data must be .txt files or directories of them")
    return files


def tokenize_files(files, tokenizer, cache_dir=None):
    """Tokens of all `files` (one document each, eot after each) as a read-only memmap.

    The cache key covers the tokenizer and every file's bytes in order, so an edited file or a
    different tokenizer gets a new cache and a stale one is never read.
    """
    texts = []
    h = hashlib.sha256(f"{CACHE_FORMAT}\0{tokenizer.name}\0{tokenizer.add_bos}\0".encode())
    for f in files:
        text = _read(f)
        if not text.strip():
            raise DataError(f"{f}: the file is empty; remove it or add text")
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: file boundaries count
        h.update(data)
        texts.append(text)
    dtype = token_dtype(tokenizer.n_vocab)
    path = Path(cache_dir or default_cache_dir()) / f"{h.hexdigest()}.{dtype.name}"
    if path.is_file() and path.stat().st_size % dtype.itemsize == 0 and path.stat().st_size:
        tokens = np.memmap(path, dtype=dtype, mode="r")
        if tokens[-1] == tokenizer.eot_token:  # cheap check that it is a whole cache
            return tokens, h.hexdigest()
    arrays = []
    for text in texts:
        arrays.append(np.asarray(tokenizer.encode_document(text), dtype=dtype))  # BOS first where the model expects it
        arrays.append(np.array([tokenizer.eot_token], dtype=dtype))
    with atomic_open(path, "wb") as f:
        f.write(np.concatenate(arrays).tobytes())
    return np.memmap(path, dtype=dtype, mode="r"), h.hexdigest()


class _Loader:
    """What both dataset kinds share: rank slicing, device transfer, resume checks."""

    def _check_batch(self, batch_size):
        if batch_size < 1 or batch_size % self.world_size:
            raise DataError(f"batch size {batch_size} must be a positive multiple of world_size "
                            f"{self.world_size} (each rank takes an equal slice of the global batch)")
        b = batch_size // self.world_size
        return slice(self.rank * b, (self.rank + 1) * b)

    @staticmethod
    def _to(x, y, device):
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if torch.device(device).type == "cuda":  # pinned host memory lets the copy run async
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def _check_state(self, state, keys):
        for k in ("kind", "seed", "fingerprint", *keys):
            if state.get(k) != self.state_dict()[k]:
                raise DataError(
                    f"data loader state does not match this dataset ({k}: checkpoint has "
                    f"{state.get(k)!r}, this run {self.state_dict()[k]!r}); resume with the same "
                    "data, seed and options, or start a new run")


class TextDataset(_Loader):
    """Random contiguous blocks from a token stream (language modelling)."""

    kind = "text"
    num_train_examples = None
    val_examples = None

    def __init__(self, train, val, block_size, seed, fingerprint, rank=0, world_size=1):
        if len(train) < block_size + 1:
            raise DataError(f"the training split has {len(train)} tokens, fewer than block_size + 1 = "
                            f"{block_size + 1}; add text, lower block_size or lower val_fraction")
        self.train, self.val, self.block_size, self.seed = train, val, block_size, seed
        self.fingerprint, self.rank, self.world_size = fingerprint, rank, world_size
        self.num_train_tokens, self.num_val_tokens = len(train), len(val)
        self._batches = 0  # batches handed out: seeds the next one's generator
        self._rows = 0     # global rows handed out: measures epochs

    def next_batch(self, batch_size, device="cpu"):
        mine, T = self._check_batch(batch_size), self.block_size
        rng = np.random.default_rng([self.seed, self._batches])
        ix = rng.integers(0, len(self.train) - T, size=batch_size)[mine]  # same draw on every rank
        x = np.stack([self.train[i:i + T] for i in ix]).astype(np.int64)          # (b, T)
        y = np.stack([self.train[i + 1:i + 1 + T] for i in ix]).astype(np.int64)  # (b, T)
        self._batches += 1
        self._rows += batch_size
        return self._to(x, y, device)

    def val_batches(self, batch_size, device="cpu", max_batches=None):
        """Consecutive non-overlapping blocks of the held-out tokens, in order."""
        if len(self.val) < 2:
            return []
        T = min(self.block_size, len(self.val) - 1)
        starts = range(0, len(self.val) - T, T)
        out = []
        for k in range(0, len(starts), batch_size):
            ix = starts[k:k + batch_size]
            x = np.stack([self.val[i:i + T] for i in ix]).astype(np.int64)          # (B, T)
            y = np.stack([self.val[i + 1:i + 1 + T] for i in ix]).astype(np.int64)  # (B, T)
            out.append(self._to(x, y, device))
            if max_batches is not None and len(out) >= max_batches:
                break
        return out

    @property
    def epoch(self):
        return self._rows * self.block_size / self.num_train_tokens

    def batches_per_epoch(self, batch_size):
        return math.ceil(self.num_train_tokens / (batch_size * self.block_size))

    def state_dict(self):
        return {"kind": self.kind, "seed": self.seed, "fingerprint": self.fingerprint,
                "num_train_tokens": self.num_train_tokens, "batches": self._batches, "rows": self._rows}

    def load_state_dict(self, state):
        self._check_state(state, ["num_train_tokens"])
        self._batches, self._rows = int(state["batches"]), int(state["rows"])


def _split_text(tokens, eot, val_fraction, val_split, where):
    if val_fraction == 0:
        return tokens, tokens[:0]
    if val_split == "documents":
        ends = np.flatnonzero(np.asarray(tokens) == eot) + 1  # a document ends after its eot
        if len(ends) < 2:
            raise DataError(f"{where}: val_split='documents' needs at least 2 documents (files), found "
                            f"{len(ends)}; use val_split='tokens' or pass held-out data (val_path=, train.py --val_data)")
        k = min(max(1, round(len(ends) * val_fraction)), len(ends) - 1)
        cut = ends[len(ends) - k - 1]
    else:
        cut = len(tokens) - int(len(tokens) * val_fraction)
        if len(tokens) - cut < 2:
            raise DataError(f"{where}: val_fraction {val_fraction} of {len(tokens)} tokens leaves no "
                            "validation text; raise val_fraction (train.py --val_fraction), add text, or pass held-out data "
                            "(val_path=, train.py --val_data)")
    return tokens[:cut], tokens[cut:]


# ----------------------------------------------------------------------------- JSON Lines

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}


def read_jsonl(path):
    """[(line number, object), ...] for each non-blank line of a JSON Lines file."""
    records = []
    # split on "\n" only: str.splitlines would also split at U+2028 inside a JSON string
    for lineno, line in enumerate(_read(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                            "each line must hold one JSON object") from None
        except (ValueError, RecursionError) as e:  # a number of 4300+ digits, or nesting deeper than the parser goes
            raise DataError(f"{path}:{lineno}: invalid JSON ({e}); each line must hold one JSON object") from None
        if not isinstance(record, dict):
            hint = " (a JSON array file? write one object per line)" if isinstance(record, list) else ""
            raise DataError(f"{path}:{lineno}: expected a JSON object, got "
                            f"{_JSON_TYPES.get(type(record), type(record).__name__)}{hint}")
        records.append((lineno, record))
    if not records:
        raise DataError(f"{path}: no examples (the file is empty); write one JSON object per line")
    return records


def read_json_array(path):
    """[(line number, object), ...] for a .json file holding one array of objects (what most exports write)."""
    text = _read(path)
    try:
        json.loads(text)  # the whole file first: a syntax error is reported with its line and column
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None
    decoder, records = json.JSONDecoder(), []
    i = text.index("[") + 1
    while True:  # walk the (valid) array element by element, to know the line each record starts on
        while text[i] in " \t\r\n,":
            i += 1
        if text[i] == "]":
            break
        record, end = decoder.raw_decode(text, i)
        lineno = text.count("\n", 0, i) + 1
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object in the array, got "
                            f"{_JSON_TYPES.get(type(record), type(record).__name__)}")
        records.append((lineno, record))
        i = end
    if not records:
        raise DataError(f"{path}: no examples (the array is empty)")
    return records


def read_csv(path):
    """[(line number, {column: value}), ...] for a .csv file whose first row names the columns."""
    rows = csv.DictReader(io.StringIO(_read(path), newline=""))
    records = []
    try:
        for record in rows:
            if None in record or None in record.values():  # DictReader's marks for too many / too few cells
                raise DataError(f"{path}:{rows.line_num}: the row's cells do not match the header's "
                                f"{len(rows.fieldnames)} columns; quote cells that hold commas")
            records.append((rows.line_num, record))
    except csv.Error as e:
        raise DataError(f"{path}:{rows.line_num}: invalid CSV ({e})") from None
    if not records:
        raise DataError(f"{path}: no examples (a header row, then one row per example)")
    return records


def read_records(path):
    """The examples of a .jsonl, .json (an array of objects, or JSON Lines) or .csv file, with line numbers."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return read_csv(path)
    if suffix == ".json" and _read(path).lstrip().startswith("["):
        return read_json_array(path)
    return read_jsonl(path)


def _template_fields(template):
    """Top-level names a str.format template reads; positional {} fields are refused."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"template {template!r} is not a valid format string: {e}") from None
    if any(n == "" or n.isdigit() for n in names):
        raise DataError(f"template {template!r} has a positional field; name each one, e.g. {{question}}")
    return sorted({n.split(".")[0].split("[")[0] for n in names})


class _Fields:
    """Turns one JSON object into (prompt, completion) strings under the chosen field options."""

    def __init__(self, text_field, prompt_field, completion_field, template, chat_template=None):
        self.chat_template = chat_template
        if text_field is not None and template is not None:
            raise DataError("text_field and template exclude each other: text_field trains on the "
                            "whole text, template builds a prompt whose tokens are masked")
        self.text_field, self.prompt_field = text_field, prompt_field
        self.completion_field, self.template = completion_field, template
        self.template_fields = _template_fields(template) if template is not None else None

    def __call__(self, path, lineno, record):
        def missing(name, option):
            have = ", ".join(map(repr, record)) or "none"
            return DataError(f"{path}:{lineno}: missing field {name!r} (from {option}); "
                             f"this line has fields: {have}")

        def get(name, option):
            if name not in record:
                raise missing(name, option)
            value = record[name]
            if not isinstance(value, str):
                raise DataError(f"{path}:{lineno}: field {name!r} must be a string, got "
                                f"{_JSON_TYPES.get(type(value), type(value).__name__)}")
            return value

        if self.text_field is not None:
            return "", get(self.text_field, "text_field")
        if self.template is not None:
            for name in self.template_fields:
                if name not in record:
                    raise missing(name, "template")
            try:  # a format spec or index that does not fit this line's value ({q:>5} on an object, {q[0]} on "")
                prompt = self.template.format_map(record)
            except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
                raise DataError(f"{path}:{lineno}: template {self.template!r} does not fit this line's values "
                                f"({type(e).__name__}: {e}); fix the line or the template") from None
        else:
            prompt = get(self.prompt_field, "prompt_field")
        return prompt, get(self.completion_field, "completion_field")


def tokenize_examples(path, tokenizer, block_size, fields, on_too_long="truncate", quiet=False):
    """Read a JSONL file into ([(ids, labels) int64 arrays], [(prompt, completion)]).

    ids = [bos] + prompt + completion + [eot] (bos where the tokenizer's model expects it); labels = ids
    with the prompt positions set to -100, so a row is x = ids[:-1], y = labels[1:].
    """
    records = read_records(path)
    if "messages" in records[0][1] and fields.text_field is None and fields.template is None:
        return tokenize_conversations(path, records, tokenizer, block_size, fields.chat_template, on_too_long, quiet)
    examples, raw = [], []
    truncated, skipped, longest = 0, 0, 0
    for lineno, record in records:
        prompt, completion = fields(path, lineno, record)
        p, c = tokenizer.encode_document(prompt), tokenizer.encode(completion)  # BOS first where the model expects it
        ids = p + c + [tokenizer.eot_token]
        if len(ids) < 2:
            raise DataError(f"{path}:{lineno}: empty example (no text to train on); remove the line")
        if len(ids) > block_size + 1:
            if on_too_long == "error":
                raise DataError(f"{path}:{lineno}: example is {len(ids)} tokens (prompt {len(p)} + "
                                f"completion {len(c)} + end-of-text), more than block_size + 1 = "
                                f"{block_size + 1}; shorten it, raise block_size or use "
                                "on_too_long='truncate'")
            longest = max(longest, len(ids))
            if len(p) > block_size:  # nothing of the completion would be left to predict
                skipped += 1
                continue
            ids = ids[:block_size + 1]
            truncated += 1
        labels = np.array(ids, dtype=np.int64)
        labels[:len(p)] = -100
        examples.append((np.array(ids, dtype=np.int64), labels))
        raw.append((prompt, completion))
    if not examples:
        raise DataError(f"{path}: no usable examples: every prompt alone is longer than block_size "
                        f"{block_size}; raise block_size or shorten the prompts")
    if (truncated or skipped) and not quiet:
        note = f"; skipped {skipped} whose prompt alone fills the context" if skipped else ""
        print(f"warning: {path}: truncated {truncated} of {len(records)} examples longer than block_size "
              f"{block_size} (longest {longest} tokens){note}; on_too_long='error' refuses them instead",
              file=sys.stderr)
    return examples, raw


def is_conversational(path):
    """Whether `path` is a JSONL file whose first line is a conversation ({"messages": ...}); never raises."""
    if not isinstance(path, (str, os.PathLike)) or Path(path).suffix.lower() not in (".jsonl", ".json"):
        return False
    try:
        with open(path, encoding="utf-8-sig") as f:
            first = next((line for line in f if line.strip()), "")
        return isinstance(json.loads(first), dict) and "messages" in json.loads(first)
    except (OSError, ValueError, RecursionError):
        return False  # load_dataset says what is wrong with the file


def tokenize_conversations(path, records, tokenizer, block_size, template, on_too_long="truncate", quiet=False):
    """TRL's conversational lines, {"messages": [{"role", "content"}, ...]}, rendered with the chat template
    -> ([(ids, labels)], None). Labels keep only the assistant answers, each through its end-of-turn text
    (chat.chat_tokens), so the model learns to answer and to stop, never to write the user's turns."""
    template = template or load_chat_template(None, tokenizer=tokenizer)
    examples, truncated, skipped, longest = [], 0, 0, 0
    for lineno, record in records:
        if "messages" not in record:
            have = ", ".join(map(repr, record)) or "none"
            raise DataError(f"{path}:{lineno}: missing field 'messages' (the file's first line is a conversation, so "
                            f"every line must be); this line has fields: {have}")
        try:
            ids, mask = chat_tokens(tokenizer, template, record["messages"])
        except ChatError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        if not any(mask):
            raise DataError(f"{path}:{lineno}: the conversation has no assistant turn, so nothing to learn; "
                            "add the assistant's answer or remove the line")
        if len(ids) > block_size + 1:
            if on_too_long == "error":
                raise DataError(f"{path}:{lineno}: conversation is {len(ids)} tokens, more than block_size + 1 = "
                                f"{block_size + 1}; shorten it, raise block_size or use on_too_long='truncate'")
            longest = max(longest, len(ids))
            if not any(mask[1:block_size + 1]):  # no answer token left to predict inside the context
                skipped += 1
                continue
            ids, mask = ids[:block_size + 1], mask[:block_size + 1]
            truncated += 1
        ids = np.array(ids, dtype=np.int64)
        examples.append((ids, np.where(mask, ids, -100)))
    if not examples:
        raise DataError(f"{path}: no usable conversations: none has an answer within block_size {block_size}; "
                        "raise block_size or shorten the conversations")
    if (truncated or skipped) and not quiet:
        note = f"; skipped {skipped} with no answer inside the context" if skipped else ""
        print(f"warning: {path}: truncated {truncated} of {len(records)} conversations longer than block_size "
              f"{block_size} (longest {longest} tokens){note}; on_too_long='error' refuses them instead", file=sys.stderr)
    return examples, None


def _pad(items, eot, length):
    """Right-pad (ids, labels) pairs into x, y of shape (len(items), length)."""
    x = np.full((len(items), length), eot, dtype=np.int64)   # (b, L)
    y = np.full((len(items), length), -100, dtype=np.int64)  # (b, L)
    for row, (ids, labels) in enumerate(items):
        x[row, :len(ids) - 1] = ids[:-1]
        y[row, :len(ids) - 1] = labels[1:]
    return x, y


class ExampleDataset(_Loader):
    """Fine-tuning examples, one epoch after another, padded or packed into rows."""

    kind = "jsonl"

    def __init__(self, train, val, val_examples, block_size, eot, seed, packing=False, rank=0, world_size=1):
        self.train, self.val, self.val_examples = train, val, val_examples
        self.block_size, self.eot, self.seed, self.packing = block_size, eot, seed, packing
        self.rank, self.world_size = rank, world_size
        self.num_train_examples = len(train)
        self.num_train_tokens = sum(len(ids) for ids, _ in train)
        self.num_val_tokens = sum(len(ids) for ids, _ in val)
        h = hashlib.sha256()
        for ids, labels in train:
            h.update(ids.tobytes() + labels.tobytes())
        self.fingerprint = h.hexdigest()
        self._items_per_epoch = len(self._epoch_items(0))
        self._epoch, self._index = 0, 0  # position: next item is _epoch_items(_epoch)[_index]

    def _epoch_items(self, epoch):
        """This epoch's rows in order, each an (ids, labels) pair of length <= block_size + 1."""
        if getattr(self, "_cached_epoch", None) != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
            items = [self.train[i] for i in order]
            if self.packing:
                ids = np.concatenate([ids for ids, _ in items])
                labels = np.concatenate([labels for _, labels in items])
                T = self.block_size
                n_rows = math.ceil((len(ids) - 1) / T)
                pad = n_rows * T + 1 - len(ids)  # the last row is padded, so no token is dropped
                ids = np.concatenate([ids, np.full(pad, self.eot, dtype=np.int64)])
                labels = np.concatenate([labels, np.full(pad, -100, dtype=np.int64)])
                # row r holds tokens r*T .. r*T+T inclusive: rows overlap by the one target token
                items = [(ids[r * T:r * T + T + 1], labels[r * T:r * T + T + 1]) for r in range(n_rows)]
            self._cached_epoch, self._cached_items = epoch, items
        return self._cached_items

    def next_batch(self, batch_size, device="cpu"):
        mine = self._check_batch(batch_size)
        batch = []
        while len(batch) < batch_size:  # a batch may run from the end of one epoch into the next
            items = self._epoch_items(self._epoch)
            take = min(batch_size - len(batch), len(items) - self._index)
            batch += items[self._index:self._index + take]
            self._index += take
            if self._index == len(items):
                self._epoch, self._index = self._epoch + 1, 0
        # pad to the longest row of the global batch, so rank slices equal the single-process rows
        length = max(len(ids) for ids, _ in batch) - 1
        return self._to(*_pad(batch[mine], self.eot, length), device)

    def val_batches(self, batch_size, device="cpu", max_batches=None):
        """The held-out examples in file order, padded, batch_size per batch (the last may be short)."""
        out = []
        for k in range(0, len(self.val), batch_size):
            items = self.val[k:k + batch_size]
            out.append(self._to(*_pad(items, self.eot, max(len(i) for i, _ in items) - 1), device))
            if max_batches is not None and len(out) >= max_batches:
                break
        return out

    @property
    def epoch(self):
        return self._epoch + self._index / self._items_per_epoch

    def batches_per_epoch(self, batch_size):
        return math.ceil(self._items_per_epoch / batch_size)

    def state_dict(self):
        return {"kind": self.kind, "seed": self.seed, "fingerprint": self.fingerprint,
                "packing": self.packing, "block_size": self.block_size,
                "epoch": self._epoch, "index": self._index}

    def load_state_dict(self, state):
        self._check_state(state, ["packing", "block_size"])
        self._epoch, self._index = int(state["epoch"]), int(state["index"])


# ----------------------------------------------------------------------------- the factory

def _kind(path):
    if isinstance(path, (list, tuple)):
        if not path:
            raise DataError("no data files given")
        return "text", list(path)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir() or p.suffix.lower() == ".txt":
        return "text", [p]
    if p.suffix.lower() in (".jsonl", ".json", ".csv"):
        return "jsonl", p  # records, whichever file holds them
    raise DataError(f"{p}: unknown data format {p.suffix or '(no extension)'!r}; use .txt files or a "
                    "directory of them (plain text), .jsonl (one JSON object per line), .json (an array of "
                    "objects) or .csv (a header row, then one row per example)")


def load_dataset(path, tokenizer, block_size, *, text_field=None, prompt_field="prompt",
                 completion_field="completion", template=None, val_fraction=0.1, val_path=None,
                 val_split="tokens", packing=False, seed=1337, cache_dir=None,
                 on_too_long="truncate", rank=0, world_size=1, chat_template=None):
    """Open `path` as a TextDataset or ExampleDataset (see the module docstring for every option)."""
    if not (isinstance(block_size, int) and block_size >= 1):
        raise DataError(f"block_size must be a positive int, got {block_size!r}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if on_too_long not in ("truncate", "error"):
        raise DataError(f"on_too_long must be 'truncate' or 'error', got {on_too_long!r}")
    if val_split not in ("tokens", "documents"):
        raise DataError(f"val_split must be 'tokens' or 'documents', got {val_split!r}")
    if not (isinstance(seed, int) and seed >= 0):
        raise DataError(f"seed must be a non-negative int, got {seed!r}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside 0..world_size-1 (world_size {world_size})")
    kind, source = _kind(path)
    val_kind, val_source = _kind(val_path) if val_path is not None else (kind, None)
    if val_kind != kind:
        raise DataError(f"the held-out data {val_path} (--val_data) is {val_kind} data but {path} is {kind} data; use one format")

    if kind == "text":
        tokens, key = tokenize_files(_text_files(source), tokenizer, cache_dir)
        if val_source is not None:
            train, val = tokens, tokenize_files(_text_files(val_source), tokenizer, cache_dir)[0]
        else:
            train, val = _split_text(tokens, tokenizer.eot_token, val_fraction, val_split, path)
        # the fingerprint covers the split too: a different val_fraction means different blocks
        return TextDataset(train, val, block_size, seed, f"{key}:{len(train)}", rank, world_size)

    fields = _Fields(text_field, prompt_field, completion_field, template, chat_template)
    quiet = rank != 0  # every rank reads the data; one warning is enough
    examples, raw = tokenize_examples(source, tokenizer, block_size, fields, on_too_long, quiet)
    if val_source is not None:
        train, (val, val_raw) = examples, tokenize_examples(val_source, tokenizer, block_size, fields,
                                                            on_too_long, quiet)
    else:
        n_val = 0 if val_fraction == 0 else min(max(1, round(len(examples) * val_fraction)), len(examples) - 1)
        cut = len(examples) - n_val
        train, val, val_raw = examples[:cut], examples[cut:], raw and raw[cut:]
    val_examples = None if text_field is not None else val_raw
    return ExampleDataset(train, val, val_examples, block_size, tokenizer.eot_token, seed, packing,
                          rank, world_size)
