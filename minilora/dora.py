"""DoRA (Liu et al. 2024): LoRA on the direction of each weight row, with its length learned apart.

    W' = m ⊙ (W + s B A) / ‖W + s B A‖        m: (out,), the norm ‖·‖ taken over each row's fan-in

W is split into a magnitude (the length of each output row) and a direction (the row over its
length). LoRA's B A changes the direction; the magnitude vector m is a trainable parameter of
its own, starting at ‖W‖ (with B = 0, W' = W: training starts at the pretrained model).

Forward, as the paper's section 4.3 and PEFT do it: the norm is treated as a constant (detached:
no gradient flows through it), and the base output W x is reused rather than recomputed, so a
DoRA layer adds to base_layer(x) = W x + b

    (m/n − 1) ⊙ W x' + (m/n) ⊙ s B A x'        n = ‖W + s B A‖ (detached), x' = dropout(x)

which is W' x' + b − W x' + W x: exactly W' x + b without dropout. With dropout active (training),
PEFT applies the same dropped x' to the W term too; so do we, to train the same thing.

Names and file layout follow PEFT's: the vector is `lora_magnitude_vector` in the layer, and
`<module path>.lora_magnitude_vector` (no ".weight") in adapter_model.safetensors.
The functions here work on tensors and on a LoRALinear's attributes; minilora.lora calls them.
"""

import torch
import torch.nn.functional as F

from minilora.errors import MiniloraError


def _fp32(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def weight_norm(weight, delta):
    """‖W + ΔW‖ of each output row, (out,): W is nn.Linear's (out, in), so the norm runs over dim 1 (fan-in)."""
    return torch.linalg.norm(_fp32(weight) + delta, dim=1)


def magnitude_scale(layer, name):
    """m / ‖W + s B A‖, (out,): the norm is detached (paper, section 4.3), so only m gets its gradient here."""
    m = layer.lora_magnitude_vector[name]
    with torch.no_grad():
        n = weight_norm(layer.base_layer.weight, layer.delta_weight(name))
    return m / n.to(m.dtype)


def update(layer, name, x_dropped, lora_out, base=None, dropped=False):
    """DoRA's addition to base = base_layer(x): (m/n − 1) W x' + (m/n) lora_out, lora_out = s B A x'.

    The base output minus its bias is W x, reused when x' = x (no dropout active); otherwise W x'
    is computed from the dropped input.
    """
    scale = magnitude_scale(layer, name)
    W, bias = layer.base_layer.weight, layer.base_layer.bias
    if dropped or base is None:
        wx = F.linear(x_dropped, W.to(x_dropped.dtype))
    else:
        wx = (base - bias if bias is not None else base).to(scale.dtype)
    return (scale - 1) * wx + scale * lora_out


def merge(weight32, delta, magnitude):
    """(m/n ⊙ (W + ΔW), n): the merged weight in fp32 and the norm n, which unmerge needs again."""
    n = weight_norm(weight32, delta)
    return (magnitude.detach() / n)[:, None] * (weight32 + delta), n  # (out, 1) scales each row


def unmerge(weight32, delta, magnitude, n):
    """Undo merge with the norm it used: W = W' / (m/n) − ΔW (exact up to fp32 rounding)."""
    return weight32 / (magnitude.detach() / n)[:, None] - delta


def check_merge(path, names, magnitudes):
    """A DoRA adapter merges alone: m/‖W + ΔW‖ rescales whatever W holds, so beside others it would be another W."""
    dora_names = [n for n in names if n in magnitudes]
    if dora_names and len(names) > 1:
        raise MiniloraError(f"DoRA adapter {dora_names[0]!r} merges only alone, and {path} would hold "
                            f"{', '.join(names)}; merge one adapter at a time (or merge_and_unload a copy)")
