"""BatchNorm from scratch (bnstudy.reference) against PyTorch's BatchNorm layers, and the blog's worked example."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnstudy import reference as ref
from bnstudy.studies.manual_bn import BLOG_MEAN, BLOG_VAR, worked_input

LAYERS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}
SHAPES = [(16, 5), (8, 5, 7), (4, 5, 3, 6)]


def make_bn(shape: tuple[int, ...], dtype: torch.dtype, momentum: float = 0.1) -> nn.Module:
    bn = LAYERS[len(shape)](shape[1], momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, shape[1], dtype=dtype))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, shape[1], dtype=dtype))
    return bn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_train_forward_and_backward_match_torch(shape, dtype):
    gen = torch.Generator().manual_seed(len(shape))
    bn = make_bn(shape, dtype)
    x = (3 * torch.randn(shape, generator=gen, dtype=dtype) + 2).requires_grad_(True)
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    y = bn(x)
    y.backward(dy)
    gamma, beta = bn.weight.detach(), bn.bias.detach()
    cache = ref.bn_train_forward(x.detach(), gamma, beta, bn.eps)
    dx, dgamma, dbeta = ref.bn_backward(dy, cache, gamma)
    assert rel_err(cache.y, y.detach()) <= 1e-6
    assert rel_err(dx, x.grad) <= 1e-6
    assert rel_err(dgamma, bn.weight.grad) <= 1e-6
    assert rel_err(dbeta, bn.bias.grad) <= 1e-6


@pytest.mark.parametrize("momentum", [0.1, 0.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_running_stats_and_eval_match_torch(shape, momentum):
    gen = torch.Generator().manual_seed(7)
    bn = make_bn(shape, torch.float64, momentum)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(4):
        x = 2 * torch.randn(shape, generator=gen, dtype=torch.float64) - 1
        with torch.no_grad():
            bn(x)
        running_mean, running_var = ref.update_running_stats(
            running_mean, running_var, ref.batch_mean(x), ref.batch_var(x), ref.count_per_channel(x), momentum
        )
        assert rel_err(running_mean, bn.running_mean) <= 1e-6
        assert rel_err(running_var, bn.running_var) <= 1e-6
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected = bn.eval()(x)
    got = ref.bn_eval_forward(x, running_mean, running_var, bn.weight.detach(), bn.bias.detach(), bn.eps)
    assert rel_err(got, expected) <= 1e-6


def test_normalisation_uses_biased_and_running_stats_unbiased_variance():
    x = torch.tensor([[1.0], [2.0], [3.0], [6.0]], dtype=torch.float64)
    assert ref.batch_var(x).item() == pytest.approx(3.5)  # Σ(x − 3)² / 4 = 14 / 4
    _, running_var = ref.update_running_stats(
        torch.zeros(1), torch.ones(1), ref.batch_mean(x), ref.batch_var(x), 4, 1.0
    )
    assert running_var.item() == pytest.approx(14 / 3)


def test_worked_example_statistics_are_the_corrected_ones():
    x = worked_input()
    mean, var = ref.batch_mean(x), ref.batch_var(x)
    assert mean.tolist() == pytest.approx([5.5, 6.5, 7.5])
    assert var.tolist() == pytest.approx([11.25] * 3)
    assert mean.tolist() != pytest.approx(BLOG_MEAN)
    assert var.tolist() != pytest.approx(BLOG_VAR)
    x_hat = ref.normalize(x, mean, var)
    for channel in range(3):
        assert x_hat[:, channel].tolist() == pytest.approx([-1.3416, -0.4472, 0.4472, 1.3416], abs=1e-4)
    with torch.no_grad():
        torch_out = nn.BatchNorm1d(3).double()(x)
    assert (x_hat - torch_out).abs().max().item() <= 1e-12


def test_zero_upstream_gradient_mean_and_scale_invariance():
    # With ε = 0, BN's output ignores a shift and a positive scale of its input, so dx is orthogonal to both.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    dy = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    gamma = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    cache = ref.bn_train_forward(x, gamma, torch.zeros(4, dtype=torch.float64), eps=0.0)
    dx, _, _ = ref.bn_backward(dy, cache, gamma)
    assert dx.sum(0).abs().max().item() < 1e-12
    assert (dx * cache.x_hat).sum(0).abs().max().item() < 1e-12
    assert dx.abs().max().item() > 1e-3


def test_eps_keeps_a_constant_channel_finite():
    x = torch.full((5, 2), 3.0)
    out = ref.bn_train_forward(x, torch.ones(2), torch.zeros(2)).y
    assert torch.isfinite(out).all() and out.abs().max().item() == 0.0
    assert math.isclose(ref.normalize(torch.tensor([[1.0], [-1.0]]), torch.zeros(1), torch.ones(1), eps=0)[0, 0], 1.0)


def test_rejects_input_without_channel_dim():
    with pytest.raises(ValueError, match="needs \\(N, C, ...\\) input"):
        ref.batch_mean(torch.ones(4))
