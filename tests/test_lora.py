"""LoRA core: the layer, targeting, freezing, merging, several adapters, configs, bad input."""

import copy
import gc
import math
import re
import weakref

import pytest
import torch
import torch.nn as nn

from minilora import GPT, GPTConfig, MiniloraError
from minilora.ops import Linear
from minilora.adapter_files import config_from_peft, peft_config_dict
from minilora import LoraConfig, LoRALinear, add_weighted_adapter, apply_lora, count_parameters, delete_adapter, disable_adapter, lora_layers, merge, merge_and_unload, print_trainable_parameters, set_adapter, unmerge

QV = ["q_proj", "v_proj"]


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("tiny", **kw))


def lora_tiny(adapter="default", **cfg):
    """A tiny GPT with a random (B != 0) adapter, so merging and switching have something to show."""
    model = tiny()
    apply_lora(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": QV, "init_lora_weights": False, **cfg}),
               adapter)
    return model


def logits(model, idx):
    return model(idx, all_logits=True)[0]


IDX = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))


# ---- the layer -------------------------------------------------------------------------------

def test_zero_b_at_init_gives_base_outputs_exactly():
    model = tiny()
    before = logits(model, IDX)
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(logits(model, IDX), before)
    for _, layer in lora_layers(model):
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert torch.count_nonzero(layer.lora_A["default"].weight) > 0


def test_only_adapter_tensors_change_during_training():
    model = tiny()
    apply_lora(model, LoraConfig(r=4, target_modules=QV))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        _, loss = model(IDX, IDX)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    lora_keys = [k for k in after if ".lora_" in k]
    assert len(lora_keys) == 2 * 2 * 2  # 2 blocks x (q, v) x (A, B)
    for k, v in after.items():
        assert torch.equal(v, before[k]) != (k in lora_keys), k  # base bit-identical, every adapter tensor moved


def test_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    layer = LoRALinear(base)
    layer.add_adapter("a", r=2, lora_alpha=3, init_lora_weights=False)
    layer.active_adapters = ["a"]
    x = torch.randn(4, 5)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    assert A.shape == (2, 5) and B.shape == (3, 2)
    torch.testing.assert_close(layer(x), base(x) + 1.5 * x @ A.T @ B.T, rtol=0, atol=1e-6)


def test_rslora_scaling_and_gaussian_init():
    layer = LoRALinear(nn.Linear(2048, 16))
    layer.add_adapter("plain", r=4, lora_alpha=8)
    layer.add_adapter("rs", r=4, lora_alpha=8, use_rslora=True)
    torch.manual_seed(0)
    layer.add_adapter("g", r=4, lora_alpha=8, init_lora_weights="gaussian")
    assert layer.scaling["plain"] == 2.0 and layer.scaling["rs"] == 8 / math.sqrt(4) == 4.0
    std = layer.lora_A["g"].weight.std().item()
    assert abs(std - 1 / 4) < 0.01, std  # PEFT's gaussian init: N(0, std=1/r)
    assert torch.count_nonzero(layer.lora_B["g"].weight) == 0
    # default A is kaiming-uniform(a=sqrt(5)): bound 1/sqrt(in_features)
    assert layer.lora_A["plain"].weight.abs().max() <= 1 / math.sqrt(2048)


def test_bf16_base_weights_and_autocast():
    model = tiny().to(torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, target_modules=QV, init_lora_weights=False))
    layer = model.transformer.h[0].attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    out = logits(model, IDX)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with disable_adapter(model):
        assert not torch.equal(logits(model, IDX), out)  # the fp32 update really reached the bf16 output
    fp32 = lora_tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(fp32, IDX)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), logits(fp32, IDX), rtol=0, atol=0.1)


def test_disabled_and_inactive_adapters_do_no_compute():
    model = lora_tiny()
    apply_lora(model, LoraConfig(r=2, target_modules=QV), "other", activate=True)  # "other" active, "default" not
    calls = []
    for _, layer in lora_layers(model):
        for name in ("default", "other"):
            layer.lora_A[name].register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    logits(model, IDX)
    assert set(calls) == {"other"}
    calls.clear()
    with disable_adapter(model):
        logits(model, IDX)
    assert calls == []


# ---- targeting and freezing ------------------------------------------------------------------

def test_count_512_with_shapes_on_2_layer_8_wide_model():
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=8, vocab_size=11, block_size=8))
    base = model.num_parameters()
    apply_lora(model, LoraConfig(r=8, target_modules=QV))
    trainable, total = count_parameters(model)
    assert (trainable, total) == (512, base + 512)
    paths = [p for p, _ in lora_layers(model)]
    assert paths == [f"transformer.h.{i}.attn.{m}" for i in range(2) for m in QV]
    for _, layer in lora_layers(model):
        assert layer.lora_A["default"].weight.shape == (8, 8) and layer.lora_B["default"].weight.shape == (8, 8)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"transformer.h.{i}.attn.{m}.lora_{ab}.default.weight" for i in range(2) for m in QV for ab in "AB"]
    assert "transformer.h.0.attn.q_proj.base_layer.weight" in model.state_dict()


def test_print_trainable_parameters_exact_line_on_meta_gpt2(capsys):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("gpt2"))
    apply_lora(model, LoraConfig(r=8, target_modules=QV))
    assert print_trainable_parameters(model) == (294_912, 124_734_720)
    assert capsys.readouterr().out == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364\n"


def test_target_rules():
    def targets(**cfg):
        model = tiny()
        apply_lora(model, LoraConfig(r=2, **cfg))
        return [p for p, _ in lora_layers(model)]

    assert targets(target_modules=["attn.q_proj"]) == ["transformer.h.0.attn.q_proj", "transformer.h.1.attn.q_proj"]
    assert targets(target_modules=r"transformer\.h\.1\.mlp\..*") == ["transformer.h.1.mlp.fc_in", "transformer.h.1.mlp.fc_out"]
    assert len(targets(target_modules="all-linear")) == 2 * 6  # lm_head excluded
    assert len(targets(target_modules=["all-linear"])) == 2 * 6  # the form train.py's list option gives
    assert targets(target_modules=QV, layers_to_transform=[1]) == ["transformer.h.1.attn.q_proj", "transformer.h.1.attn.v_proj"]
    assert targets(target_modules=["lm_head"]) == ["lm_head"]


def test_bias_modes_and_modules_to_save():
    def trainable(**cfg):
        model = tiny()
        apply_lora(model, LoraConfig(r=2, target_modules=QV, **cfg))
        return {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}

    assert trainable() == set()
    assert trainable(bias="lora_only") == {f"transformer.h.{i}.attn.{m}.base_layer.bias" for i in range(2) for m in QV}
    all_biases = trainable(bias="all")
    assert "transformer.h.0.mlp.fc_in.bias" in all_biases and "transformer.ln_f.bias" in all_biases
    assert all(n.endswith("bias") for n in all_biases)
    # lm_head is tied to wte: one tensor, so saving lm_head trains the embedding, counted once
    assert trainable(modules_to_save=["ln_f", "lm_head"]) == {"transformer.wte.weight", "transformer.ln_f.weight",
                                                              "transformer.ln_f.bias"}


def test_second_adapter_shares_the_wrapped_layers():
    model = lora_tiny("a")
    layer = model.transformer.h[0].attn.q_proj
    apply_lora(model, LoraConfig(r=3, target_modules=["q_proj", "k_proj"]), "b")
    assert model.transformer.h[0].attn.q_proj is layer and set(layer.lora_A) == {"a", "b"}
    assert set(model.transformer.h[0].attn.k_proj.lora_A) == {"b"}
    # PEFT's rule: a second adapter is added, not activated; "a" stays in use and alone trains
    assert set(model.peft_config) == {"a", "b"} and layer.active_adapters == ["a"]
    assert model.transformer.h[0].attn.k_proj.active_adapters == ["a"]  # a layer new to "b" follows the model
    assert count_parameters(model)[0] == 2 * 2 * 4 * (32 + 32)
    set_adapter(model, "b")
    assert count_parameters(model)[0] == 2 * 2 * 3 * (32 + 32)  # only the active adapter trains


# ---- merging ---------------------------------------------------------------------------------

def test_merge_algebra_idempotence_and_unmerge():
    model = lora_tiny().eval()
    assert all(not layer.merged_adapters for _, layer in lora_layers(model))  # eval() never merges
    layer = model.transformer.h[1].attn.v_proj
    W = layer.base_layer.weight.detach().clone()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    unmerged = logits(model, IDX)
    merge(model)
    once = layer.base_layer.weight.detach().clone()
    torch.testing.assert_close(once, W + 2.0 * B @ A, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, IDX), unmerged, rtol=0, atol=1e-5)
    merge(model)
    assert torch.equal(layer.base_layer.weight, once)
    torch.testing.assert_close(logits(model, IDX), unmerged, rtol=0, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)
    assert layer.merged_adapters == []


def test_hand_computed_merge():
    layer = LoRALinear(nn.Linear(4, 6, bias=False))
    layer.add_adapter("default", r=2, lora_alpha=1)
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.base_layer.weight.fill_(3.0)
        layer.lora_A["default"].weight.copy_(torch.tensor([[1., 2, 3, 4], [5, 6, 7, 8]]))
        layer.lora_B["default"].weight.copy_(torch.arange(1., 13).view(6, 2))
    layer.merge()
    assert layer.base_layer.weight[0].tolist() == [8.5, 10.0, 11.5, 13.0]


def test_bf16_merge_is_computed_in_fp32_and_cast_once():
    model = tiny().to(torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, target_modules=QV, init_lora_weights=False))
    layer = model.transformer.h[0].attn.q_proj
    expected = (layer.base_layer.weight.float() + layer.delta_weight("default")).to(torch.bfloat16)
    merge(model)
    assert torch.equal(layer.base_layer.weight, expected)


def test_merge_and_unload_loads_strict_into_fresh_gpt():
    model = lora_tiny()
    expected = logits(model, IDX)
    plain = merge_and_unload(model)
    assert type(plain) is GPT and not hasattr(plain, "peft_config")
    fresh = GPT(GPTConfig.from_name("tiny"))
    assert set(plain.state_dict()) == set(fresh.state_dict())
    fresh.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, IDX), expected, rtol=0, atol=1e-5)


def test_safe_merge_on_nan_adapter_raises_and_changes_nothing():
    model = lora_tiny()
    with torch.no_grad():
        model.transformer.h[1].attn.v_proj.lora_A["default"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MiniloraError, match=r"default.*transformer\.h\.1\.attn\.v_proj"):
        merge(model, safe_merge=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or torch.isnan(before[k]).any(), k
    assert all(not layer.merged_adapters for _, layer in lora_layers(model))


def test_merging_a_tied_lm_head_is_refused():
    model = lora_tiny(target_modules=["lm_head"])
    with pytest.raises(MiniloraError, match="tied"):
        merge(model)


def test_rank_above_a_targeted_layers_dimensions_is_refused_before_anything_changes():
    model = tiny()  # n_embd 32: q_proj is 32x32, fc_in 32->128, lm_head 32->257
    for targets, r, where in ((QV, 33, "transformer.h.0.attn.q_proj's min(in_features 32, out_features 32)"),
                              (["fc_in"], 64, "transformer.h.0.mlp.fc_in's min(in_features 32, out_features 128)"),
                              (["lm_head"], 258, "lm_head's min(in_features 32, out_features 257)")):
        with pytest.raises(MiniloraError, match=re.escape(f"LoRA rank {r} exceeds {where}")):
            apply_lora(model, LoraConfig(r=r, target_modules=targets))
        assert not list(lora_layers(model)) and not hasattr(model, "peft_config")  # nothing was wrapped
    apply_lora(model, LoraConfig(r=32, target_modules=QV))  # min(in, out) itself is a valid rank


def test_lm_head_adapter_trains_through_the_loss_only_path():
    """The chunked loss reads lm_head.weight, which would skip the adapter; a wrapped head takes the logits path."""
    model = lora_tiny(target_modules=["lm_head"])
    targets = torch.roll(IDX, -1, dims=1)
    logits, loss = model(IDX, targets, loss_only=True)
    assert logits is None
    torch.testing.assert_close(loss, model(IDX, targets)[1], atol=0, rtol=0)
    plain = tiny()
    assert not torch.allclose(loss, plain(IDX, targets, loss_only=True)[1])  # the adapter is in the loss
    loss.backward()
    assert model.lm_head.lora_B["default"].weight.grad.abs().sum() > 0
    assert model.lm_head.weight is model.lm_head.base_layer.weight  # PEFT's alias, for code reading .weight.device


# ---- several adapters ------------------------------------------------------------------------

def two_adapters():
    model = lora_tiny("a")
    torch.manual_seed(1)
    apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "fc_in"], init_lora_weights=False), "b",
               activate=True)
    return model


def test_set_adapter_switches_and_matches_each_alone():
    model = two_adapters()
    set_adapter(model, "a")
    out_a = logits(model, IDX)
    set_adapter(model, "b")
    out_b = logits(model, IDX)
    assert not torch.allclose(out_a, out_b)
    for keep, out in (("a", out_a), ("b", out_b)):
        alone = copy.deepcopy(model)
        delete_adapter(alone, "b" if keep == "a" else "a")
        set_adapter(alone, keep)
        assert torch.equal(logits(alone, IDX), out)
    with disable_adapter(model):
        assert torch.equal(logits(model, IDX), logits(tiny(), IDX))


def test_disable_adapter_restores_after_exception():
    model = lora_tiny()
    adapted = logits(model, IDX)
    with pytest.raises(RuntimeError):
        with disable_adapter(model):
            assert torch.equal(logits(model, IDX), logits(tiny(), IDX))
            raise RuntimeError("boom")
    assert torch.equal(logits(model, IDX), adapted)
    assert all(not layer.disable_adapters for _, layer in lora_layers(model))


def test_weighted_cat_is_exact_sum_of_deltas():
    model = two_adapters()
    add_weighted_adapter(model, ["a", "b"], [0.7, -1.3], "ab", combination_type="cat")
    assert model.peft_config["ab"].r == 6
    assert model.transformer.h[0].attn.q_proj.active_adapters == ["b"]  # added, not activated
    for path, layer in lora_layers(model):
        expected = sum(w * layer.delta_weight(n) for n, w in (("a", 0.7), ("b", -1.3)) if n in layer.lora_A)
        torch.testing.assert_close(layer.delta_weight("ab"), expected, rtol=0, atol=1e-6)


def test_weighted_linear_needs_equal_ranks():
    model = two_adapters()
    with pytest.raises(MiniloraError, match="same rank.*'cat'"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab", combination_type="linear")
    add_weighted_adapter(model, ["a"], [0.25], "quarter", combination_type="linear")
    layer = model.transformer.h[0].attn.q_proj
    torch.testing.assert_close(layer.delta_weight("quarter"), 0.25 * layer.delta_weight("a"), rtol=0, atol=1e-6)


def test_delete_adapter_frees_its_tensors():
    model = two_adapters()
    layer = model.transformer.h[0].attn.v_proj
    refs = [weakref.ref(layer.lora_A["b"].weight), weakref.ref(layer.lora_B["b"])]
    delete_adapter(model, "b")
    gc.collect()
    assert all(r() is None for r in refs)
    assert "b" not in layer.lora_A and "b" not in layer.r and set(model.peft_config) == {"a"}
    assert not any(".b." in k for k in model.state_dict())
    assert type(model.transformer.h[0].mlp.fc_in) is Linear  # left with no adapter: unwrapped
    with pytest.raises(MiniloraError, match="unknown adapter"):
        set_adapter(model, "b")


# ---- configs and bad input -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r"), (dict(r=-2), "r"), (dict(r=2.5), "r"), (dict(lora_alpha=0), "lora_alpha"),
    (dict(bias="some"), "bias"), (dict(lora_dropout=-0.1), "lora_dropout"), (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"), (dict(target_modules=[]), "target_modules"),
    (dict(target_modules="q_proj("), "target_modules"), (dict(layers_to_transform=[-1]), "layers_to_transform"),
    (dict(use_rslora="yes"), "use_rslora"),
])
def test_bad_config_values_raise_at_construction(kwargs, field):
    with pytest.raises(MiniloraError, match=field):
        LoraConfig(**kwargs)


def test_unmatched_targets_list_existing_linears():
    names = "q_proj, k_proj, v_proj, out_proj, fc_in, fc_out, lm_head"
    with pytest.raises(MiniloraError, match=f"matched no nn.Linear; the model's nn.Linear modules are: {names}"):
        apply_lora(tiny(), LoraConfig(target_modules=["query", "value"]))
    model = tiny()
    with pytest.raises(MiniloraError, match=r"\['q_prj'\] matched no nn.Linear \(a typo\?\).*q_proj, k_proj"):
        apply_lora(model, LoraConfig(target_modules=["q_prj", "v_proj"]))
    assert not list(lora_layers(model)) and not hasattr(model, "peft_config")  # refused before changing anything
    with pytest.raises(MiniloraError, match=r"\[5\].*transformer\.h\.0 \.\. 1"):
        apply_lora(tiny(), LoraConfig(target_modules=QV, layers_to_transform=[5]))
    with pytest.raises(MiniloraError, match="modules_to_save.*lnf"):
        apply_lora(tiny(), LoraConfig(target_modules=QV, modules_to_save=["lnf"]))


def test_bad_adapter_operations_raise():
    model = lora_tiny("a")
    with pytest.raises(MiniloraError, match="already exists"):
        apply_lora(model, LoraConfig(), "a")
    with pytest.raises(MiniloraError, match="without '.'"):
        apply_lora(model, LoraConfig(), "x.y")
    with pytest.raises(MiniloraError, match="unknown adapter.*this model has: a"):
        delete_adapter(model, "z")
    with pytest.raises(MiniloraError, match="one weight per adapter"):
        add_weighted_adapter(model, ["a"], [1.0, 2.0], "w")
    merge(model)
    with pytest.raises(MiniloraError, match="unmerge"):
        with disable_adapter(model):
            pass


def test_peft_dict_round_trip_and_refusals():
    config = LoraConfig(r=16, lora_alpha=32, target_modules=QV, lora_dropout=0.05, bias="lora_only", use_rslora=True,
                        init_lora_weights="gaussian", layers_to_transform=[0, 3], modules_to_save=["lm_head"],
                        task_type="CAUSAL_LM", base_model_name_or_path="gpt2")
    d = peft_config_dict(config)
    assert d["peft_type"] == "LORA" and d["fan_in_fan_out"] is False and d["r"] == 16 and d["target_modules"] == QV
    assert config_from_peft(d) == config
    assert config_from_peft({**d, "some_future_key": 1, "fan_in_fan_out": True}) == config  # tolerated
    assert config_from_peft({**d, "target_modules": ["v_proj", "q_proj"]}).target_modules == ["v_proj", "q_proj"]
    for bad, match in (({"use_dora": "yes"}, "use_dora"), ({"peft_type": "IA3"}, "IA3"), ({"r": "8"}, "r must"),
                       ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"), ({"fan_in_fan_out": "no"}, "fan_in_fan_out")):
        with pytest.raises(MiniloraError, match=match):
            config_from_peft({**d, **bad})


def test_a_second_all_linear_adapter_wraps_only_the_models_linears():
    """all-linear means the model's linears: a second adapter never puts LoRA on the first one's lora_A/lora_B."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear"), "a")
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear"), "b")
    wrapped = [p for p, m in model.named_modules() if hasattr(m, "base_layer")]
    assert wrapped and not any(".lora_" in p for p in wrapped)
    assert all(set(model.get_submodule(p).lora_A) == {"a", "b"} for p in wrapped)
