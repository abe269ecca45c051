"""How the C allocator hands memory back: keep what tensors free inside the process.

Why: glibc's malloc gives each block above its mmap threshold (128 KiB at first, rising to at most 32 MiB as such
blocks are freed) fresh pages of its own from the kernel and unmaps them when the block is freed, and trims the top
of its heap once more than twice that threshold lies free there. A training step frees and allocates the same
activation-sized buffers every step, so every step takes a page fault for each 4 KiB it has just given back. On the
2-vCPU VM the README's measurements come from, one epoch of the width-16 model at 32 images/process took 500-650
thousand minor faults, and 10-20% of its training time went to them; sync BN, whose layers allocate a few more
buffers, lost more than plain BN. Serving every block from the heap (no mmap) and never trimming it keeps freed
blocks for the next step. The price: a process keeps its peak heap until it exits, which a training process reaches
in its first step anyway.

Training processes (the launcher) and the processes ``bnstudy bench syncbn``, ``ddp`` and ``train`` measure in call
:func:`retain_freed_memory` first.
``BNSTUDY_MALLOC=system`` keeps glibc's defaults; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import platform

from bnstudy.errors import env_choice

__all__ = ["MALLOC_ENV", "malloc_setting", "requested_malloc", "retain_freed_memory"]

MALLOC_ENV = "BNSTUDY_MALLOC"
_CHOICES = ("retain", "system")
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4  # how many blocks may have pages of their own; 0: none
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int
_setting = "system"


def requested_malloc() -> str:
    """What ``BNSTUDY_MALLOC`` asks for: "retain" (the default) or "system"; a one-line error for anything else."""
    return env_choice(MALLOC_ENV, _CHOICES, "an allocator setting")


def retain_freed_memory() -> str:
    """Have glibc's malloc keep freed memory in this process (unless ``BNSTUDY_MALLOC=system``), for the rest of its
    life; returns :func:`malloc_setting`. Call it before the first step."""
    global _setting
    if requested_malloc() == "system":
        _setting = "system"
    elif platform.libc_ver()[0] != "glibc":
        _setting = "system (not glibc)"
    else:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        accepted = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
        _setting = "retain" if accepted else "system (mallopt refused)"
    return _setting


def malloc_setting() -> str:
    """How this process's allocator treats freed memory: "retain" after :func:`retain_freed_memory` took effect,
    else "system", with the reason when it was asked to retain and could not."""
    return _setting
