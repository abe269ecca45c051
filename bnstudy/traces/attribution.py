"""Trace attribution: where did a profiled step's time go? Reading does not need TensorBoard's profiler plugin
(it is deprecated upstream). For each profiled step (``ProfilerStep#N``; without such markers the whole trace is one
window, and the summary says so) it reports two tables that each add up to the step time:

- CPU (:mod:`bnstudy.traces.cpu_attribution`): BN forward, BN backward, BN synchronisation, convolution/linear, DDP
  gradient all-reduce, waiting for other ranks (in shared-memory exchanges), optimizer, data loading and other,
  across the thread that ran the step and the autograd engine threads that ran its backward;
- GPU, when the trace has GPU activity (:mod:`bnstudy.traces.gpu_attribution`): BN forward and backward kernels, BN
  synchronisation, DDP gradient all-reduce, convolution/GEMM, elementwise, memcpy, memset, other kernels, other
  communication and GPU idle, with communication hidden under compute reported separately.

Any trace schema torch.profiler has written since torch 1.9 is read (:mod:`bnstudy.traces.trace_events`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bnstudy.errors import UserError
from bnstudy.traces.cpu_attribution import (
    BN_BACKWARD,
    BN_FORWARD,
    BN_SYNC,
    CATEGORY_LABELS,
    CONV_LINEAR,
    DATA,
    DDP_ALLREDUCE,
    OPTIMIZER,
    OTHER,
    RANK_WAIT,
    classify,
    cpu_step,
    cpu_timeline,
    is_collective,
    opens_ddp_scope,
)
from bnstudy.traces.gpu_attribution import (
    COMMUNICATION,
    CONV_GEMM,
    GPU_CATEGORY_LABELS,
    GpuStep,
    GpuTimeline,
    gpu_activities,
)
from bnstudy.traces.trace_events import TraceEvents, find_traces, load_trace, normalise, read_trace, worker_name

__all__ = [
    "BN_BACKWARD",
    "BN_FORWARD",
    "BN_SYNC",
    "CATEGORY_LABELS",
    "CONV_LINEAR",
    "DATA",
    "DDP_ALLREDUCE",
    "DEVICE_CATEGORIES",
    "GPU_CATEGORY_LABELS",
    "OPTIMIZER",
    "OTHER",
    "RANK_WAIT",
    "StepTimes",
    "classify",
    "compare",
    "find_traces",
    "is_collective",
    "load_trace",
    "opens_ddp_scope",
    "summarize",
    "trace_steps",
    "worker_name",
]

# A CPU run against a GPU run: the time of the device that did the work, on the categories both tables have.
# key -> (label, CPU category, GPU category)
DEVICE_CATEGORIES = {
    BN_FORWARD: ("BN forward", BN_FORWARD, BN_FORWARD),
    BN_BACKWARD: ("BN backward", BN_BACKWARD, BN_BACKWARD),
    BN_SYNC: ("BN synchronisation", BN_SYNC, BN_SYNC),
    "conv": ("convolution/linear/GEMM", CONV_LINEAR, CONV_GEMM),
    DDP_ALLREDUCE: ("DDP gradient all-reduce", DDP_ALLREDUCE, DDP_ALLREDUCE),
}


@dataclass
class StepTimes:
    """One profiled step: its duration and how it splits, in microseconds."""

    duration_us: float
    categories_us: Counter = field(default_factory=Counter)
    self_us: Counter = field(default_factory=Counter)  # by operator name
    calls: Counter = field(default_factory=Counter)
    op_categories_us: Counter = field(default_factory=Counter)  # self time by (operator name, category)
    marked: bool = True  # delimited by a ProfilerStep event; False: no markers, the whole trace is one window
    gpu: GpuStep | None = None


def trace_steps(trace: dict | TraceEvents) -> list[StepTimes]:
    """Attribute each ``ProfilerStep#N`` of a trace (loaded, or normalised) on the CPU and, when it has GPU
    activity, on the GPU; without step markers the whole trace is one step with ``marked`` False."""
    events = trace if isinstance(trace, TraceEvents) else normalise(trace)
    cpu = cpu_timeline(events.cpu_ops)
    if cpu is None:
        return []
    gpu = GpuTimeline(gpu_activities(events.gpu, cpu)) if events.gpu else None
    if cpu.steps:
        windows = [(op.start, op.end) for op in cpu.steps]
    else:
        start, end = cpu.span()
        if gpu is not None:
            start = min(start, gpu.activities[0].start)
            end = max(end, max(a.end for a in gpu.activities))
        windows = [(start, end)]
    result = []
    for start, end in windows:
        cpu_times = cpu_step(cpu, start, end)
        result.append(
            StepTimes(
                end - start,
                cpu_times.categories_us,
                cpu_times.self_us,
                cpu_times.calls,
                cpu_times.op_categories_us,
                marked=bool(cpu.steps),
                gpu=gpu.step(start, end) if gpu is not None else None,
            )
        )
    return result


# ---------------------------------------------------------------- summaries and comparison


def _gpu_record(gpu: GpuStep) -> dict:
    return {
        "devices": gpu.devices,
        "categories": {key: gpu.categories_us[key] / 1e3 for key in GPU_CATEGORY_LABELS},
        "overlapped": {key: gpu.overlapped_us[key] / 1e3 for key in COMMUNICATION},
        "kernels": {
            key: {"ms": gpu.kernel_us[key] / 1e3, "calls": gpu.kernel_calls[key]}
            for key in set(gpu.kernel_us) | set(gpu.kernel_calls)
        },
    }


def _record(step: StepTimes) -> dict:
    """A step in milliseconds: its time, each category's time, each operator's self time, calls and the category
    most of its self time went to, and the GPU table when there is one."""
    category_of: dict[str, tuple[float, str]] = {}
    for (name, category), us in step.op_categories_us.items():
        category_of[name] = max(category_of.get(name, (-1.0, OTHER)), (us, category))
    return {
        "step_ms": step.duration_us / 1e3,
        "marked": step.marked,
        "categories": {key: step.categories_us[key] / 1e3 for key in CATEGORY_LABELS},
        "ops": {
            name: {"self_ms": us / 1e3, "calls": step.calls[name], "category": category_of.get(name, (0, OTHER))[1]}
            for name, us in step.self_us.items()
        },
        "gpu": _gpu_record(step.gpu) if step.gpu is not None else None,
    }


def _mean_dicts(dicts: list[dict], keys, fields: tuple[str, ...], label: str | None = None) -> dict:
    """Per key, the mean of each numeric field over ``dicts`` (a missing key counts as 0), and the ``label`` field
    of the dict where the first field is largest."""
    n = len(dicts)
    zero = dict.fromkeys(fields, 0.0)
    means = {key: {f: sum(d.get(key, zero)[f] for d in dicts) / n for f in fields} for key in keys}
    if label is not None:
        for key, values in means.items():
            values[label] = max((d[key] for d in dicts if key in d), key=lambda v: v[fields[0]])[label]
    return means


def _average_gpu(records: list[dict]) -> dict | None:
    gpus = [r["gpu"] for r in records if r["gpu"] is not None]
    if not gpus:
        return None
    n = len(gpus)
    return {
        "devices": max(g["devices"] for g in gpus),
        "categories": {key: sum(g["categories"][key] for g in gpus) / n for key in GPU_CATEGORY_LABELS},
        "overlapped": {key: sum(g["overlapped"][key] for g in gpus) / n for key in COMMUNICATION},
        "kernels": _mean_dicts(
            [g["kernels"] for g in gpus], set().union(*(g["kernels"] for g in gpus)), ("ms", "calls")
        ),
    }


def _average(records: list[dict]) -> dict:
    """The mean of step records (or of averages of them); an operator missing from a record counts as 0. The GPU
    table is the mean over the records that have one."""
    n = len(records)
    names = set().union(*(r["ops"] for r in records))
    return {
        "step_ms": sum(r["step_ms"] for r in records) / n,
        "marked": all(r["marked"] for r in records),
        "categories": {key: sum(r["categories"][key] for r in records) / n for key in CATEGORY_LABELS},
        "ops": _mean_dicts([r["ops"] for r in records], names, ("self_ms", "calls"), label="category"),
        "gpu": _average_gpu(records),
    }


def _share(ms: float, step_ms: float) -> float:
    return ms / step_ms if step_ms else 0.0


def _gpu_report(gpu: dict | None, step_ms: float, top: int | None) -> dict | None:
    if gpu is None:
        return None
    ranked = sorted(gpu["kernels"].items(), key=lambda item: (-item[1]["ms"], item[0]))[:top]
    return {
        "devices": gpu["devices"],
        "categories": {key: {"ms": ms, "share": _share(ms, step_ms)} for key, ms in gpu["categories"].items()},
        "overlapped_ms": dict(gpu["overlapped"]),
        "top_kernels": [
            {"name": name, "category": category, **values, "share": _share(values["ms"], step_ms)}
            for (name, category), values in ranked
        ],
    }


def _report(record: dict, top: int | None) -> dict:
    """A record with shares of the step, its operators ranked by self time and its kernels by time, both cut to
    ``top`` (None: all)."""
    step_ms = record["step_ms"]
    ranked = sorted(record["ops"].items(), key=lambda item: (-item[1]["self_ms"], item[0]))[:top]
    return {
        "step_ms": step_ms,
        "step_markers": record["marked"],
        "categories": {key: {"ms": ms, "share": _share(ms, step_ms)} for key, ms in record["categories"].items()},
        "top_ops": [{"name": name, **values, "share": _share(values["self_ms"], step_ms)} for name, values in ranked],
        "gpu": _gpu_report(record["gpu"], step_ms, top),
    }


def _nothing_to_attribute(path: Path, events: TraceEvents) -> str:
    if not events.events:
        return f"{path}: the trace holds no events; record it again with torch.profiler"
    if events.gpu:
        return (
            f"{path}: {len(events.gpu)} GPU activities but no CPU operator events; steps are found from CPU "
            "operators, so record with ProfilerActivity.CPU as well"
        )
    seen = ", ".join(f"{name} ({count})" for name, count in events.categories.most_common(5)) or "none"
    return (
        f"{path}: {events.events} events but none bnstudy can attribute (no CPU operators or GPU kernels; "
        f"complete events by category: {seen}); record with torch.profiler's CPU activity"
    )


def _worker_averages(path: str | Path) -> tuple[Path, dict[str, dict]]:
    """(run folder, worker → {"files", "steps", "average"}) for the trace run at ``path``."""
    run, files = find_traces(path)
    workers = {}
    for worker, paths in files.items():
        steps = []
        for file in paths:
            events = read_trace(file)
            found = trace_steps(events)
            if not found:
                raise UserError(_nothing_to_attribute(file, events))
            steps += found
        workers[worker] = {
            "files": [str(p) for p in paths],
            "steps": len(steps),
            "average": _average([_record(s) for s in steps]),
        }
    return run, workers


def summarize(path: str | Path, top: int | None = 10) -> dict:
    """Where the profiled steps of the trace run at ``path`` spent their time: per worker (rank) and averaged
    over workers, the mean step time, each CPU category's time and share of the step, the ``top`` operators by
    self time, and, for traces with GPU activity, the GPU categories and the ``top`` kernels (all per step)."""
    run, workers = _worker_averages(path)
    mean = _average([w["average"] for w in workers.values()])
    return {
        "source": str(path),
        "run": str(run),
        "category_labels": CATEGORY_LABELS,
        "gpu_category_labels": GPU_CATEGORY_LABELS,
        "workers": {
            name: {"files": w["files"], "steps": w["steps"], **_report(w["average"], top)}
            for name, w in workers.items()
        },
        "mean": {"workers": len(workers), "steps": min(w["steps"] for w in workers.values()), **_report(mean, top)},
    }


def _delta(a: float, b: float) -> dict:
    return {"a_ms": a, "b_ms": b, "delta_ms": b - a, "delta_pct": (b - a) / a * 100 if a else None}


def _category_deltas(a: dict, b: dict, keys) -> dict:
    rows = {}
    for key in keys:
        row = _delta(a["categories"][key]["ms"], b["categories"][key]["ms"])
        rows[key] = {**row, "a_share": a["categories"][key]["share"], "b_share": b["categories"][key]["share"]}
    return rows


def _gpu_comparison(a: dict, b: dict, top: int) -> dict:
    a_kernels = {(k["name"], k["category"]): k["ms"] for k in a["top_kernels"]}
    b_kernels = {(k["name"], k["category"]): k["ms"] for k in b["top_kernels"]}
    keys = dict.fromkeys([*list(a_kernels)[:top], *list(b_kernels)[:top]])
    kernels = [
        {
            "name": name,
            "category": category,
            **_delta(a_kernels.get((name, category), 0.0), b_kernels.get((name, category), 0.0)),
        }
        for name, category in keys
    ]
    kernels.sort(key=lambda row: -max(row["a_ms"], row["b_ms"]))
    return {
        "categories": _category_deltas(a, b, GPU_CATEGORY_LABELS),
        "overlapped": {key: _delta(a["overlapped_ms"][key], b["overlapped_ms"][key]) for key in COMMUNICATION},
        "kernels": kernels,
    }


def _device_comparison(a: dict, b: dict) -> dict:
    """A CPU-only run against a GPU run: each category's time on the device that did the work (the CPU run's CPU
    table, the GPU run's GPU table)."""

    def side(run: dict) -> tuple[str, dict, int]:
        return ("gpu", run["gpu"]["categories"], 2) if run["gpu"] is not None else ("cpu", run["categories"], 1)

    (a_device, a_table, a_column), (b_device, b_table, b_column) = side(a), side(b)
    categories = {}
    for key, columns in DEVICE_CATEGORIES.items():
        a_key, b_key = columns[a_column], columns[b_column]
        row = _delta(a_table[a_key]["ms"], b_table[b_key]["ms"])
        categories[key] = {**row, "a_share": a_table[a_key]["share"], "b_share": b_table[b_key]["share"]}
    return {
        "a_device": a_device,
        "b_device": b_device,
        "category_labels": {key: columns[0] for key, columns in DEVICE_CATEGORIES.items()},
        "categories": categories,
    }


def compare(path_a: str | Path, path_b: str | Path, top: int = 10) -> dict:
    """Two trace runs side by side (means over workers, per step): step time, each CPU category and the operators
    in either run's top ``top`` by self time, with absolute and relative (to A) deltas; the GPU categories and
    kernels when both runs have GPU activity; when only one has, each category's time on the device that did the
    work (the CPU run's CPU time against the GPU run's GPU time)."""
    a, b = summarize(path_a, top=None)["mean"], summarize(path_b, top=None)["mean"]
    a_ops = {op["name"]: op["self_ms"] for op in a["top_ops"]}
    b_ops = {op["name"]: op["self_ms"] for op in b["top_ops"]}
    names = dict.fromkeys([op["name"] for op in a["top_ops"][:top]] + [op["name"] for op in b["top_ops"][:top]])
    ops = [{"name": name, **_delta(a_ops.get(name, 0.0), b_ops.get(name, 0.0))} for name in names]
    ops.sort(key=lambda op: -max(op["a_ms"], op["b_ms"]))
    both_gpu = a["gpu"] is not None and b["gpu"] is not None
    one_gpu = (a["gpu"] is None) != (b["gpu"] is None)
    return {
        "a": {"source": str(path_a), "workers": a["workers"], "steps": a["steps"], "step_markers": a["step_markers"]},
        "b": {"source": str(path_b), "workers": b["workers"], "steps": b["steps"], "step_markers": b["step_markers"]},
        "category_labels": CATEGORY_LABELS,
        "gpu_category_labels": GPU_CATEGORY_LABELS,
        "step": _delta(a["step_ms"], b["step_ms"]),
        "categories": _category_deltas(a, b, CATEGORY_LABELS),
        "ops": ops,
        "gpu": _gpu_comparison(a["gpu"], b["gpu"], top) if both_gpu else None,
        "device": _device_comparison(a, b) if one_gpu else None,
    }
