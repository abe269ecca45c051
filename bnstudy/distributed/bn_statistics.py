"""BatchNorm statistics across ranks: how far plain BN's per-process statistics drift apart, and the ways to make
them consistent before evaluation (average, copy rank 0's, or PreciseBN recomputation)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


def bn_layers(model: nn.Module) -> Iterator[tuple[str, _BatchNorm]]:
    """Named BN layers (plain or sync) that keep running statistics."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            yield name, module


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def used_statistics(x: Tensor, y: Tensor, bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """The per-channel mean and variance a BN layer actually normalised with, recovered from its input and output.

    y = (x − μ)·a + β with a = γ/√(σ²+ε) per channel, so a is the regression slope of y on x; this observes any
    implementation (plain, sync, CUDA) without trusting it.
    """
    dims = [0, *range(2, x.dim())]
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(dims), y.mean(dims)
    shape = [1, -1] + [1] * (x.dim() - 2)
    xc = x - x_mean.view(shape)
    slope = (xc * (y - y_mean.view(shape))).mean(dims) / (xc * xc).mean(dims)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(slope)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(slope)
    var = (gamma / slope) ** 2 - bn.eps
    mean = x_mean - (y_mean - beta) / slope
    return mean, var


def _gather(t: Tensor) -> Tensor:
    """(world, ...) stack of ``t`` from every rank (just ``t[None]`` in a single process)."""
    if not _distributed():
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def _spread(stack: Tensor) -> float:
    return (stack.max(0).values - stack.min(0).values).abs().max().item()


def _relative(spread: float, stack: Tensor) -> float:
    return spread / max(stack.abs().mean().item(), 1e-12)


@torch.no_grad()
def bn_statistics_report(model: nn.Module, probe: Tensor) -> list[dict]:
    """Per BN layer, how ranks differ: running_mean/var (max abs and relative difference) and the batch
    statistics each rank normalises ``probe`` with in train mode (zero spread for sync BN, non-zero for plain BN).

    Collective: every rank must call it. Running buffers are restored afterwards.
    """
    layers = list(bn_layers(model))
    if not layers:
        return []
    saved = {name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for name, m in layers}
    captured: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: captured.__setitem__(name, (inp[0], out)))
        for name, m in layers
    ]
    was_training = model.training
    try:
        model.train()
        model(probe)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
        for name, m in layers:
            m.running_mean.copy_(saved[name][0])
            m.running_var.copy_(saved[name][1])
            m.num_batches_tracked.copy_(saved[name][2])
    records = []
    for name, m in layers:
        used_mean, used_var = used_statistics(*captured[name], m)
        stacks = {
            "running_mean": _gather(saved[name][0].double()),
            "running_var": _gather(saved[name][1].double()),
            "batch_mean": _gather(used_mean),
            "batch_var": _gather(used_var),
        }
        record = {"layer": name, "channels": m.num_features}
        for key, stack in stacks.items():
            spread = _spread(stack)
            if key.startswith("running"):
                record[f"{key}_max_abs_diff"] = spread
                record[f"{key}_max_rel_diff"] = _relative(spread, stack)
            else:
                record[f"{key}_spread"] = spread
                record[f"{key}_rel_spread"] = _relative(spread, stack)
        records.append(record)
    return records


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable[Tensor]) -> None:
    """PreciseBN (Wu & Johnson 2021): recompute running stats as the plain average over ``batches`` with the
    weights frozen, instead of the EMA collected while the weights moved."""
    layers = [m for _, m in bn_layers(model)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        model.train(was_training)
        for m, (momentum, tracked) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


@torch.no_grad()
def sync_bn_buffers(model: nn.Module, mode: str, precise_batches: Callable[[], Iterable[Tensor]]) -> None:
    """Make BN running stats consistent across ranks before evaluation (``--eval-bn``).

    local: keep each rank's own; reduce: average them; broadcast: copy rank 0's; precise: PreciseBN on each
    rank, then average. Collective for every mode but local.
    """
    layers = [m for _, m in bn_layers(model)]
    if mode == "local" or not layers:
        return
    if mode == "precise":
        precise_bn(model, precise_batches())
    if not _distributed():
        return
    world = dist.get_world_size()
    for m in layers:
        for buffer in (m.running_mean, m.running_var):
            if mode == "broadcast":
                dist.broadcast(buffer, 0)
            else:
                dist.all_reduce(buffer)
                buffer.div_(world)
