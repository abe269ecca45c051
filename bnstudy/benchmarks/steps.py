"""Timed training steps on a synthetic CIFAR-shaped batch, shared by the training benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from bnstudy.distributed.ddp_gradients import wrap_ddp
from bnstudy.precision import Precision


def timed_training_step(
    model: nn.Module, batch: int, warmup: int = 2, precision: Precision | None = None, ddp_transport: str | None = None
) -> Callable[[], float]:
    """A function that runs one SGD step (forward, backward, update) of ``model`` in channels_last and returns its
    seconds, with the forward pass under ``precision``'s autocast (float32 when None); ``warmup`` steps run first.

    Each model keeps its own optimizer and batch, so steps of several models can be interleaved one by one. Under an
    initialised process group the model is wrapped in DDP (:func:`~bnstudy.distributed.ddp_gradients.wrap_ddp`, its
    gradients over ``ddp_transport``: auto | shm | gloo, by default ``BNSTUDY_DDP_TRANSPORT``'s) and every step
    starts at a barrier, so each rank times the same step."""
    model = model.to(memory_format=torch.channels_last)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    net = wrap_ddp(model, requested=ddp_transport)[0] if distributed else model
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step() -> float:
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        with precision.autocast() if precision else nullcontext():
            loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    return step


def images_per_s(
    model: nn.Module, batch: int, steps: int, precision: Precision | None = None, ddp_transport: str | None = None
) -> float:
    """Training throughput of one process over ``steps`` timed steps of ``batch`` images."""
    step = timed_training_step(model, batch, precision=precision, ddp_transport=ddp_transport)
    return batch * steps / sum(step() for _ in range(steps))
