"""DistributedDataParallel for bnstudy's models, its gradient all-reduce through shared memory when it can.

Why: DDP's default hook sums each gradient bucket through gloo (TCP on loopback) on gloo's own threads. On a CPU
with no core to spare those threads preempt the ranks' training threads at random: measured with 2 ranks × 1
thread on 2 cores (the default model, 8 images per rank), a plain-BN step took 52 ms with gloo's gradient
all-reduce against 44 ms with none at all, and the preemptions are most of what sync BN's ranks then wait for at
its rendezvous. When every rank runs on this host on x86-64, :func:`wrap_ddp` registers a comm hook that averages
each bucket through the same shared-memory exchange sync BN uses (:mod:`bnstudy.distributed.shm_allreduce`),
synchronously on the thread running backward, a chunk at a time; every rank gets bitwise identical gradients.
``BNSTUDY_DDP_TRANSPORT=auto|shm|gloo`` forces a choice; CUDA models and other backends keep DDP's own hook.
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations as objects, not strings.
import functools

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bnstudy.distributed.collectives import TRANSPORTS, close_exchanges, shared_memory_exchange
from bnstudy.distributed.process_group import at_shutdown
from bnstudy.distributed.shm_allreduce import DEFAULT_MAX_NUMEL, ShmAllReduce
from bnstudy.errors import env_choice

__all__ = [
    "DDP_ALL_REDUCE",
    "DDP_TRANSPORT_ENV",
    "gradient_transport",
    "metrics_exchange",
    "requested_ddp_transport",
    "shared_memory_gradient_hook",
    "wrap_ddp",
]

DDP_TRANSPORT_ENV = "BNSTUDY_DDP_TRANSPORT"
# The profiler label of each chunk's exchange; trace attribution counts it as DDP's gradient all-reduce.
DDP_ALL_REDUCE = "bnstudy.ddp.all_reduce"
# The per-step metrics' exchange; trace attribution leaves it under "other", where gloo's was.
METRICS_ALL_REDUCE = "bnstudy.metrics.all_reduce"
# 256Ki elements a chunk (1 MiB of float32): a bucket of the default model is a few chunks, and a chunk's rows stay
# in cache while they are summed.
CHUNK_NUMEL = 1 << 18

_exchanges: dict[tuple[dist.ProcessGroup, str, str], ShmAllReduce | None] = {}
at_shutdown(functools.partial(close_exchanges, _exchanges))


def requested_ddp_transport() -> str:
    """The transport ``BNSTUDY_DDP_TRANSPORT`` asks for (default auto); a one-line error for anything else."""
    return env_choice(DDP_TRANSPORT_ENV, TRANSPORTS, "a transport")


def wrap_ddp(
    model: nn.Module, device: torch.device | None = None, requested: str | None = None
) -> tuple[DistributedDataParallel, str]:
    """``model`` in DDP with rank-local BN buffers (``broadcast_buffers=False``: bnstudy shows how plain BN's
    statistics diverge), and the name of the transport its gradients travel by (see :func:`gradient_transport`).
    A collective: every rank calls it."""
    transport = gradient_transport(device, requested)
    on_cuda = device is not None and device.type == "cuda"
    ddp = DistributedDataParallel(model, device_ids=[device] if on_cuda else None, broadcast_buffers=False)
    if transport == "shm":
        ddp.register_comm_hook(_gradient_exchange(requested), shared_memory_gradient_hook)
    return ddp, transport


def gradient_transport(device: torch.device | None = None, requested: str | None = None) -> str:
    """How DDP's gradients travel for a model on ``device``: "shm", "gloo", or the default group's backend. Chosen
    once per process group and request (a collective, so every rank calls it); ``requested`` (auto | shm | gloo)
    overrides ``BNSTUDY_DDP_TRANSPORT``."""
    backend = dist.get_backend()
    if backend != "gloo" or (device is not None and device.type == "cuda"):
        return backend
    return "gloo" if _gradient_exchange(requested) is None else "shm"


def _gradient_exchange(requested: str | None) -> ShmAllReduce | None:
    return _world_exchange(requested or requested_ddp_transport(), DDP_ALL_REDUCE, CHUNK_NUMEL)


def metrics_exchange() -> ShmAllReduce | None:
    """A shared-memory all-reduce over all ranks for a training loop's per-step metrics (loss, accuracy), for runs
    whose gradients travel through shared memory (:func:`wrap_ddp` said "shm"): through gloo that sum of 3 numbers
    costs 1–2 ms a step, a sixth of a small-batch step here. A collective: every rank calls it."""
    return _world_exchange("shm", METRICS_ALL_REDUCE, DEFAULT_MAX_NUMEL)


def _world_exchange(requested: str, label: str, max_numel: int) -> ShmAllReduce | None:
    """The shared-memory exchange over all ranks labelled ``label``, made on first use (None where ``requested``
    or the machine rules shared memory out)."""
    key = (dist.group.WORLD, requested, label)
    if key not in _exchanges:
        _exchanges[key] = shared_memory_exchange(
            dist.group.WORLD, requested, DDP_TRANSPORT_ENV, label=label, max_numel=max_numel
        )
    return _exchanges[key]


def shared_memory_gradient_hook(exchange: ShmAllReduce, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP comm hook: the bucket averaged over ranks through ``exchange``, chunk by chunk, before it returns
    (divided first, as DDP's own hook does)."""
    buffer = bucket.buffer()
    buffer.div_(exchange.world_size)
    for chunk in buffer.split(exchange.max_numel):
        exchange.all_reduce(chunk)
    future: torch.futures.Future[Tensor] = torch.futures.Future()
    future.set_result(buffer)
    return future
