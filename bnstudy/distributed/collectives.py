"""The collectives sync BN issues, and the profiler labels they carry (trace attribution imports them from here,
so a renamed label cannot silently stop counting as BN synchronisation)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

# Any record_function label starting with this counts as BN synchronisation in trace attribution.
SYNCBN_LABEL_PREFIX = "bnstudy.syncbn."
SYNCBN_ALL_REDUCE = SYNCBN_LABEL_PREFIX + "all_reduce"


def all_reduce_polling(tensor: Tensor, group: dist.ProcessGroup) -> None:
    """In-place sum over ``group``, waiting by polling with ``sched_yield`` rather than blocking.

    A blocked waiter lets its CPU go idle, and on virtual machines waking an idle CPU can cost milliseconds: far
    more than the all-reduce of a few hundred floats. Yielding keeps the core awake and still lets gloo's own
    threads run.
    """
    with torch.profiler.record_function(SYNCBN_ALL_REDUCE):
        work = dist.all_reduce(tensor, group=group, async_op=True)
        while not work.is_completed():
            os.sched_yield()
        work.wait()


_syncbn_groups: dict[object, dist.ProcessGroup] = {}


def world_group_for_syncbn() -> dist.ProcessGroup:
    """A second group over all ranks, created once per default group.

    Gloo runs a group's collectives in order, so on the default group a sync-BN all-reduce in backward would
    wait behind DDP's gradient buckets queued before it; its own group lets the two overlap.
    """
    world = dist.group.WORLD
    if world not in _syncbn_groups:
        _syncbn_groups[world] = dist.new_group(backend=dist.get_backend(world))
    return _syncbn_groups[world]
