"""DoRA: forward, gradients, merge and unmerge against the paper's formula written out here; PEFT's file layout."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from minilora import (GPT, GPTConfig, LoraConfig, MiniloraError, add_weighted_adapter, adapter_rows, apply_lora,
                      generate, load_adapter, lora_layers, merge, merge_and_unload, save_adapter, unmerge)
from minilora.adapter_files import config_from_peft, peft_config_dict
from minilora.safetensors import load_file, save_file

IDX = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))


def dora_model(preset="tiny", targets=("q_proj", "v_proj", "fc_in"), **cfg):
    """A tiny model with a DoRA adapter whose A, B and magnitude are all random (nothing at its init value)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(preset)).eval()
    apply_lora(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": list(targets),
                                    "init_lora_weights": False, "use_dora": True, **cfg}))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            m = layer.lora_magnitude_vector["default"]
            m.mul_(1 + 0.5 * torch.rand(m.shape, generator=g))  # trained away from ‖W + ΔW‖
    return model


def paper_weight(layer, name="default"):
    """W' = m · (W + s B A) / ‖W + s B A‖_c (Liu et al. 2024, eq. 5), the column norm over each output's inputs."""
    V = layer.base_layer.weight + layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight
    return layer.lora_magnitude_vector[name][:, None] * V / V.norm(dim=1, keepdim=True).detach()


def logits(model, idx=IDX):
    return model(idx, all_logits=True)[0]


def test_new_dora_adapter_is_the_base_model_and_trains_the_magnitude():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny")).eval()
    before = logits(model)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    assert torch.equal(logits(model), before)  # m = ‖W‖ and B = 0: m/‖W‖ is exactly 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.q_proj.lora_magnitude_vector.default" in trainable
    layer = model.transformer.h[0].attn.q_proj
    assert layer.lora_magnitude_vector["default"].shape == (layer.out_features,)
    assert torch.allclose(layer.lora_magnitude_vector["default"], layer.base_layer.weight.norm(dim=1))


def test_forward_and_gradients_match_the_paper_formula():
    model = dora_model()
    layer = model.transformer.h[0].attn.q_proj
    x = torch.randn(2, 5, layer.in_features)
    got = layer(x)
    want = F.linear(x, paper_weight(layer), layer.base_layer.bias)
    assert torch.allclose(got, want, atol=1e-5)
    # gradients: the norm is a constant (section 4.3), so A, B and m get the paper's gradients
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"]]
    for p in params:
        p.requires_grad_(True)
    g_got = torch.autograd.grad(layer(x).pow(2).sum(), params)
    g_want = torch.autograd.grad(F.linear(x, paper_weight(layer), layer.base_layer.bias).pow(2).sum(), params)
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dropout_applies_to_both_terms_as_in_peft():
    model = dora_model(lora_dropout=0.5)
    layer = model.transformer.h[0].mlp.fc_in
    layer.train()
    x = torch.randn(3, layer.in_features)
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    xd = F.dropout(x, 0.5, training=True)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    # W x + b + (m/n - 1) W x' + (m/n) s B A x' = (W x + b) + W' x' - W x'
    want = F.linear(x, W, b) + F.linear(xd, paper_weight(layer)) - F.linear(xd, W)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_merge_unmerge_and_merge_and_unload_are_exact(preset):
    targets = ("q_proj", "v_proj", "fc_in") if preset == "tiny" else ("q_proj", "v_proj", "up_proj", "down_proj")
    model = dora_model(preset, targets)
    weights = {p: l.base_layer.weight.clone() for p, l in lora_layers(model)}
    paper = {p: paper_weight(l).detach() for p, l in lora_layers(model)}
    unmerged = logits(model)
    merge(model)
    for p, layer in lora_layers(model):
        assert torch.allclose(layer.base_layer.weight, paper[p], atol=1e-6)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)
    merge(model)  # idempotent
    unmerge(model)
    for p, layer in lora_layers(model):
        assert torch.allclose(layer.base_layer.weight, weights[p], atol=1e-6)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)
    plain = merge_and_unload(model)
    fresh = GPT(plain.config)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert torch.allclose(logits(fresh.eval()), unmerged, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_file_round_trip_with_peft_key_names(tmp_path, preset):
    model = dora_model(preset, ("q_proj", "v_proj", "fc_in" if preset == "tiny" else "up_proj"))
    want = logits(model)
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    mags = sorted(k for k in tensors if "magnitude" in k)
    stem = "base_model.model.transformer.h.0.attn.q_proj" if preset == "tiny" else \
        "base_model.model.model.layers.0.self_attn.q_proj"  # the HF model's module names, as PEFT writes them
    assert f"{stem}.lora_magnitude_vector" in mags  # PEFT's key: no adapter name, no ".weight"
    assert len(mags) == 3 * model.config.n_layer and all(tensors[k].dim() == 1 for k in mags)
    torch.manual_seed(0)
    fresh = GPT(GPTConfig.from_name(preset)).eval()  # the same base weights, the adapter from the file alone
    load_adapter(fresh, tmp_path / "a", adapter_name="other")
    assert torch.equal(logits(fresh), want)
    # a magnitude missing from the file is named, not silently re-initialised
    del tensors[f"{stem}.lora_magnitude_vector"]
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(MiniloraError, match="missing keys: .*lora_magnitude_vector"):
        load_adapter(copy.deepcopy(fresh), tmp_path / "a", adapter_name="third")


def test_peft_config_round_trip_keeps_use_dora():
    config = LoraConfig(r=4, use_dora=True)
    assert peft_config_dict(config)["use_dora"] is True
    assert config_from_peft(peft_config_dict(config)).use_dora is True
    with pytest.raises(MiniloraError, match="use_dora must be a bool"):
        LoraConfig(use_dora="yes")


def test_single_adapter_rows_are_exact_and_mixed_batches_refused():
    model = dora_model()
    want = logits(model)
    with adapter_rows(model, ["default", "default"]):
        assert torch.equal(logits(model), want)
    with pytest.raises(MiniloraError, match="DoRA adapter\\(s\\) default cannot share a mixed-adapter batch"):
        generate(model, IDX, 2, temperature=0, adapter_names=["default", "__base__"])


def test_refusals(tmp_path):
    model = dora_model()
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj"]), "plain")
    with pytest.raises(MiniloraError, match="cannot combine DoRA"):
        add_weighted_adapter(model, ["default", "plain"], [1, 1], "both", combination_type="cat")
    with pytest.raises(MiniloraError, match="DoRA adapter 'default' merges only alone"):
        merge(model, adapter_names=["default", "plain"])
    with pytest.raises(MiniloraError, match="cannot export a DoRA adapter to HF GPT-2"):
        save_adapter(model, tmp_path / "hf", format="hf-gpt2")
