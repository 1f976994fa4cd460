"""HF-format checkpoints (GPT-2, OPT, Llama, Mistral, Qwen2) with no Hugging Face library: load, save, download.

    model = GPT.from_pretrained("gpt2")          # downloads once into ~/.cache/minilora/gpt2/
    model = GPT.from_pretrained("path/to/dir")   # config.json + model.safetensors (or shards, or pytorch_model.bin)
    model.save_pretrained("out/merged")          # the same layout, readable by transformers' AutoModelForCausalLM

This module reads and writes the files (read_config, read_checkpoint, write_checkpoint, download);
hf_layout.py says what each family calls its config fields and tensors. It never builds a model,
so model.py can build on it.

A directory holds config.json (the family's own field names; minilora's extras, such as the
tokenizer of a model trained here, under a "minilora" key), the weights, and, for models from the
hub, tokenizer.json with tokenizer_config.json and generation_config.json (BOS/EOS ids).

GPT-2 differs most from our modules: its linears are Conv1D (weight stored (in, out), applied as
x @ W + b) and its attention input projection is fused, c_attn.weight (C, 3C) = [q | k | v]; both
are undone on import and redone on export. The other families only rename (hf_layout.RENAMES).

Downloads go to $MINILORA_CACHE (default ~/.cache/minilora)/<name>/ from $MINILORA_HUB_URL (default
https://huggingface.co)/<name>/resolve/main/<file>, over plain urllib; a cached file is never re-fetched.
Big models come sharded (model.safetensors.index.json + model-0000i-of-0000n.safetensors): the index
is fetched when the hub has no model.safetensors, then every shard it names.

bias=False GPT-2 models (a minilora option, not a GPT-2 one) are written without bias tensors and with
"minilora": {"bias": false}; HF GPT-2 loaders cannot read those, they need bias=True.
"""

import http.client
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request

import torch

from minilora.errors import MiniloraError
from minilora.fileio import atomic_directory, atomic_open
from minilora.hf_layout import config_from_hf, config_to_hf, gpt2_from_hf, gpt2_shapes, gpt2_to_hf, hf_name, our_name
from minilora.safetensors import load_file, load_sharded, parse_size, read_index, save_sharded
from minilora.tokenizer import get_tokenizer

HUB_URL = "https://huggingface.co"  # override with MINILORA_HUB_URL (a mirror, or a test server)
CONFIG_FILE, SAFETENSORS_FILE, PYTORCH_FILE = "config.json", "model.safetensors", "pytorch_model.bin"
INDEX_FILE = SAFETENSORS_FILE + ".index.json"  # a sharded checkpoint's index, beside its shards
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
TOKENIZER_FILE = "tokenizer.json"
# The tokenizer and generation settings travel with the weights (fetched when the hub has them).
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers older checkpoints carry
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")

# -----------------------------------------------------------------------------
# config.json

def read_config(path, dropout=None):
    """config.json at `path` -> GPTConfig. The model's tokenizer is the directory's tokenizer.json when
    there is one, else the one config.json names, else GPT-2's for GPT-2 checkpoints."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise MiniloraError(f"{path} not found; an HF-format directory needs config.json") from None
    except (ValueError, RecursionError) as e:
        raise MiniloraError(f"{path} is not valid JSON ({e})") from None
    directory = os.path.abspath(os.path.dirname(path))
    # Without a tokenizer.json a non-GPT-2 directory still loads (logits need no tokenizer); text fails then, by name.
    default = "gpt2" if isinstance(d, dict) and d.get("model_type", "gpt2") == "gpt2" else directory
    config = config_from_hf(d, path, dropout, tokenizer=default)
    if os.path.isfile(os.path.join(directory, TOKENIZER_FILE)):
        config.tokenizer = directory
    elif not os.path.exists(config.tokenizer):
        try:
            get_tokenizer(config.tokenizer)  # an unknown name fails now, not at the first generate()
        except MiniloraError as e:
            raise MiniloraError(f"{path}: {e}") from None
    return config

# -----------------------------------------------------------------------------
# tensors: check every name and shape, then rename

def _problems(where, config, missing, unexpected, misshaped):
    problems = [f"{kind} tensors: {', '.join(names[:20])}" + (f" (+{len(names) - 20} more)" if len(names) > 20 else "")
                for kind, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names]
    if problems:
        raise MiniloraError(f"{where} does not match its config.json ({config.model_type}, n_layer={config.n_layer}, "
                            f"n_embd={config.n_embd}, vocab_size={config.vocab_size}, block_size={config.block_size}): "
                            f"{'; '.join(problems)}")


def _misshaped(key, t, shape):
    return f"{key} {list(t.shape)} {str(t.dtype).removeprefix('torch.')} (expected {list(shape)} float)"


def _match(tensors, want, canonical, where, config, shown=str):
    """File tensors -> ({our name: tensor}, the file's lm_head.weight if `want` lacks it: a tied head).

    want: {canonical file name: (our name, shape)}; canonical(key) names a file key that way, or
    None for a buffer to skip. One error names every missing, unexpected and mis-shaped tensor
    (missing ones as shown(name)).
    """
    found, seen, unexpected, misshaped, head = {}, {}, [], [], None
    for key, t in tensors.items():
        name = canonical(key)
        if name is None:
            continue
        if name == "lm_head.weight" and name not in want:
            head = t
        elif name not in want:
            unexpected.append(key)
        elif name in seen:
            unexpected.append(f"{key} (duplicate of {seen[name]})")
        else:
            seen[name] = key
            ours, shape = want[name]
            if tuple(t.shape) == shape and t.is_floating_point():
                found[ours] = t
            else:
                misshaped.append(_misshaped(key, t, shape))
    _problems(where, config, [shown(name) for name in want if name not in seen], unexpected, misshaped)
    return found, head


def _check_gpt2(tensors, config, where):
    """HF GPT-2 file tensors -> our state dict (c_attn split, Conv1D transposed), every tensor checked."""
    want = {name: (name, shape) for name, shape in gpt2_shapes(config).items()}
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""

    def canonical(key):  # GPT2Model checkpoints (the hub's gpt2) have no "transformer." prefix
        name = key.removeprefix("transformer.")
        return None if _BUFFER.fullmatch(name) else name

    found, head = _match(tensors, want, canonical, where, config, lambda name: prefix + name)
    if head is not None and not (head.shape == found["wte.weight"].shape and torch.equal(head, found["wte.weight"])):
        raise MiniloraError(f"{where}: lm_head.weight differs from wte.weight; minilora ties them "
                            "(GPT-2 does too), so an untied head cannot be loaded")
    return gpt2_from_hf(found, config)


def _check_family(tensors, config, expected, where):
    """OPT / Llama-family file tensors -> our names; `expected` is a model's state dict (shapes only)."""
    tied = config.tie_word_embeddings
    want = {hf_name(config, k): (k, tuple(v.shape)) for k, v in expected.items() if not (tied and k == "lm_head.weight")}

    def canonical(key):  # facebook/opt-* files lack the "model." prefix; older Llama files carry a rotary buffer
        return None if key.endswith("rotary_emb.inv_freq") else hf_name(config, our_name(config, key))

    found, head = _match(tensors, want, canonical, where, config)
    if head is not None and not torch.equal(head, found["transformer.wte.weight"]):
        raise MiniloraError(f"{where}: lm_head.weight differs from the token embedding but config.json says "
                            "tie_word_embeddings true; fix config.json")
    return found

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
        try:  # memory-mapped, like safetensors: a quantized load then never holds the float file whole
            tensors = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the pre-1.6 (non-zip) format cannot be mapped: read it whole
                raise
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


def read_weights(path, config):
    """The weight tensors of HF-format directory `path` (memory-mapped, not yet checked) and their file.

    Refuses a config.json with more blocks than the file has tensors before anything is built from it.
    """
    tensors, where = _read_weights(path)
    if config.n_layer > len(tensors):  # every block has tensors; a config.json saying 10**9 must not build them all
        raise MiniloraError(f"{where} holds {len(tensors)} tensors, too few for its config's n_layer={config.n_layer}; "
                            "config.json does not belong to these weights")
    return tensors, where


def read_checkpoint(tensors, where, config, expected, dtype=None, device=None, raw=()):
    """read_weights' tensors -> our state dict, every name and shape checked first.

    `expected` is the state dict of a model built from `config` (on the meta device: shapes only).
    dtype defaults to float32 whatever the file stores (training keeps fp32 master weights); "auto"
    keeps the file's own (a bf16 checkpoint loads as bf16), or name one (torch.bfloat16,
    "bfloat16"). device: "cpu" by default. GPT.from_pretrained builds the model from these.
    raw: names left as the file's tensors (a quantized model's linear weights: each layer converts and
    quantizes its own as it loads).
    """
    sd = _check_gpt2(tensors, config, where) if config.family == "gpt2" else _check_family(tensors, config, expected, where)
    dtype, device = None if dtype == "auto" else _as_dtype(dtype or torch.float32), device or "cpu"
    out = {name: t if name in raw else t.to(device=device, dtype=dtype or t.dtype).contiguous()  # views become dense
           for name, t in sd.items()}
    # Unless every tensor is still a zero-copy view of the file (same dtype, no transpose), copy the rest out too:
    # one view left in the memory map keeps the whole map resident, with every page the copies (or a quantized
    # load) read, as much again as the weights.
    views = [name for name, t in out.items() if t is sd[name] and name not in raw]
    if len(views) < len(out):
        out.update({name: out[name].clone() for name in views})
    sd = out
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied: one tensor under both names
    return sd


def foreign_files(directory):
    """Files in `directory` that are not part of a saved checkpoint (replacing it would delete them)."""
    ours = {CONFIG_FILE, SAFETENSORS_FILE, INDEX_FILE, PYTORCH_FILE, *TOKENIZER_FILES}
    return sorted(f for f in os.listdir(directory) if f not in ours and not _SHARD.fullmatch(f))


def write_checkpoint(config, state_dict, save_dir, max_shard_size="5GB", chat_template=None):
    """Write config.json + weights in the family's HF layout, replacing save_dir in one rename.

    Weights above max_shard_size (bytes, or "500MB", "5GB"...) are split into model-0000i-of-0000n
    shards with model.safetensors.index.json, as transformers writes them; below it, one model.safetensors.

    state_dict is a plain model's (GPT.save_pretrained checks that); a tied lm_head is not written.
    Tokenizer files in the model's tokenizer directory are copied along, so the directory stands alone.
    chat_template: Jinja source written as chat_template.jinja in place of the tokenizer directory's
    (merge.py: the template an adapter trained with), in the same rename.
    """
    sd, limit = state_dict, parse_size(max_shard_size)
    if any(t.is_meta for t in sd.values()):
        raise MiniloraError("model has parameters on the meta device (no data); load real weights first")
    if config.tie_word_embeddings and not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"]):
        raise MiniloraError("lm_head.weight is no longer tied to transformer.wte.weight; "
                            "the checkpoint holds one shared matrix")
    save_dir = os.fspath(save_dir)
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise MiniloraError(f"{save_dir} is a file; save_pretrained writes a directory")
    tokenizer_files = [os.path.join(config.tokenizer, f) for f in TOKENIZER_FILES
                       if os.path.isdir(config.tokenizer) and os.path.isfile(os.path.join(config.tokenizer, f))]
    if os.path.isdir(save_dir):  # the directory is replaced whole: never delete files we did not write
        foreign = foreign_files(save_dir)
        if foreign:
            raise MiniloraError(f"{save_dir} holds files save_pretrained did not write ({', '.join(foreign[:5])}); "
                                "it replaces the whole directory, so pass an empty or new one")
    if config.family == "gpt2":
        hf_config, tensors = config_to_hf(config, get_tokenizer(config.tokenizer).eot_token), gpt2_to_hf(sd, config)
    else:
        hf_config = config_to_hf(config)
        tensors = {hf_name(config, k): t for k, t in sd.items()
                   if not (config.tie_word_embeddings and k == "lm_head.weight")}
        if any(f.endswith(os.sep + TOKENIZER_FILE) for f in tokenizer_files):  # copied: the next load finds it there
            hf_config["minilora"]["tokenizer"] = None
    hf_config["torch_dtype"] = str(sd["lm_head.weight"].dtype).removeprefix("torch.")
    with atomic_directory(save_dir) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
            f.write("\n")
        save_sharded(tensors, tmp, limit, metadata={"format": "pt"})
        for src in tokenizer_files:
            shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))
        if chat_template is not None:  # loaders read chat_template.jinja before tokenizer_config.json's
            with open(os.path.join(tmp, "chat_template.jinja"), "wb") as f:
                f.write(chat_template.encode("utf-8"))

# -----------------------------------------------------------------------------
# download



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
    for file in TOKENIZER_FILES:
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
