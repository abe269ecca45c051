"""The collectives sync BN issues, over the transport chosen for its group, and the profiler label they carry
(trace attribution imports it from here, so a renamed label cannot silently stop counting as BN synchronisation).

Transports on CPU: ``shm`` (a shared-memory exchange, :mod:`bnstudy.distributed.shm_allreduce`) when every rank of
the group runs on this host on x86-64, else ``gloo``. ``BNSTUDY_SYNCBN_TRANSPORT=auto|shm|gloo`` forces a choice;
``BNSTUDY_SYNCBN_TIMEOUT_S`` sets how long a shared-memory exchange (sync BN's, and DDP's gradients', see
:mod:`bnstudy.distributed.ddp_gradients`) waits for a late rank (default 60 s). On CUDA, sync BN runs PyTorch's own
kernels over the group's backend (nccl).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from bnstudy.distributed.process_group import all_reduce_polling, at_shutdown
from bnstudy.distributed.shm_allreduce import (
    DEFAULT_MAX_NUMEL,
    DEFAULT_TIMEOUT_S,
    ShmAllReduce,
    fast_path_supported,
    ranks_share_host,
)
from bnstudy.errors import UserError, env_choice

# Any record_function label starting with this counts as BN synchronisation in trace attribution.
SYNCBN_LABEL_PREFIX = "bnstudy.syncbn."
SYNCBN_ALL_REDUCE = SYNCBN_LABEL_PREFIX + "all_reduce"

TRANSPORT_ENV = "BNSTUDY_SYNCBN_TRANSPORT"
TIMEOUT_ENV = "BNSTUDY_SYNCBN_TIMEOUT_S"
TRANSPORTS = ("auto", "shm", "gloo")


def requested_transport() -> str:
    """The transport ``BNSTUDY_SYNCBN_TRANSPORT`` asks for (default auto); a one-line error for anything else."""
    return env_choice(TRANSPORT_ENV, TRANSPORTS, "a transport")


def requested_timeout_s() -> float:
    """How long a shared-memory exchange waits for the other ranks, ``BNSTUDY_SYNCBN_TIMEOUT_S`` (default 60 s); a
    one-line error for anything but a positive number."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


_transports: dict[dist.ProcessGroup, ShmAllReduce | None] = {}


def local_transports() -> tuple[str, ...]:
    """The transports a gloo group of processes on this host can use: gloo, and shm on x86-64."""
    return ("gloo", "shm") if fast_path_supported() else ("gloo",)


def select_transport(group: dist.ProcessGroup, requested: str | None = None) -> str:
    """Choose (once per group; a collective, so every rank calls it) and return the name of the transport sync BN's
    all-reduces use on ``group``: "shm", "gloo", or the group's backend when it is not gloo. ``requested``
    (auto | shm | gloo) overrides ``BNSTUDY_SYNCBN_TRANSPORT``."""
    backend = dist.get_backend(group)
    if backend != "gloo":
        return backend
    if group not in _transports:
        _transports[group] = shared_memory_exchange(
            group, requested or requested_transport(), TRANSPORT_ENV, label=SYNCBN_ALL_REDUCE
        )
    return "gloo" if _transports[group] is None else "shm"


def shared_memory_exchange(
    group: dist.ProcessGroup, requested: str, env_name: str, label: str, max_numel: int = DEFAULT_MAX_NUMEL
) -> ShmAllReduce | None:
    """A shared-memory all-reduce over ``group`` (a gloo group; a collective, so every rank calls it) unless
    ``requested`` (auto | shm | gloo, named by ``env_name`` in errors) is gloo or the ranks or CPU cannot share
    memory, then None."""
    timeout_s = requested_timeout_s()
    use_shm = requested != "gloo" and fast_path_supported() and ranks_share_host(group)
    if requested == "shm" and not use_shm:
        why = "this CPU is not x86-64" if not fast_path_supported() else "the ranks are not all on this host"
        raise UserError(f"{env_name}=shm but {why}; use {env_name}=auto or gloo")
    return ShmAllReduce(group, max_numel=max_numel, timeout_s=timeout_s, label=label) if use_shm else None


_exchanges: dict[dist.ProcessGroup, Callable[[Tensor], object]] = {}


def syncbn_exchange(group: dist.ProcessGroup) -> Callable[[Tensor], object]:
    """The in-place sum over ``group`` that sync BN's collectives use, over the group's transport (chosen on first
    use; a collective then). One callable per group, so the compiled layer can hold it across forward and
    backward."""
    exchange = _exchanges.get(group)
    if exchange is None:
        select_transport(group)
        transport = _transports.get(group)
        exchange = (
            transport.all_reduce if transport is not None else functools.partial(_labelled_all_reduce, group=group)
        )
        _exchanges[group] = exchange
    return exchange


def _labelled_all_reduce(tensor: Tensor, group: dist.ProcessGroup) -> None:
    with torch.profiler.record_function(SYNCBN_ALL_REDUCE):
        all_reduce_polling(tensor, group)


_syncbn_groups: dict[object, dist.ProcessGroup] = {}


def close_exchanges(cache: dict[object, ShmAllReduce | None]) -> None:
    """Close every shared-memory exchange in ``cache`` and empty it (at shutdown, see ``process_group.at_shutdown``)."""
    for exchange in cache.values():
        if exchange is not None:
            exchange.close()
    cache.clear()


def _forget_groups() -> None:
    close_exchanges(_transports)
    _exchanges.clear()
    _syncbn_groups.clear()


at_shutdown(_forget_groups)


def world_group_for_syncbn() -> dist.ProcessGroup:
    """A second group over all ranks, created once per default group.

    Gloo runs a group's collectives in order, so on the default group a sync-BN all-reduce in backward would
    wait behind DDP's gradient buckets queued before it; its own group lets the two overlap.
    """
    world = dist.group.WORLD
    if world not in _syncbn_groups:
        _syncbn_groups[world] = dist.new_group(backend=dist.get_backend(world))
    return _syncbn_groups[world]
