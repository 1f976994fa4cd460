"""A strictly validated reader/writer for the safetensors format, without the safetensors package.

A .safetensors file is three parts, all little-endian:

    [8 bytes]  N, the header length (unsigned 64-bit)
    [N bytes]  UTF-8 JSON object, possibly padded with trailing spaces:
               {"__metadata__": {str: str},                                   (optional)
                "<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
    [rest]     the byte buffer; offsets are relative to its start, and the tensors tile it
               exactly (no gaps, no overlaps, nothing left over), as the reference demands.

The writer pads the header so the buffer starts at a multiple of 8 and stores wider dtypes
first, so every tensor is aligned and `load_file` can hand out zero-copy views of a
copy-on-write memory map. Every malformed file raises SafetensorsError naming the file and,
where relevant, the tensor; nothing is allocated until the header proves the file holds it.

Big checkpoints are sharded the way transformers shards them (`save_sharded`, `load_sharded`):

    model-00001-of-00003.safetensors ... model-00003-of-00003.safetensors
    model.safetensors.index.json    {"metadata": {"total_size": <bytes of tensor data>},
                                     "weight_map": {tensor name: shard file name}}

and a checkpoint that fits in one shard is a plain `model.safetensors` with no index.
"""

import io
import json
import mmap
import os
import re
import struct
from fractions import Fraction

import torch

from minilora.errors import MiniloraError
from minilora.fileio import atomic_open


class SafetensorsError(MiniloraError):
    """A safetensors file (or a dict of tensors to save) that breaks the format."""


MAX_HEADER_SIZE = 100 * 1024 * 1024  # the reference's limit: a bigger header is an attack, not a model
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _fail(where, msg):
    return SafetensorsError(f"{where}: {msg}".replace("\n", " "))  # one line, for CLIs and logs


# -----------------------------------------------------------------------------
# writing

def _prepare(tensors, metadata):
    """Check everything up front; return (8-byte length + padded header, [(name, tensor)] in file order)."""
    if not isinstance(tensors, dict):
        raise SafetensorsError(f"tensors must be a dict of name -> torch.Tensor, got {type(tensors).__name__}")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise SafetensorsError(f"metadata must be a dict of str -> str, got {type(metadata).__name__}")
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise SafetensorsError(f"metadata must map str -> str; entry {k!r} has a {type(v).__name__} "
                                       f"value (convert it with str() or json.dumps())")
    items = []
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"tensor name {name!r} is not allowed (must be a str other than '__metadata__')")
        if not isinstance(t, torch.Tensor):
            raise SafetensorsError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in _NAMES:
            raise SafetensorsError(f"tensor {name!r} has unsupported dtype {t.dtype} "
                                   f"(supported: {', '.join(map(str, _NAMES))})")
        if t.layout != torch.strided or t.is_meta:
            raise SafetensorsError(f"tensor {name!r} has no dense data to save (layout {t.layout}, device {t.device})")
        items.append((name, t))
    # Widest dtypes first (then by name, like the reference): every offset stays a multiple of its itemsize.
    items.sort(key=lambda kv: (-kv[1].element_size(), kv[0]))
    header = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # spaces are valid JSON whitespace; 8 + N is now a multiple of 8
    return struct.pack("<Q", len(raw)) + raw, items


def _tensor_bytes(t):
    """The raw little-endian bytes of one tensor, as a numpy uint8 array (no copy when already dense on CPU)."""
    # resolve_neg: a lazily negated view would otherwise be written un-negated.
    t = t.detach().resolve_neg().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy()  # via uint8 because numpy has no bfloat16 / float8


def save_file(tensors, path, metadata=None):
    """Write `tensors` (name -> tensor) to `path` atomically: a failure leaves any old file untouched."""
    prefix, items = _prepare(tensors, metadata)
    with atomic_open(path, "wb") as f:
        f.write(prefix)
        for _, t in items:
            f.write(_tensor_bytes(t))


def save(tensors, metadata=None):
    """The in-memory form of `save_file`: the whole file as bytes."""
    prefix, items = _prepare(tensors, metadata)
    return prefix + b"".join(_tensor_bytes(t).tobytes() for _, t in items)


# -----------------------------------------------------------------------------
# reading

def _no_duplicate_keys(where, what="header"):
    def hook(pairs):
        obj = dict(pairs)
        if len(obj) != len(pairs):  # json keeps the last duplicate silently; two "w" entries is a corrupt file
            seen = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise _fail(where, f"{what} has duplicate key {dup!r}")
        return obj
    return hook


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true/false must not pass as 1/0


def _parse_header(raw, buffer_len, where):
    """Validate the JSON header against a buffer of `buffer_len` bytes; return (header, metadata)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys(where))
    except SafetensorsError:
        raise
    except RecursionError:
        raise _fail(where, "header JSON is nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise _fail(where, f"header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise _fail(where, f"header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # optional in the reference, and may be null
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(where, "__metadata__ must be an object mapping strings to strings")
    spans = []
    for name, info in header.items():
        at = f"{where}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
            raise _fail(at, "entry must be an object with exactly the keys dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise _fail(at, f"unknown dtype {dtype!r:.50} (supported: {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
            raise _fail(at, f"shape must be a list of non-negative integers, got {shape!r:.100}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise _fail(at, f"data_offsets must be two integers, got {offsets!r:.100}")
        begin, end = offsets
        if not 0 <= begin <= end <= buffer_len:
            raise _fail(at, f"data_offsets [{begin}, {end}] out of bounds for a {buffer_len}-byte buffer")
        numel = 1
        for d in shape:  # clamped, so a hostile shape cannot make us do huge big-int arithmetic
            numel = min(numel * d, buffer_len + 1)
        itemsize = _DTYPES[dtype].itemsize
        if numel * itemsize != end - begin:
            need = numel * itemsize if numel <= buffer_len else f"more than {buffer_len}"
            raise _fail(at, f"shape {shape!s:.100} of {dtype} needs {need} bytes "
                            f"but data_offsets [{begin}, {end}] hold {end - begin}")
        spans.append((begin, end, name))
    # Sorted by offset the tensors must tile the buffer exactly, so no byte is read twice or never.
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            kind = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise _fail(where, f"tensor {name!r}: data_offsets [{begin}, {end}] {kind} (previous one ends at {pos})")
        pos = end
    if pos != buffer_len:
        raise _fail(where, f"{buffer_len - pos} trailing bytes after the last tensor")
    return header, metadata


def _read_header(f, size, where):
    """Read and validate the header from file object `f` holding `size` bytes; also return where data starts."""
    if size < 8:
        raise _fail(where, f"file is {size} bytes, too short for the 8-byte header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_SIZE:
        raise _fail(where, f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit (corrupt file?)")
    if n > size - 8:
        raise _fail(where, f"header length {n} is larger than the {size - 8} bytes after it (truncated file?)")
    raw = f.read(n)
    if len(raw) != n:
        raise _fail(where, "file shrank while being read")
    header, metadata = _parse_header(raw, size - 8 - n, where)
    return header, metadata, 8 + n


def _build(header, base, start, where):
    """Tensors as views into `base`, a flat uint8 tensor over the whole file whose buffer begins at `start`."""
    out = {}
    for name, info in header.items():
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        begin, end = (start + o for o in info["data_offsets"])
        if begin == end:  # empty or zero-size: nothing to view, and views of 0 bytes have alignment quirks
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = base[begin:end]
        if dtype == torch.bool and bool((raw > 1).any()):  # any other byte is undefined behaviour in torch
            raise _fail(where, f"tensor {name!r}: BOOL data holds bytes other than 0 and 1")
        if begin % dtype.itemsize:  # view(dtype) needs an aligned offset; other writers may not pad
            raw = raw.clone()
        out[name] = raw.view(dtype).reshape(shape)
    return out


def _guarded(where, fn, *args, **kwargs):
    """Run fn; any stray error a corrupt file provokes becomes a SafetensorsError (OSErrors stay as they are)."""
    try:
        return fn(*args, **kwargs)
    except SafetensorsError:
        raise
    except (ValueError, TypeError, OverflowError, RuntimeError, struct.error, IndexError, KeyError) as e:
        raise _fail(where, f"corrupt safetensors data ({type(e).__name__}: {e})") from e


def read_header(path):
    """(header without __metadata__, metadata) of a file, reading only its header: check shapes before loading."""
    where = os.fspath(path)
    with open(where, "rb") as f:
        header, metadata, _ = _guarded(where, _read_header, f, os.fstat(f.fileno()).st_size, where)
    return header, metadata


def load_file(path, device="cpu"):
    """Load every tensor of a file as a zero-copy view of a private (copy-on-write) memory map."""
    where = os.fspath(path)
    with open(where, "rb") as f:
        size = os.fstat(f.fileno()).st_size  # fstat on the open file: header and mapping see the same inode
        header, _, start = _guarded(where, _read_header, f, size, where)
        # ACCESS_COPY maps privately: tensors are writable without touching the file, and the mapping
        # stays valid after this fd closes and after the path is deleted or atomically replaced.
        mm = _guarded(where, mmap.mmap, f.fileno(), size, access=mmap.ACCESS_COPY)
    base = torch.frombuffer(mm, dtype=torch.uint8)  # holds a buffer export of mm: the map lives as long as any view
    tensors = _guarded(where, _build, header, base, start, where)
    if torch.device(device).type != "cpu":
        tensors = {name: t.to(device) for name, t in tensors.items()}
    return tensors


def load(data, where="<bytes>"):
    """The in-memory form of `load_file`: tensors from the bytes of a whole file (copied once)."""
    header, _, start = _guarded(where, _read_header, io.BytesIO(data), len(data), where)
    base = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a bytearray is writable: no torch warning
    return _guarded(where, _build, header, base, start, where)


# -----------------------------------------------------------------------------
# sharded checkpoints: several files plus an index, as transformers writes them

INDEX_SUFFIX = ".safetensors.index.json"  # "model" + INDEX_SUFFIX is the index beside model-0000i-of-0000n shards
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(size):
    """Bytes from an int or a string such as "5GB" (5 * 10**9), "2GiB" (2 * 2**30), "500MB", "1.5GB", "4096"."""
    if _is_int(size):
        n = size
    elif isinstance(size, str) and (m := _SIZE.fullmatch(size)) and m[2].lower() in _UNITS:
        n = int(Fraction(m[1]) * _UNITS[m[2].lower()])  # Fraction: "1.1GB" is exactly 1100000000, no float rounding
    else:
        raise MiniloraError(f"{size!r:.40} is not a size; give a number of bytes or one with a unit "
                            "(B, KB, MB, GB, TB, or KiB, MiB, GiB, TiB), e.g. 5GB, 500MB, 2GiB")
    if n < 1:
        raise MiniloraError(f"size {size!r:.40} is {n} bytes; it must be at least 1 byte")
    return n


def _is_shard_name(name):
    """A plain .safetensors file name: an index must never point outside its own directory."""
    return (isinstance(name, str) and name.endswith(".safetensors") and ".." not in name
            and not any(c in name for c in "/\\\0") and os.path.basename(name) == name)


def read_index(path):
    """(weight_map, metadata) of a .safetensors.index.json, validated: tensor name -> plain shard file name."""
    where = os.fspath(path)
    with open(where, "rb") as f:  # like load_file, a missing or unreadable file stays an OSError
        raw = f.read()
    try:
        index = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys(where, "index"))
    except SafetensorsError:
        raise
    except RecursionError:
        raise _fail(where, "index JSON is nested too deeply") from None
    except ValueError as e:
        raise _fail(where, f"index is not valid UTF-8 JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise _fail(where, 'index must be a JSON object with a "weight_map" object of tensor name -> shard file name')
    weight_map = index["weight_map"]
    if not weight_map:
        raise _fail(where, "index has an empty weight_map: it names no tensors")
    for name, shard in weight_map.items():
        if not _is_shard_name(shard):
            raise _fail(where, f"tensor {name!r} maps to {shard!r:.80}, which is not a plain .safetensors "
                               "file name in the index's directory")
    metadata = index.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise _fail(where, f'"metadata" must be a JSON object, got {type(metadata).__name__}')
    if "total_size" in metadata and not (_is_int(metadata["total_size"]) and metadata["total_size"] >= 0):
        raise _fail(where, f"metadata.total_size must be a non-negative integer, got {metadata['total_size']!r:.40}")
    return weight_map, metadata


def _listing(items, limit=5):
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_sharded(index_path, device="cpu"):
    """Every tensor of a sharded checkpoint (memory-mapped, as load_file), its index checked against its shards.

    Each shard is read once and validated like any file; then every tensor must be in exactly the shard
    the index names, and metadata.total_size (when present) must be the bytes the shards hold, so a
    shard from another checkpoint or an index edited by hand fails by name instead of loading garbage.
    """
    where = os.fspath(index_path)
    weight_map, metadata = read_index(where)
    folder = os.path.dirname(where)
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise _fail(where, f"shard file(s) missing from {folder or '.'}: {_listing(missing)} "
                           "(an interrupted download or copy? fetch them again)")
    out, home = {}, {}  # home: tensor name -> the shard it was found in
    twice, unlisted, moved = [], [], []
    for shard in shards:
        for name, t in load_file(os.path.join(folder, shard), device).items():
            if name in home:
                twice.append(f"{name} ({home[name]} and {shard})")
            elif name not in weight_map:
                unlisted.append(f"{name} (in {shard})")
            elif weight_map[name] != shard:
                moved.append(f"{name} (index: {weight_map[name]}, found in {shard})")
            home.setdefault(name, shard)
            out.setdefault(name, t)
    absent = [f"{name} (index: {shard})" for name, shard in weight_map.items() if name not in home]
    problems = [f"{kind}: {_listing(names)}" for kind, names in (
        ("tensors missing from their shard", absent), ("tensors in another shard than the index says", moved),
        ("tensors the index does not list", unlisted), ("tensors in two shards", twice)) if names]
    if problems:
        raise _fail(where, f"index does not match its shards: {'; '.join(problems)}")
    total = sum(t.numel() * t.element_size() for t in out.values())
    if "total_size" in metadata and metadata["total_size"] != total:
        raise _fail(where, f"metadata.total_size is {metadata['total_size']} but the shards hold {total} bytes "
                           "of tensors (a shard from another checkpoint?)")
    return out


def save_sharded(tensors, directory, max_shard_bytes, metadata=None, prefix="model"):
    """Write `tensors` into `directory` as shards of at most max_shard_bytes each; return the paths written.

    One shard is a plain `<prefix>.safetensors`; more are `<prefix>-0000i-of-0000n.safetensors` plus
    `<prefix>.safetensors.index.json`, transformers' names. Tensors are packed in the order given; a tensor
    bigger than the limit gets a shard of its own. `metadata` goes into every shard's header (transformers
    writes {"format": "pt"}). Each file is written atomically, the index last; the directory as a whole is
    the caller's to make atomic (build it inside fileio.atomic_directory).
    """
    limit = parse_size(max_shard_bytes)
    _prepare(tensors, metadata)  # every name, dtype and metadata entry checked before the first file is written
    if not isinstance(prefix, str) or not _is_shard_name(prefix + ".safetensors"):
        raise SafetensorsError(f"prefix {prefix!r:.60} must be a plain file name such as 'model'")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise SafetensorsError(f"{directory} is not a directory; save_sharded writes into an existing one")
    # Weights already there would be read instead of ours (model.safetensors wins over an index), or mix with them.
    ours = re.compile(re.escape(prefix) + r"(\.safetensors|\.safetensors\.index\.json|-\d{5}-of-\d{5}\.safetensors)")
    stale = sorted(f for f in os.listdir(directory) if ours.fullmatch(f))
    if stale:
        raise SafetensorsError(f"{directory} already holds {_listing(stale)}; save_sharded writes into a "
                               "directory without weights (a fresh one, or remove those files first)")
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:  # never an empty shard: an oversized tensor sits alone
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        path = os.path.join(directory, prefix + ".safetensors")
        save_file(shards[0], path, metadata)
        return [path]
    n = len(shards)
    written, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file = f"{prefix}-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(directory, file), metadata)
        written.append(os.path.join(directory, file))
        weight_map |= dict.fromkeys(shard, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path = os.path.join(directory, prefix + INDEX_SUFFIX)
    with atomic_open(path, "w") as f:  # last: an index never names a shard that is not complete on disk
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written + [path]
