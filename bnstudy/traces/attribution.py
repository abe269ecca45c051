"""Trace attribution: where did a profiled step's time go? Reading does not need TensorBoard's profiler plugin
(it is deprecated upstream): it attributes each profiled step's time on the thread that ran
the step to BN forward, BN backward, BN synchronisation, convolution/linear, DDP gradient all-reduce, optimizer,
data loading and other, on CPU traces too.

Attribution rules:
- Events nest by time on each thread. An event's category is that of its outermost categorised ancestor (so
  ``aten::native_batch_norm`` inside ``aten::batch_norm`` counts once), with one exception: a collective issued
  inside a BN event is BN synchronisation (plain BN issues none; sync BN's forward and backward do). Other
  collectives are DDP's when launched inside autograd (DDP's gradient hooks) or DDP's forward, else "other"
  (a loop's metric all-reduce, a barrier).
- Each event's self time (its duration minus its children's) goes to its category, "other" when it has none. The
  self times of a step's events partition the step, so the categories add up to the step time exactly.
- Blocking on a collective shows up as self time of whatever encloses the collective's launch (gloo runs it on a
  worker thread; the launching thread waits in ``work.wait()``, which records no event). Self time of an event
  that overlaps a collective launched inside it, up to the end of the matching worker-thread event, goes to that
  collective's category: sync BN's waits are BN synchronisation, DDP's wait for its buckets is DDP all-reduce.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnstudy.distributed.collectives import SYNCBN_LABEL_PREFIX
from bnstudy.errors import UserError
from bnstudy.traces.record import DATA_LOADING, OPTIMIZER_STEP, TRACE_FILE

BN_FORWARD = "bn_forward"
BN_BACKWARD = "bn_backward"
BN_SYNC = "bn_sync"
CONV_LINEAR = "conv_linear"
DDP_ALLREDUCE = "ddp_allreduce"
OPTIMIZER = "optimizer"
DATA = "data_loading"
OTHER = "other"
CATEGORY_LABELS = {
    BN_FORWARD: "BN forward",
    BN_BACKWARD: "BN backward",
    BN_SYNC: "BN synchronisation",
    CONV_LINEAR: "convolution/linear",
    DDP_ALLREDUCE: "DDP gradient all-reduce",
    OPTIMIZER: "optimizer",
    DATA: "data loading",
    OTHER: "other",
}


# ---------------------------------------------------------------- finding and reading traces


def _natural_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def worker_name(path: Path) -> str:
    """The worker a trace file belongs to (``rank0`` for ``rank0.1700000000.pt.trace.json.gz``)."""
    match = TRACE_FILE.match(path.name)
    return match["worker"] if match else path.name.split(".")[0]


def find_traces(path: str | Path) -> tuple[Path, dict[str, list[Path]]]:
    """The trace run that ``path`` names, as (run folder, worker → trace files). ``path`` is a trace file, a
    TensorBoard run folder holding ``*.pt.trace.json[.gz]`` files, or a directory with exactly one such folder
    below it (a run directory ``runs/NAME`` with one profiled label)."""
    path = Path(path)
    if path.is_file():
        return path.parent, {worker_name(path): [path]}
    if not path.is_dir():
        raise UserError(f"{path} does not exist; pass a trace file, a run directory or a TensorBoard run folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and TRACE_FILE.match(p.name))
    runs = sorted({p.parent for p in files})
    if not runs:
        raise UserError(
            f"{path}: no profiler traces (*.pt.trace.json[.gz]) found; record some with --profile or pass a trace file"
        )
    if len(runs) > 1:
        names = ", ".join(str(run) for run in runs)
        raise UserError(f"{path} holds {len(runs)} trace runs ({names}); pass one of them")
    workers: dict[str, list[Path]] = defaultdict(list)
    for file in files:
        workers[worker_name(file)].append(file)
    return runs[0], {name: workers[name] for name in sorted(workers, key=_natural_key)}


def load_trace(path: str | Path) -> dict:
    """A Chrome trace file (plain or gzipped JSON) as a dict, or a one-line :class:`UserError` saying what is
    wrong with the file."""
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as stream:
                data = json.load(stream)
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise UserError(
            f"{path}: truncated or corrupt gzip ({exc}); the trace was not fully written, record it again"
        ) from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); record the trace again"
        ) from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text JSON trace; pass a *.pt.trace.json or *.pt.trace.json.gz file") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise UserError(f"{path}: not a Chrome trace (no traceEvents list); pass a torch.profiler trace")
    return data


# ---------------------------------------------------------------- classifying events

_AUTOGRAD_PREFIX = "autograd::engine::evaluate_function: "
_BN_BACKWARD = re.compile(r"batch_?norm.*backward", re.IGNORECASE)
_BN = re.compile(r"batch_?norm", re.IGNORECASE)
_CONV_LINEAR = re.compile(
    r"^aten::(\w*conv(?!ert)\w*|linear|addmm|_addmm_activation|mm|bmm|baddbmm|matmul)$"
    r"|^\w*(Convolution|Addmm|Mm|Bmm|Linear)Backward\d*$"
)
_COLLECTIVE = re.compile(r"^(c10d::|gloo:|nccl:)|^record_param_comms$")
_DDP_REDUCER = re.compile(r"reducer::")
_OPTIMIZER = re.compile(r"^Optimizer\.(step|zero_grad)#")
_DATA = re.compile(r"^enumerate\(DataLoader\)#")
_STEP = re.compile(r"^ProfilerStep#\d+$")


def is_collective(name: str) -> bool:
    """Whether an event launches (or, on a worker thread, runs) a communication collective."""
    return bool(_COLLECTIVE.search(name)) or name.startswith(SYNCBN_LABEL_PREFIX)


def opens_ddp_scope(name: str) -> bool:
    """Whether collectives launched inside this event are DDP's: its gradient all-reduces start from autograd
    hooks during backward, its buffer broadcasts from its forward."""
    return name.startswith(_AUTOGRAD_PREFIX) or name.startswith("DistributedDataParallel.")


def classify(name: str, enclosing: str | None, in_ddp_scope: bool = False) -> str | None:
    """The category of an event named ``name`` inside events of category ``enclosing`` (None: uncategorised),
    ``in_ddp_scope`` when an enclosing event opens one; None when nothing says anything."""
    base = name.removeprefix(_AUTOGRAD_PREFIX)
    if enclosing in (BN_FORWARD, BN_BACKWARD):
        return BN_SYNC if is_collective(base) else enclosing
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
    if (in_ddp_scope and is_collective(base)) or _DDP_REDUCER.search(base):
        return DDP_ALLREDUCE
    if base == OPTIMIZER_STEP or _OPTIMIZER.search(base):
        return OPTIMIZER
    if base == DATA_LOADING or _DATA.search(base):
        return DATA
    return None


# ---------------------------------------------------------------- event trees and attribution


@dataclass(eq=False)
class _Op:
    name: str
    start: float
    end: float
    dims: Any = None  # recorded input dims, to pair a launched collective with the worker event that ran it
    children: list[_Op] = field(default_factory=list)
    wait_end: float | None = None  # for a launched collective: when the worker thread finished running it


def _collective_shape(op: _Op, launched: bool) -> str | None:
    """Input dims in a form both sides of a collective share: the launching ``c10d::`` op takes a tensor list
    first (``[[[2, 17]], [], …]``), the gloo worker event the tensors themselves (``[[2, 17]]``)."""
    if not isinstance(op.dims, list) or not op.dims:
        return None
    return json.dumps(op.dims[0] if launched else [d for d in op.dims if d])


def _ops_by_thread(events: Iterable[dict]) -> dict[tuple, list[_Op]]:
    threads: dict[tuple, list[_Op]] = defaultdict(list)
    for event in events:
        if event.get("ph") != "X" or event.get("cat") not in ("cpu_op", "user_annotation"):
            continue
        try:
            start, duration, name = float(event["ts"]), float(event.get("dur", 0.0)), str(event["name"])
        except (KeyError, TypeError, ValueError):
            continue
        dims = (event.get("args") or {}).get("Input Dims")
        threads[(event.get("pid"), event.get("tid"))].append(_Op(name, start, start + duration, dims))
    return threads


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
    ``default``. Yields (category, duration)."""
    cuts = sorted({start, end, *(t for w in windows for t in w[:2] if start < t < end)})
    for a, b in zip(cuts, cuts[1:]):
        covering = [w for w in windows if w[0] <= a and w[1] >= b]
        yield (max(covering)[2] if covering else default), b - a


@dataclass
class StepTimes:
    """One profiled step: its duration and how it splits, in microseconds."""

    duration_us: float
    categories_us: Counter = field(default_factory=Counter)
    self_us: Counter = field(default_factory=Counter)  # by operator name
    calls: Counter = field(default_factory=Counter)


def _attribute(
    op: _Op, enclosing: str | None, step: StepTimes, in_ddp_scope: bool = False, is_step: bool = False
) -> list[tuple]:
    """Add ``op``'s subtree to ``step``; returns the wait windows (start, end, category) of the collectives
    launched inside it."""
    category = classify(op.name, enclosing, in_ddp_scope)
    in_ddp_scope = in_ddp_scope or opens_ddp_scope(op.name)
    windows: list[tuple[float, float, str]] = []
    for child in op.children:
        windows += _attribute(child, category, step, in_ddp_scope)
    if op.wait_end is not None:
        windows.append((op.start, op.wait_end, category or OTHER))
    own = 0.0
    for gap_start, gap_end in _gaps(op):
        for piece_category, duration in _split(gap_start, gap_end, windows, category or OTHER):
            step.categories_us[piece_category] += duration
            own += duration
    if not is_step:
        step.self_us[op.name] += own
        step.calls[op.name] += 1
    return windows


def trace_steps(trace: dict) -> list[StepTimes]:
    """Attribute each ``ProfilerStep#N`` of a loaded trace on the thread that ran the steps (without step
    events, the busiest thread's whole span is one step)."""
    forests = {key: _nest(ops) for key, ops in _ops_by_thread(trace["traceEvents"]).items()}
    if not forests:
        return []

    def step_count_then_busy_time(key: tuple) -> tuple[int, float]:
        roots = forests[key]
        return sum(bool(_STEP.match(r.name)) for r in roots), sum(r.end - r.start for r in roots)

    main = max(forests, key=step_count_then_busy_time)
    roots = forests[main]
    # A profiler stopped before its schedule ends leaves a last step with no operators in it.
    steps = [root for root in roots if _STEP.match(root.name) and root.children]
    if not steps:
        steps = [_Op("whole trace", roots[0].start, max(r.end for r in roots), children=roots)]
    launched = [op for op in _walk(roots) if op.name.startswith("c10d::")]
    worker_ops = [op for key, ops in forests.items() if key != main for op in _walk(ops) if is_collective(op.name)]
    _pair_collectives(launched, worker_ops)
    result = []
    for root in steps:
        step = StepTimes(root.end - root.start)
        _attribute(root, None, step, is_step=True)
        result.append(step)
    return result


# ---------------------------------------------------------------- summaries and comparison


def _record(step: StepTimes) -> dict:
    """A step in milliseconds: its time, each category's time, each operator's self time and calls."""
    return {
        "step_ms": step.duration_us / 1e3,
        "categories": {key: step.categories_us[key] / 1e3 for key in CATEGORY_LABELS},
        "ops": {name: {"self_ms": us / 1e3, "calls": step.calls[name]} for name, us in step.self_us.items()},
    }


def _average(records: list[dict]) -> dict:
    """The mean of step records (or of averages of them); an operator missing from a record counts as 0."""
    n = len(records)
    zero = {"self_ms": 0.0, "calls": 0}
    names = set().union(*(r["ops"] for r in records))
    return {
        "step_ms": sum(r["step_ms"] for r in records) / n,
        "categories": {key: sum(r["categories"][key] for r in records) / n for key in CATEGORY_LABELS},
        "ops": {name: {f: sum(r["ops"].get(name, zero)[f] for r in records) / n for f in zero} for name in names},
    }


def _report(record: dict, top: int | None) -> dict:
    """A record with shares of the step, its operators ranked by self time and cut to ``top`` (None: all)."""
    step_ms = record["step_ms"]

    def share(ms: float) -> float:
        return ms / step_ms if step_ms else 0.0

    ranked = sorted(record["ops"].items(), key=lambda item: (-item[1]["self_ms"], item[0]))[:top]
    return {
        "step_ms": step_ms,
        "categories": {key: {"ms": ms, "share": share(ms)} for key, ms in record["categories"].items()},
        "top_ops": [{"name": name, **values, "share": share(values["self_ms"])} for name, values in ranked],
    }


def _worker_averages(path: str | Path) -> tuple[Path, dict[str, dict]]:
    """(run folder, worker → {"files", "steps", "average"}) for the trace run at ``path``."""
    run, files = find_traces(path)
    workers = {}
    for worker, paths in files.items():
        steps = [step for file in paths for step in trace_steps(load_trace(file))]
        if not steps:
            raise UserError(f"{paths[0]}: no CPU operator events; record with CPU activity (torch.profiler)")
        workers[worker] = {
            "files": [str(p) for p in paths],
            "steps": len(steps),
            "average": _average([_record(s) for s in steps]),
        }
    return run, workers


def summarize(path: str | Path, top: int | None = 10) -> dict:
    """Where the profiled steps of the trace run at ``path`` spent their time: per worker (rank) and averaged
    over workers, the mean step time, each category's time and share of the step, and the ``top`` operators by
    self time (per step, on the thread that ran the steps)."""
    run, workers = _worker_averages(path)
    mean = _average([w["average"] for w in workers.values()])
    return {
        "source": str(path),
        "run": str(run),
        "category_labels": CATEGORY_LABELS,
        "workers": {
            name: {"files": w["files"], "steps": w["steps"], **_report(w["average"], top)}
            for name, w in workers.items()
        },
        "mean": {"workers": len(workers), "steps": min(w["steps"] for w in workers.values()), **_report(mean, top)},
    }


def _delta(a: float, b: float) -> dict:
    return {"a_ms": a, "b_ms": b, "delta_ms": b - a, "delta_pct": (b - a) / a * 100 if a else None}


def compare(path_a: str | Path, path_b: str | Path, top: int = 10) -> dict:
    """Two trace runs side by side (means over workers, per step): step time, each category and the operators
    in either run's top ``top`` by self time, with absolute and relative (to A) deltas."""
    a, b = summarize(path_a, top=None)["mean"], summarize(path_b, top=None)["mean"]
    a_ops = {op["name"]: op["self_ms"] for op in a["top_ops"]}
    b_ops = {op["name"]: op["self_ms"] for op in b["top_ops"]}
    names = dict.fromkeys([op["name"] for op in a["top_ops"][:top]] + [op["name"] for op in b["top_ops"][:top]])
    ops = [{"name": name, **_delta(a_ops.get(name, 0.0), b_ops.get(name, 0.0))} for name in names]
    ops.sort(key=lambda op: -max(op["a_ms"], op["b_ms"]))
    categories = {}
    for key in CATEGORY_LABELS:
        row = _delta(a["categories"][key]["ms"], b["categories"][key]["ms"])
        categories[key] = {**row, "a_share": a["categories"][key]["share"], "b_share": b["categories"][key]["share"]}
    return {
        "a": {"source": str(path_a), "workers": a["workers"], "steps": a["steps"]},
        "b": {"source": str(path_b), "workers": b["workers"], "steps": b["steps"]},
        "category_labels": CATEGORY_LABELS,
        "step": _delta(a["step_ms"], b["step_ms"]),
        "categories": categories,
        "ops": ops,
    }
