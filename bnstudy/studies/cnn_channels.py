"""Study ``cnn-channels``: BatchNorm2d keeps one mean and variance per channel, taken over (N, H, W); a conv bias
before it is cancelled by the mean subtraction; and seed 004's CIFAR CNN trained briefly with and without BN."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import nn

from bnstudy import reference as ref
from bnstudy.models import seed_cnn
from bnstudy.studies.fitting import torch_threads, train_seeds
from bnstudy.studies.images import as_split, load_train_test
from bnstudy.studies.result import DEFAULT_SEEDS, Check, StudyResult, choose_params, history_summary, mean_std

NAME = "cnn-channels"
NORMS = ("bn", "none")
SYNTHETIC_SIZES = (5000, 1000)


@dataclass(frozen=True)
class Params:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    train_size: int | None = 5000
    test_size: int | None = None
    width: int = 32
    tolerance: float = 1e-6
    precision: str = "fp32"


QUICK = {"epochs": 1, "train_size": 256, "test_size": 256, "width": 8}


def channel_statistics(seed: int, shape: tuple[int, int, int, int] = (8, 4, 6, 6)) -> dict:
    """BatchNorm2d in train mode against statistics computed by hand over (N, H, W) per channel, and against the
    two wrong readings: one mean over everything, and a mean per (channel, position) over N only."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 3.0, c).view(1, c, 1, 1).double()
    x = x + torch.linspace(-2.0, 4.0, c).view(1, c, 1, 1).double()
    bn = nn.BatchNorm2d(c).double()
    with torch.no_grad():
        out = bn(x)
    mean, var = ref.batch_mean(x), ref.batch_var(x)
    running_mean, running_var = ref.update_running_stats(
        torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype), mean, var, ref.count_per_channel(x)
    )
    global_norm = (x - x.mean()) / (x.var(unbiased=False) + bn.eps).sqrt()
    per_position = (x - x.mean(0)) / (x.var(0, unbiased=False) + bn.eps).sqrt()
    return {
        "manual_mean": mean.tolist(),
        "manual_var": var.tolist(),
        "output_error": (ref.normalize(x, mean, var, bn.eps) - out).abs().max().item(),
        "running_mean_error": (running_mean - bn.running_mean).abs().max().item(),
        "running_var_error": (running_var - bn.running_var).abs().max().item(),
        "global_reading_error": (global_norm - out).abs().max().item(),
        "per_position_reading_error": (per_position - out).abs().max().item(),
        "output_channel_mean_max": ref.batch_mean(out).abs().max().item(),
    }


def bias_cancellation(seed: int, shape: tuple[int, int, int, int] = (8, 3, 10, 10), channels: int = 6) -> dict:
    """A conv with a (large) bias and the same conv without it, each followed by BatchNorm2d in train mode:
    outputs agree, and the bias gets no gradient, because BN subtracts the per-channel mean the bias shifts."""
    gen = torch.Generator().manual_seed(seed)
    with_bias = nn.Conv2d(shape[1], channels, 3, padding=1, bias=True).double()
    without = nn.Conv2d(shape[1], channels, 3, padding=1, bias=False).double()
    with torch.no_grad():
        with_bias.weight.copy_(torch.randn(with_bias.weight.shape, generator=gen, dtype=torch.float64))
        with_bias.bias.copy_(5.0 * torch.randn(channels, generator=gen, dtype=torch.float64))
        without.weight.copy_(with_bias.weight)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    target = torch.randn(shape[0], channels, *shape[2:], generator=gen, dtype=torch.float64)
    outs = []
    for conv in (with_bias, without):
        out = nn.BatchNorm2d(channels).double()(conv(x))
        ((out - target) ** 2).mean().backward()
        outs.append(out.detach())
    return {
        "bias": with_bias.bias.tolist(),
        "output_difference": (outs[0] - outs[1]).abs().max().item(),
        "bias_grad_max": with_bias.bias.grad.abs().max().item(),
        "weight_grad_mean": with_bias.weight.grad.abs().mean().item(),
        "weight_grad_difference": (with_bias.weight.grad - without.weight.grad).abs().max().item(),
    }


def run(
    seeds: Sequence[int] = DEFAULT_SEEDS,
    quick: bool | None = None,
    data: str | os.PathLike | None = None,
    **overrides,
) -> StudyResult:
    """The per-channel and bias checks per seed, then brief CNN training with and without BN. ``data``: a
    CIFAR-10 directory or torchvision root, "synthetic", or None for real data when found."""
    p = choose_params(Params(), QUICK, quick, overrides)
    stats = [channel_statistics(s) for s in seeds]
    bias = [bias_cancellation(s) for s in seeds]
    train, test = load_train_test("cifar10", data, p.train_size, p.test_size, SYNTHETIC_SIZES)
    split = as_split(train, test)
    with torch_threads(1):
        histories = {
            norm: train_seeds(
                partial(seed_cnn, norm, width=p.width),
                split,
                seeds,
                epochs=p.epochs,
                batch_size=p.batch_size,
                lr=p.lr,
                desc=f"{NAME} {norm}",
                precision=p.precision,
            )
            for norm in NORMS
        }
    curves = {norm: history_summary(h) for norm, h in histories.items()}
    final = {norm: {key: c["final"] for key, c in curves[norm].items()} for norm in NORMS}

    def worst(rows: list[dict], key: str) -> float:
        return max(r[key] for r in rows)

    checks = {
        "per_channel_statistics": Check(
            "BatchNorm2d's output and running stats equal per-channel statistics over (N, H, W) computed by hand",
            max(worst(stats, k) for k in ("output_error", "running_mean_error", "running_var_error")) <= p.tolerance,
            {k: worst(stats, k) for k in ("output_error", "running_mean_error", "running_var_error")},
        ),
        "other_readings_differ": Check(
            "one mean over everything, or a mean per position over N only, gives a different output",
            min(min(r["global_reading_error"], r["per_position_reading_error"]) for r in stats) > 0.1,
            {k: min(r[k] for r in stats) for k in ("global_reading_error", "per_position_reading_error")},
        ),
        "conv_bias_cancelled": Check(
            "a conv bias before BN changes neither the output nor the weight gradients, and gets zero gradient",
            max(worst(bias, k) for k in ("output_difference", "bias_grad_max", "weight_grad_difference"))
            <= p.tolerance,
            {k: worst(bias, k) for k in ("output_difference", "bias_grad_max", "weight_grad_difference")},
        ),
    }
    findings = {
        "bn_higher_test_accuracy": Check(
            f"after {p.epochs} epochs on {len(train)} images, the CNN with BN has higher test accuracy",
            final["bn"]["test_acc"]["mean"] > final["none"]["test_acc"]["mean"],
            {norm: final[norm]["test_acc"]["mean"] for norm in NORMS},
        )
    }
    summary = {
        "data_source": train.source,
        "test_source": test.source,
        "train_samples": len(train),
        "test_samples": len(test),
        "final": final,
        "bias_grad_max": mean_std([r["bias_grad_max"] for r in bias]),
        "weight_grad_mean": mean_std([r["weight_grad_mean"] for r in bias]),
    }
    return StudyResult(
        NAME,
        asdict(p),
        list(seeds),
        summary,
        checks,
        findings,
        data={"channel_statistics": stats[0], "bias_cancellation": bias, "curves": curves},
    )
