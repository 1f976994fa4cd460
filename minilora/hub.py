"""HF-format GPT-2 checkpoints with no Hugging Face library: load, save, download.

    model = GPT.from_pretrained("gpt2")          # downloads once into ~/.cache/minilora/gpt2/
    model = GPT.from_pretrained("path/to/dir")   # config.json + model.safetensors (or pytorch_model.bin)
    model.save_pretrained("out/merged")          # the same layout, readable by any GPT-2 loader

This module turns files into (GPTConfig, state dict) and back (read_checkpoint, write_checkpoint);
it never builds a model, so model.py can build on it.

The directory layout is the one transformers' GPT2LMHeadModel reads and writes:

    config.json        GPT-2's field names (n_embd, n_layer, n_head, n_positions, vocab_size, ...);
                       minilora's own fields (tokenizer, bias, dropout) under a "minilora" key
    model.safetensors  transformer.wte.weight, transformer.h.N.attn.c_attn.weight, ...

Two differences from our modules are undone on import and redone on export:
- GPT-2's linears are Conv1D: weight stored (in, out) and applied as x @ W + b, the transpose of
  nn.Linear's (out, in) weight.
- GPT-2 fuses the attention input projection: c_attn.weight (C, 3C) = [q | k | v] along dim 1.
  We keep separate q_proj/k_proj/v_proj so LoRA can target them by name.

Downloads go to $MINILORA_CACHE (default ~/.cache/minilora)/<name>/ from $MINILORA_HUB_URL (default
https://huggingface.co)/<name>/resolve/main/<file>, over plain urllib; a cached file is never re-fetched.
Big models come sharded (model.safetensors.index.json + model-0000i-of-0000n.safetensors): the index
is fetched when the hub has no model.safetensors, then every shard it names.

bias=False models (a minilora option, not a GPT-2 one) are written without bias tensors and with
"minilora": {"bias": false}; HF GPT-2 loaders cannot read those, they need bias=True.
"""

import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.request

import torch

from minilora.config import GPTConfig
from minilora.errors import MiniloraError
from minilora.fileio import atomic_directory, atomic_open
from minilora.safetensors import load_file, load_sharded, read_index, save_file
from minilora.tokenizer import get_tokenizer

HUB_URL = "https://huggingface.co"  # override with MINILORA_HUB_URL (a mirror, or a test server)
CONFIG_FILE, SAFETENSORS_FILE, PYTORCH_FILE = "config.json", "model.safetensors", "pytorch_model.bin"
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers older checkpoints carry
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
# Per-block tensors that map one to one: (GPT-2 name, our name, is a Conv1D that needs a transpose).
_BLOCK_MAP = [("ln_1", "ln_1", False), ("attn.c_proj", "attn.out_proj", True), ("ln_2", "ln_2", False),
              ("mlp.c_fc", "mlp.fc_in", True), ("mlp.c_proj", "mlp.fc_out", True)]

# -----------------------------------------------------------------------------
# config.json <-> GPTConfig

_REQUIRED = object()


def _field(d, key, types, where, default=_REQUIRED):
    if key not in d:
        if default is _REQUIRED:
            raise MiniloraError(f"{where}: missing field {key!r}")
        return default
    value = d[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):  # JSON true is no int
        names = " or ".join(t.__name__ for t in types)
        raise MiniloraError(f"{where}: field {key!r} must be {names}, got {value!r:.60}")
    return value


def config_to_hf(config):
    """GPTConfig -> a config.json dict with GPT-2's field names, as transformers writes it."""
    eot = get_tokenizer(config.tokenizer).eot_token
    d = config.dropout
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "layer_norm_epsilon": config.layer_norm_epsilon, "resid_pdrop": d, "embd_pdrop": d, "attn_pdrop": d,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "bos_token_id": eot, "eos_token_id": eot,
        "minilora": {"tokenizer": config.tokenizer, "bias": config.bias, "dropout": d},
    }


def config_from_hf(d, where=CONFIG_FILE, dropout=None):
    """A config.json dict -> GPTConfig; every missing or mistyped field is named in the error."""
    if not isinstance(d, dict):
        raise MiniloraError(f"{where}: must hold a JSON object, got {type(d).__name__}")
    ints = {k: _field(d, k, (int,), where) for k in ("vocab_size", "n_embd", "n_layer", "n_head")}
    block_size = _field(d, "n_positions", (int,), where, None)
    if block_size is None:  # very old configs only have n_ctx
        block_size = _field(d, "n_ctx", (int,), where)
    eps = _field(d, "layer_norm_epsilon", (int, float), where, 1e-5)
    # GPT-2 options this model does not implement: loading such a checkpoint would silently compute something else.
    for key, allowed in (("model_type", ("gpt2",)), ("activation_function", ("gelu_new", "gelu_pytorch_tanh")),
                         ("n_inner", (None, 4 * ints["n_embd"])), ("scale_attn_weights", (True,)),
                         ("scale_attn_by_inverse_layer_idx", (False,)), ("tie_word_embeddings", (True,))):
        if key in d and d[key] not in allowed:
            raise MiniloraError(f"{where}: field {key!r} is {d[key]!r:.60}; minilora's GPT-2 supports only "
                                f"{' or '.join(map(repr, allowed))}")
    # Without our block this is a checkpoint from the GPT-2 family: GPT-2's tokenizer, with biases.
    # Its *_pdrop fields are pretraining settings; like nanoGPT we fine-tune with dropout 0 unless asked.
    ext = _field(d, "minilora", (dict,), where, {})
    at = f"{where}: 'minilora'"
    extra = dict(tokenizer=_field(ext, "tokenizer", (str,), at, "gpt2"), bias=_field(ext, "bias", (bool,), at, True),
                 dropout=_field(ext, "dropout", (int, float), at, 0.0))
    if dropout is not None:
        extra["dropout"] = dropout
    try:
        get_tokenizer(extra["tokenizer"])  # an unknown name fails now, not at the first generate()
        return GPTConfig(block_size=block_size, layer_norm_epsilon=float(eps), **ints, **extra)
    except MiniloraError as e:
        raise MiniloraError(f"{where}: {e}") from None


def read_config(path, dropout=None):
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise MiniloraError(f"{path} not found; an HF-format directory needs config.json") from None
    except (ValueError, RecursionError) as e:
        raise MiniloraError(f"{path} is not valid JSON ({e})") from None
    return config_from_hf(d, path, dropout)

# -----------------------------------------------------------------------------
# tensor names and shapes

def hf_shapes(config):
    """Every tensor an HF GPT-2 checkpoint of `config` holds (names without "transformer."), with shapes."""
    C = config.n_embd

    def params(name, weight_shape):
        bias = {f"{name}.bias": (weight_shape[-1],)} if config.bias else {}
        return {f"{name}.weight": weight_shape, **bias}

    shapes = {"wte.weight": (config.vocab_size, C), "wpe.weight": (config.block_size, C)}
    for i in range(config.n_layer):
        h = f"h.{i}"
        shapes |= params(f"{h}.ln_1", (C,)) | params(f"{h}.attn.c_attn", (C, 3 * C))  # Conv1D: (in, out)
        shapes |= params(f"{h}.attn.c_proj", (C, C)) | params(f"{h}.ln_2", (C,))
        shapes |= params(f"{h}.mlp.c_fc", (C, 4 * C)) | params(f"{h}.mlp.c_proj", (4 * C, C))
    shapes |= params("ln_f", (C,))
    return shapes


def _check(tensors, config, where):
    """File tensors -> {unprefixed name: tensor}, or one error naming every missing/unexpected/mis-shaped one."""
    if config.n_layer > len(tensors):  # every block has tensors; a config.json saying 10**9 must not list them all
        raise MiniloraError(f"{where} holds {len(tensors)} tensors, too few for its config's n_layer={config.n_layer}; "
                            "config.json does not belong to these weights")
    expected = hf_shapes(config)
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
    found, seen, unexpected, misshaped, head = {}, {}, [], [], None
    for key, t in tensors.items():
        name = key.removeprefix("transformer.")  # GPT2Model checkpoints (the hub's gpt2) have no prefix
        if _BUFFER.fullmatch(name):
            continue
        if name == "lm_head.weight":
            head = t
        elif name not in expected:
            unexpected.append(key)
        elif name in seen:
            unexpected.append(f"{key} (duplicate of {seen[name]})")
        else:
            seen[name] = key
            if tuple(t.shape) == expected[name] and t.is_floating_point():
                found[name] = t
            else:
                misshaped.append(f"{key} {list(t.shape)} {str(t.dtype).removeprefix('torch.')} "
                                 f"(expected {list(expected[name])} float)")
    missing = [prefix + name for name in expected if name not in seen]
    problems = [f"{kind} tensors: {', '.join(names)}" for kind, names in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names]
    if problems:
        raise MiniloraError(f"{where} does not match its config.json (n_layer={config.n_layer}, "
                            f"n_embd={config.n_embd}, vocab_size={config.vocab_size}, block_size={config.block_size}, "
                            f"bias={config.bias}): {'; '.join(problems)}")
    if head is not None and not (head.shape == found["wte.weight"].shape and torch.equal(head, found["wte.weight"])):
        raise MiniloraError(f"{where}: lm_head.weight differs from wte.weight; minilora ties them "
                            "(GPT-2 does too), so an untied head cannot be loaded")
    return found


def _from_hf(t, config, dtype, device):
    """Checked HF tensors -> our state dict (Conv1D weights transposed, c_attn split into q/k/v)."""
    C = config.n_embd
    sd = {}

    def put(name, tensor):
        sd[name] = tensor.to(device=device, dtype=dtype).contiguous()  # transposed views become dense copies

    put("transformer.wte.weight", t["wte.weight"])
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied: one tensor under both names
    put("transformer.wpe.weight", t["wpe.weight"])
    for i in range(config.n_layer):
        h = f"h.{i}"
        # Conv1D is (in, out) and computes x @ W; nn.Linear is (out, in): transpose, then the
        # fused [q | k | v] output columns become three row blocks of C.
        for proj, w in zip("qkv", t[f"{h}.attn.c_attn.weight"].t().split(C, dim=0)):  # 3 x (C, C)
            put(f"transformer.{h}.attn.{proj}_proj.weight", w)
        if config.bias:
            for proj, b in zip("qkv", t[f"{h}.attn.c_attn.bias"].split(C)):  # 3 x (C,)
                put(f"transformer.{h}.attn.{proj}_proj.bias", b)
        for theirs, ours, conv1d in _BLOCK_MAP:
            w = t[f"{h}.{theirs}.weight"]
            put(f"transformer.{h}.{ours}.weight", w.t() if conv1d else w)
            if config.bias:
                put(f"transformer.{h}.{ours}.bias", t[f"{h}.{theirs}.bias"])
    put("transformer.ln_f.weight", t["ln_f.weight"])
    if config.bias:
        put("transformer.ln_f.bias", t["ln_f.bias"])
    return sd


def _to_hf(sd, config):
    """Our state dict -> HF GPT-2 tensors with the "transformer." prefix; no lm_head (tied to wte)."""
    out = {name: sd[name] for name in ("transformer.wte.weight", "transformer.wpe.weight")}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}"  # the block prefix is the same in both layouts
        # Stack q, k, v as rows (3C, C), then transpose to Conv1D's (C, 3C) = [q | k | v] columns.
        qkv = torch.cat([sd[f"{h}.attn.{p}_proj.weight"] for p in "qkv"], dim=0)  # (3C, C)
        out[f"{h}.attn.c_attn.weight"] = qkv.t().contiguous()  # (C, 3C)
        if config.bias:
            out[f"{h}.attn.c_attn.bias"] = torch.cat([sd[f"{h}.attn.{p}_proj.bias"] for p in "qkv"])  # (3C,)
        for theirs, ours, conv1d in _BLOCK_MAP:
            w = sd[f"{h}.{ours}.weight"]
            out[f"{h}.{theirs}.weight"] = w.t().contiguous() if conv1d else w
            if config.bias:
                out[f"{h}.{theirs}.bias"] = sd[f"{h}.{ours}.bias"]
    out["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"]
    if config.bias:
        out["transformer.ln_f.bias"] = sd["transformer.ln_f.bias"]
    return out

# -----------------------------------------------------------------------------
# load / save

def _read_weights(path):
    st, index, pt = (os.path.join(path, f) for f in (SAFETENSORS_FILE, INDEX_FILE, PYTORCH_FILE))
    if os.path.isfile(st):
        return load_file(st), st  # zero-copy views of a memory map; only transposed tensors get copied
    if os.path.isfile(index):
        return load_sharded(index), index  # the same views, one map per shard, checked against the index
    if not os.path.isfile(pt):
        sharded_bin = os.path.isfile(os.path.join(path, PYTORCH_FILE + ".index.json"))
        hint = ("; sharded pytorch_model.bin checkpoints are not supported, convert them to safetensors"
                if sharded_bin else "")
        raise MiniloraError(f"{path} has no {SAFETENSORS_FILE}, {INDEX_FILE} or {PYTORCH_FILE}{hint}")
    try:  # weights_only: a pickle from the internet may hold tensors, never code
        tensors = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first_line = (str(e).splitlines() or [""])[0]
        raise MiniloraError(f"cannot read {pt}: {type(e).__name__}: {first_line}") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise MiniloraError(f"{pt} must hold a dict of tensor name -> tensor, got {type(tensors).__name__}")
    return tensors, pt


def _as_dtype(dtype):
    if isinstance(dtype, str):  # "bfloat16", as a CLI passes it
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MiniloraError(f"dtype must be a floating torch dtype such as torch.bfloat16, got {dtype!r}")
    return dtype


def read_checkpoint(name_or_dir, dtype=None, device=None, dropout=None):
    """An HF-format GPT-2 directory, or a hub name downloaded once -> (GPTConfig, our state dict).

    dtype defaults to float32 whatever the file stores (as transformers does); device to "cpu";
    dropout to the checkpoint's minilora setting, 0.0 for plain GPT-2 checkpoints. GPT.from_pretrained
    builds the model from these.
    """
    path = resolve(name_or_dir)
    config = read_config(os.path.join(path, CONFIG_FILE), dropout)
    tensors, where = _read_weights(path)
    return config, _from_hf(_check(tensors, config, where), config, _as_dtype(dtype or torch.float32), device or "cpu")


def write_checkpoint(config, state_dict, save_dir):
    """Write config.json + model.safetensors in the HF GPT-2 layout, replacing save_dir in one rename.

    state_dict is a plain GPT's (GPT.save_pretrained checks that); lm_head is tied to wte and not written.
    """
    sd = state_dict
    expected = {"transformer." + k for k in _ours(config)}
    if set(sd) != expected | {"lm_head.weight"}:
        raise MiniloraError(f"model is not a plain GPT: unexpected {sorted(set(sd) - expected - {'lm_head.weight'})[:5]}, "
                            f"missing {sorted(expected - set(sd))[:5]}; merge or remove extra modules first")
    if any(t.is_meta for t in sd.values()):
        raise MiniloraError("model has parameters on the meta device (no data); load real weights first")
    if not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"]):
        raise MiniloraError("lm_head.weight is no longer tied to transformer.wte.weight; "
                            "GPT-2 files hold one shared matrix")
    save_dir = os.fspath(save_dir)
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise MiniloraError(f"{save_dir} is a file; save_pretrained writes a directory")
    if os.path.isdir(save_dir):  # the directory is replaced whole: never delete files we did not write
        foreign = sorted(set(os.listdir(save_dir)) - {CONFIG_FILE, SAFETENSORS_FILE, PYTORCH_FILE})
        if foreign:
            raise MiniloraError(f"{save_dir} holds files save_pretrained did not write ({', '.join(foreign[:5])}); "
                                "it replaces the whole directory, so pass an empty or new one")
    hf_config = config_to_hf(config)
    hf_config["torch_dtype"] = str(sd["lm_head.weight"].dtype).removeprefix("torch.")
    with atomic_directory(save_dir) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
            f.write("\n")
        save_file(_to_hf(sd, config), os.path.join(tmp, SAFETENSORS_FILE), metadata={"format": "pt"})


def _ours(config):
    """Our parameter names under transformer. for `config` (what _from_hf produces, lm_head aside)."""
    names = ["wte.weight", "wpe.weight", "ln_f.weight"] + (["ln_f.bias"] if config.bias else [])
    kinds = ["ln_1", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "ln_2", "mlp.fc_in", "mlp.fc_out"]
    for i in range(config.n_layer):
        for k in kinds:
            names += [f"h.{i}.{k}.weight"] + ([f"h.{i}.{k}.bias"] if config.bias else [])
    return names

# -----------------------------------------------------------------------------
# download

INDEX_FILE = SAFETENSORS_FILE + ".index.json"  # a sharded checkpoint's index, beside its shards
OPTIONAL_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")  # fetched when the hub has them


def resolve(name_or_dir):
    """A local directory as is; a hub name ("gpt2", "org/name") -> its cache directory, downloading if needed."""
    p = os.fspath(name_or_dir)
    if os.path.isdir(p):
        return p
    if os.path.exists(p):
        raise MiniloraError(f"{p} is a file; pass the directory that holds config.json and {SAFETENSORS_FILE}")
    if not _HUB_NAME.fullmatch(p) or ".." in p:
        raise MiniloraError(f"{p!r} is neither an existing directory nor a model name like 'gpt2' or 'org/name'")
    return download(p)


def cache_dir(name):
    root = os.environ.get("MINILORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minilora")
    return os.path.join(root, *name.split("/"))


def download(name):
    """Fetch hub model `name` into the cache: config.json, the tokenizer files the hub has, then the weights
    (model.safetensors, or model.safetensors.index.json and every shard it names); cached files are reused."""
    base = (os.environ.get("MINILORA_HUB_URL") or HUB_URL).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise MiniloraError(f"MINILORA_HUB_URL must start with http:// or https://, got {base!r}")
    path = cache_dir(name)

    def get(file):
        """True once `file` is in the cache; False when the hub has no such file (404)."""
        dest = os.path.join(path, file)
        # Only complete files are ever renamed into the cache, so one that exists is whole.
        return os.path.exists(dest) or _fetch(f"{base}/{name}/resolve/main/{file}", dest)

    if not get(CONFIG_FILE):
        raise MiniloraError(f"no such model on the hub: {name} ({base}/{name}/resolve/main/{CONFIG_FILE} "
                            "returned 404), and no local directory of that name")
    dest = os.path.join(path, CONFIG_FILE)
    read_config(dest)  # a config we cannot load fails before gigabytes of weights download
    if _weights_cached(path):
        return path  # the small files below were tried before the weights: nothing left to ask the hub
    for file in OPTIONAL_FILES:
        get(file)  # many models lack some of these; a 404 is no error
    index = os.path.join(path, INDEX_FILE)
    if not os.path.exists(index) and get(SAFETENSORS_FILE):
        return path
    if not get(INDEX_FILE):
        raise MiniloraError(f"hub model {name} has neither {SAFETENSORS_FILE} nor {INDEX_FILE} (404 for both); "
                            "minilora downloads safetensors weights only: fetch the files yourself and pass the directory")
    for shard in sorted(set(read_index(index)[0].values())):  # read_index admits plain file names only
        if not get(shard):
            raise MiniloraError(f"hub model {name}: {INDEX_FILE} names {shard}, but "
                                f"{base}/{name}/resolve/main/{shard} returned 404")
    return path


def _weights_cached(path):
    """Whether the cache already holds complete weights: model.safetensors, or the index and all its shards."""
    if os.path.isfile(os.path.join(path, SAFETENSORS_FILE)):
        return True
    index = os.path.join(path, INDEX_FILE)
    return os.path.isfile(index) and all(os.path.isfile(os.path.join(path, shard))
                                         for shard in set(read_index(index)[0].values()))


def _fetch(url, dest):
    """Download `url` to `dest` atomically; False (and nothing written) when the hub answers 404."""
    request = urllib.request.Request(url, headers={"User-Agent": "minilora"})
    try:
        response = urllib.request.urlopen(request, timeout=60)  # follows the hub's redirects to its CDN
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False  # the caller knows whether this file is required and what its absence means
        hint = "; the model may be gated or private: download it yourself and pass the directory" \
            if e.code in (401, 403) else ""
        raise MiniloraError(f"{url} returned HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise MiniloraError(f"cannot reach {url} ({reason}); set MINILORA_HUB_URL or pass a local directory") from None
    with response, atomic_open(dest) as f:  # a failure below deletes the temp file: no partial file in the cache
        total = int(response.headers.get("Content-Length") or 0) or None
        done = 0
        try:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                _progress(os.path.basename(dest), done, total)
        except (ConnectionError, TimeoutError, http.client.HTTPException) as e:  # not disk errors: those propagate
            raise MiniloraError(f"download of {url} was interrupted ({e}); run again to retry") from None
        finally:
            _progress(os.path.basename(dest), done, total, end=True)
        if total is not None and done != total:  # urllib returns a short body silently when a connection drops
            raise MiniloraError(f"download of {url} was cut short ({done} of {total} bytes); run again to retry")
    return True


def _progress(file, done, total, end=False):
    """One updating line on stderr ("model.safetensors: 12.0/548.1 MB"); silent when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return
    of = f"/{total / 1e6:.1f}" if total else ""
    sys.stderr.write(f"\rdownloading {file}: {done / 1e6:.1f}{of} MB" + ("\n" if end else ""))
    sys.stderr.flush()
