"""Finding profiler traces and reading every schema torch.profiler has written since torch 1.9 into one event
form, so attribution never looks at a schema's spelling.

What differs between schemas, and how it is read:

- Categories: torch 1.9-era Kineto writes ``Operator``, ``Runtime``, ``Kernel``, ``Memcpy``, ``Memset``; torch 1.10
  and later ``cpu_op``, ``user_annotation`` (``record_function`` labels, ``ProfilerStep#N``), ``cuda_runtime``,
  ``cuda_driver``, ``kernel``, ``gpu_memcpy``, ``gpu_memset``. The legacy autograd profiler's JSON array
  (``use_kineto=False``) has no categories: its CPU events sit in process ``CPU functions``, its kernels in
  ``CUDA functions``. Python stacks (``python_function``), GPU-side copies of annotations
  (``gpu_user_annotation``), instant events and metadata carry no time of their own and are skipped.
- Time: ``ts`` and ``dur`` are microseconds in every schema (Chrome trace format), as integers (torch 1.9),
  fractional microseconds (nanosecond resolution, ``displayTimeUnit: ns``, which only sets how viewers display
  time) or numeric strings. With ``baseTimeNanoseconds`` timestamps are relative to it; attribution only needs
  differences, so the base is kept as metadata. Times are counted from the trace's first timestamp, read from the
  JSON text, so absolute timestamps (~1.7e15 µs) keep their nanoseconds.
- Threads and processes: ids are integers or strings (``"25738"`` on 1.9 operators, ``25738`` on its flow events,
  ``"stream 7"`` for a CUDA stream); numeric strings become integers so both spellings name one thread.
- Launches: a GPU activity is tied to the CPU point that launched it by its CUPTI ``correlation`` id (shared with
  the runtime call), else by a launch flow (``ac2g``, 1.9's ``async`` ``launch`` flows, legacy ``cpu_to_cuda``),
  else by ``External id`` (the CPU operator it ran under).
"""

from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from bnstudy.errors import UserError
from bnstudy.traces.record import TRACE_FILE

CPU_OP = "cpu_op"
RUNTIME = "runtime"
KERNEL = "kernel"
MEMCPY = "memcpy"
MEMSET = "memset"
GPU_KINDS = (KERNEL, MEMCPY, MEMSET)

# Category spellings (lower-cased) of every schema -> the kind of event they hold.
KINDS = {
    "operator": CPU_OP,  # torch 1.9
    "cpu_op": CPU_OP,
    "user_annotation": CPU_OP,  # record_function labels, ProfilerStep#N
    "runtime": RUNTIME,  # torch 1.9
    "cuda_runtime": RUNTIME,  # also HIP's runtime on ROCm
    "cuda_driver": RUNTIME,  # cuLaunchKernel (Triton kernels)
    "privateuse1_runtime": RUNTIME,
    "kernel": KERNEL,  # "Kernel" on torch 1.9
    "memcpy": MEMCPY,  # torch 1.9
    "gpu_memcpy": MEMCPY,
    "memset": MEMSET,  # torch 1.9
    "gpu_memset": MEMSET,
}
_LAUNCH_FLOWS = {"ac2g", "async", "cpu_to_cuda"}  # flows from a launch to its GPU activity (not fwdbwd)
_LEGACY_GPU_PROCESS = "CUDA functions"
_NUMERIC_ID = re.compile(r"-?\d+")

Point = tuple[Any, Any, float]  # (pid, tid, ts): a moment on one CPU thread


# ---------------------------------------------------------------- finding and loading traces


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


def load_trace(path: str | Path, *, exact_times: bool = False) -> dict:
    """A Chrome trace file (plain or gzipped JSON; an object with ``traceEvents`` or, as the legacy autograd
    profiler writes, a bare array of events) as a dict with a ``traceEvents`` list, or a one-line
    :class:`UserError` saying what is wrong with the file. With ``exact_times`` non-integer numbers stay the text
    they were written as: a float holds an absolute timestamp (~1.7e15 µs) to a quarter microsecond only, and
    :func:`normalise` reads the text to the nanosecond."""
    path = Path(path)
    parse_float = str if exact_times else float
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as stream:
                data = json.load(stream, parse_float=parse_float)
        else:
            data = json.loads(path.read_text(encoding="utf-8"), parse_float=parse_float)
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
    if isinstance(data, list) and data and all(isinstance(event, dict) and "ph" in event for event in data):
        data = {"traceEvents": data}  # JSON array format
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise UserError(f"{path}: not a Chrome trace (no traceEvents list); pass a torch.profiler trace")
    return data


# ---------------------------------------------------------------- one event form


@dataclass(slots=True, eq=False)
class Event:
    """A span of time on a CPU thread or a GPU stream, in microseconds after the trace's origin."""

    kind: str  # CPU_OP, RUNTIME, KERNEL, MEMCPY or MEMSET
    name: str
    start: float
    end: float
    pid: Any
    tid: Any
    dims: Any = None  # CPU operators: recorded input dims
    correlation: Any = None  # runtime calls and GPU activities: CUPTI correlation id
    external_id: Any = None  # CPU operators: their own id; GPU activities: the operator they ran under
    device: Any = None  # GPU activities
    launch: Point | None = None  # GPU activities: where on the CPU they were launched, when the trace says


@dataclass
class TraceEvents:
    """A trace in one form: CPU operators (``record_function`` labels included), runtime calls and GPU activities
    (kernels, copies, fills) with their launch points, and what the trace said about itself."""

    source: str
    origin_us: int = 0  # event times count from here (a timestamp of the trace's clock)
    cpu_ops: list[Event] = field(default_factory=list)
    runtime: list[Event] = field(default_factory=list)
    gpu: list[Event] = field(default_factory=list)
    events: int = 0  # entries in traceEvents
    categories: Counter = field(default_factory=Counter)  # complete ("X") events per category as spelled
    display_time_unit: str | None = None
    base_time_ns: int | None = None


def _number(value: Any) -> float | None:
    """A finite number from an int, float or numeric string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _timestamp(value: Any, origin: int) -> float | None:
    """Microseconds after ``origin`` from an int, float or numeric text, exactly for ints and text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return float(value - origin)
    if isinstance(value, float):
        return value - origin if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            return None
        return float(number - origin) if number.is_finite() else None
    return None


def _origin(raw_events: list) -> int:
    """A whole microsecond near the trace's timestamps (the first one's), to count time from."""
    for raw in raw_events:
        if isinstance(raw, dict) and raw.get("ph") == "X" and not isinstance(raw.get("ts"), bool):
            try:
                return int(Decimal(str(raw.get("ts")).strip()))
            except (InvalidOperation, ValueError, OverflowError):
                continue
    return 0


def _id(value: Any) -> Any:
    """A process or thread id in one spelling: numeric strings become integers."""
    if isinstance(value, str) and _NUMERIC_ID.fullmatch(value.strip()):
        return int(value)
    return value


def _kind(event: dict) -> str | None:
    category = event.get("cat")
    if category is None:  # the legacy autograd profiler's array
        return KERNEL if event.get("pid") == _LEGACY_GPU_PROCESS else CPU_OP
    return KINDS.get(str(category).lower())


def _arg(args: dict, *names: str) -> Any:
    for name in names:
        if name in args:
            return args[name]
    return None


def normalise(data: dict, source: str = "trace") -> TraceEvents:
    """The events of a loaded trace (:func:`load_trace`) in one form, times in microseconds after ``origin_us``;
    malformed entries are skipped."""
    raw_events = data["traceEvents"]
    origin = _origin(raw_events)
    trace = TraceEvents(
        source=str(source),
        origin_us=origin,
        events=len(raw_events),
        display_time_unit=data.get("displayTimeUnit") if isinstance(data.get("displayTimeUnit"), str) else None,
        base_time_ns=int(_number(data.get("baseTimeNanoseconds")) or 0) or None,
    )
    flow_starts: dict[Any, Point] = {}
    flow_ends: dict[Point, Any] = {}
    for raw in raw_events:
        if not isinstance(raw, dict):
            continue
        phase = raw.get("ph")
        if phase in ("s", "f", "t"):
            if str(raw.get("cat", "")).lower() in _LAUNCH_FLOWS and raw.get("id") is not None:
                ts = _timestamp(raw.get("ts"), origin)
                if ts is not None:
                    point = (_id(raw.get("pid")), _id(raw.get("tid")), ts)
                    if phase == "s":
                        flow_starts[raw["id"]] = point
                    else:
                        flow_ends[point] = raw["id"]
            continue
        if phase != "X":
            continue
        trace.categories[str(raw.get("cat"))] += 1
        kind = _kind(raw)
        start, duration, name = _timestamp(raw.get("ts"), origin), _number(raw.get("dur", 0)), raw.get("name")
        if kind is None or start is None or duration is None or name is None:
            continue
        args = raw.get("args") if isinstance(raw.get("args"), dict) else {}
        event = Event(kind, str(name), start, start + max(duration, 0.0), _id(raw.get("pid")), _id(raw.get("tid")))
        if kind == CPU_OP:
            event.dims = args.get("Input Dims")
            event.external_id = _arg(args, "External id", "external id")
            trace.cpu_ops.append(event)
        elif kind == RUNTIME:
            event.correlation = args.get("correlation")
            trace.runtime.append(event)
        else:
            event.correlation = args.get("correlation")
            event.external_id = _arg(args, "External id", "external id")
            event.device = _id(_arg(args, "device", "Device"))
            if event.device is None:
                event.device = event.pid
            trace.gpu.append(event)
    _link_launches(trace, flow_starts, flow_ends)
    return trace


def _link_launches(trace: TraceEvents, flow_starts: dict, flow_ends: dict) -> None:
    """Set each GPU activity's launch point: its runtime call (same correlation id), else the start of the launch
    flow ending at it, else the start of the CPU operator its External id names."""
    if not trace.gpu:
        return
    by_correlation = {e.correlation: (e.pid, e.tid, e.start) for e in trace.runtime if e.correlation is not None}
    by_external_id = {e.external_id: (e.pid, e.tid, e.start) for e in trace.cpu_ops if e.external_id is not None}
    for event in trace.gpu:
        point = by_correlation.get(event.correlation) if event.correlation is not None else None
        if point is None:
            flow = flow_ends.get((event.pid, event.tid, event.start))
            point = flow_starts.get(flow) if flow is not None else None
        if point is None and event.external_id is not None:
            point = by_external_id.get(event.external_id)
        event.launch = point


def read_trace(path: str | Path) -> TraceEvents:
    """Load and normalise one trace file, timestamps to the nanosecond."""
    return normalise(load_trace(path, exact_times=True), source=str(path))
