"""Tests for minilora.safetensors: bit-exact round trips, the on-disk layout, and strict rejection."""

import gc
import json
import os
import pathlib
import shutil
import struct

import pytest
import torch

import minilora.safetensors as st
from minilora.errors import MiniloraError
from minilora.safetensors import (SafetensorsError, load, load_file, load_sharded, parse_size, read_header,
                                 read_index, save, save_file, save_sharded)

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def random_tensor(dtype, shape, seed=0):
    """Random bit patterns (NaNs, infs, denormals included) so the comparison is truly bit-exact."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def write_raw(path, header, buffer=b"", n=None):
    """A file built by hand from the spec (struct + json), independent of our writer. No padding."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + buffer)
    return path


# -----------------------------------------------------------------------------
# round trips

@pytest.mark.parametrize("name", list(DTYPES))
def test_round_trip_every_dtype(tmp_path, name):
    dtype = DTYPES[name]
    tensors = {
        "matrix": random_tensor(dtype, (3, 5), seed=1),
        "scalar": random_tensor(dtype, (), seed=2),
        "empty": random_tensor(dtype, (0, 4), seed=3),
        "vector": random_tensor(dtype, (7,), seed=4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for k, t in tensors.items():
        assert same_bits(loaded[k], t), k
    header, _ = read_header(path)
    assert {k: v["dtype"] for k, v in header.items()} == {k: name for k in tensors}
    assert header["scalar"]["shape"] == [] and header["empty"]["shape"] == [0, 4]


def test_round_trip_mixed_dtypes_and_in_memory_form(tmp_path):
    tensors = {f"{name.lower()}.w": random_tensor(d, (2, 3), seed=i) for i, (name, d) in enumerate(DTYPES.items())}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    assert path.read_bytes() == save(tensors, metadata={"format": "pt"})  # both forms write the same bytes
    for loaded in (load_file(path), load(path.read_bytes())):
        assert all(same_bits(loaded[k], t) for k, t in tensors.items())


def test_round_trip_extra_reference_dtypes(tmp_path):
    extra = {"u16": torch.uint16, "u32": torch.uint32, "u64": torch.uint64,
             "f8a": torch.float8_e4m3fn, "f8b": torch.float8_e5m2}
    tensors = {k: random_tensor(d, (4,), seed=i) for i, (k, d) in enumerate(extra.items())}
    save_file(tensors, tmp_path / "x.safetensors")
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(same_bits(loaded[k], t) for k, t in tensors.items())


def test_metadata_round_trip(tmp_path):
    meta = {"format": "pt", "note": "ünïcödé ✓", "empty": "", "json": json.dumps({"r": 8})}
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2)}, path, metadata=meta)
    assert read_header(path)[1] == meta
    assert read_header(path)[0] == {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    save_file({"w": torch.ones(2)}, path)
    assert read_header(path)[1] == {}


def test_saves_views_noncontiguous_and_grad_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    p = torch.nn.Parameter(torch.randn(3, 3))
    tensors = {"t": base.t(), "slice": base[1:3, ::2], "param": p, "alias": base}  # alias shares memory
    save_file(tensors, tmp_path / "v.safetensors")
    loaded = load_file(tmp_path / "v.safetensors")
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t.detach()), k
        assert loaded[k].is_contiguous() and not loaded[k].requires_grad


def test_empty_dict_round_trips(tmp_path):
    save_file({}, tmp_path / "e.safetensors")
    assert load_file(tmp_path / "e.safetensors") == {}


# -----------------------------------------------------------------------------
# layout: our writer matches the spec, and our reader reads a file written by hand

def test_writer_layout(tmp_path):
    tensors = {"b": torch.ones(3, dtype=torch.int8), "a": torch.ones(2, 2), "c": torch.ones(5, dtype=torch.float16)}
    path = tmp_path / "l.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert (8 + n) % 8 == 0  # padded so the buffer is 8-aligned, like the reference
    text = data[8:8 + n].decode("utf-8")
    assert text == text.rstrip() + " " * (len(text) - len(text.rstrip()))  # padding is trailing spaces only
    header = json.loads(text)
    assert header.pop("__metadata__") == {"k": "v"}
    spans = sorted((v["data_offsets"], k) for k, v in header.items())
    assert [k for _, k in spans] == ["a", "c", "b"]  # widest dtype first, keeps every tensor aligned
    pos = 0
    for (begin, end), _ in spans:
        assert begin == pos
        pos = end
    assert pos == len(data) - 8 - n
    assert data[8 + n:8 + n + 16] == tensors["a"].numpy().tobytes()  # raw little-endian bytes


def test_reads_hand_written_unpadded_unaligned_file(tmp_path):
    # A 1-byte U8 first puts the F32 at an odd offset: the reader must copy rather than fail on alignment.
    f32 = struct.pack("<3f", 1.5, -2.0, 3.25)
    i16 = struct.pack("<2h", -7, 300)
    header = {
        "__metadata__": {"source": "hand"},
        "flag": {"dtype": "U8", "shape": [], "data_offsets": [0, 1]},
        "x": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
        "y": {"dtype": "I16", "shape": [1, 2], "data_offsets": [13, 17]},
        "none": {"dtype": "BF16", "shape": [2, 0], "data_offsets": [17, 17]},
    }
    path = write_raw(tmp_path / "hand.safetensors", header, b"\x09" + f32 + i16)
    for loaded in (load_file(path), load(path.read_bytes())):
        assert loaded["flag"].item() == 9 and loaded["flag"].shape == ()
        assert loaded["x"].tolist() == [1.5, -2.0, 3.25]
        assert loaded["y"].tolist() == [[-7, 300]]
        assert loaded["none"].shape == (2, 0) and loaded["none"].dtype == torch.bfloat16
    assert read_header(path)[1] == {"source": "hand"}


# -----------------------------------------------------------------------------
# rejection: every corrupt file raises SafetensorsError naming the file and the problem

def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_FILES = {
    "header_too_long": (dict(header={"w": entry()}, buffer=bytes(8), n=10_000), "larger than"),
    "header_absurd": (dict(header={"w": entry()}, buffer=bytes(8), n=2**64 - 1), "exceeds"),
    "bad_json": (dict(header=b'{"w": {"dtype": "F32",'), "not valid UTF-8 JSON"),
    "bad_utf8": (dict(header=b'{"\xff\xfe": 1}'), "not valid UTF-8 JSON"),
    "empty_header": (dict(header=b""), "not valid UTF-8 JSON"),
    "not_object": (dict(header=[1, 2]), "must be a JSON object"),
    "deep_nesting": (dict(header=b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    "deep_nesting_in_metadata": (dict(header=b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                                 "nested too deeply"),
    "unknown_dtype": (dict(header={"w": entry(dtype="F31")}, buffer=bytes(8)), "unknown dtype 'F31'"),
    "dtype_not_str": (dict(header={"w": entry(dtype=["F32"])}, buffer=bytes(8)), "unknown dtype"),
    "shape_mismatch": (dict(header={"w": entry(shape=(3,))}, buffer=bytes(8)), "needs 12 bytes"),
    "huge_shape": (dict(header={"w": entry(shape=(2**62, 2**62, 2**62))}, buffer=bytes(8)), "needs"),
    "negative_dim": (dict(header={"w": entry(shape=(-2,))}, buffer=bytes(8)), "non-negative integers"),
    "bool_dim": (dict(header={"w": entry(shape=(True,), offsets=(0, 4))}, buffer=bytes(4)), "non-negative integers"),
    "float_dim": (dict(header={"w": entry(shape=(2.0,))}, buffer=bytes(8)), "non-negative integers"),
    "shape_not_list": (dict(header={"w": {**entry(), "shape": 2}}, buffer=bytes(8)), "non-negative integers"),
    "offsets_three": (dict(header={"w": entry(offsets=(0, 4, 8))}, buffer=bytes(8)), "two integers"),
    "offsets_reversed": (dict(header={"w": entry(offsets=(8, 0))}, buffer=bytes(8)), "out of bounds"),
    "offsets_out_of_bounds": (dict(header={"w": entry(offsets=(8, 16))}, buffer=bytes(8)), "out of bounds"),
    "offsets_negative": (dict(header={"w": entry(offsets=(-8, 0))}, buffer=bytes(8)), "out of bounds"),
    "overlap": (dict(header={"a": entry(), "b": entry(offsets=(4, 12))}, buffer=bytes(12)), "overlaps"),
    "gap": (dict(header={"a": entry(), "b": entry(offsets=(12, 20))}, buffer=bytes(20)), "gap of 4 bytes"),
    "not_from_zero": (dict(header={"a": entry(offsets=(4, 12))}, buffer=bytes(12)), "gap of 4 bytes"),
    "trailing_bytes": (dict(header={"a": entry()}, buffer=bytes(9)), "1 trailing bytes"),
    "extra_key": (dict(header={"w": {**entry(), "extra": 1}}, buffer=bytes(8)), "exactly the keys"),
    "missing_key": (dict(header={"w": {"dtype": "F32", "shape": [2]}}, buffer=bytes(8)), "exactly the keys"),
    "entry_not_object": (dict(header={"w": [1]}, buffer=bytes(8)), "exactly the keys"),
    "metadata_not_str": (dict(header={"__metadata__": {"r": 8}}), "__metadata__"),
    "metadata_not_object": (dict(header={"__metadata__": ["a"]}), "__metadata__"),
    "duplicate_key": (dict(header=b'{"w":{"dtype":"U8","shape":[],"data_offsets":[0,1]},'
                                  b'"w":{"dtype":"U8","shape":[],"data_offsets":[0,1]}}', buffer=b"\x00"),
                      "duplicate key 'w'"),
    "bool_byte": (dict(header={"b": entry("BOOL", (2,), (0, 2))}, buffer=b"\x01\x02"), "bytes other than 0 and 1"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_rejects_corrupt_file(tmp_path, case):
    spec, expected = BAD_FILES[case]
    path = write_raw(tmp_path / f"{case}.safetensors", **spec)
    with pytest.raises(SafetensorsError) as err:
        load_file(path)
    msg = str(err.value)
    assert expected in msg and str(path) in msg and "\n" not in msg
    with pytest.raises(SafetensorsError):
        load(path.read_bytes())


@pytest.mark.parametrize("case", ["shape_mismatch", "overlap", "unknown_dtype", "header_too_long"])
def test_read_header_validates_too(tmp_path, case):
    spec, expected = BAD_FILES[case]
    path = write_raw(tmp_path / "h.safetensors", **spec)
    with pytest.raises(SafetensorsError, match=expected):
        read_header(path)


def test_names_the_tensor(tmp_path):
    path = write_raw(tmp_path / "n.safetensors", {"h.0.attn.q_proj.lora_A": entry(shape=(3,))}, bytes(8))
    with pytest.raises(SafetensorsError, match=r"tensor 'h\.0\.attn\.q_proj\.lora_A'"):
        load_file(path)


def test_rejects_truncated_file_at_every_kind_of_cut(tmp_path):
    good = save({"a": torch.randn(4, 4), "b": torch.arange(3)}, metadata={"k": "v"})
    (n,) = struct.unpack("<Q", good[:8])
    for cut in [0, 1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(good) - 1]:
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(good[:cut])
        with pytest.raises(SafetensorsError) as err:
            load_file(path)
        assert str(path) in str(err.value), cut
        with pytest.raises(SafetensorsError):
            read_header(path)


def test_random_corruption_only_ever_raises_safetensors_error():
    import random
    good = save({"a": torch.randn(3, 4), "b": torch.tensor(True), "c": torch.zeros(0, 5, dtype=torch.bfloat16),
                 "d": torch.arange(5, dtype=torch.int8)}, metadata={"k": "v"})
    rng = random.Random(0)
    for _ in range(1000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):  # flip a byte, cut the tail, or insert a byte
            op = rng.random()
            if op < 0.6:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op < 0.8:
                del data[rng.randrange(1, len(data)):]
            else:
                data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        try:
            load(bytes(data))
        except SafetensorsError:
            pass  # anything else (KeyError, RecursionError, a crash) fails the test


def test_error_is_a_minilora_error_and_missing_file_is_not_swallowed(tmp_path):
    assert issubclass(SafetensorsError, MiniloraError) and issubclass(SafetensorsError, ValueError)
    with pytest.raises(FileNotFoundError):
        load_file(tmp_path / "nope.safetensors")


# -----------------------------------------------------------------------------
# writer refusals and atomicity

def test_save_refuses_bad_input_and_leaves_existing_file(tmp_path):
    path = tmp_path / "keep.safetensors"
    save_file({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    bad = [
        (({"w": torch.ones(2)}, path, {"rank": 8}), "'rank'"),
        (({"w": torch.ones(2)}, path, {1: "x"}), "str -> str"),
        (({"ok": torch.ones(2), "z": torch.ones(2, dtype=torch.complex64)}, path), "'z' has unsupported dtype torch.complex64"),
        (({"w": [1.0, 2.0]}, path), "not a torch.Tensor"),
        (({"__metadata__": torch.ones(1)}, path), "not allowed"),
        (({"w": torch.empty(2, device="meta")}, path), "no dense data"),
    ]
    for args, expected in bad:
        with pytest.raises(SafetensorsError, match=expected):
            save_file(*args)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]  # no temporary files left behind


def test_failure_midway_through_writing_leaves_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.safetensors"
    save_file({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    real, calls = st._tensor_bytes, []

    def flaky(t):  # the header and first tensor are written, then serialization of the second blows up
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(t)

    monkeypatch.setattr(st, "_tensor_bytes", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_file({"a": torch.zeros(100), "b": torch.zeros(100)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]


# -----------------------------------------------------------------------------
# the memory map: private, and independent of the file's later fate

def test_loaded_tensors_survive_file_deletion_and_replacement(tmp_path):
    path = tmp_path / "m.safetensors"
    original = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.arange(10, dtype=torch.int64)}
    save_file(original, path)
    first = load_file(path)
    save_file({"a": torch.zeros(5)}, path)  # atomic replace: a new inode, the old mapping is untouched
    assert torch.equal(first["a"], original["a"]) and torch.equal(first["b"], original["b"])
    second = load_file(path)
    os.remove(path)
    gc.collect()
    assert torch.equal(first["a"], original["a"]) and torch.equal(second["a"], torch.zeros(5))
    keep = first["b"]
    del first
    gc.collect()  # one surviving view keeps the whole mapping alive
    assert keep.sum().item() == 45


def test_loaded_tensors_are_writable_copy_on_write(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4)}, path)
    before = path.read_bytes()
    loaded = load_file(path)
    loaded["a"].mul_(3)  # in place, no warning, and the file on disk must not change
    assert loaded["a"].tolist() == [3.0] * 4
    assert path.read_bytes() == before
    assert load_file(path)["a"].tolist() == [1.0] * 4


def test_load_file_device_argument(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "d.safetensors")
    for device in ("cpu", torch.device("cpu")):
        assert load_file(tmp_path / "d.safetensors", device=device)["a"].device.type == "cpu"


# -----------------------------------------------------------------------------
# sharded checkpoints: model-0000i-of-0000n.safetensors + model.safetensors.index.json

LLAMA = pathlib.Path(__file__).parent / "fixtures" / "hf" / "llama" / "model"  # 6 shards written by transformers
INDEX = "model.safetensors.index.json"


def shard_tensors():
    """Five tensors of 40, 40, 400, 8 and 40 bytes, in packing order."""
    return {"a": random_tensor(torch.float32, (10,), 1), "b": random_tensor(torch.float32, (10,), 2),
            "big": random_tensor(torch.float32, (100,), 3), "c": random_tensor(torch.int16, (4,), 4),
            "d": random_tensor(torch.bfloat16, (20,), 5)}


def fresh(path):
    path.mkdir()  # save_sharded writes into an existing directory
    return path


def test_sharded_round_trip_packs_in_order(tmp_path):
    tensors = shard_tensors()
    written = save_sharded(tensors, tmp_path, 90, metadata={"format": "pt"})
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [os.path.basename(p) for p in written] == names + [INDEX]
    assert sorted(os.listdir(tmp_path)) == names + [INDEX]  # no model.safetensors, no temporary files
    # a+b fill 80 of 90 bytes; big (400 > 90) sits alone; c+d = 48 share the last shard
    assert [sorted(read_header(tmp_path / n)[0]) for n in names] == [["a", "b"], ["big"], ["c", "d"]]
    assert all(read_header(tmp_path / n)[1] == {"format": "pt"} for n in names)
    index = json.loads((tmp_path / INDEX).read_text())
    assert index == {"metadata": {"total_size": 528}, "weight_map": {
        "a": names[0], "b": names[0], "big": names[1], "c": names[2], "d": names[2]}}
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    loaded = load_sharded(tmp_path / INDEX)
    assert sorted(loaded) == sorted(tensors) and all(same_bits(loaded[k], t) for k, t in tensors.items())


def test_sharded_fits_in_one_file_and_size_strings(tmp_path):
    tensors = shard_tensors()
    written = save_sharded(tensors, tmp_path, "1KB")
    assert written == [os.path.join(tmp_path, "model.safetensors")] and os.listdir(tmp_path) == ["model.safetensors"]
    assert all(same_bits(load_file(written[0])[k], t) for k, t in tensors.items())
    one_each = save_sharded(tensors, fresh(tmp_path / "x"), 1, prefix="adapter")  # every tensor over the limit
    assert [os.path.basename(p) for p in one_each] == [f"adapter-0000{i}-of-00005.safetensors" for i in range(1, 6)] + [
        "adapter.safetensors.index.json"]
    assert sorted(load_sharded(tmp_path / "x" / "adapter.safetensors.index.json")) == sorted(tensors)


def test_save_sharded_refuses_before_writing(tmp_path):
    save_sharded({"w": torch.ones(2)}, tmp_path, 100)
    with pytest.raises(SafetensorsError, match="already holds model.safetensors"):  # it would shadow new shards
        save_sharded(shard_tensors(), tmp_path, 90)
    for args, match in [((shard_tensors(), tmp_path / "nodir", 90), "not a directory"),
                        (({"w": torch.ones(2), "z": torch.ones(2, dtype=torch.complex64)}, tmp_path / "e", 4), "'z'"),
                        ((shard_tensors(), tmp_path / "e", 0), "at least 1 byte"),
                        ((shard_tensors(), tmp_path / "e", 90, None, "../model"), "prefix")]:
        (tmp_path / "e").mkdir(exist_ok=True)
        with pytest.raises(MiniloraError, match=match):
            save_sharded(*args)
        assert os.listdir(tmp_path / "e") == []


@pytest.mark.parametrize("text,expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5 gb", 1_500_000_000), ("64kib", 65536),
    ("4096", 4096), (" 10B ", 10), (1234, 1234), ("1.1GB", 1_100_000_000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["5 gigs", "GB", "-1GB", "", "1e9", True, 2.5, None, 0, "0MB"])
def test_parse_size_refuses_with_a_hint(bad):
    with pytest.raises(MiniloraError, match="not a size|at least 1 byte") as e:
        parse_size(bad)
    assert "\n" not in str(e.value)


def sharded_dir(tmp_path):
    save_sharded(shard_tensors(), fresh(tmp_path / "ck"), 90)
    return tmp_path / "ck"


def edit_index(d, fn):
    index = json.loads((d / INDEX).read_text())
    fn(index)
    (d / INDEX).write_text(json.dumps(index))


S1, S2, S3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))


def _add_to_shard(d, shard, **extra):
    save_file({**load_file(d / shard), **extra}, d / shard)


CORRUPTIONS = {
    "missing shard": (lambda d: os.remove(d / S2), f"shard file.s. missing from .*: {S2} "),
    "wrong shard": (lambda d: edit_index(d, lambda i: i["weight_map"].update(a=S3)),
                    f"tensors in another shard than the index says: a .index: {S3}, found in {S1}."),
    "missing tensor": (lambda d: edit_index(d, lambda i: i["weight_map"].update(ghost=S1)),
                       f"tensors missing from their shard: ghost .index: {S1}."),
    "extra tensor": (lambda d: _add_to_shard(d, S3, extra=torch.ones(1)),
                     f"tensors the index does not list: extra .in {S3}."),
    "duplicate": (lambda d: _add_to_shard(d, S3, a=torch.ones(1)), f"tensors in two shards: a .{S1} and {S3}."),
    "path escape": (lambda d: edit_index(d, lambda i: i["weight_map"].update(a="../" + S1)),
                    "tensor 'a' maps to '../model-00001-of-00003.safetensors', which is not a plain"),
    "absolute path": (lambda d: edit_index(d, lambda i: i["weight_map"].update(a="/etc/x.safetensors")), "not a plain"),
    "not a shard file": (lambda d: edit_index(d, lambda i: i["weight_map"].update(a="config.json")), "not a plain"),
    "not json": (lambda d: (d / INDEX).write_text("{not json"), "index is not valid UTF-8 JSON"),
    "a list": (lambda d: (d / INDEX).write_text("[1, 2]"), "must be a JSON object with a .weight_map"),
    "no weight_map": (lambda d: edit_index(d, lambda i: i.pop("weight_map")), "must be a JSON object with a .weight_map"),
    "empty weight_map": (lambda d: edit_index(d, lambda i: i.update(weight_map={})), "empty weight_map"),
    "non-string shard": (lambda d: edit_index(d, lambda i: i["weight_map"].update(a=1)), "tensor 'a' maps to 1"),
    "duplicate key": (lambda d: (d / INDEX).write_text(f'{{"weight_map": {{"a": "{S1}", "a": "{S2}"}}}}'),
                      "index has duplicate key 'a'"),
    "bad metadata": (lambda d: edit_index(d, lambda i: i.update(metadata=[1])), '"metadata" must be a JSON object'),
    "bad total_size": (lambda d: edit_index(d, lambda i: i["metadata"].update(total_size="528")),
                       "total_size must be a non-negative integer"),
    "wrong total_size": (lambda d: edit_index(d, lambda i: i["metadata"].update(total_size=529)),
                         "metadata.total_size is 529 but the shards hold 528 bytes"),
    "corrupt shard": (lambda d: (d / S3).write_bytes((d / S3).read_bytes()[:-3]), f"{S3}: "),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_sharded_corruption_is_one_line_naming_it(tmp_path, case):
    corrupt, match = CORRUPTIONS[case]
    d = sharded_dir(tmp_path)
    load_sharded(d / INDEX)  # sound before the damage
    corrupt(d)
    with pytest.raises(SafetensorsError, match=match) as e:
        load_sharded(d / INDEX)
    assert isinstance(e.value, MiniloraError) and "\n" not in str(e.value)
    assert str(d / INDEX) in str(e.value) or case == "corrupt shard"


def test_sharded_reports_every_mismatch_at_once(tmp_path):
    d = sharded_dir(tmp_path)
    _add_to_shard(d, S1, extra=torch.ones(1), c=torch.ones(1))
    edit_index(d, lambda i: i["weight_map"].update(ghost=S2))
    msg = pytest.raises(SafetensorsError, load_sharded, d / INDEX).value.args[0]
    assert "ghost" in msg and "extra" in msg and f"c (index: {S3}, found in {S1})" in msg  # c was seen in S1 first


def test_missing_index_stays_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sharded(tmp_path / INDEX)


def test_reads_the_sharded_llama_checkpoint_transformers_wrote():
    weight_map, metadata = read_index(LLAMA / INDEX)
    assert len(set(weight_map.values())) == 6
    tensors = load_sharded(LLAMA / INDEX)
    assert sorted(tensors) == sorted(weight_map)
    for shard in set(weight_map.values()):
        for name, t in load_file(LLAMA / shard).items():
            assert weight_map[name] == shard and same_bits(tensors[name], t), name
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == metadata["total_size"]
    assert tensors["model.embed_tokens.weight"].shape == (1000, 64) and tensors["model.norm.weight"].shape == (64,)


def test_resharding_the_llama_checkpoint_round_trips(tmp_path):
    shutil.copytree(LLAMA, tmp_path / "orig")  # a copy reads the same: the index names its shards relative to itself
    tensors = load_sharded(tmp_path / "orig" / INDEX)
    (tmp_path / "new").mkdir()
    *shards, index = save_sharded(tensors, tmp_path / "new", "300KB")
    assert len(shards) == 4 and index.endswith(INDEX)  # 857344 bytes in shards of at most 300000
    assert all(sum(v.numel() * 4 for v in load_file(p).values()) <= 300_000 for p in shards)
    again = load_sharded(index)
    assert sorted(again) == sorted(tensors) and all(same_bits(again[k], t) for k, t in tensors.items())
