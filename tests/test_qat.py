"""Quantisation-aware training with BN folded: the math, the folded fake-quant conv against the plain conv + BN,
frozen statistics, SyncBN under DDP, and onnxruntime INT8 against the torch fake-quant model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bnstudy.edge.qat_math import (
    ACTIVATION_RANGE,
    WEIGHT_RANGE,
    affine_activation_qparams,
    batch_corrected_output,
    fake_quantize_activation,
    fake_quantize_weight,
    symmetric_weight_scale,
)


def test_weight_scale_uses_the_range_without_clipping():
    weight = torch.randn(6, 3, 3, 3, dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64).view(-1, 1, 1, 1)
    scale = symmetric_weight_scale(weight, *WEIGHT_RANGE)
    q = fake_quantize_weight(weight, scale, *WEIGHT_RANGE)
    levels = torch.round(q / scale.double().view(-1, 1, 1, 1))
    assert levels.abs().flatten(1).amax(1).tolist() == [63.0] * 6  # the largest magnitude uses the last level
    assert ((q - weight).abs() <= scale.double().view(-1, 1, 1, 1) / 2 + 1e-12).all()


def test_activation_grid_holds_zero_exactly():
    scale, zero_point = affine_activation_qparams(torch.tensor(-0.37), torch.tensor(2.9), *ACTIVATION_RANGE)
    x = torch.tensor([0.0, -0.37, 2.9, 1.0])
    q = fake_quantize_activation(x, scale, zero_point, *ACTIVATION_RANGE)
    assert q[0] == 0
    assert ((q - x).abs() <= scale / 2 + 1e-7).all()
    scale, zero_point = affine_activation_qparams(torch.tensor(0.5), torch.tensor(2.0), *ACTIVATION_RANGE)
    assert zero_point == 0 and torch.isclose(scale, torch.tensor(2.0 / 255))  # widened to contain 0


def test_batch_correction_without_rounding_is_training_batchnorm():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(8, 5, 4, 4, generator=gen, dtype=torch.float64) * 3 + 1
    gamma, beta = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5, torch.randn(5, generator=gen).double()
    running_var = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    batch_var, batch_mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    folded_running = y * (gamma * torch.rsqrt(running_var + 1e-5)).view(1, -1, 1, 1)  # conv(x, W·γ/σ_r), q = id
    got = batch_corrected_output(folded_running, running_var, batch_mean, batch_var, gamma, beta, 1e-5)
    expected = F.batch_norm(y, None, None, gamma, beta, training=True, eps=1e-5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
