"""The LoRA paper's section 7 measures (minilora.analysis) on matrices whose answers are known by construction."""

import copy
import math

import pytest
import torch

from minilora import GPT, GPTConfig, LoraConfig, MiniloraError, apply_lora, lora_layers
from minilora.analysis import (adapter_delta, adapter_deltas, amplification_factor, full_deltas, random_similarity,
                               similarity_grid, spectrum, subspace_similarity)


def rows(d, dims, scales=None, seed=0):
    """A (len(dims), d) matrix whose row space is span(e_k for k in dims), singular values `scales` (descending),
    with its rows rotated by a random orthogonal matrix so the basis is not handed over in the rows themselves."""
    scales = scales or [len(dims) - i for i in range(len(dims))]
    E = torch.zeros(len(dims), d, dtype=torch.float64)
    for i, k in enumerate(dims):
        E[i, k] = scales[i]
    Q, _ = torch.linalg.qr(torch.randn(len(dims), len(dims), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return Q @ E


def test_phi_known_answers():
    d = 32
    A = rows(d, range(8))
    assert subspace_similarity(A, A, 8, 8) == pytest.approx(1.0, abs=1e-12)
    assert subspace_similarity(A, A * 3 + 0, 3, 3) == pytest.approx(1.0, abs=1e-12)  # scale does not move subspaces
    small = rows(d, [0, 1, 2, 3], seed=1)
    assert subspace_similarity(small, A, 4, 8) == pytest.approx(1.0, abs=1e-12)  # contained: 1
    assert subspace_similarity(A, small, 8, 4) == pytest.approx(1.0, abs=1e-12)
    other = rows(d, range(8, 16), seed=2)
    assert subspace_similarity(A, other, 8, 8) == pytest.approx(0.0, abs=1e-12)  # orthogonal: 0
    # top directions by singular value: A1's are e0 > e1, A2's are e1 > e2
    A1, A2 = rows(d, [0, 1], [2.0, 1.0]), rows(d, [1, 2], [2.0, 1.0])
    assert subspace_similarity(A1, A2, 1, 1) == pytest.approx(0.0, abs=1e-12)   # e0 vs e1
    assert subspace_similarity(A1, A2, 2, 1) == pytest.approx(1.0, abs=1e-12)   # {e0, e1} holds e1
    assert subspace_similarity(A1, A2, 2, 2) == pytest.approx(0.5, abs=1e-12)   # one shared direction of two
    # a 45-degree direction: cos^2 = 1/2
    B = torch.zeros(1, d, dtype=torch.float64)
    B[0, 0] = B[0, 5] = 1.0
    assert subspace_similarity(B, rows(d, [0]), 1, 1) == pytest.approx(0.5, abs=1e-12)


def test_grid_matches_pointwise_and_random_floor():
    g = torch.Generator().manual_seed(0)
    A1, A2 = torch.randn(4, 64, generator=g), torch.randn(8, 64, generator=g)
    grid = similarity_grid(A1, A2)
    assert grid.shape == (4, 8)
    for i in range(1, 5):
        for j in range(1, 9):
            assert grid[i - 1, j - 1] == pytest.approx(subspace_similarity(A1, A2, i, j), abs=1e-12)
    assert grid.min() >= 0 and grid.max() <= 1 + 1e-12
    assert random_similarity(4, 8, 64) == 8 / 64


def test_phi_refuses_bad_input():
    A = torch.randn(4, 16)
    with pytest.raises(MiniloraError, match="has 1..4 singular directions; asked for 5"):
        subspace_similarity(A, A, 5, 1)
    with pytest.raises(MiniloraError, match="reads 16 inputs and A2 8"):
        subspace_similarity(A, torch.randn(4, 8), 2, 2)
    with pytest.raises(MiniloraError, match="2-D tensor"):
        subspace_similarity(torch.randn(16), A, 1, 1)
    with pytest.raises(MiniloraError, match="NaN or inf"):
        subspace_similarity(A * float("nan"), A, 1, 1)


def test_amplification_of_a_known_component():
    W = torch.zeros(6, 5, dtype=torch.float64)
    W[0, 1] = 0.5  # the part of W along ΔW's directions (u = e0, v = e1)
    W[3, 4] = 7.0  # the rest, orthogonal to them
    dW = torch.zeros(6, 5, dtype=torch.float64)
    dW[0, 1] = 3.0  # rank 1: 3 * e0 e1^T
    amp = amplification_factor(W, dW, 1)
    assert amp.delta_norm == pytest.approx(3.0)
    assert amp.projected_norm == pytest.approx(0.5)
    assert amp.weight_norm == pytest.approx(math.sqrt(0.25 + 49))
    assert amp.factor == pytest.approx(6.0)
    W[0, 1] = 0.0  # W has nothing along ΔW: infinite amplification
    assert amplification_factor(W, dW, 1).factor == math.inf
    with pytest.raises(MiniloraError, match="same layer"):
        amplification_factor(W, dW[:, :4], 1)
    with pytest.raises(MiniloraError, match="r must be an int in 1..5"):
        amplification_factor(W, dW, 6)


def test_spectrum_energy_and_effective_rank():
    s = spectrum(torch.diag(torch.tensor([3.0, 4.0, 0.0])))
    assert s.singular_values.tolist() == pytest.approx([4.0, 3.0, 0.0])
    assert s.energy(1) == pytest.approx(16 / 25) and s.energy(2) == pytest.approx(1.0) and s.energy(8) == 1.0
    assert s.rank_for(0.9) == 2 and s.rank_for(0.5) == 1
    assert spectrum(torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.0]))).effective_rank == pytest.approx(3.0)
    assert spectrum(torch.zeros(3, 3)).energy(1) == 1.0 and spectrum(torch.zeros(3, 3)).effective_rank == 0.0
    g = torch.Generator().manual_seed(0)
    low = torch.randn(20, 2, generator=g) @ torch.randn(2, 30, generator=g)  # rank 2
    assert spectrum(low).energy(2) == pytest.approx(1.0, abs=1e-12) and spectrum(low).rank_for(0.99) <= 2


def test_deltas_of_a_model():
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_name("tiny"))
    lora = apply_lora(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                      init_lora_weights=False))
    apply_lora(lora, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, use_dora=True), "dora")
    for path, (W, dW, A) in adapter_deltas(lora, "default").items():
        layer = lora.get_submodule(path)
        assert torch.allclose(dW, 2.0 * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double())
        assert A.shape == (2, layer.in_features) and spectrum(dW).rank_for(0.999999) <= 2
    for path, layer in lora_layers(lora):  # DoRA: the merged weight minus W, not s B A
        m, V = layer.lora_magnitude_vector["dora"].double(), (layer.base_layer.weight + layer.delta_weight("dora")).double()
        want = m[:, None] * V / V.norm(dim=1, keepdim=True) - layer.base_layer.weight.double()
        assert torch.allclose(adapter_delta(layer, "dora"), want, atol=1e-6)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.transformer.h[1].mlp.fc_in.weight.add_(1.0)
    deltas = full_deltas(base, tuned)
    assert "transformer.h.0.attn.q_proj" in deltas and "lm_head" not in deltas
    assert deltas["transformer.h.1.mlp.fc_in"][1].abs().min() == pytest.approx(1.0)
    assert deltas["transformer.h.0.attn.q_proj"][1].abs().max() == 0
    assert set(full_deltas(base, lora)) == set(deltas)  # a wrapped layer counts by its base layer
    with pytest.raises(MiniloraError, match="no adapter 'nope'"):
        adapter_deltas(lora, "nope")
