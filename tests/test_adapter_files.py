"""Tests for minilora.adapter_files: PEFT-format adapter directories and HF GPT-2 adapters."""

import json
import os
import pickle
import struct

import pytest
import torch

from minilora import GPT, GPTConfig
from minilora.adapter_files import CONFIG_NAME, PICKLE_NAME, PREFIX, WEIGHTS_NAME, load_adapter, save_adapter
from minilora.errors import MiniloraError
from minilora import LoraConfig, apply_lora, lora_layers, set_adapter
from minilora.safetensors import SafetensorsError, load_file, read_header, save_file

C, N_LAYER = 32, 2  # the "tiny" preset
IDX = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))


def base_model(**overrides):
    torch.manual_seed(0)  # every call builds the same base weights
    return GPT(GPTConfig.from_name("tiny", **overrides)).eval()


def adapted(**kw):
    """The tiny GPT with a non-zero adapter (both A and B random)."""
    model = base_model()
    torch.manual_seed(1)
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return apply_lora(model, LoraConfig(**{**config, **kw})).eval()  # eval: apply_lora's dropouts start in training mode


def logits(model):
    with torch.no_grad():
        return model(IDX, all_logits=True)[0]


def lora_keys(modules, blocks=range(N_LAYER)):
    return {f"{PREFIX}transformer.h.{i}.{m}.lora_{ab}.weight" for i in blocks for m in modules for ab in "AB"}


def targets(model, name="default"):
    return sorted(p for p, layer in lora_layers(model) if name in layer.lora_A)


# ---- PEFT format --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {},
    dict(target_modules="all-linear", use_rslora=True, bias="all", modules_to_save=["ln_f"], layers_to_transform=[1]),
    dict(bias="lora_only", lora_dropout=0.1),
])
def test_round_trip_gives_identical_logits(tmp_path, kw):
    model = adapted(**kw)
    with torch.no_grad():  # make the trained biases / modules_to_save differ from the base too
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.1 * torch.randn_like(p))
    save_adapter(model, tmp_path / "ad")
    fresh = load_adapter(base_model(), tmp_path / "ad")  # base_model() is in eval mode: so is the new dropout
    assert targets(fresh) == targets(model)
    assert not torch.equal(logits(fresh), logits(base_model()))
    assert torch.equal(logits(fresh), logits(model))
    assert not any(p.requires_grad for p in fresh.parameters())  # inference mode by default
    trainable = load_adapter(base_model(), tmp_path / "ad", is_trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if "lora_" in n)


def test_file_keys_metadata_and_config_are_peft(tmp_path):
    save_adapter(adapted(), tmp_path / "ad", base_model_name_or_path="an-older-one")
    save_adapter(adapted(), tmp_path / "ad", base_model_name_or_path="gpt2")  # replaces the directory whole
    header, metadata = read_header(tmp_path / "ad" / WEIGHTS_NAME)
    assert set(header) == lora_keys(["attn.q_proj", "attn.v_proj"])
    assert header[f"{PREFIX}transformer.h.0.attn.q_proj.lora_A.weight"]["shape"] == [4, C]
    assert header[f"{PREFIX}transformer.h.0.attn.q_proj.lora_B.weight"]["shape"] == [C, 4]
    assert {v["dtype"] for v in header.values()} == {"F32"}
    assert metadata == {"format": "pt"}
    assert sorted(os.listdir(tmp_path / "ad")) == [CONFIG_NAME, WEIGHTS_NAME]
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["base_model_name_or_path"]) == \
        ("LORA", 4, 8, ["q_proj", "v_proj"], "gpt2")


@pytest.mark.parametrize("dtype,itemsize", [(None, 4), (torch.bfloat16, 2)])
def test_file_size_is_the_adapter_not_the_base(tmp_path, dtype, itemsize):
    model = adapted()
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert params == N_LAYER * 2 * (4 * C + C * 4)  # 2 layers x {q, v} x (A + B) = 1024
    save_adapter(model, tmp_path / "ad", dtype=dtype)
    path = tmp_path / "ad" / WEIGHTS_NAME
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header_len < 2048
    assert os.path.getsize(path) == 8 + header_len + params * itemsize
    loaded = load_adapter(base_model(), tmp_path / "ad")
    for (_, a), (_, b) in zip(lora_layers(model), lora_layers(loaded)):
        assert b.lora_A["default"].weight.dtype == torch.float32  # stored bf16, trained/served in the adapter's fp32
        assert torch.equal(b.lora_A["default"].weight, a.lora_A["default"].weight.to(dtype or torch.float32).float())


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    save_adapter(adapted(), tmp_path / "ad")
    path = tmp_path / "ad" / WEIGHTS_NAME
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    missing = f"{PREFIX}transformer.h.1.attn.v_proj.lora_A.weight"
    unexpected = f"{PREFIX}transformer.h.0.attn.k_proj.lora_A.weight"
    misshaped = f"{PREFIX}transformer.h.0.attn.q_proj.lora_B.weight"
    del tensors[missing]
    tensors[unexpected] = torch.zeros(4, C)
    tensors[misshaped] = torch.zeros(C, 3)  # rank 3 where the config says 4
    save_file(tensors, path)
    model = base_model()
    with pytest.raises(MiniloraError) as e:
        load_adapter(model, tmp_path / "ad")
    msg = str(e.value)
    assert f"missing keys: {missing}" in msg and f"unexpected keys: {unexpected}" in msg
    assert f"mis-shaped keys: {misshaped} (32, 3) (model: (32, 4))" in msg
    assert not list(lora_layers(model)) and not hasattr(model, "peft_config")  # checked before touching the model


def test_adapter_for_another_base_shape_is_refused(tmp_path):
    save_adapter(adapted(), tmp_path / "ad")
    wide = base_model(n_embd=64)
    with pytest.raises(MiniloraError, match=r"another shape: transformer\.h\.0\.attn\.q_proj is 64x64 here but 32x32"):
        load_adapter(wide, tmp_path / "ad")
    assert not list(lora_layers(wide))


def test_adapter_names_and_expected_base(tmp_path):
    save_adapter(adapted(), tmp_path / "ad", base_model_name_or_path="tiny-base")
    model = load_adapter(base_model(), tmp_path / "ad", expected_base="tiny-base")
    with pytest.raises(MiniloraError, match="already has an adapter named 'default'"):
        load_adapter(model, tmp_path / "ad")
    load_adapter(model, tmp_path / "ad", adapter_name="second")
    assert set(model.peft_config) == {"default", "second"}
    with pytest.raises(MiniloraError, match="trained on base 'tiny-base', not the expected 'gpt2'"):
        load_adapter(base_model(), tmp_path / "ad", expected_base="gpt2")


def test_save_refuses_a_directory_holding_other_files(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.pt").write_bytes(b"precious")
    with pytest.raises(MiniloraError, match="already holds ckpt.pt"):
        save_adapter(adapted(), tmp_path / "out")
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == b"precious"


_side_effects = []


class _Payload:
    def __reduce__(self):
        return _side_effects.append, ("pickle code ran",)


def test_pickle_only_with_the_flag_and_never_code(tmp_path):
    model = adapted()
    save_adapter(model, tmp_path / "ad")
    ad = tmp_path / "ad"
    torch.save({k: v.clone() for k, v in load_file(ad / WEIGHTS_NAME).items()}, ad / PICKLE_NAME)
    os.remove(ad / WEIGHTS_NAME)
    with pytest.raises(MiniloraError, match="pickle.*allow_pickle=True"):
        load_adapter(base_model(), ad)
    assert torch.equal(logits(load_adapter(base_model(), ad, allow_pickle=True)), logits(model))
    (ad / PICKLE_NAME).write_bytes(pickle.dumps({"x": _Payload()}, protocol=2))
    with pytest.raises(MiniloraError, match="weights_only=True"):
        load_adapter(base_model(), ad, allow_pickle=True)
    assert _side_effects == []


@pytest.mark.parametrize("damage,match", [
    (lambda ad: (ad / CONFIG_NAME).write_text("{not json"), "adapter_config.json is not valid JSON"),
    (lambda ad: os.remove(ad / CONFIG_NAME), "adapter_config.json is missing"),
    (lambda ad: (ad / CONFIG_NAME).write_text('{"peft_type": "PREFIX_TUNING"}'), "peft_type is 'PREFIX_TUNING'"),
    (lambda ad: (ad / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": -1, "target_modules": ["q_proj"]}'),
     "adapter_config.json: LoraConfig.r must be a positive int"),
    (lambda ad: os.remove(ad / WEIGHTS_NAME), "has no adapter_model.safetensors"),
    (lambda ad: (ad / WEIGHTS_NAME).write_bytes((ad / WEIGHTS_NAME).read_bytes()[:-10]), "adapter_model.safetensors"),
])
def test_damaged_adapter_directories_raise_miniloraerror(tmp_path, damage, match):
    save_adapter(adapted(), tmp_path / "ad")
    damage(tmp_path / "ad")
    with pytest.raises(MiniloraError, match=match):
        load_adapter(base_model(), tmp_path / "ad")


def test_truncated_safetensors_is_a_safetensors_error(tmp_path):
    save_adapter(adapted(), tmp_path / "ad")
    path = tmp_path / "ad" / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SafetensorsError):
        load_adapter(base_model(), tmp_path / "ad")
    with pytest.raises(MiniloraError, match="does not exist"):
        load_adapter(base_model(), tmp_path / "nowhere")


# ---- HF GPT-2 -----------------------------------------------------------------------------------

def hf_reference(deltas):
    """The base model with HF-GPT-2 LoRA deltas merged the way PEFT merges into Conv1D layers.

    deltas: {(block, hf module): scaling * B @ A, shaped (out, in)}. HF's Conv1D stores its weight
    as (in, out) and computes x @ W + b; with fan_in_fan_out PEFT adds the transposed delta to it.
    c_attn's weight is our q, k and v weights side by side: (C, 3C) = [Wq^T | Wk^T | Wv^T].
    """
    model = base_model()
    with torch.no_grad():
        for (i, module), delta in deltas.items():
            h = model.transformer.h[i]
            if module == "attn.c_attn":
                conv = torch.cat([h.attn.q_proj.weight, h.attn.k_proj.weight, h.attn.v_proj.weight]).t()  # (C, 3C)
                conv = conv + delta.t()
                for proj, w in zip((h.attn.q_proj, h.attn.k_proj, h.attn.v_proj), conv.t().split(C)):  # 3 x (C, C)
                    proj.weight.copy_(w)
            else:
                ours = {"attn.c_proj": h.attn.out_proj, "mlp.c_fc": h.mlp.fc_in, "mlp.c_proj": h.mlp.fc_out}[module]
                conv = ours.weight.t() + delta.t()  # (in, out)
                ours.weight.copy_(conv.t())
    return model


def write_hf_adapter(ad, zero_k=False, r=4, alpha=16):
    """An adapter as PEFT writes it for GPT2LMHeadModel with target_modules ["c_attn", "c_proj"]."""
    g = torch.Generator().manual_seed(2)
    tensors, deltas = {}, {}
    shapes = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_proj": (4 * C, C)}  # (in, out)
    for i in range(N_LAYER):
        for module, (fin, fout) in shapes.items():
            A, B = torch.randn(r, fin, generator=g) * 0.1, torch.randn(fout, r, generator=g) * 0.1
            if zero_k and module == "attn.c_attn":
                B[C:2 * C] = 0
            tensors[f"{PREFIX}transformer.h.{i}.{module}.lora_A.weight"] = A
            tensors[f"{PREFIX}transformer.h.{i}.{module}.lora_B.weight"] = B
            deltas[(i, module)] = alpha / r * B @ A
    os.makedirs(ad)
    save_file(tensors, os.path.join(ad, WEIGHTS_NAME), metadata={"format": "pt"})
    config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "gpt2", "bias": "none",
        "fan_in_fan_out": True, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha, "lora_dropout": 0.05,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
        "r": r, "rank_pattern": {}, "revision": None, "target_modules": ["c_attn", "c_proj"],
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }
    with open(os.path.join(ad, CONFIG_NAME), "w") as f:
        json.dump(config, f)
    return deltas


@pytest.mark.parametrize("zero_k", [False, True])
def test_hf_gpt2_adapter_loads_to_the_hand_computed_reference(tmp_path, zero_k):
    deltas = write_hf_adapter(tmp_path / "hf", zero_k=zero_k)
    model = load_adapter(base_model(), tmp_path / "hf")
    projections = ["q_proj", "v_proj"] if zero_k else ["q_proj", "k_proj", "v_proj"]  # an all-zero k slice is dropped
    assert targets(model) == sorted(f"transformer.h.{i}.{m}" for i in range(N_LAYER)
                                    for m in ["attn.out_proj", "mlp.fc_out"] + [f"attn.{p}" for p in projections])
    A = model.transformer.h[0].attn.q_proj.lora_A["default"].weight
    assert torch.equal(A, model.transformer.h[0].attn.v_proj.lora_A["default"].weight)  # one shared A
    torch.testing.assert_close(logits(model), logits(hf_reference(deltas)), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(model), logits(base_model()), atol=1e-3)
    trainable = load_adapter(base_model(), tmp_path / "hf", is_trainable=True)  # training keeps PEFT's structure
    assert "transformer.h.0.attn.k_proj" in targets(trainable)
    torch.testing.assert_close(logits(trainable), logits(model), atol=1e-5, rtol=0)


def test_hf_adapter_errors_name_hf_keys(tmp_path):
    write_hf_adapter(tmp_path / "hf")
    path = tmp_path / "hf" / WEIGHTS_NAME
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    gone = f"{PREFIX}transformer.h.1.attn.c_proj.lora_B.weight"
    del tensors[gone]
    save_file(tensors, path)
    with pytest.raises(MiniloraError, match=f"missing keys: {gone}"):
        load_adapter(base_model(), tmp_path / "hf")
    with pytest.raises(MiniloraError, match=r"transformer\.h\.0\.attn\.c_attn .*is 64x64 here but 32x32"):
        load_adapter(base_model(n_embd=64), tmp_path / "hf")


@pytest.mark.parametrize("kw,rank,alpha", [
    (dict(target_modules=["q_proj", "v_proj", "out_proj", "fc_in"]), 8, 16),
    (dict(target_modules=["q_proj", "k_proj", "v_proj"], use_rslora=True, layers_to_transform=[1]), 12, 8 * 3 ** 0.5),
])
def test_export_to_hf_gpt2_then_reimport(tmp_path, kw, rank, alpha):
    model = adapted(**kw)
    save_adapter(model, tmp_path / "hf", format="hf-gpt2")
    cfg = json.loads((tmp_path / "hf" / CONFIG_NAME).read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["r"] == rank and cfg["lora_alpha"] == pytest.approx(alpha)
    tensors = load_file(tmp_path / "hf" / WEIGHTS_NAME)
    B = tensors[f"{PREFIX}transformer.h.1.attn.c_attn.lora_B.weight"]
    assert B.shape == (3 * C, rank)
    q_B = model.transformer.h[1].attn.q_proj.lora_B["default"].weight
    assert torch.equal(B[:C, :4], q_B) and not B[:C, 4:].any()  # q block: rows 0:C, columns 0:r only
    # what PEFT would compute on HF GPT-2: the fused deltas merged into the Conv1D weights
    scaling = cfg["lora_alpha"] / (rank ** 0.5 if cfg["use_rslora"] else rank)
    deltas = {}
    for key in tensors:
        if key.endswith("lora_A.weight"):
            i, module = int(key.split(".")[4]), ".".join(key.split(".")[5:7])
            deltas[(i, module)] = scaling * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
    torch.testing.assert_close(logits(hf_reference(deltas)), logits(model), atol=1e-5, rtol=0)

    back = load_adapter(base_model(), tmp_path / "hf")
    assert targets(back) == targets(model)
    assert back.peft_config["default"].r == 4  # export's padding trimmed away again
    for (_, a), (_, b) in zip(lora_layers(model), lora_layers(back)):
        assert torch.equal(b.lora_A["default"].weight, a.lora_A["default"].weight)
        assert torch.equal(b.lora_B["default"].weight, a.lora_B["default"].weight)
    if kw.get("use_rslora"):  # alpha*sqrt(3) then back: the scaling may move by an ulp
        torch.testing.assert_close(logits(back), logits(model), atol=1e-6, rtol=0)
    else:
        assert back.peft_config["default"].lora_alpha == 8
        assert torch.equal(logits(back), logits(model))


def test_export_refuses_what_hf_gpt2_cannot_hold(tmp_path):
    with pytest.raises(MiniloraError, match="lm_head to HF GPT-2"):
        save_adapter(adapted(target_modules=["lm_head"]), tmp_path / "a", format="hf-gpt2")
    with pytest.raises(MiniloraError, match="bias='lora_only' to HF GPT-2"):
        save_adapter(adapted(bias="lora_only"), tmp_path / "b", format="hf-gpt2")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_a_second_loaded_adapter_is_not_active_until_set(tmp_path):
    """PEFT's semantics: load_adapter of a second adapter adds it; the first one stays in use."""
    first = adapted()
    save_adapter(first, tmp_path / "first")
    torch.manual_seed(5)
    second = apply_lora(base_model(), LoraConfig(r=2, target_modules=["v_proj", "fc_in"], init_lora_weights=False)).eval()
    save_adapter(second, tmp_path / "second")

    model = load_adapter(base_model(), tmp_path / "first", adapter_name="first")
    load_adapter(model, tmp_path / "second", adapter_name="second")
    assert set(model.peft_config) == {"first", "second"}
    assert all(layer.active_adapters == ["first"] for _, layer in lora_layers(model))  # fc_in too: wrapped just now
    assert torch.equal(logits(model), logits(first))
    set_adapter(model, "second")
    assert torch.equal(logits(model), logits(second))
    load_adapter(model, tmp_path / "first", adapter_name="again", activate=True)  # the explicit switch
    assert torch.equal(logits(model), logits(first))
