"""What Hugging Face calls things: config.json fields and tensor/module names, per model family.

hub.py reads and writes the files; this module only translates, in both directions:

    config.json  <->  GPTConfig              config_from_hf, config_to_hf
    HF names     <->  our module paths       hf_name, our_name (Llama, Mistral, Qwen2, OPT: one to one)
    GPT-2        <->  our tensors            gpt2_from_hf, gpt2_to_hf (Conv1D transposes, fused c_attn)

Our module tree is the same for every family (transformer.wte, transformer.h.N.attn.q_proj, ...), so
the names differ from each family's own only by a prefix or a word:

    ours                              Llama / Mistral / Qwen2                     OPT
    transformer.wte                   model.embed_tokens                          model.decoder.embed_tokens
    transformer.wpe                   (rotary: none)                              model.decoder.embed_positions
    transformer.project_in/out        -                                           model.decoder.project_in/out
    transformer.h.N.ln_1              model.layers.N.input_layernorm              model.decoder.layers.N.self_attn_layer_norm
    transformer.h.N.attn.q_proj       model.layers.N.self_attn.q_proj             model.decoder.layers.N.self_attn.q_proj
    transformer.h.N.ln_2              model.layers.N.post_attention_layernorm     model.decoder.layers.N.final_layer_norm
    transformer.h.N.mlp.gate_proj     model.layers.N.mlp.gate_proj                (OPT) model.decoder.layers.N.fc1
    transformer.ln_f                  model.norm                                  model.decoder.final_layer_norm
    lm_head                           lm_head                                     lm_head
"""

import re

import torch

from minilora.config import LLAMA_FAMILY, GPTConfig, check_rope_scaling
from minilora.errors import MiniloraError

# (our module prefix, the family's), {i} standing for a block number; every name starts with one of them.
RENAMES = {
    "llama": [("transformer.wte", "model.embed_tokens"), ("transformer.ln_f", "model.norm"),
              ("transformer.h.{i}.ln_1", "model.layers.{i}.input_layernorm"),
              ("transformer.h.{i}.ln_2", "model.layers.{i}.post_attention_layernorm"),
              ("transformer.h.{i}.attn", "model.layers.{i}.self_attn"),
              ("transformer.h.{i}.mlp", "model.layers.{i}.mlp")],
    "opt": [("transformer.wte", "model.decoder.embed_tokens"), ("transformer.wpe", "model.decoder.embed_positions"),
            ("transformer.project_in", "model.decoder.project_in"),
            ("transformer.project_out", "model.decoder.project_out"),
            ("transformer.ln_f", "model.decoder.final_layer_norm"),
            ("transformer.h.{i}.ln_1", "model.decoder.layers.{i}.self_attn_layer_norm"),
            ("transformer.h.{i}.ln_2", "model.decoder.layers.{i}.final_layer_norm"),
            ("transformer.h.{i}.attn", "model.decoder.layers.{i}.self_attn"),
            ("transformer.h.{i}.mlp.fc1", "model.decoder.layers.{i}.fc1"),  # OPT's MLP sits in the layer itself
            ("transformer.h.{i}.mlp.fc2", "model.decoder.layers.{i}.fc2")],
}


def _rename(name, pairs):
    """Replace the first matching module prefix (whole dotted components only), keeping the block number."""
    for src, dst in pairs:
        m = re.match(re.escape(src).replace(r"\{i\}", r"(\d+)") + r"(?=\.|$)", name)
        if m:
            return dst.replace("{i}", m.group(1) if m.groups() else "") + name[m.end():]
    return name


def hf_name(config, ours):
    """Our module or tensor path -> the family's ("transformer.h.3.attn.q_proj" -> "model.layers.3.self_attn.q_proj")."""
    return _rename(ours, RENAMES[config.family])


def our_name(config, theirs):
    """The family's HF module or tensor path -> ours (the inverse of hf_name)."""
    if config.family == "opt" and theirs.startswith("decoder."):  # facebook/opt-* files were saved from OPTModel
        theirs = "model." + theirs
    return _rename(theirs, [(dst, src) for src, dst in RENAMES[config.family]])

# -----------------------------------------------------------------------------
# config.json <-> GPTConfig

_REQUIRED = object()


def field(d, key, types, where, default=_REQUIRED):
    """d[key] checked against `types` (None in types: JSON null allowed); absent or null -> `default`.

    A missing or mistyped field is named in a one-line error.
    """
    value = d.get(key)
    if value is None and default is not _REQUIRED and (key not in d or None not in types):
        return default
    if key not in d:
        raise MiniloraError(f"{where}: missing field {key!r}")
    allowed = tuple(t for t in types if t is not None)
    if not (value is None and None in types) and (not isinstance(value, allowed) or (
            isinstance(value, bool) and bool not in types)):  # JSON true is no int
        names = " or ".join("null" if t is None else t.__name__ for t in types)
        raise MiniloraError(f"{where}: field {key!r} must be {names}, got {value!r:.60}")
    return value


def _refuse(d, where, family, allowed):
    """Options this model does not implement: loading such a checkpoint would silently compute something else."""
    for key, values in allowed:
        if key in d and d[key] not in values:
            raise MiniloraError(f"{where}: field {key!r} is {d[key]!r:.60}; minilora's {family} supports only "
                                f"{' or '.join(map(repr, values))}")


def _extra(d, where, tokenizer, dropout):
    """minilora's own fields under "minilora" (absent in files from elsewhere)."""
    ext = field(d, "minilora", (dict,), where, {})
    at = f"{where}: 'minilora'"
    extra = dict(tokenizer=field(ext, "tokenizer", (str,), at, tokenizer), bias=field(ext, "bias", (bool,), at, True),
                 dropout=field(ext, "dropout", (int, float), at, 0.0))
    if dropout is not None:
        extra["dropout"] = dropout
    return extra


def config_from_hf(d, where="config.json", dropout=None, tokenizer="gpt2"):
    """A config.json dict -> GPTConfig; every missing, mistyped or unsupported field is named in the error.

    `tokenizer` is what the model uses when config.json does not say (hub.py passes the directory
    when it holds tokenizer.json). The *_pdrop / dropout fields are pretraining settings; like nanoGPT
    we fine-tune with dropout 0 unless asked.
    """
    if not isinstance(d, dict):
        raise MiniloraError(f"{where}: must hold a JSON object, got {type(d).__name__}")
    model_type = field(d, "model_type", (str,), where, "gpt2")
    readers = {"gpt2": _gpt2_config, "opt": _opt_config, **{t: _llama_config for t in LLAMA_FAMILY}}
    if model_type not in readers:
        raise MiniloraError(f"{where}: model_type {model_type!r} is not supported; minilora reads "
                            f"{', '.join(readers)} checkpoints")
    try:
        return readers[model_type](d, where, _extra(d, where, tokenizer, dropout))
    except MiniloraError as e:
        raise MiniloraError(e.args[0] if e.args[0].startswith(where) else f"{where}: {e}") from None


def _gpt2_config(d, where, extra):
    ints = {k: field(d, k, (int,), where) for k in ("vocab_size", "n_embd", "n_layer", "n_head")}
    block_size = field(d, "n_positions", (int,), where, None)
    if block_size is None:  # very old configs only have n_ctx
        block_size = field(d, "n_ctx", (int,), where)
    eps = field(d, "layer_norm_epsilon", (int, float), where, 1e-5)
    _refuse(d, where, "GPT-2", [("activation_function", ("gelu_new", "gelu_pytorch_tanh")),
                                ("n_inner", (None, 4 * ints["n_embd"])), ("scale_attn_weights", (True,)),
                                ("scale_attn_by_inverse_layer_idx", (False,)), ("tie_word_embeddings", (True,))])
    return GPTConfig(block_size=block_size, layer_norm_epsilon=float(eps), **ints, **extra)


def _opt_config(d, where, extra):
    pre_norm = field(d, "do_layer_norm_before", (bool,), where, True)
    # transformers drops the final norm when either is set; post-LN OPT has none to drop, so only pre-LN differs
    _refuse(d, where, "OPT", [("activation_function", ("relu",)), ("enable_bias", (True,)),
                              ("layer_norm_elementwise_affine", (True,)),
                              ("_remove_final_layer_norm", (False,) if pre_norm else (False, True)),
                              ("tie_word_embeddings", (True,))])
    C = field(d, "hidden_size", (int,), where)
    return GPTConfig(
        model_type="opt", vocab_size=field(d, "vocab_size", (int,), where), n_embd=C,
        n_layer=field(d, "num_hidden_layers", (int,), where), n_head=field(d, "num_attention_heads", (int,), where),
        intermediate_size=field(d, "ffn_dim", (int,), where), block_size=field(d, "max_position_embeddings", (int,), where),
        pre_norm=pre_norm, word_embed_proj_dim=field(d, "word_embed_proj_dim", (int, None), where, None), **extra)


def _llama_config(d, where, extra):
    model_type = d["model_type"]
    _refuse(d, where, model_type, [("hidden_act", ("silu",)), ("mlp_bias", (False,)), ("pretraining_tp", (1,)),
                                   ("attention_bias", (False,))])
    block_size = field(d, "max_position_embeddings", (int,), where)
    window = field(d, "sliding_window", (int, None), where, None)
    if window is not None and window < block_size and d.get("use_sliding_window", True):
        raise MiniloraError(f"{where}: sliding_window {window} is shorter than the context ({block_size}); "
                            "minilora attends to the whole context and does not implement sliding windows")
    # transformers 5 nests the rotary settings under rope_parameters; earlier files have rope_theta + rope_scaling.
    rope_key = "rope_parameters" if field(d, "rope_parameters", (dict, None), where, None) else "rope_scaling"
    rope = field(d, rope_key, (dict, None), where, None) or {}
    theta = field(rope, "rope_theta", (int, float), where, None) or field(d, "rope_theta", (int, float), where, 10000.0)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or None
    if scaling is not None:
        check_rope_scaling(scaling, rope_key)  # the error names the field the file has
        if scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
    extra["bias"] = False
    return GPTConfig(
        model_type=model_type, vocab_size=field(d, "vocab_size", (int,), where),
        n_embd=field(d, "hidden_size", (int,), where), n_layer=field(d, "num_hidden_layers", (int,), where),
        n_head=field(d, "num_attention_heads", (int,), where),
        n_kv_head=field(d, "num_key_value_heads", (int, None), where, None),
        head_dim=field(d, "head_dim", (int, None), where, None),
        intermediate_size=field(d, "intermediate_size", (int,), where), block_size=block_size,
        layer_norm_epsilon=float(field(d, "rms_norm_eps", (int, float), where, 1e-6)),
        rope_theta=float(theta), rope_scaling=scaling, qkv_bias=model_type == "qwen2",
        tie_word_embeddings=field(d, "tie_word_embeddings", (bool,), where, False), **extra)


def config_to_hf(config, eot_token=None):
    """GPTConfig -> a config.json dict with the family's own field names, as transformers writes it."""
    ours = {"tokenizer": config.tokenizer, "bias": config.bias, "dropout": config.dropout}
    if config.family == "gpt2":
        d = config.dropout
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
            "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "layer_norm_epsilon": config.layer_norm_epsilon, "resid_pdrop": d, "embd_pdrop": d, "attn_pdrop": d,
            "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
            "bos_token_id": eot_token, "eos_token_id": eot_token, "minilora": ours,
        }
    if config.family == "opt":
        return {
            "architectures": ["OPTForCausalLM"], "model_type": "opt", "activation_function": "relu",
            "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "ffn_dim": config.mlp_width,
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "max_position_embeddings": config.block_size, "do_layer_norm_before": config.pre_norm,
            "word_embed_proj_dim": config.embed_dim, "enable_bias": True, "layer_norm_elementwise_affine": True,
            "_remove_final_layer_norm": False, "tie_word_embeddings": True, "dropout": config.dropout,
            "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0, "init_std": 0.02, "minilora": ours,
        }
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.model_type]
    d = {
        "architectures": [arch], "model_type": config.model_type, "hidden_act": "silu",
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads, "head_dim": config.head_size,
        "max_position_embeddings": config.block_size, "rms_norm_eps": config.layer_norm_epsilon,
        "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02,
        "minilora": ours,
    }
    if config.model_type == "llama":
        d |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    else:  # both have windows; null (or use_sliding_window false) means full attention, which is what we compute
        d |= {"sliding_window": None} | ({"use_sliding_window": False} if config.model_type == "qwen2" else {})
    return d

# -----------------------------------------------------------------------------
# GPT-2 tensors: Conv1D weights and the fused c_attn

# Per-block tensors that map one to one: (GPT-2 name, our name, is a Conv1D that needs a transpose).
GPT2_BLOCK_MAP = [("ln_1", "ln_1", False), ("attn.c_proj", "attn.out_proj", True), ("ln_2", "ln_2", False),
                  ("mlp.c_fc", "mlp.fc_in", True), ("mlp.c_proj", "mlp.fc_out", True)]


def gpt2_shapes(config):
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


def gpt2_from_hf(t, config):
    """Checked HF GPT-2 tensors (no "transformer." prefix) -> our names (Conv1D transposed, c_attn split)."""
    C = config.n_embd
    sd = {"transformer.wte.weight": t["wte.weight"], "transformer.wpe.weight": t["wpe.weight"]}
    for i in range(config.n_layer):
        h = f"h.{i}"
        # Conv1D is (in, out) and computes x @ W; nn.Linear is (out, in): transpose, then the
        # fused [q | k | v] output columns become three row blocks of C.
        for proj, w in zip("qkv", t[f"{h}.attn.c_attn.weight"].t().split(C, dim=0)):  # 3 x (C, C)
            sd[f"transformer.{h}.attn.{proj}_proj.weight"] = w
        if config.bias:
            for proj, b in zip("qkv", t[f"{h}.attn.c_attn.bias"].split(C)):  # 3 x (C,)
                sd[f"transformer.{h}.attn.{proj}_proj.bias"] = b
        for theirs, ours, conv1d in GPT2_BLOCK_MAP:
            w = t[f"{h}.{theirs}.weight"]
            sd[f"transformer.{h}.{ours}.weight"] = w.t() if conv1d else w
            if config.bias:
                sd[f"transformer.{h}.{ours}.bias"] = t[f"{h}.{theirs}.bias"]
    sd["transformer.ln_f.weight"] = t["ln_f.weight"]
    if config.bias:
        sd["transformer.ln_f.bias"] = t["ln_f.bias"]
    return sd


def gpt2_to_hf(sd, config):
    """Our state dict -> HF GPT-2 tensors with the "transformer." prefix; no lm_head (tied to wte)."""
    out = {name: sd[name] for name in ("transformer.wte.weight", "transformer.wpe.weight")}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}"  # the block prefix is the same in both layouts
        # Stack q, k, v as rows (3C, C), then transpose to Conv1D's (C, 3C) = [q | k | v] columns.
        qkv = torch.cat([sd[f"{h}.attn.{p}_proj.weight"] for p in "qkv"], dim=0)  # (3C, C)
        out[f"{h}.attn.c_attn.weight"] = qkv.t().contiguous()  # (C, 3C)
        if config.bias:
            out[f"{h}.attn.c_attn.bias"] = torch.cat([sd[f"{h}.attn.{p}_proj.bias"] for p in "qkv"])
        for theirs, ours, conv1d in GPT2_BLOCK_MAP:
            w = sd[f"{h}.{ours}.weight"]
            out[f"{h}.{theirs}.weight"] = w.t().contiguous() if conv1d else w
            if config.bias:
                out[f"{h}.{theirs}.bias"] = sd[f"{h}.{ours}.bias"]
    out["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"]
    if config.bias:
        out["transformer.ln_f.bias"] = sd["transformer.ln_f.bias"]
    return out
