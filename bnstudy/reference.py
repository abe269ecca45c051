"""BatchNorm from scratch as pure tensor functions: forward, backward, running statistics and eval mode.

Layout follows PyTorch: channels on dim 1, statistics over every other dim ((N, C), (N, C, L), (N, C, H, W)).
Each function does one step of the math, so tests and notebooks can compare every step with ``nn.BatchNorm*``.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """The dims BN averages over: all but the channel dim 1."""
    if x.dim() < 2:
        raise ValueError(f"BatchNorm needs (N, C, ...) input, got shape {tuple(x.shape)}")
    return (0, *range(2, x.dim()))


def per_channel(v: Tensor, x: Tensor) -> Tensor:
    """View a (C,) vector so it broadcasts against ``x`` along dim 1."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def count_per_channel(x: Tensor) -> int:
    """How many values each channel's statistics average: N·H·W…"""
    return x.numel() // x.shape[1]


def batch_mean(x: Tensor) -> Tensor:
    """μ_B per channel."""
    return x.mean(dim=reduce_dims(x))


def batch_var(x: Tensor) -> Tensor:
    """σ²_B per channel, biased (divides by the count m, not m − 1): the variance BN normalises with."""
    return x.var(dim=reduce_dims(x), unbiased=False)


def normalize(x: Tensor, mean: Tensor, var: Tensor, eps: float = 1e-5) -> Tensor:
    """x̂ = (x − μ) / sqrt(σ² + ε)."""
    return (x - per_channel(mean, x)) / per_channel(var + eps, x).sqrt()


def scale_shift(x_hat: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """y = γ·x̂ + β, the learnable affine step that lets the layer undo the normalisation if that helps."""
    return per_channel(gamma, x_hat) * x_hat + per_channel(beta, x_hat)


class ForwardCache(NamedTuple):
    """What the training-mode forward produces and the backward needs."""

    y: Tensor
    x_hat: Tensor
    mean: Tensor
    var: Tensor
    inv_std: Tensor


def bn_train_forward(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> ForwardCache:
    """Training-mode BN: normalise with this batch's own statistics."""
    mean, var = batch_mean(x), batch_var(x)
    x_hat = normalize(x, mean, var, eps)
    return ForwardCache(scale_shift(x_hat, gamma, beta), x_hat, mean, var, (var + eps).rsqrt())


def bn_backward(dy: Tensor, cache: ForwardCache, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dx, dγ, dβ) of training-mode BN given dL/dy.

    The batch statistics depend on every x, so dx is not just γ·dy/σ: with m values per channel,
    dx = (1/σ)·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)), where dx̂ = γ·dy.
    """
    dims = reduce_dims(dy)
    x_hat = cache.x_hat
    dgamma = (dy * x_hat).sum(dim=dims)
    dbeta = dy.sum(dim=dims)
    dx_hat = dy * per_channel(gamma, dy)
    mean_dx_hat = per_channel(dx_hat.mean(dim=dims), dy)
    mean_dx_hat_x_hat = per_channel((dx_hat * x_hat).mean(dim=dims), dy)
    dx = per_channel(cache.inv_std, dy) * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat)
    return dx, dgamma, dbeta


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int, momentum: float = 0.1
) -> tuple[Tensor, Tensor]:
    """The exponential moving averages eval mode uses: r ← (1 − momentum)·r + momentum·batch_stat.

    The running variance takes the unbiased batch variance (σ²·m/(m − 1)), unlike the normalisation itself.
    """
    unbiased = var * count / (count - 1)
    return (1 - momentum) * running_mean + momentum * mean, (1 - momentum) * running_var + momentum * unbiased


def bn_eval_forward(
    x: Tensor, running_mean: Tensor, running_var: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5
) -> Tensor:
    """Eval-mode BN: a fixed per-channel affine map from the running statistics, so each sample's output
    depends on that sample alone."""
    return scale_shift(normalize(x, running_mean, running_var, eps), gamma, beta)
