"""The fold math as pure tensor functions, done in float64 and cast back to the layer's dtype.

In eval mode BN is a per-channel affine map, y = x·s + t with s = γ/√(var+ε) and t = β − μ·s, so it can be
merged into the layer before it (W' = W·s per output channel, b' = b·s + t, the same as (b − μ)·s + β) or, when
the layer has no zero padding, into the layer after it (W' = W·s per input channel, b' = b + Σ W·t).
"""

from __future__ import annotations

import torch
from torch import Tensor


def bn_scale_shift(
    running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as ``x·scale + shift`` per channel, in float64: scale = γ/√(var+ε), shift = β − μ·scale."""
    scale = torch.rsqrt(running_var.double() + eps)
    if weight is not None:
        scale = scale * weight.double()
    shift = -running_mean.double() * scale
    if bias is not None:
        shift = shift + bias.double()
    return scale, shift


def fold_into_output(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *, groups: int = 1, transposed: bool = False
) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``BN(layer(x))`` as one layer, for conv, transposed conv and linear weights.

    A transposed conv keeps output channels on weight dim 1, per group: weight (C_in, C_out/g, *k), and output
    channel ``g·C_out/g + j`` is column ``j`` of the rows of group ``g``.
    """
    w = weight.double()
    if transposed:
        c_in, c_out_per_group = w.shape[:2]
        spatial = [1] * (w.dim() - 2)
        per_group = w.reshape(groups, c_in // groups, c_out_per_group, *w.shape[2:])
        w_folded = (per_group * scale.view(groups, 1, c_out_per_group, *spatial)).reshape(w.shape)
    else:
        w_folded = w * scale.view(-1, *[1] * (w.dim() - 1))
    b = bias.double() if bias is not None else torch.zeros_like(scale)
    return w_folded.to(weight.dtype), (b * scale + shift).to(weight.dtype)


def fold_into_input(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``layer(BN(x))`` as one layer, for conv (without zero padding) and linear weights.

    Weight (C_out, C_in/g, *k): output channel ``o`` of group ``g`` reads input channels ``g·C_in/g + j``.
    """
    w = weight.double()
    c_out, c_in_per_group = w.shape[:2]
    per_group = w.reshape(groups, c_out // groups, c_in_per_group, -1)
    w_folded = (per_group * scale.view(groups, 1, c_in_per_group, 1)).reshape(w.shape)
    b = (per_group * shift.view(groups, 1, c_in_per_group, 1)).sum((2, 3)).reshape(c_out)
    if bias is not None:
        b = b + bias.double()
    return w_folded.to(weight.dtype), b.to(weight.dtype)
