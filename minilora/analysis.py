"""Is the weight change of fine-tuning low-rank? The LoRA paper's section 7 as functions.

LoRA's premise (Hu et al. 2021) is that the update a fine-tune makes to a weight, ΔW, has a
low "intrinsic rank". These functions measure that on a real ΔW, either an adapter's
(ΔW = scaling · B A, or DoRA's merged weight minus W) or a full fine-tune's (W_tuned − W_base):

    spectrum(delta_W)                     singular values; .energy(k) = share of ‖ΔW‖²_F in the top k
                                          directions; .effective_rank (Roy & Vetterli 2007)
    subspace_similarity(A1, A2, i, j)     the paper's φ (section 7.2, Figure 3): how much the top-i
                                          row-space directions of A1 overlap the top-j of A2
    amplification_factor(W, delta_W, r)   the paper's Table 7: how strongly ΔW amplifies directions
                                          that W itself barely uses

Everything is computed in float64 on the CPU: these are small SVDs (at most in × out), and the
quantities compared (overlaps near 0, energies near 1) are where fp32 rounding shows.
`python -m minilora.analyze` runs them over every adapted layer of a model (minilora.analyze).
"""

import math
from dataclasses import dataclass

import torch

from minilora.errors import MiniloraError
from minilora.lora import lora_layers


def _matrix(M, what):
    if not torch.is_tensor(M) or M.dim() != 2 or 0 in M.shape:
        shape = tuple(M.shape) if torch.is_tensor(M) else type(M).__name__
        raise MiniloraError(f"{what} must be a non-empty 2-D tensor, got {shape}")
    if not M.is_floating_point():
        raise MiniloraError(f"{what} must be a floating-point tensor, got {M.dtype}")
    M = M.detach().to("cpu", torch.float64)
    if not torch.isfinite(M).all():
        raise MiniloraError(f"{what} has NaN or inf values; nothing can be measured on it")
    return M


def right_singular_vectors(M, k, what="matrix"):
    """The top-k right-singular vectors of M (rows of V^T), (k, in): the input directions M reads most."""
    M = _matrix(M, what)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= min(M.shape):
        raise MiniloraError(f"{what} is {M.shape[0]}x{M.shape[1]}, so it has 1..{min(M.shape)} singular directions; "
                            f"asked for {k!r}")
    return torch.linalg.svd(M, full_matrices=False).Vh[:k]  # (k, in), rows orthonormal


# ---- section 7.2: subspace similarity --------------------------------------------------------------

def subspace_similarity(A1, A2, i, j):
    """φ(A1, A2, i, j) = ‖U1ᵢᵀ U2ⱼ‖²_F / min(i, j), with U1ᵢ the top-i right-singular vectors of A1.

    A1, A2: (r1, d) and (r2, d), e.g. two adapters' lora_A weights for the same layer (or any two
    matrices reading the same d inputs: two ΔWs of shape (out, d)). The result is in [0, 1]: 1 when
    one subspace contains the other, 0 when they are orthogonal. Two random subspaces of sizes i
    and j in d dimensions give about max(i, j) / d (random_similarity), the floor to compare with.
    """
    V1 = right_singular_vectors(A1, i, "A1")
    V2 = right_singular_vectors(A2, j, "A2")
    if V1.shape[1] != V2.shape[1]:
        raise MiniloraError(f"A1 reads {V1.shape[1]} inputs and A2 {V2.shape[1]}; subspace similarity compares "
                            f"matrices of the same layer")
    return float((V1 @ V2.T).pow(2).sum() / min(i, j))  # (i, j) cosines; their squares sum to the overlap


def similarity_grid(A1, A2, max_i=None, max_j=None):
    """φ(A1, A2, i, j) for every i <= max_i, j <= max_j as an (max_i, max_j) tensor (the paper's Figure 3)."""
    M1, M2 = _matrix(A1, "A1"), _matrix(A2, "A2")
    max_i, max_j = max_i or min(M1.shape), max_j or min(M2.shape)
    V1, V2 = right_singular_vectors(M1, max_i, "A1"), right_singular_vectors(M2, max_j, "A2")
    cos2 = (V1 @ V2.T).pow(2)  # (max_i, max_j)
    overlap = cos2.cumsum(0).cumsum(1)  # [i-1, j-1] = ‖U1ᵢᵀ U2ⱼ‖²_F
    i = torch.arange(1, max_i + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, max_j + 1, dtype=torch.float64)[None, :]
    return overlap / torch.minimum(i, j)


def random_similarity(i, j, d):
    """E[φ] for random i- and j-dimensional subspaces of R^d: i·j/d expected overlap over min(i, j)."""
    return max(i, j) / d


# ---- the singular spectrum of ΔW ---------------------------------------------------------------------

@dataclass
class Spectrum:
    """Singular values of a ΔW (descending, float64) and what they say about its rank."""
    singular_values: torch.Tensor

    @property
    def total_energy(self):
        return float(self.singular_values.pow(2).sum())  # = ‖ΔW‖²_F

    def energy(self, k):
        """Share of ‖ΔW‖²_F in the top k directions (1.0 for a zero ΔW: nothing is left out)."""
        total = self.total_energy
        return float(self.singular_values[:k].pow(2).sum() / total) if total > 0 else 1.0

    def rank_for(self, share=0.9):
        """Fewest directions holding `share` of ‖ΔW‖²_F."""
        if self.total_energy == 0:
            return 0
        cum = self.singular_values.pow(2).cumsum(0) / self.total_energy
        return int((cum < share - 1e-12).sum()) + 1

    @property
    def effective_rank(self):
        """exp(entropy of σ / Σσ) (Roy & Vetterli 2007): k for k equal singular values, ~1 for one dominant one."""
        s = self.singular_values
        if float(s.sum()) == 0:
            return 0.0
        p = s / s.sum()
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))


def spectrum(delta_W):
    """The singular spectrum of delta_W (out, in)."""
    return Spectrum(torch.linalg.svdvals(_matrix(delta_W, "delta_W")))


# ---- section 7.3: amplification ----------------------------------------------------------------------

@dataclass
class Amplification:
    factor: float          # ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F
    delta_norm: float      # ‖ΔW‖_F
    projected_norm: float  # ‖Uᵀ W Vᵀ‖_F: how much of W lies in ΔW's top-r directions
    weight_norm: float     # ‖W‖_F, for scale


def amplification_factor(W, delta_W, r):
    """The LoRA paper's Table 7 quantity: ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F, with U (out, r), Vᵀ (r, in) the
    top-r left and right singular vectors of ΔW.

    Uᵀ W Vᵀ is W seen through ΔW's own directions. A large factor means ΔW amplifies directions
    W barely uses (the paper: ~21.5 for r=4 on GPT-3's W_q at layer 48), a factor near 1 that ΔW
    repeats what W already emphasises. Returns an Amplification with the three norms.
    """
    W, delta_W = _matrix(W, "W"), _matrix(delta_W, "delta_W")
    if W.shape != delta_W.shape:
        raise MiniloraError(f"W is {W.shape[0]}x{W.shape[1]} but delta_W is {delta_W.shape[0]}x{delta_W.shape[1]}; "
                            f"they must be the same layer's")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= min(W.shape):
        raise MiniloraError(f"r must be an int in 1..{min(W.shape)} for a {W.shape[0]}x{W.shape[1]} weight, got {r!r}")
    U, _, Vh = torch.linalg.svd(delta_W, full_matrices=False)
    projected = U[:, :r].T @ W @ Vh[:r].T  # (r, r)
    delta_norm, projected_norm = float(torch.linalg.norm(delta_W)), float(torch.linalg.norm(projected))
    factor = delta_norm / projected_norm if projected_norm > 0 else math.inf
    return Amplification(factor, delta_norm, projected_norm, float(torch.linalg.norm(W)))


# ---- ΔW of a model ----------------------------------------------------------------------------------

def adapter_delta(layer, name):
    """The weight change adapter `name` makes to a LoRALinear, (out, in) float64: what merging would add."""
    if name not in layer.lora_A:
        raise MiniloraError(f"this layer has no adapter {name!r} (it has: {', '.join(layer.lora_A) or 'none'})")
    if name not in layer.lora_magnitude_vector:
        return layer.delta_weight(name).detach().to(torch.float64)  # scaling · B A
    W = layer.base_layer.weight.detach().to(torch.float64)
    return layer.merge_into(W, [name])[0] - W  # DoRA: m/‖W + ΔW‖ ⊙ (W + ΔW) − W, in float64


def adapter_deltas(model, name):
    """{module path: (W (out, in), ΔW, lora_A weight (r, in))} for every layer adapter `name` adapts."""
    out = {}
    for path, layer in lora_layers(model):
        if name in layer.lora_A:
            out[path] = (layer.base_layer.weight.detach().to(torch.float64), adapter_delta(layer, name),
                         layer.lora_A[name].weight.detach().to(torch.float64))
    if not out:
        raise MiniloraError(f"the model has no adapter {name!r}; load it first")
    return out


def _linear_weights(model):
    """{path: weight} of every nn.Linear inside the blocks (a LoRALinear counts by its base layer)."""
    weights = {}
    for path, m in model.named_modules():
        if ".h." in f".{path}" and isinstance(m, torch.nn.Linear):
            weights[path.replace(".base_layer", "")] = m.weight
    return weights


def full_deltas(base, tuned, paths=None):
    """{path: (W_base, W_tuned − W_base)} for the linear layers in the blocks (or just `paths`), float64."""
    before, after = _linear_weights(base), _linear_weights(tuned)
    paths = sorted(before) if paths is None else list(paths)
    missing = [p for p in paths if p not in before or p not in after]
    if missing:
        raise MiniloraError(f"the full fine-tune and the base differ in layers: {', '.join(missing[:5])} missing; "
                            f"compare a fine-tune with the base it was trained from")
    out = {}
    for p in paths:
        if before[p].shape != after[p].shape:
            raise MiniloraError(f"{p} is {tuple(before[p].shape)} in the base but {tuple(after[p].shape)} in the "
                                f"fine-tune; compare a fine-tune with the base it was trained from")
        W = before[p].detach().to(torch.float64)
        out[p] = (W, after[p].detach().to(torch.float64) - W)
    return out
