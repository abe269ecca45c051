"""Timed training steps on a synthetic CIFAR-shaped batch, shared by the training benchmarks."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bnstudy.precision import Precision


def training_step_times(
    model: nn.Module, batch: int, steps: int, warmup: int = 2, precision: Precision | None = None
) -> list[float]:
    """Seconds per SGD step (forward, backward, update) of ``model`` in channels_last, after ``warmup`` steps, with
    the forward pass under ``precision``'s autocast (float32 when None).

    Under an initialised process group the model is wrapped in DDP (``broadcast_buffers=False``) and every step
    starts at a barrier, so each rank times the same step."""
    model = model.to(memory_format=torch.channels_last)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    net = DistributedDataParallel(model, broadcast_buffers=False) if distributed else model
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(warmup + steps):
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        with precision.autocast() if precision else nullcontext():
            loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def images_per_s(model: nn.Module, batch: int, steps: int, precision: Precision | None = None) -> float:
    """Training throughput of one process over ``steps`` timed steps of ``batch`` images."""
    return batch * steps / sum(training_step_times(model, batch, steps, precision=precision))
