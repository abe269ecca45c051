"""The math of quantisation-aware training with BN folded, as pure tensor functions.

What ships is an INT8 conv whose weights are the *folded* weights ``W·γ/σ`` rounded per output channel, so training
must round those (Jacob et al. 2018, §3.2). While BN still learns, it normalises with batch statistics, yet the
shipped conv uses running statistics; Krishnamoorthi 2018 (§2.7) resolves this by folding with the running σ for the
rounded weights and rescaling the conv output by σ_running/σ_batch, with the bias from batch statistics:

    y = conv(x, q(W·γ/σ_r)) · σ_r/σ_B + (β − γ·μ_B/σ_B)

which is exactly BN in training mode when q is the identity, and the shipped conv ``conv(x, q(W·γ/σ_r)) + β −
γ·μ_r/σ_r`` once σ_B, μ_B are replaced by the running values. The fold itself is :mod:`bnstudy.edge.fold_math`'s.

Weights are symmetric int8 per output channel (zero point 0), by default in 7 bits, [-64, 63]: onnxruntime's uint8 ×
int8 kernels on x86 CPUs without VNNI add pairs of products in saturating int16, which full-range weights can
overflow (see deploy/quantize.py). Activations are affine uint8 per tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnstudy.edge.fold_math import bn_scale_shift, fold_into_output

WEIGHT_RANGE = (-64, 63)  # 7-bit: safe for onnxruntime's u8s8 kernels on CPUs without VNNI
FULL_WEIGHT_RANGE = (-128, 127)
ACTIVATION_RANGE = (0, 255)  # uint8
_MIN_SCALE = float(torch.finfo(torch.float32).eps)  # 2^-23, torch.ao observers' floor; see symmetric_weight_scale


def symmetric_weight_scale(weight: Tensor, qmin: int, qmax: int) -> Tensor:
    """Per-output-channel float32 scale so that the channel's largest magnitude lands on the last level both signs
    reach (min(−qmin, qmax)): nothing is clipped, and the rounding error is at most half a step.

    An all-zero channel (γ = 0: a pruned channel, a zero-initialised residual γ) gets 2^-23 rather than a tinier
    floor: its levels are 0 whatever the scale, but its bias ships as int32 at s_input·s_weight, and 2^-23 holds a
    bias up to 2^31·2^-23·s_input = 256·s_input (about the input's whole range) to within 2^-24·s_input."""
    amax = weight.detach().double().abs().flatten(1).amax(1)
    return (amax / min(-qmin, qmax)).clamp(min=_MIN_SCALE).float()


def affine_activation_qparams(min_val: Tensor, max_val: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Per-tensor (float32 scale, int32 zero point) covering [min, max] widened to contain 0, so that 0 (ReLU's
    floor, zero padding) is represented exactly."""
    low = torch.clamp(min_val.detach().double(), max=0.0)
    high = torch.clamp(max_val.detach().double(), min=0.0)
    scale = ((high - low) / (qmax - qmin)).clamp(min=_MIN_SCALE)
    zero_point = torch.clamp(qmin - torch.round(low / scale), qmin, qmax)
    return scale.float(), zero_point.to(torch.int32)


def fake_quantize_weight(weight: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Round ``weight`` to ``scale``'s per-output-channel grid in [qmin, qmax]; the gradient passes straight
    through inside the range."""
    zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, qmin, qmax)


def fake_quantize_activation(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Round ``x`` to a per-tensor affine grid in [qmin, qmax] (straight-through gradient), as QuantizeLinear →
    DequantizeLinear does at inference."""
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


def fold_conv_bn(
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``BN(conv(x))`` as one conv, for the given statistics (running ones for what ships, batch
    ones inside the training correction). Differentiable in every argument, so γ, β and W learn through it."""
    scale, shift = bn_scale_shift(mean, var, bn_weight, bn_bias, eps)
    return fold_into_output(weight, bias, scale, shift)


def training_fold_scale(running_scale: Tensor) -> Tensor:
    """The per-channel k that training folds into the weights before rounding and divides out after the conv, so
    that BN normalises conv(x, q(W·k))/k: BN's γ/σ_r, except 1 where that is 0 (γ = 0), where q(0)/0 would be NaN.
    There BN sees the conv with its own weights rounded, which q(W·k)/k is for every k ≠ 0 (per-channel rounding
    commutes with the fold), so γ still learns as in plain BN; what ships is unchanged (levels 0, bias β)."""
    return torch.where(running_scale == 0, torch.ones_like(running_scale), running_scale)


def batch_corrected_output(
    conv_running_folded: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float,
    conv_bias: Tensor | None = None,
) -> Tensor:
    """Krishnamoorthi's training output from ``conv(x, q(W·γ/σ_r))`` (no bias): rescaled by σ_r/σ_B, plus the bias
    folded with batch statistics (the conv's own bias, if any, rescaled the same way). What
    :class:`bnstudy.edge.qat.FoldedConvBn` computes in training, written out."""
    ratio = torch.sqrt((running_var.double() + eps) / (batch_var.double() + eps))
    batch_scale, bias = bn_scale_shift(batch_mean, batch_var, bn_weight, bn_bias, eps)
    if conv_bias is not None:
        bias = bias + conv_bias.double() * batch_scale
    shape = (1, -1) + (1,) * (conv_running_folded.dim() - 2)
    return conv_running_folded * ratio.view(shape).to(conv_running_folded.dtype) + bias.view(shape).to(
        conv_running_folded.dtype
    )


def weight_levels(weight: Tensor, qmin: int, qmax: int) -> Tensor:
    """The integer levels the shipped weights hold: ``weight`` on its per-output-channel symmetric grid."""
    scale = symmetric_weight_scale(weight, qmin, qmax).double().view(-1, *(1,) * (weight.dim() - 1))
    return torch.round(weight.detach().double() / scale).clamp(qmin, qmax)


def fold_rounding_agreement(weight: Tensor, channel_scale: Tensor, qmin: int, qmax: int) -> float:
    """Fraction of weights whose level is the same whether the fold's per-channel scale k is applied before
    rounding (what ships: levels of W·k) or after (QAT without folding: k·q(W), the levels of W times sign k).
    A per-channel symmetric grid scales with |k|, so rounding commutes with the fold and this is 1 up to float ties."""
    k = channel_scale.detach().double().view(-1, *(1,) * (weight.dim() - 1))
    folded = weight_levels(weight.detach().double() * k, qmin, qmax)
    unfolded = weight_levels(weight, qmin, qmax) * torch.sign(k)
    return float((folded == unfolded).double().mean())
