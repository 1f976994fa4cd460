"""Seeded mutation fuzzing of every reader of untrusted files: safetensors, adapter directories
(adapter_config.json + adapter_model.safetensors, through load_adapter and through the server's
registry), base checkpoints (config.json + model.safetensors) and JSONL datasets.

Each case starts from a valid file and mutates it (flipped bytes, truncation, splices, an inflated
header length, changed dtypes/shapes/offsets, hostile JSON values, deep nesting). The promise
under test: every case either loads correctly (checked, not just "no exception") or raises
MiniloraError; any other exception, a hang (a per-case alarm) or a memory blow-up fails the
test, naming the case and keeping its input. Seeds are fixed, so a failure reproduces; a run
reports every distinct failure (grouped by exception type and the line that raised it).
MINILORA_SOAK=1 (or `pytest --soak`) runs 100x the cases.
"""

import contextlib
import copy
import io
import json
import os
import random
import resource
import signal
import struct
import time
import traceback
import tracemalloc

import pytest
import torch

from minilora import GPT, GPTConfig
from minilora.adapter_files import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
from minilora.data import load_dataset
from minilora.errors import MiniloraError
from minilora import LoraConfig, apply_lora, load_adapter, lora_layers, save_adapter
from minilora.adapter_files import peft_config_dict
from minilora.registry import AdapterRegistry
from minilora.safetensors import MAX_HEADER_SIZE, load, load_file, read_header, save
from minilora.tokenizer import get_tokenizer

SOAK = 100 if os.environ.get("MINILORA_SOAK", "0") not in ("", "0") else 1
CASE_SECONDS = 5  # hang guard only: a case costs about a millisecond
BYTE = get_tokenizer("byte")

# JSON values that break naive readers: wrong types, bounds, huge claims, 4300+ digit ints.
HOSTILE = [0, -1, 1, 3, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, -2**63, 1.5, float("nan"),
           float("inf"), True, False, None, "", "F32", "BOOL", "x" * 300, "\ud800", [], [1], [[2]], {},
           {"a": 1}, [2**40, 2**40], [0, 2**62], [2**62, 2**62, 0], [-3], [1.0], ["2"], [None], "<BIG>", ["<BIG>"]]
BIG = "<BIG>"  # written out as a 5000-digit integer, past Python's int-parsing limit
# byte strings to insert: JSON syntax, escapes, invalid UTF-8, NUL, line separators
TOKENS = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"\\", b"\x00", b"\xff\xfe", b"\xc3", b"\\ud800",
          b"\\u0000", b"\xe2\x80\xa8", b"\r\n", b"\n", b"-0", b"1e999", b"NaN", b"9" * 5000, b"\xef\xbb\xbf"]


class Hang(BaseException):
    """Raised by the per-case alarm; a BaseException so no `except Exception` in the code under test eats it."""


@contextlib.contextmanager
def alarm(seconds):
    def ring(signum, frame):
        raise Hang(f"case still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def origin(e):
    """Where an exception was raised: the innermost minilora frame, as file:line."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "minilora" in f.filename and "tests" not in f.filename]
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"


def fuzz(name, n, make_case, check, tmp_path, seed=None):
    """Run n cases; make_case(rng) -> (what, payload), check(payload) -> True (loaded) / False (refused).

    Failures are grouped by exception type and origin, so one run reports every distinct bug.
    """
    rng = random.Random(f"minilora-fuzz-{seed or name}")  # str seeds are stable across runs and platforms
    loaded = refused = hangs = 0
    failures = {}  # (type, origin) -> [count, first case]
    rss0, vm0, cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, vm_peak_kib(), time.process_time()
    for i in range(n):
        what, payload = make_case(rng)
        try:
            with alarm(CASE_SECONDS), contextlib.redirect_stderr(io.StringIO()):  # truncation warnings
                ok = check(payload)
            loaded, refused = loaded + ok, refused + (not ok)
        except MiniloraError:
            refused += 1
        except (Exception, Hang) as e:
            key = (type(e).__name__, origin(e))
            if key not in failures:
                kept = tmp_path / f"failing-{name.replace(' ', '_')}-{i}"
                os.makedirs(kept, exist_ok=True)
                for fname, data in payload.items():
                    (kept / fname).write_bytes(data)
                failures[key] = [0, f"case {i} ({what}): {str(e)[:200]} [input kept in {kept}]"]
            failures[key][0] += 1
            hangs += isinstance(e, Hang)
            if hangs >= 3:  # each costs CASE_SECONDS
                break
    # peak resident and peak virtual size: an allocation a file merely claims shows in one of them
    rss, vm = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, (vm_peak_kib() - vm0) / 1024
    bad = sum(c for c, _ in failures.values())
    print(f"\n[fuzz] {name}: {i + 1} cases tried, {loaded} loaded, {refused} refused with MiniloraError, "
          f"{bad} failed; peak RSS +{rss:.0f} MiB, peak VM +{vm:.0f} MiB; {time.process_time() - cpu0:.1f} s CPU")
    assert not failures, f"{name}: {bad} cases raised something other than MiniloraError:\n" + "\n".join(
        f"{t} at {where} x{count}, first {first}" for (t, where), (count, first) in failures.items())
    assert rss < 256 and vm < 1024, f"{name}: memory peaks grew by {rss:.0f} MiB (RSS), {vm:.0f} MiB (VM)"
    return loaded, refused


def put(path, data):
    # unlink first: ext4 flushes a file that is truncated and rewritten (auto_da_alloc), 2 ms a case
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def vm_peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmPeak:"))


# ---- generic byte mutations ------------------------------------------------------------------------

def mutate_bytes(rng, data, other, lo=0, hi=None):
    """One byte-level mutation of `data`, positions drawn mostly from [lo, hi)."""
    data = bytearray(data)
    hi = len(data) if hi is None else hi
    pos = lambda: rng.randrange(lo, max(hi, lo + 1)) if rng.random() < 0.8 else rng.randrange(len(data) + 1)
    op = rng.choice(["flip", "truncate", "splice", "insert", "delete", "duplicate"])
    if op == "flip":
        for _ in range(rng.randint(1, 8) if data else 0):
            p = min(pos(), len(data) - 1)
            data[p] ^= rng.randrange(1, 256)
    elif op == "truncate":
        data = data[:pos()]
    elif op == "splice":
        data = data[:pos()] + other[rng.randrange(len(other) + 1):]
    elif op == "insert":
        p = pos()
        data[p:p] = rng.choice(TOKENS) if rng.random() < 0.7 else rng.randbytes(rng.randint(1, 16))
    elif op == "delete":
        p = pos()
        del data[p:p + rng.randint(1, 32)]
    else:
        p, q = sorted((pos(), pos()))
        data[q:q] = data[p:q]
    return op, bytes(data)


def to_json(value):
    return json.dumps(value).replace(json.dumps(BIG), "9" * 5000)


def nested(rng, depth=None):
    """A JSON text nested `depth` deep (deeper than any parser's recursion limit, or just below it)."""
    depth = depth or rng.choice([100, 900, 5000, 100_000])
    return rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])


# ---- safetensors -------------------------------------------------------------------------------------

def raw_file(pairs, buffer, pad=True):
    """A safetensors file from (key, value) header pairs (duplicates allowed) and a raw buffer."""
    text = "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in pairs) + "}"
    raw = text.encode()
    raw += b" " * (-len(raw) % 8 if pad else 0)
    return struct.pack("<Q", len(raw)) + raw + buffer


def split(data):
    """(header dict as pairs, buffer) of a valid file."""
    (n,) = struct.unpack("<Q", data[:8])
    return list(json.loads(data[8:8 + n]).items()), data[8 + n:]


def safetensors_seeds():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    adapter = {"base_model.model.transformer.h.0.attn.q_proj.lora_A.weight": r(2, 32),
               "base_model.model.transformer.h.0.attn.q_proj.lora_B.weight": r(32, 2)}
    mixed = {"f64": r(3).double(), "f32": r(2, 2), "bf16": r(4).bfloat16(), "f16": r(1, 3).half(),
             "i64": torch.arange(2), "i8": torch.arange(5, dtype=torch.int8), "u8": torch.arange(3, dtype=torch.uint8),
             "bool": torch.tensor([True, False, True, True]), "f8": r(2).to(torch.float8_e4m3fn),
             "empty": torch.empty(0, 3), "scalar": torch.tensor(7.0)}
    # another writer's layout: no padding and narrow dtypes first, so tensors sit unaligned
    unaligned = raw_file([("b", {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}),
                          ("w", {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]})],
                         bytes([1, 2, 3]) + struct.pack("<2f", 1.5, -2.0), pad=False)
    return [save(adapter, metadata={"format": "pt"}), save(mixed), unaligned]


def mutate_header(rng, data):
    pairs, buffer = split(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["field", "near", "dtype", "drop_field", "extra_field", "drop", "duplicate", "metadata", "top"])
        i = rng.randrange(len(pairs)) if pairs else 0
        key, info = pairs[i] if pairs else ("t", {})
        info = copy.deepcopy(info) if isinstance(info, dict) else {}
        if op == "field":
            info[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(HOSTILE)
        elif op == "near" and all(isinstance(v, list) and all(type(d) is int for d in v)
                                  for v in (info.get("shape"), info.get("data_offsets"))):
            s, o = list(info["shape"]), list(info["data_offsets"])
            choice = rng.randrange(5)
            if choice == 0 and s:  # same bytes, another shape: must load as that shape
                info["shape"] = s[::-1]
            elif choice == 1:
                info["shape"] = s + [rng.choice([0, 1, 2, 2**62])]
            elif choice == 2 and o:
                o[rng.randrange(len(o))] += rng.choice([-8, -1, 1, 2, 8, 2**40])
                info["data_offsets"] = o
            elif choice == 3:
                info["data_offsets"] = o[::-1]
            else:
                info["shape"] = [d * 2 for d in s]
        elif op == "dtype":
            info["dtype"] = rng.choice(["F64", "F32", "F16", "BF16", "I32", "U8", "BOOL", "F8_E5M2", "I4", "f32", "Q8"])
        elif op == "drop_field" and info:
            info.pop(rng.choice(sorted(info)))
        elif op == "extra_field":
            info[rng.choice(["offset", "dtype2", "shape "])] = 1
        elif op == "drop" and pairs:
            pairs.pop(i)
            continue
        elif op == "duplicate" and pairs:
            pairs.append((key if rng.random() < 0.5 else key + "2", info))
            continue
        elif op == "metadata":
            pairs.append(("__metadata__", rng.choice([{"k": 1}, [], "x", None, {"format": "pt"}, {"a": {"b": "c"}}])))
            continue
        elif op == "top":
            return op, struct.pack("<Q", 2) + b"[]" + buffer
        if pairs:
            pairs[i] = (key, info)
    return "header", raw_file(pairs, buffer, pad=rng.random() < 0.8)


def mutate_safetensors(rng, seeds):
    data, other = rng.choice(seeds), rng.choice(seeds)
    (n,) = struct.unpack("<Q", data[:8])
    kind = rng.random()
    if kind < 0.35:
        return mutate_header(rng, data)
    if kind < 0.45:  # inflate (or shrink) the header length
        size = len(data)
        n2 = rng.choice([size - 8 + 1, size, n + 1, n - 1, n + 8, 0, 1, 2**63, 2**64 - 1, MAX_HEADER_SIZE,
                         MAX_HEADER_SIZE + 1, rng.randrange(2**64)])
        return "length", struct.pack("<Q", n2) + data[8:]
    if kind < 0.5:
        where = rng.choice(["whole", "metadata", "shape"])
        body = nested(rng)
        text = {"whole": body, "metadata": '{"__metadata__":' + body + "}",
                "shape": '{"t":{"dtype":"F32","shape":' + body + ',"data_offsets":[0,0]}}'}[where]
        return "nested", struct.pack("<Q", len(text)) + text.encode()
    # bytes: mostly in the 8-byte length and the header, sometimes in the data
    return mutate_bytes(rng, data, other, 0, 8 + n if rng.random() < 0.8 else len(data))


def check_safetensors(path, data):
    """Loaded -> True after checking the tensors match the header and fit in the file; refused -> False."""
    put(path, data)
    try:
        tensors = load_file(path)
    except MiniloraError:
        with pytest.raises(MiniloraError):  # the in-memory reader refuses the same bytes
            load(data)
        return False
    header, _ = read_header(path)
    again = load(data)
    assert set(tensors) == set(header) == set(again)
    held = 0
    for name, t in tensors.items():
        assert list(t.shape) == header[name]["shape"] and t.dtype == again[name].dtype
        held += t.numel() * t.element_size()
    assert held <= len(data), f"tensors hold {held} bytes, more than the {len(data)}-byte file"
    assert all(torch.equal(t.view(-1).view(torch.uint8), again[k].view(-1).view(torch.uint8))
               for k, t in tensors.items() if t.numel())
    return True


def test_fuzz_safetensors_reader(tmp_path):
    seeds, path = safetensors_seeds(), tmp_path / "case.safetensors"

    def make(rng):
        what, data = mutate_safetensors(rng, seeds)
        return what, {path.name: data}

    loaded, _ = fuzz("safetensors", 10000 * SOAK, make, lambda files: check_safetensors(path, files[path.name]), tmp_path)
    assert loaded  # some mutations (same-size dtype/shape, data bytes) stay valid and must load


@pytest.mark.parametrize("pairs, buffer", [
    ([("t", {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 8]})], bytes(8)),
    ([("t", {"dtype": "F64", "shape": [2**29], "data_offsets": [0, 8]})], bytes(8)),  # 4 GiB claimed
    ([("t", {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]})], b""),
    ([("t", {"dtype": "U8", "shape": [8], "data_offsets": [0, 2**40]})], bytes(8)),
    ([("t", {"dtype": "U8", "shape": [0, 2**62], "data_offsets": [0, 0]})], b""),
])
def test_header_claiming_huge_tensors_allocates_nothing(tmp_path, pairs, buffer):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(raw_file(pairs, buffer))
    peak0 = vm_peak_kib()
    tracemalloc.start()
    try:
        for _ in range(3):
            try:
                tensors = load_file(path)
                assert all(t.numel() == 0 for t in tensors.values())  # only a zero-size tensor may pass
            except MiniloraError as e:
                assert "allocate" not in str(e)  # refused by the header check, not by a failed malloc
        _, traced = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = (vm_peak_kib() - peak0) / 1024
    assert traced < 1 << 20, f"{traced} bytes of Python allocations for a {path.stat().st_size}-byte file"
    assert grown < 512, f"virtual memory peak grew {grown:.0f} MiB for a {path.stat().st_size}-byte file"


# ---- adapter directories -------------------------------------------------------------------------

HOSTILE_REGEX = "([a-z._0-9]+)+Z"  # nested quantifier: exponential backtracking on a module path
CONFIG_VALUES = {
    "target_modules": [["q_proj"], ["k_proj", "v_proj"], "all-linear", r".*\.q_proj", "x", ["c_attn"], ["lm_head"],
                       "(" * 5000 + ")" * 5000, "a{99999999999}", "["],  # HOSTILE_REGEX: its own test, below
    "r": [1, 2, 3, 4, 2**40, 2**63 - 1], "lora_alpha": [1, 0.5, -1, 1e308], "layers_to_transform": [[0], [1], [5], [0, 1], 0],
    "modules_to_save": [["ln_f"], ["wte"], ["nonexistent"], ["lm_head"]], "bias": ["all", "lora_only", "none", "NONE"],
    "peft_type": ["LORA", "PREFIX_TUNING", "lora"], "use_dora": [True], "rank_pattern": [{"q_proj": 4}],
    "layers_pattern": ["layers", "h"], "fan_in_fan_out": [True, "yes"], "init_lora_weights": ["gaussian", "pissa"],
    "base_model_name_or_path": ["tiny-base", "gpt2", None], "lora_dropout": [0.5, 1.0, -0.1], "use_rslora": [True, 1],
}
CHECKPOINT_VALUES = {  # config.json of an HF GPT-2 checkpoint (tiny: vocab 257, 2 layers, 4 heads, n_embd 32)
    "vocab_size": [257, 256, 50257, 2**40], "n_embd": [32, 64, 33, 2**31], "n_layer": [1, 2, 3, 10**6],
    "n_head": [1, 3, 4, 8, 0], "n_positions": [64, 32, 2**40], "n_ctx": [64, 1], "layer_norm_epsilon": [1e-5, -1, 1e300],
    "model_type": ["gpt2", "llama"], "activation_function": ["gelu_new", "relu"], "n_inner": [None, 128, 7],
    "tie_word_embeddings": [True, False], "minilora": [{"tokenizer": "byte", "bias": False}, {"tokenizer": "sentencepiece"},
                                                      {"tokenizer": "gpt2"}, {"dropout": 2.0}, []],
}


def adapter_seeds(tmp_path):
    """Three adapter directories as {file name: bytes}: PEFT r=2 on q/v, all-linear with biases, HF GPT-2."""
    seeds = []
    for i, (kw, fmt) in enumerate([(dict(r=2), "peft"),
                                   (dict(r=1, target_modules="all-linear", bias="lora_only", modules_to_save=["ln_f"]), "peft"),
                                   (dict(r=2, target_modules=["q_proj", "v_proj", "fc_in"]), "hf-gpt2")]):
        torch.manual_seed(i)
        model = apply_lora(GPT(GPTConfig.from_name("tiny")), LoraConfig(init_lora_weights=False, **kw))
        save_adapter(model, tmp_path / f"seed{i}", base_model_name_or_path="tiny-base", format=fmt)
        seeds.append({name: (tmp_path / f"seed{i}" / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)})
    return seeds


def mutate_config(rng, text, values=CONFIG_VALUES):
    config = json.loads(text)
    kind = rng.random()
    if kind < 0.6:
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(sorted(values))
            config[key] = rng.choice(values[key] + HOSTILE[:: rng.randint(3, 9)])
        return "config values", to_json(config).encode()
    if kind < 0.7:
        config.pop(rng.choice(sorted(config)))
        return "config key dropped", to_json(config).encode()
    if kind < 0.8:
        return "config nested", rng.choice([nested(rng), '{"peft_type":"LORA","n_embd":' + nested(rng) + "}"]).encode()
    return mutate_bytes(rng, text, text)


def mutate_weights_semantically(rng, data):
    """A well-formed file whose tensors no longer fit the config: renamed, dropped, reshaped, retyped."""
    tensors = dict(load(data))
    key = rng.choice(sorted(tensors))
    op = rng.choice(["drop", "rename", "add", "transpose", "dtype", "slice", "nonfinite", "empty"])
    t = tensors[key]
    if op == "drop":
        del tensors[key]
    elif op == "rename":
        old, new = rng.choice([("q_proj", "k_proj"), ("lora_A", "lora_B"), ("h.0", "h.7"), (".weight", ".base_layer.weight"),
                               ("base_model.model.", ""), ("c_attn", "c_proj"), ("q_proj", "c_attn")])
        tensors[key.replace(old, new)] = tensors.pop(key)
    elif op == "add":
        tensors[key.replace("h.0", "h.1").replace("lora_A", "lora_B") + "x"] = t
    elif op == "transpose" and t.dim() == 2:
        tensors[key] = t.t().contiguous()
    elif op == "dtype":
        tensors[key] = t.to(rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool, torch.uint8]))
    elif op == "slice":
        tensors[key] = t[: max(t.shape[0] - 1, 0)].contiguous()
    elif op == "nonfinite":  # a NaN adapter is well-formed: it must load (safe_merge is what refuses it)
        tensors[key] = torch.full_like(t, rng.choice([float("nan"), float("inf")]))
    else:
        tensors[key] = torch.empty(0)
    return f"weights {op}", save(tensors, metadata={"format": "pt"})


def make_adapter_case(rng, seeds, config=CONFIG_NAME, weights=WEIGHTS_NAME, values=CONFIG_VALUES):
    seed = dict(rng.choice(seeds))
    if rng.random() < 0.4:
        what, seed[config] = mutate_config(rng, seed[config], values)
    elif rng.random() < 0.35:
        what, seed[weights] = mutate_weights_semantically(rng, seed[weights])
    else:
        what, seed[weights] = mutate_safetensors(rng, [seed[weights]])
    return what, seed


class AdapterTarget:
    """Loads each case onto a tiny GPT; a refused load must leave that model exactly as it was."""

    def __init__(self, tmp_path, seeds):
        torch.manual_seed(0)
        self.pristine = GPT(GPTConfig.from_name("tiny")).eval()
        self.before = {k: v.clone() for k, v in self.pristine.state_dict().items()}
        self.model, self.dir, self.calls = None, tmp_path / "case", 0
        os.makedirs(self.dir, exist_ok=True)
        self(seeds[0])  # warm-up: the first meta-device build imports much of torch, seconds the alarm must not count

    def __call__(self, files):
        for name, data in files.items():
            put(self.dir / name, data)
        if self.model is None:  # a successful load changed the last one
            self.model = copy.deepcopy(self.pristine)
        self.calls += 1
        expected_base = "tiny-base" if self.calls % 5 == 0 else None
        try:
            load_adapter(self.model, self.dir, adapter_name="fz", expected_base=expected_base)
        except MiniloraError:
            state = self.model.state_dict()
            assert not getattr(self.model, "peft_config", {}) and not list(lora_layers(self.model))
            assert state.keys() == self.before.keys() and all(torch.equal(state[k], v) for k, v in self.before.items()), \
                "a refused adapter changed the model"
            raise
        model, self.model = self.model, None
        assert list(model.peft_config) == ["fz"] and any("fz" in layer.lora_A for _, layer in lora_layers(model))
        with torch.no_grad():
            logits, _ = model(torch.arange(8).view(1, 8))
        assert logits.shape == (1, 1, 257)
        return True


def test_fuzz_adapter_loader(tmp_path):
    seeds = adapter_seeds(tmp_path)
    target = AdapterTarget(tmp_path, seeds)
    loaded, _ = fuzz("load_adapter", 1500 * SOAK, lambda rng: make_adapter_case(rng, seeds), target, tmp_path,
                     seed="adapter")
    assert loaded


def test_fuzz_serving_registry_reader(tmp_path):
    """The same cases through AdapterRegistry.read: what serve.py runs on a runtime-loaded client path."""
    seeds = adapter_seeds(tmp_path)
    registry = AdapterRegistry(GPT(GPTConfig.from_name("tiny")), max_lora_rank=64)
    case = tmp_path / "case"
    os.makedirs(case)

    def check(files):
        for name, data in files.items():
            put(case / name, data)
        weights = registry.read("fz", case)
        assert weights.tensors and all(t.shape[0] == weights.config.r for k, t in weights.tensors.items() if k.endswith("lora_A.weight"))
        return True

    loaded, _ = fuzz("serving registry", 3000 * SOAK, lambda rng: make_adapter_case(rng, seeds), check, tmp_path,
                     seed="adapter")
    assert loaded


def test_pickle_adapter_is_refused_and_never_unpickled(tmp_path):
    """adapter_model.bin only: refused by default; with allow_pickle, weights_only refuses the code in it."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.mkdir, (str(marker),)
    adapter = tmp_path / "ad"
    os.makedirs(adapter)
    (adapter / CONFIG_NAME).write_text(json.dumps(peft_config_dict(LoraConfig(r=2))))
    torch.save({"base_model.model.transformer.h.0.attn.q_proj.lora_A.weight": Evil()}, adapter / PICKLE_NAME)
    model = GPT(GPTConfig.from_name("tiny"))
    with pytest.raises(MiniloraError, match="pickle.*allow_pickle=True"):
        load_adapter(model, adapter)
    with pytest.raises(MiniloraError, match="weights_only=True"):
        load_adapter(model, adapter, allow_pickle=True)
    assert not marker.exists() and not getattr(model, "peft_config", {})


def test_adapter_config_regex_cannot_hang_the_loader(tmp_path):
    """A target_modules regex from a file must not be able to backtrack for hours (ReDoS)."""
    seed = adapter_seeds(tmp_path)[0]
    config = json.loads(seed[CONFIG_NAME])
    config["target_modules"] = HOSTILE_REGEX
    os.makedirs(tmp_path / "ad")
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(config))
    (tmp_path / "ad" / WEIGHTS_NAME).write_bytes(seed[WEIGHTS_NAME])
    model = GPT(GPTConfig.from_name("tiny"))
    try:
        with alarm(CASE_SECONDS):
            load_adapter(model, tmp_path / "ad")
    except MiniloraError:
        pass  # refusing it is fine; the file's keys name exactly the modules it adapts


# ---- JSONL datasets ------------------------------------------------------------------------------

JSONL_SEEDS = [  # (rows, load_dataset options)
    ([{"prompt": f"Q{i}: {'x' * (i % 5)}?", "completion": f" a{i}"} for i in range(12)], {}),
    ([{"text": f"document {i} " * (i % 4 + 1)} for i in range(10)], {"text_field": "text"}),
    ([{"question": f"{i}+{i}", "answer": str(2 * i), "id": i} for i in range(10)],
     {"template": "Q: {question}\nA: ", "completion_field": "answer"}),
]


def mutate_jsonl(rng, rows):
    rows = copy.deepcopy(rows)
    kind = rng.random()
    if kind < 0.4:  # a value, a key, or a whole line
        for _ in range(rng.randint(1, 3)):
            row = rng.choice(rows)
            op = rng.randrange(4) if isinstance(row, dict) and row else 2
            if op == 0:
                row[rng.choice(sorted(row))] = rng.choice(HOSTILE + ["", "\u2028", "\x00", "<|endoftext|>", "y" * 5000])
            elif op == 1:
                row.pop(rng.choice(sorted(row)))
            elif op == 2:
                rows[rng.randrange(len(rows))] = rng.choice(HOSTILE)
            else:
                rows.append(row)
        text = "".join(to_json(r) + "\n" for r in rows).encode()
        return "values", text
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if kind < 0.5:
        lines = text.split(b"\n")
        lines.insert(rng.randrange(len(lines) + 1), nested(rng).encode())
        return "nested", b"\n".join(lines)
    if kind < 0.55:
        return "empty", rng.choice([b"", b"\n\n", b" \n", b"\xef\xbb\xbf", b"[]", b"{}\n"])
    return mutate_bytes(rng, text, text)


def check_jsonl(path, files, options):
    put(path, files["data.jsonl"])
    ds = load_dataset(path, BYTE, **options)
    x, y = ds.next_batch(2)
    assert x.shape == y.shape and x.dtype == y.dtype == torch.int64 and x.shape[0] == 2
    assert x.shape[1] <= options["block_size"] and int(x.min()) >= 0 and int(x.max()) < BYTE.n_vocab
    assert bool(((y == -100) | ((y >= 0) & (y < BYTE.n_vocab))).all())
    for vx, vy in ds.val_batches(2, max_batches=2):
        assert vx.shape == vy.shape and vx.shape[1] <= options["block_size"]
    return True


def test_fuzz_jsonl_reader(tmp_path):
    path = tmp_path / "data.jsonl"
    options = {}

    def make(rng):
        rows, opts = rng.choice(JSONL_SEEDS)
        options.clear()
        options.update(opts, block_size=rng.choice([1, 4, 16, 64]), val_fraction=rng.choice([0.0, 0.1, 0.5]),
                       packing=rng.random() < 0.3, on_too_long=rng.choice(["truncate", "error"]),
                       cache_dir=str(tmp_path / "cache"))
        what, data = mutate_jsonl(rng, rows)
        return what, {"data.jsonl": data}

    loaded, _ = fuzz("jsonl", 6000 * SOAK, make, lambda files: check_jsonl(path, files, options), tmp_path)
    assert loaded


# ---- base checkpoints (HF GPT-2 layout) ----------------------------------------------------------

def test_fuzz_checkpoint_loader(tmp_path):
    """GPT.from_pretrained on mutated config.json + model.safetensors: loads a working model or refuses."""
    torch.manual_seed(0)
    GPT(GPTConfig.from_name("tiny")).save_pretrained(tmp_path / "seed")
    seeds = [{name: (tmp_path / "seed" / name).read_bytes() for name in ("config.json", "model.safetensors")}]
    case = tmp_path / "case"
    os.makedirs(case)
    GPT.from_pretrained(tmp_path / "seed")  # warm-up outside the alarm: the first meta-device build imports a lot

    def check(files):
        for name, data in files.items():
            put(case / name, data)
        model = GPT.from_pretrained(case)
        with torch.no_grad():
            logits, _ = model(torch.zeros(1, 2, dtype=torch.long))
        assert logits.shape == (1, 1, model.config.vocab_size)
        return True

    loaded, _ = fuzz("from_pretrained", 1500 * SOAK, lambda rng: make_adapter_case(
        rng, seeds, "config.json", "model.safetensors", CHECKPOINT_VALUES), check, tmp_path)
    assert loaded
