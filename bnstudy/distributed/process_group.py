"""Process-group plumbing: torchrun environment, backend choice, rank-0 printing, metric reduction, and a
local launcher that spawns a real gloo group (for tests, benchmarks and notebooks)."""

from __future__ import annotations

import gc
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnstudy.errors import UserError

if TYPE_CHECKING:  # shm_allreduce imports this module
    from bnstudy.distributed.shm_allreduce import ShmAllReduce

# DDP suggests forward_sync_buffers over broadcast_buffers=False, but that still syncs buffers at init, and bnstudy
# needs rank-local BN buffers to show how plain BN's statistics diverge.
warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; a single process is rank 0 of world size 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_backend(device: torch.device) -> str:
    """nccl for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(device: str = "auto") -> DistEnv:
    """Initialise the default process group from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Without them this is a single process and no group is created. ``device`` is "auto", "cpu" or "cuda".
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available here; use --device cpu (or auto)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size == 1:
        return DistEnv(device=dev)
    backend = choose_backend(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if use_cuda else None)
    return DistEnv(rank, local_rank, world_size, backend, dev)


_shutdown_hooks: list[Callable[[], None]] = []


def at_shutdown(hook: Callable[[], None]) -> None:
    """Have :func:`shutdown` call ``hook`` before it destroys the groups. Modules that cache process groups (or
    exchanges over them) drop them there, so that destroying a group frees it, and joins gloo's threads, while the
    interpreter is whole rather than during its finalisation."""
    _shutdown_hooks.append(hook)


def shutdown() -> None:
    """Destroy the default process group if there is one, after every rank got here (a rank that tears its group
    down while a peer still works makes gloo abort)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        for hook in _shutdown_hooks:
            hook()
        # Objects in reference cycles (a DDP wrapper and its reducer can be) would otherwise keep groups and their
        # pending work alive into interpreter finalisation, where a gloo thread releasing a tensor aborts the process.
        gc.collect()
        dist.destroy_process_group()


# What gloo's TCP transport says when the process on the other end of a pair has gone; it raises these as plain
# RuntimeErrors (from DDP's reducer, for one), not always as DistBackendError.
_GLOO_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def is_peer_lost(exc: BaseException) -> bool:
    """True when ``exc`` means another rank of the job died: there is nobody left to part with in order."""
    from bnstudy.distributed.shm_allreduce import PeerLostError

    if isinstance(exc, (PeerLostError, dist.DistBackendError)):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _GLOO_PEER_GONE)


def main_print(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(
    values: list[float] | torch.Tensor, device: torch.device | None = None, exchange: ShmAllReduce | None = None
) -> torch.Tensor:
    """Sum a vector of numbers over all ranks (float64); a no-op without a process group. ``exchange`` (a
    shared-memory all-reduce over all ranks) sums it through shared memory instead of the default group."""
    tensor = torch.as_tensor(values, dtype=torch.float64, device=device)
    if exchange is not None:
        exchange.all_reduce(tensor)
    elif dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_polling(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """In-place sum over ``group``, waiting by polling with ``sched_yield`` rather than blocking.

    A blocked waiter lets its CPU go idle, and on virtual machines waking an idle CPU can cost milliseconds: far
    more than the all-reduce of a few hundred floats. Yielding keeps the core awake and still lets gloo's own
    threads run.
    """
    work = dist.all_reduce(tensor, group=group, async_op=True)
    while not work.is_completed():
        os.sched_yield()
    work.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_worker(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)
    shutdown()  # only after success: a rank whose fn raised must not wait at the barrier for the others


def spawn_gloo(fn: Callable, world_size: int, *args, threads: int = 1) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined in a real gloo group on
    loopback. ``fn`` must be importable (module level). Raises if any rank fails."""
    mp.spawn(_local_worker, args=(world_size, free_port(), threads, fn, args), nprocs=world_size, join=True)
