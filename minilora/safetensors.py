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
"""

import io
import json
import mmap
import os
import struct

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

def _no_duplicate_keys(where):
    def hook(pairs):
        obj = dict(pairs)
        if len(obj) != len(pairs):  # json keeps the last duplicate silently; two "w" entries is a corrupt file
            seen = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise _fail(where, f"header has duplicate key {dup!r}")
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
