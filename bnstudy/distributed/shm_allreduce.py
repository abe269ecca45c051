"""A same-host shared-memory all-reduce for the small tensors sync BN exchanges on CPU.

Why: sync BN on CPU all-reduces a (world, 1+2C) table in forward and a (2C,) vector in backward, a few hundred
floats. Through gloo on loopback that costs about a millisecond; through shared memory, microseconds.

Protocol. One POSIX shared-memory segment holds, per rank, a control cache line (a 64-bit sequence number and a
size/dtype signature per buffer) and two data rows, one per buffer. For generation ``g`` (the g-th call) every rank
uses buffer ``g % 2``: it writes its tensor into its own row, its signature into its control line, then bumps its
sequence number to ``g``; it spins with ``os.sched_yield`` until every rank's sequence number reaches ``g``, checks
that all signatures agree, and sums the rows in rank order 0..K-1 into its tensor. Every rank performs the same
additions on the same bits in the same order, so all ranks get bitwise identical results.

Buffer reuse. Buffer ``g % 2`` was last read at generation ``g - 2``. A rank publishes generation ``g - 1`` only
after it finished reading generation ``g - 2``, and a rank starts writing generation ``g`` only after it saw every
rank publish ``g - 1``. So the arrival counters double as "done reading" counters for the buffer two generations
back, and no rank ever waits more than once per call. (With a single buffer a fast rank would overwrite its row
while a slow one still reads it; the stress test catches that.)

Memory ordering. The fast path is used only on x86-64, whose memory model (TSO) does not reorder stores with other
stores, loads with other loads, or stores before earlier loads. A rank writes its data, then its signature, then
its sequence number, with ordinary stores through views on the mapping; a reader that sees the new sequence number
therefore sees the data. Each step is a separate C call made by the interpreter, so the C compiler cannot reorder
them either; aligned 8-byte loads and stores of the counters are single instructions, never torn. String copies
and glibc's non-temporal copies end before the next store is issued (glibc fences its non-temporal loop). On
weakly ordered CPUs (ARM, POWER) this would need explicit fences that Python cannot issue, so there every call
goes to the process group.

Two builds. Where sync BN's C++ extension builds (:mod:`bnstudy.distributed.syncbn_kernels`), ``_exchange`` runs
its compiled twin (``ShmExchange`` in ``csrc/syncbn_cpu.cpp``): the same layout, stores and rank-ordered sums, with
a release store to publish and acquire loads to wait, a few microseconds less per call than the interpreter's
steps. The two builds interoperate (a test runs one rank of each); errors are raised here for both.

Lifetime. Rank 0 creates the segment under a unique name (pid and a random token, so two jobs on one host never
collide) and broadcasts the name through the process group; once every rank reports that it attached, rank 0
unlinks the name. The mappings live on until the processes exit, so nothing is left in /dev/shm after a normal
exit, an exception or a SIGKILL (a SIGKILL of rank 0 during construction is the only window). Python's
``multiprocessing.shared_memory`` is avoided: its resource tracker may unlink or warn about segments other
processes created, and ``track=False`` needs Python 3.13.
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import socket
import struct
import time
import warnings
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.autograd.profiler as _autograd_profiler
import torch.distributed as dist
from torch import Tensor

from bnstudy.distributed.process_group import all_reduce_polling
from bnstudy.distributed.syncbn_kernels import cpu_kernels

try:
    import _posixshmem
except ImportError:  # not a POSIX system
    _posixshmem = None

__all__ = [
    "DEFAULT_MAX_NUMEL",
    "DEFAULT_TIMEOUT_S",
    "SHM_NAME_PREFIX",
    "WAIT_LABEL",
    "PeerLostError",
    "ShmAllReduce",
    "fast_path_supported",
    "host_identity",
    "ranks_share_host",
]

# Segment names are "/" + SHM_NAME_PREFIX + "<pid>-<random token>"; they appear in /dev/shm only during setup.
SHM_NAME_PREFIX = "bnstudy-allreduce-"
# 64Ki elements: a (16, 1+2*2048) forward table fits; at float64 a row is 512 KiB, the segment 2 * world rows.
DEFAULT_MAX_NUMEL = 1 << 16
# Well under torchrun's and gloo's own timeouts, so a dead peer is named here first.
DEFAULT_TIMEOUT_S = 60.0
# The profiler label of the time a rank spends waiting for the others to arrive, inside any exchange: what lockstep
# costs, apart from the exchange itself (through gloo the two cannot be told apart).
WAIT_LABEL = "bnstudy.shm.wait_for_ranks"

_X86_64 = ("x86_64", "AMD64")
_LINE = 128  # bytes per control line: two cache lines, so the adjacent-line prefetcher causes no false sharing
_WORDS = _LINE // 8
_MAGIC = 0x626E7374756479  # "bnstudy"
_VERSION = 1
# Signature: numel * 256 + a dtype id, identical across ranks for the same torch build.
_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
_DTYPE_ID = {dtype: i + 1 for i, dtype in enumerate(_DTYPES)}
_DTYPE_BY_ID = {i: dtype for dtype, i in _DTYPE_ID.items()}
_F32 = _DTYPE_ID[torch.float32]
_F64 = _DTYPE_ID[torch.float64]
_HOST_ID_ENV = "BNSTUDY_HOST_ID"
# torch's own cheap "is a profiler running" flag; should a release drop it, label every call.
_ALWAYS_LABEL = not hasattr(_autograd_profiler, "_is_profiler_enabled")

# Sums that overflow to inf (a diverged run) stay silent, as they are through gloo; np.errstate per call would cost
# more than the copy and the sum together.
warnings.filterwarnings("ignore", r"(overflow|invalid value) encountered in add", RuntimeWarning, __name__)


def _profiler_label(label: str | None) -> AbstractContextManager:
    """``record_function(label)`` while a profiler runs, else (or with no label) nothing: entering
    ``record_function`` costs about 10 µs even with no profiler running, as much as an exchange."""
    if label and (_ALWAYS_LABEL or _autograd_profiler._is_profiler_enabled):
        return torch.profiler.record_function(label)
    return nullcontext()


def fast_path_supported() -> bool:
    """Whether this machine gets the shared-memory path: x86-64 (total store order) with POSIX shared memory."""
    return platform.machine() in _X86_64 and _posixshmem is not None


def host_identity() -> str:
    """This process's host as far as shared memory is concerned: hostname, kernel boot id and the /dev/shm file
    system (containers on one host with private /dev/shm mounts differ). ``BNSTUDY_HOST_ID`` overrides it."""
    override = os.environ.get(_HOST_ID_ENV)
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = "?"
    try:
        st = os.stat("/dev/shm")
        shm = f"{st.st_dev}:{st.st_ino}"
    except OSError:
        shm = "?"
    return f"{socket.gethostname()}/{boot_id}/{shm}"


def ranks_share_host(group: dist.ProcessGroup | None = None) -> bool:
    """Whether every rank of ``group`` runs on this host (and sees the same /dev/shm), so the shared-memory
    transport can serve it. A collective: every rank must call it. True without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return True
    identities: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(identities, host_identity(), group=group)
    return len(set(identities)) == 1


def _describe(signature: int) -> str:
    dtype = _DTYPE_BY_ID.get(signature & 0xFF)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "unknown dtype"
    return f"{name}[{signature >> 8}]"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class PeerLostError(RuntimeError):
    """A rank did not reach a shared-memory exchange in time: it died, hangs, or runs a different number of steps."""


class ShmAllReduce:
    """In-place sum over the ranks of ``group`` (all on one host) through shared memory.

    float32/float64 CPU tensors of at most ``max_numel`` elements take the shared-memory path; other tensors, and
    every tensor on CPUs without total store order, go to ``dist.all_reduce`` on ``group`` (after a size check
    through shared memory where there is one). Construction is a collective; so is every :meth:`all_reduce`, which
    all ranks must call in the same order with the same numel and dtype. A rank that does not arrive within
    ``timeout_s`` seconds is named in a :class:`PeerLostError`, after which this object is unusable. While a
    profiler runs, each call is labelled ``label`` (when given), and the time it waits for other ranks
    :data:`WAIT_LABEL`. Not thread-safe: one thread per process calls it, as sync BN does.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        max_numel: int = DEFAULT_MAX_NUMEL,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        label: str | None = None,
    ) -> None:
        if max_numel < 1:
            raise ValueError(f"max_numel must be positive, got {max_numel}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.max_numel = int(max_numel)
        self.timeout_s = float(timeout_s)
        self.label = label
        self.name: str | None = None
        self._generation = 0
        self._failure: str | None = None
        self._mm: mmap.mmap | None = None
        self._ctrl: memoryview | None = None
        self._compiled = self._base = None
        if self.world_size > 1 and fast_path_supported():
            self._setup()

    @property
    def build(self) -> str:
        """Which build of the exchange runs: "compiled" (with sync BN's compiled kernels) or "python"."""
        return "python" if self._compiled is None else "compiled"

    @property
    def uses_shared_memory(self) -> bool:
        """Whether small float tensors go through shared memory (else everything goes to the process group)."""
        return self._mm is not None

    # ----------------------------------------------------------------------------------------------- setup
    def _layout(self) -> tuple[int, int, int]:
        ctrl_bytes = _LINE * (1 + self.world_size)  # a header line, then one control line per rank
        row_bytes = _round_up(self.max_numel * 8, _LINE)
        data_offset = _round_up(ctrl_bytes, mmap.PAGESIZE)
        return data_offset, row_bytes, data_offset + 2 * self.world_size * row_bytes

    def _setup(self) -> None:
        data_offset, row_bytes, size = self._layout()
        error: str | None = None
        name: str | None = None
        try:
            if self.rank == 0:
                name = f"/{SHM_NAME_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
                try:
                    self._mm = self._create(name, size)
                except OSError as exc:  # the finally below still unlinks whatever was created
                    error = f"could not create {name} ({size} bytes) in /dev/shm: {exc}"
            payload: list[object] = [name, self.max_numel, error]
            dist.broadcast_object_list(payload, group_src=0, group=self.group)
            name, max_numel_0, error_0 = payload
            if self.rank != 0:
                if error_0 is not None:
                    error = "rank 0 failed"
                elif max_numel_0 != self.max_numel:
                    error = f"max_numel {self.max_numel} differs from rank 0's {max_numel_0}"
                else:
                    try:
                        self._mm = self._attach(name, size)
                    except (OSError, ValueError) as exc:
                        error = f"could not attach {name}: {exc} (is every rank on this host, sharing /dev/shm?)"
            # Doubles as the barrier after which nobody needs the name any more.
            errors: list[str | None] = [None] * self.world_size
            dist.all_gather_object(errors, error, group=self.group)
        finally:
            if self.rank == 0 and name is not None:
                try:
                    _posixshmem.shm_unlink(name)
                except FileNotFoundError:
                    pass
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            self.close()
            detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
            raise RuntimeError(f"shared-memory all-reduce setup failed: {detail}")
        self.name = name
        self._make_views(data_offset, row_bytes)

    def _create(self, name: str, size: int) -> mmap.mmap:
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            # Reserve the pages now: on a full tmpfs a bare ftruncate succeeds and the first write is a SIGBUS.
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        struct.pack_into("4q", mm, 0, *self._header())
        return mm

    def _header(self) -> tuple[int, int, int, int]:
        return (_MAGIC, _VERSION, self.world_size, self.max_numel)

    def _attach(self, name: str, size: int) -> mmap.mmap:
        fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0o600)
        try:
            if os.fstat(fd).st_size != size:
                raise ValueError(f"segment has {os.fstat(fd).st_size} bytes, expected {size}")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        found = struct.unpack_from("4q", mm, 0)
        if found != self._header():
            mm.close()
            raise ValueError(f"unexpected segment header {found}")
        return mm

    def _make_views(self, data_offset: int, row_bytes: int) -> None:
        mm = self._mm
        k = self.world_size
        self._ctrl = memoryview(mm)[:data_offset].cast("q")
        self._seq_words = tuple(_WORDS * (1 + j) for j in range(k))
        # _sig_words[parity] lists every rank's signature word for that buffer.
        self._sig_words = tuple(tuple(_WORDS * (1 + j) + 1 + parity for j in range(k)) for parity in (0, 1))
        kernels = cpu_kernels()
        if kernels.name == "compiled":  # the compiled build of _exchange, on the same segment
            self._base = np.frombuffer(mm, np.uint8, count=1)  # the mapping's address, held until close()
            self._compiled = kernels.functions.ShmExchange(
                self._base.ctypes.data, self.rank, k, _WORDS, data_offset, row_bytes, self.timeout_s, WAIT_LABEL
            )
        # _rows[dtype id][parity][rank]: full-length 1-D views; calls slice them to the tensor's numel.
        self._rows = {
            code: tuple(
                tuple(
                    np.frombuffer(mm, dtype, count=self.max_numel, offset=data_offset + (parity * k + j) * row_bytes)
                    for j in range(k)
                )
                for parity in (0, 1)
            )
            for code, dtype in ((_F32, np.float32), (_F64, np.float64))
        }

    def close(self) -> None:
        """Unmap the segment (the process group is left alone). Further calls raise."""
        self._failure = self._failure or "shared-memory all-reduce: used after close()"
        self._rows = {}
        self._compiled = self._base = None
        try:
            if self._ctrl is not None:
                self._ctrl.release()
            if self._mm is not None:
                self._mm.close()
        except BufferError:  # a traceback still holds a row view: the mapping goes when that does, or at exit
            pass
        self._ctrl = None
        self._mm = None

    def __enter__(self) -> ShmAllReduce:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- exchange
    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over all ranks, in place (rank order, bitwise identical on every rank); returns it.

        While a profiler runs, the call is labelled ``self.label``."""
        with _profiler_label(self.label):
            self._all_reduce(tensor)
        return tensor

    def _all_reduce(self, tensor: Tensor) -> None:
        if self._failure is not None:
            raise PeerLostError(self._failure)
        if self.world_size == 1:
            return
        if self._mm is None:
            self._process_group_all_reduce(tensor)
            return
        n = tensor.numel()
        dtype = tensor.dtype
        code = _F32 if dtype is torch.float32 else _F64 if dtype is torch.float64 else 0
        if code == 0 or n > self.max_numel or not tensor.is_cpu or tensor.layout is not torch.strided:
            # Even here the sizes are compared first: a rank whose tensor fits would otherwise spin in shared
            # memory while its peer waits inside gloo.
            self._exchange(None, n * 256 + _DTYPE_ID.get(dtype, 0))
            self._process_group_all_reduce(tensor)
            return
        if tensor.requires_grad:
            tensor = tensor.detach()
        work = tensor if tensor.is_contiguous() else tensor.contiguous()
        self._exchange(work, n * 256 + code)
        if work is not tensor:
            tensor.copy_(work)

    def _exchange(self, tensor: Tensor | None, signature: int) -> None:
        """One generation of the protocol; sums into ``tensor`` (contiguous; None: compare signatures only), in
        the compiled build where there is one."""
        g = self._generation + 1
        parity = g & 1
        if self._compiled is not None:
            self._generation = g
            status = self._compiled.exchange(tensor, signature, g)
            if status == 1:
                self._lost(g, self._compiled.late_ranks())
            elif status == 2:
                self._mismatch(parity)
            return
        flat = None if tensor is None else tensor.numpy().ravel()
        rank = self.rank
        ctrl = self._ctrl
        if flat is not None:
            n = signature >> 8
            rows = self._rows[signature & 0xFF][parity]
            rows[rank][:n] = flat
        ctrl[self._sig_words[parity][rank]] = signature
        ctrl[self._seq_words[rank]] = g  # publish: ordered after the stores above (TSO)
        self._generation = g
        for word in self._seq_words:
            if ctrl[word] < g:
                self._spin(g)
                break
        for word in self._sig_words[parity]:
            if ctrl[word] != signature:
                self._mismatch(parity)
        if flat is not None:
            np.add(rows[0][:n], rows[1][:n], out=flat)
            for j in range(2, self.world_size):
                np.add(flat, rows[j][:n], out=flat)

    def _spin(self, g: int) -> None:
        with _profiler_label(WAIT_LABEL):
            self._spin_until(g)

    def _spin_until(self, g: int) -> None:
        ctrl = self._ctrl
        words = self._seq_words
        deadline = time.monotonic() + self.timeout_s
        while True:
            os.sched_yield()
            for word in words:
                if ctrl[word] < g:
                    break
            else:
                return
            if time.monotonic() > deadline:
                late = [j for j, word in enumerate(words) if ctrl[word] < g]
                if late:
                    self._lost(g, late)
                return

    def _lost(self, g: int, late: list[int]) -> None:
        who = f"rank {late[0]}" if len(late) == 1 else "ranks " + ", ".join(map(str, late))
        self._failure = (
            f"shared-memory all-reduce: {who} did not arrive within {self.timeout_s:g} s (it may have died, "
            f"or the ranks called all_reduce a different number of times); generation {g}, rank {self.rank}"
        )
        raise PeerLostError(self._failure)

    def _mismatch(self, parity: int) -> None:
        found = ", ".join(f"rank {j}: {_describe(self._ctrl[w])}" for j, w in enumerate(self._sig_words[parity]))
        raise RuntimeError(
            f"shared-memory all-reduce: ranks reached the exchange with different tensors ({found}); "
            "every rank must reduce the same numel and dtype"
        )

    def _process_group_all_reduce(self, tensor: Tensor) -> None:
        all_reduce_polling(tensor, self.group)
