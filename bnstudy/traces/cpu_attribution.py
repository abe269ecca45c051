"""CPU attribution: which category each moment of a CPU thread belongs to (BN forward, BN backward, BN
synchronisation, convolution/linear, casts/conversions, DDP gradient all-reduce, waiting for other ranks, optimizer,
data loading, other), and a step's CPU time across the threads that ran it.

Rules:
- Events nest by time on each thread. An event's category is that of its outermost categorised ancestor (so
  ``aten::native_batch_norm`` inside ``aten::batch_norm`` counts once), with two exceptions: a collective issued
  inside a BN event is BN synchronisation (plain BN issues none; sync BN's forward and backward do), and a
  conversion (``aten::to``/``_to_copy``) inside a convolution/linear event is a cast (under autocast,
  ``aten::conv2d`` first casts its input and weight to bf16/fp16: the price of mixed precision, not of the
  convolution; fp32 steps have a few too, e.g. layout copies in convolution backward). Other collectives are
  DDP's when launched inside autograd (DDP's gradient hooks) or DDP's forward, else "other"
  (a loop's metric all-reduce, a barrier).
- Each event's self time (its duration minus its children's) goes to its category, "other" when it has none. The
  self times of a thread's events partition the time they cover.
- A shared-memory exchange's wait for the other ranks to arrive (``bnstudy.shm.wait_for_ranks``, inside sync BN's,
  DDP's or the metrics' exchanges) is "waiting for other ranks": the price of lockstep, which the exchange itself
  does not set (a rank that waits there was simply faster since the last rendezvous).
- Blocking on a gloo collective shows up as self time of whatever encloses the collective's launch (gloo runs it on a
  worker thread; the launching thread waits in ``work.wait()``, which records no event). Self time of an event
  that overlaps a collective launched inside it, up to the end of the matching worker-thread event, goes to that
  collective's category: sync BN's waits are BN synchronisation, DDP's wait for its buckets is DDP all-reduce.
- A step is the main thread's ``ProfilerStep#N`` window (the thread with the most such events; without any, the
  whole trace is one window). Its time is the main thread's partition of the window, except where the main
  thread has nothing categorised to do (waiting in ``loss.backward()``, say) and an autograd engine thread of the
  same process (on GPUs, backward runs there; torch 1.9 names its events after the node, later versions
  ``autograd::engine::evaluate_function: …``) runs an event: that time goes to the autograd thread's event and
  its category (categorised work wins where several autograd threads overlap). So the categories still add up to
  the step's wall time, and backward on GPU is BN backward, convolution, DDP, … instead of "other".
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bnstudy.distributed.collectives import SYNCBN_LABEL_PREFIX
from bnstudy.distributed.ddp_gradients import DDP_ALL_REDUCE
from bnstudy.distributed.shm_allreduce import WAIT_LABEL
from bnstudy.traces.record import DATA_LOADING, OPTIMIZER_STEP
from bnstudy.traces.trace_events import Event, Point

BN_FORWARD = "bn_forward"
BN_BACKWARD = "bn_backward"
BN_SYNC = "bn_sync"
CONV_LINEAR = "conv_linear"
CAST = "cast"
DDP_ALLREDUCE = "ddp_allreduce"
RANK_WAIT = "rank_wait"
OPTIMIZER = "optimizer"
DATA = "data_loading"
OTHER = "other"
CATEGORY_LABELS = {
    BN_FORWARD: "BN forward",
    BN_BACKWARD: "BN backward",
    BN_SYNC: "BN synchronisation",
    CONV_LINEAR: "convolution/linear",
    CAST: "casts/conversions",
    DDP_ALLREDUCE: "DDP gradient all-reduce",
    RANK_WAIT: "waiting for other ranks",
    OPTIMIZER: "optimizer",
    DATA: "data loading",
    OTHER: "other",
}

# ---------------------------------------------------------------- classifying events

AUTOGRAD_PREFIX = "autograd::engine::evaluate_function: "
_BN_BACKWARD = re.compile(r"batch_?norm.*backward", re.IGNORECASE)
_BN = re.compile(r"batch_?norm", re.IGNORECASE)
_CONV_LINEAR = re.compile(
    r"^aten::(\w*conv(?!ert)\w*|linear|addmm|_addmm_activation|mm|bmm|baddbmm|matmul)$"
    r"|^\w*(Convolution|Addmm|Mm|Bmm|Linear)Backward\d*$"
)
# dtype conversions: autocast's (``aten::to`` → ``aten::_to_copy``, and their backward), oneDNN's layout reorders
_CAST = re.compile(
    r"^aten::(to|_to_copy|_autocast_to_(reduced|full)_precision|to_mkldnn|to_dense|mkldnn_reorder_\w+)$"
    r"|^ToCopyBackward\d*$"
)
_COLLECTIVE = re.compile(r"^(c10d::|gloo:|nccl:)|^record_param_comms$")
_DDP_REDUCER = re.compile(r"reducer::")
_OPTIMIZER = re.compile(r"^Optimizer\.(step|zero_grad)#")
_DATA = re.compile(r"^enumerate\(DataLoader\)#")
STEP_MARKER = re.compile(r"^ProfilerStep#\d+$")
# What the autograd engine records for a node it runs: "autograd::engine::evaluate_function: MulBackward0" since torch
# 1.10, the bare node name ("CudnnBatchNormBackward", "torch::autograd::AccumulateGrad") on torch 1.9.
_AUTOGRAD_NODE = re.compile(
    r"^(autograd::engine::evaluate_function: .*|\w*Backward\d*|torch::autograd::AccumulateGrad)$"
)


def is_collective(name: str) -> bool:
    """Whether an event launches (or, on a worker thread, runs) a communication collective."""
    return bool(_COLLECTIVE.search(name)) or name.startswith(SYNCBN_LABEL_PREFIX)


def is_autograd_node(name: str) -> bool:
    """Whether the autograd engine recorded this event for a node it ran (in backward)."""
    return bool(_AUTOGRAD_NODE.match(name))


def opens_ddp_scope(name: str) -> bool:
    """Whether collectives launched inside this event are DDP's: its gradient all-reduces start from autograd
    hooks during backward, its buffer broadcasts from its forward."""
    return is_autograd_node(name) or name.startswith("DistributedDataParallel.")


def classify(name: str, enclosing: str | None, in_ddp_scope: bool = False) -> str | None:
    """The category of an event named ``name`` inside events of category ``enclosing`` (None: uncategorised),
    ``in_ddp_scope`` when an enclosing event opens one; None when nothing says anything."""
    base = name.removeprefix(AUTOGRAD_PREFIX)
    if base == WAIT_LABEL:
        return RANK_WAIT
    if base == DDP_ALL_REDUCE:  # bnstudy's shared-memory gradient hook, wherever backward runs it
        return DDP_ALLREDUCE
    if enclosing in (BN_FORWARD, BN_BACKWARD):
        return BN_SYNC if is_collective(base) else enclosing
    if enclosing == CONV_LINEAR and _CAST.search(base):
        return CAST
    if enclosing is not None:
        return enclosing
    if base.startswith(SYNCBN_LABEL_PREFIX):
        return BN_SYNC
    if _BN_BACKWARD.search(base):
        return BN_BACKWARD
    if _BN.search(base):
        return BN_FORWARD
    if _CONV_LINEAR.search(base):
        return CONV_LINEAR
    if _CAST.search(base):
        return CAST
    if (in_ddp_scope and is_collective(base)) or _DDP_REDUCER.search(base):
        return DDP_ALLREDUCE
    if base == OPTIMIZER_STEP or _OPTIMIZER.search(base):
        return OPTIMIZER
    if base == DATA_LOADING or _DATA.search(base):
        return DATA
    return None


# ---------------------------------------------------------------- event trees on one thread


@dataclass(eq=False, slots=True)
class _Op:
    name: str
    start: float
    end: float
    dims: Any = None  # recorded input dims, to pair a launched collective with the worker event that ran it
    children: list[_Op] = field(default_factory=list)
    wait_end: float | None = None  # for a launched collective: when the worker thread finished running it
    category: str | None = None  # after classification: its own or its outermost categorised ancestor's


# (start, end, category, operator name); the name is None for a step marker's own time and for time no event covers
Piece = tuple[float, float, str, "str | None"]


def _nest(ops: list[_Op]) -> list[_Op]:
    """Nest one thread's events by time; returns the roots. A child is clipped to its parent (timestamps are
    rounded, so a child can overhang by a nanosecond)."""
    roots: list[_Op] = []
    stack: list[_Op] = []
    for op in sorted(ops, key=lambda o: (o.start, -o.end)):
        while stack and stack[-1].end <= op.start:
            stack.pop()
        if stack:
            op.end = min(op.end, stack[-1].end)
            stack[-1].children.append(op)
        else:
            roots.append(op)
        stack.append(op)
    return roots


def _walk(ops: Iterable[_Op]) -> Iterator[_Op]:
    pending = list(ops)
    while pending:
        op = pending.pop()
        yield op
        pending += op.children


def _classify_tree(roots: list[_Op]) -> None:
    pending = [(root, None, False) for root in roots]
    while pending:
        op, enclosing, in_ddp_scope = pending.pop()
        op.category = classify(op.name, enclosing, in_ddp_scope)
        in_ddp_scope = in_ddp_scope or opens_ddp_scope(op.name)
        pending += [(child, op.category, in_ddp_scope) for child in op.children]


def _collective_shape(op: _Op, launched: bool) -> str | None:
    """Input dims in a form both sides of a collective share: the launching ``c10d::`` op takes a tensor list
    first (``[[[2, 17]], [], …]``), the gloo worker event the tensors themselves (``[[2, 17]]``)."""
    if not isinstance(op.dims, list) or not op.dims:
        return None
    return json.dumps(op.dims[0] if launched else [d for d in op.dims if d])


def _pair_collectives(launched: list[_Op], worker_ops: list[_Op]) -> None:
    """Set ``wait_end`` of each launched collective to the end of the first worker-thread collective with the
    same input shape that started after it (a process group runs its collectives in launch order)."""
    remaining = sorted(worker_ops, key=lambda o: o.start)
    shapes = {id(op): _collective_shape(op, launched=False) for op in remaining}
    for op in sorted(launched, key=lambda o: o.start):
        shape = _collective_shape(op, launched=True)
        for index, candidate in enumerate(remaining):
            if candidate.start >= op.start and shapes[id(candidate)] == shape:
                op.wait_end = candidate.end
                del remaining[index]
                break


def _gaps(op: _Op) -> Iterator[tuple[float, float]]:
    """The intervals of ``op`` not covered by its children: where its self time was spent."""
    cursor = op.start
    for child in op.children:
        if child.start > cursor:
            yield cursor, child.start
        cursor = max(cursor, child.end)
    if op.end > cursor:
        yield cursor, op.end


def _split(start: float, end: float, windows: list[tuple[float, float, str]], default: str) -> Iterator[tuple]:
    """Cut [start, end] at the window edges; each piece goes to the latest-opened window covering it, else to
    ``default``. Yields (start, end, category)."""
    cuts = sorted({start, end, *(t for w in windows for t in w[:2] if start < t < end)})
    for a, b in zip(cuts, cuts[1:]):
        covering = [w for w in windows if w[0] <= a and w[1] >= b]
        yield a, b, (max(covering)[2] if covering else default)


def _pieces(op: _Op, out: list[Piece]) -> list[tuple[float, float, str]]:
    """Append ``op``'s subtree's self-time pieces to ``out``; returns the wait windows (start, end, category) of
    the collectives launched inside it."""
    windows: list[tuple[float, float, str]] = []
    for child in op.children:
        windows += _pieces(child, out)
    category = op.category or OTHER
    if op.wait_end is not None:
        windows.append((op.start, op.wait_end, category))
    name = None if STEP_MARKER.match(op.name) else op.name
    for gap_start, gap_end in _gaps(op):
        if windows:
            out += [(a, b, piece, name) for a, b, piece in _split(gap_start, gap_end, windows, category)]
        else:
            out.append((gap_start, gap_end, category, name))
    return windows


@dataclass
class Thread:
    """One CPU thread's events: their trees, its time partitioned into categorised pieces, and its operators by
    start time (to count calls in a window)."""

    key: tuple
    roots: list[_Op]
    pieces: list[Piece] = field(default_factory=list)
    piece_starts: list[float] = field(default_factory=list)
    op_starts: list[float] = field(default_factory=list)
    op_names: list[str] = field(default_factory=list)

    def index(self) -> None:
        out: list[Piece] = []
        for root in self.roots:
            _pieces(root, out)
        self.pieces = sorted(piece for piece in out if piece[1] > piece[0])
        self.piece_starts = [piece[0] for piece in self.pieces]
        ops = sorted((op.start, op.name) for op in _walk(self.roots) if not STEP_MARKER.match(op.name))
        self.op_starts = [start for start, _ in ops]
        self.op_names = [name for _, name in ops]

    def category_at(self, ts: float) -> str | None:
        """The category of the innermost event running at ``ts``; None when none is."""
        i = bisect_right(self.piece_starts, ts) - 1
        if i >= 0 and ts <= self.pieces[i][1]:
            return self.pieces[i][2]
        return None

    def clipped(self, start: float, end: float) -> list[Piece]:
        """The pieces overlapping [start, end], clipped to it."""
        i = max(bisect_right(self.piece_starts, start) - 1, 0)
        result = []
        for a, b, category, name in self.pieces[i:]:
            if a >= end:
                break
            if b > start:
                result.append((max(a, start), min(b, end), category, name))
        return result

    def calls(self, start: float, end: float) -> Counter:
        """Operators starting in [start, end), by name."""
        return Counter(self.op_names[bisect_left(self.op_starts, start) : bisect_left(self.op_starts, end)])

    def span(self) -> tuple[float, float]:
        return self.roots[0].start, max(root.end for root in self.roots)


@dataclass
class CpuTimeline:
    """A trace's CPU side: every thread, the main one (that ran the steps), the helpers whose work counts towards
    a step (autograd engine threads of the main thread's process) and the step markers."""

    threads: dict[tuple, Thread]
    main: tuple
    helpers: list[tuple]
    steps: list[_Op]

    def category_at(self, point: Point) -> str | None:
        """The CPU category at a launch point; None when no event of that thread runs there."""
        thread = self.threads.get(point[:2])
        return thread.category_at(point[2]) if thread else None

    def span(self) -> tuple[float, float]:
        """From the first to the last event of the main and helper threads."""
        spans = [self.threads[key].span() for key in [self.main, *self.helpers]]
        return min(s for s, _ in spans), max(e for _, e in spans)


def _step_markers(roots: list[_Op]) -> list[_Op]:
    """The outermost ``ProfilerStep#N`` events with operators in them (a profiler stopped before its schedule ends
    leaves a last step with none)."""
    found, pending = [], list(roots)
    while pending:
        op = pending.pop()
        if STEP_MARKER.match(op.name):
            if op.children:
                found.append(op)
        else:
            pending += op.children
    return sorted(found, key=lambda op: op.start)


def cpu_timeline(cpu_ops: list[Event]) -> CpuTimeline | None:
    """Nest, classify and partition every thread's CPU events; None when there are none."""
    by_thread: dict[tuple, list[_Op]] = defaultdict(list)
    for event in cpu_ops:
        by_thread[(event.pid, event.tid)].append(_Op(event.name, event.start, event.end, event.dims))
    if not by_thread:
        return None
    threads = {key: Thread(key, _nest(ops)) for key, ops in by_thread.items()}
    steps = {key: _step_markers(thread.roots) for key, thread in threads.items()}
    autograd = {key for key, thread in threads.items() if any(is_autograd_node(op.name) for op in _walk(thread.roots))}
    only_collectives = {key for key, thread in threads.items() if all(is_collective(op.name) for op in thread.roots)}

    def main_thread_rank(key: tuple) -> tuple:
        roots = threads[key].roots
        return (
            len(steps[key]),
            key not in only_collectives,  # a gloo worker thread never runs the steps
            key[0] == key[1],  # on Linux the main thread's id is the process id
            sum(root.end - root.start for root in roots),
        )

    main = max(threads, key=main_thread_rank)
    helpers = sorted(key for key in autograd if key != main and key[0] == main[0])
    for thread in threads.values():
        _classify_tree(thread.roots)
    step_threads = {main, *helpers}
    launched = [op for key in step_threads for op in _walk(threads[key].roots) if op.name.startswith("c10d::")]
    worker_ops = [
        op
        for key, thread in threads.items()
        if key not in step_threads
        for op in _walk(thread.roots)
        if is_collective(op.name)
    ]
    _pair_collectives(launched, worker_ops)
    for thread in threads.values():
        thread.index()
    return CpuTimeline(threads, main, helpers, steps[main])


def _first_wins(pieces: Iterable[Piece]) -> list[Piece]:
    """Pieces as one non-overlapping list: where two overlap, the one that started first keeps the overlap."""
    merged: list[Piece] = []
    cursor = float("-inf")
    for a, b, category, name in sorted(pieces):
        a = max(a, cursor)
        if b > a:
            merged.append((a, b, category, name))
            cursor = b
    return merged


def _covered(piece: Piece, cover: list[Piece], starts: list[float]) -> Iterator[Piece]:
    """``piece`` cut along ``cover`` (non-overlapping, by start): the cover's pieces where they overlap it, the
    rest of ``piece`` elsewhere."""
    a, b = piece[0], piece[1]
    cursor = a
    for ca, cb, category, name in cover[max(bisect_right(starts, a) - 1, 0) :]:
        if ca >= b:
            break
        ca, cb = max(ca, a), min(cb, b)
        if cb <= ca:
            continue
        if ca > cursor:
            yield cursor, ca, piece[2], piece[3]
        yield ca, cb, category, name
        cursor = cb
    if b > cursor:
        yield cursor, b, piece[2], piece[3]


def _union(pieces: list[Piece]) -> list[Piece]:
    """Several threads' pieces as one non-overlapping list in which categorised pieces win over uncategorised
    ones."""
    categorised = _first_wins(p for p in pieces if p[2] != OTHER)
    starts = [p[0] for p in categorised]
    rest = [part for p in _first_wins(p for p in pieces if p[2] == OTHER) for part in _covered(p, categorised, starts)]
    return sorted(categorised + rest)


def _overlay(main: list[Piece], helpers: list[Piece]) -> list[Piece]:
    """``main``'s pieces, with the uncategorised ones taken over by helper pieces where helpers ran something."""
    if not helpers:
        return main
    starts = [piece[0] for piece in helpers]
    result: list[Piece] = []
    for piece in main:
        if piece[2] != OTHER:
            result.append(piece)
        else:
            result += _covered(piece, helpers, starts)
    return result


@dataclass
class CpuStep:
    """One step's CPU time in microseconds: by category, by operator (self time), by operator and category, and
    operator calls."""

    categories_us: Counter = field(default_factory=Counter)
    self_us: Counter = field(default_factory=Counter)
    op_categories_us: Counter = field(default_factory=Counter)  # (operator, category) -> self time
    calls: Counter = field(default_factory=Counter)


def cpu_step(timeline: CpuTimeline, start: float, end: float) -> CpuStep:
    """Attribute the window [start, end] across the main thread and its helpers (see the module's rules)."""
    main: list[Piece] = []
    cursor = start
    for piece in timeline.threads[timeline.main].clipped(start, end):
        if piece[0] > cursor:
            main.append((cursor, piece[0], OTHER, None))  # no event on the main thread: nothing recorded ran
        main.append(piece)
        cursor = piece[1]
    if end > cursor:
        main.append((cursor, end, OTHER, None))
    helpers = _union([p for key in timeline.helpers for p in timeline.threads[key].clipped(start, end)])
    step = CpuStep()
    for a, b, category, name in _overlay(main, helpers):
        step.categories_us[category] += b - a
        if name is not None:
            step.self_us[name] += b - a
            step.op_categories_us[(name, category)] += b - a
    for key in [timeline.main, *timeline.helpers]:
        step.calls.update(timeline.threads[key].calls(start, end))
    for name in step.calls:
        step.self_us[name] += 0.0
    return step
