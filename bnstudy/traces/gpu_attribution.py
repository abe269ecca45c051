"""GPU attribution: where a step's GPU time went, from the kernels, copies and fills the trace recorded.

Each GPU activity gets one category:

1. Collective kernels (NCCL/RCCL, ``nccl…`` in the name) are communication: BN synchronisation when launched inside
   a BN operator or a sync BN collective (SyncBatchNorm's all-gather and all-reduce), DDP gradient all-reduce when
   launched by DDP (its autograd hooks, its reducer, its forward's broadcasts), else other communication.
2. BN kernels by name: cuDNN's ``bn_fw_*`` / ``bn_bw_*``, ATen's ``batch_norm_*`` (including elementwise kernels
   whose functor is a ``batch_norm`` lambda), MIOpen's ``BatchNorm*``; forward or backward by the name
   (``bw``/``backward``/``Bwd``), else by the operator that launched it. ATen's ``welford`` statistics kernels
   count as BN when a BN operator launched them (or nothing says who did).
3. Convolution/GEMM kernels by name (``gemm``, ``scudnn``, ``conv``, ``winograd``, ``wgrad``/``dgrad``, cutlass,
   ``im2col``, …).
4. Names alone are ambiguous for the rest (an elementwise kernel, a copy): they take the category of the CPU
   operator that launched them (its correlation id or launch flow leads to the runtime call, the call to the
   innermost operator around it): BN forward/backward/synchronisation, DDP gradient all-reduce,
   convolution/GEMM (cuDNN's and cuBLAS's helper kernels), or casts/conversions (autocast's copy kernels).
5. Otherwise: memcpy, memset, elementwise (``elementwise``, fills, copies, ``multi_tensor_apply``), other kernels.

A step's GPU time is the step's window ([start, end] of its ``ProfilerStep``) on each device's timeline: at each
moment the running activities decide the category, so the categories and GPU idle add up to the step. Kernels
overlapping on several streams split the moment evenly between their categories; communication running under
compute is not counted a second time: the compute gets the moment and the communication's hidden time is
reported separately ("overlapped"). With several GPUs in one trace, the table is their mean.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from bnstudy.traces.cpu_attribution import (
    BN_BACKWARD,
    BN_FORWARD,
    BN_SYNC,
    CAST,
    CONV_LINEAR,
    DDP_ALLREDUCE,
    CpuTimeline,
)
from bnstudy.traces.trace_events import KERNEL, MEMCPY, MEMSET, Event

CONV_GEMM = "conv_gemm"
ELEMENTWISE = "elementwise"
GPU_MEMCPY = "memcpy"
GPU_MEMSET = "memset"
OTHER_KERNELS = "other_kernels"
OTHER_COMM = "other_comm"
IDLE = "idle"
GPU_CATEGORY_LABELS = {
    BN_FORWARD: "BN forward",
    BN_BACKWARD: "BN backward",
    BN_SYNC: "BN synchronisation",
    DDP_ALLREDUCE: "DDP gradient all-reduce",
    CONV_GEMM: "convolution/GEMM",
    CAST: "casts/conversions",
    ELEMENTWISE: "elementwise",
    GPU_MEMCPY: "memcpy",
    GPU_MEMSET: "memset",
    OTHER_KERNELS: "other kernels",
    OTHER_COMM: "other communication",
    IDLE: "GPU idle",
}
COMMUNICATION = (BN_SYNC, DDP_ALLREDUCE, OTHER_COMM)

_COLLECTIVE_KERNEL = re.compile(r"nccl|rccl", re.IGNORECASE)
_BN_KERNEL = re.compile(r"\bbn_(fw|bw)|batch_?norm|BatchNorm", re.IGNORECASE)
_BN_BACKWARD_KERNEL = re.compile(r"bn_bw|backward|Bwd|_bw_|grad", re.IGNORECASE)
_BN_FORWARD_KERNEL = re.compile(r"bn_fw|forward|Fwd|_fw_|collect_statistics|transform_input|infer", re.IGNORECASE)
_WELFORD_KERNEL = re.compile(r"welford", re.IGNORECASE)
_CONV_GEMM_KERNEL = re.compile(
    r"gemm|gemv|scudnn|conv(?!ert)|winograd|wgrad|dgrad|fprop|cutlass|xmma|im2col|col2im|cublas|implicit_",
    re.IGNORECASE,
)
_ELEMENTWISE_KERNEL = re.compile(r"elementwise|fill|copy|multi_tensor_apply|CatArray", re.IGNORECASE)
_BY_LAUNCHER = {
    BN_FORWARD: BN_FORWARD,
    BN_BACKWARD: BN_BACKWARD,
    BN_SYNC: BN_SYNC,
    DDP_ALLREDUCE: DDP_ALLREDUCE,
    CONV_LINEAR: CONV_GEMM,
    CAST: CAST,
}


def kernel_name(event: Event) -> str:
    """A kernel's name without ``void`` and its argument list (``cudnn::bn_bw_1C11_kernel_new<float, …>``)."""
    return _short_name(event.name) if event.kind == KERNEL else event.name.strip()


@lru_cache(maxsize=4096)
def _short_name(name: str) -> str:
    name = name.removeprefix("void ").strip()
    if not name.endswith(")"):
        return name
    depth = 0
    for index in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[index], 0)
        if depth == 0:
            return name[:index].rstrip() or name
    return name


@lru_cache(maxsize=4096)
def classify_gpu(name: str, kind: str, launched_in: str | None) -> str:
    """The category of a GPU activity (``kind``: kernel, memcpy or memset) named ``name``, launched inside a CPU
    event of category ``launched_in`` (None: the trace does not say where it was launched)."""
    if kind == KERNEL and _COLLECTIVE_KERNEL.search(name):
        if launched_in in (BN_SYNC, BN_FORWARD, BN_BACKWARD):
            return BN_SYNC
        return DDP_ALLREDUCE if launched_in == DDP_ALLREDUCE else OTHER_COMM
    bn_statistics = _WELFORD_KERNEL.search(name) and launched_in in (None, BN_FORWARD, BN_BACKWARD)
    if kind == KERNEL and (_BN_KERNEL.search(name) or bn_statistics):
        if _BN_BACKWARD_KERNEL.search(name):
            return BN_BACKWARD
        if _BN_FORWARD_KERNEL.search(name):
            return BN_FORWARD
        return BN_BACKWARD if launched_in == BN_BACKWARD else BN_FORWARD
    if kind == KERNEL and _CONV_GEMM_KERNEL.search(name):
        return CONV_GEMM
    if launched_in in _BY_LAUNCHER:
        return _BY_LAUNCHER[launched_in]
    if kind == MEMCPY:
        return GPU_MEMCPY
    if kind == MEMSET:
        return GPU_MEMSET
    return ELEMENTWISE if _ELEMENTWISE_KERNEL.search(name) else OTHER_KERNELS


@dataclass(slots=True)
class Activity:
    """A GPU activity with its category."""

    start: float
    end: float
    device: object
    name: str
    category: str
    communication: bool


def gpu_activities(gpu: list[Event], cpu: CpuTimeline | None) -> list[Activity]:
    """Every GPU activity of a trace, categorised, by start time."""
    activities = []
    for event in gpu:
        name = kernel_name(event)
        launched_in = cpu.category_at(event.launch) if cpu is not None and event.launch is not None else None
        category = classify_gpu(name, event.kind, launched_in)
        communication = event.kind == KERNEL and bool(_COLLECTIVE_KERNEL.search(name))
        activities.append(Activity(event.start, event.end, event.device, name, category, communication))
    activities.sort(key=lambda a: a.start)
    return activities


@dataclass
class GpuStep:
    """One step's GPU time in microseconds (mean over devices): by category (GPU idle included; they add up to the
    step), communication hidden under compute, and kernel time and launches by (name, category)."""

    devices: int
    categories_us: Counter = field(default_factory=Counter)
    overlapped_us: Counter = field(default_factory=Counter)
    kernel_us: Counter = field(default_factory=Counter)
    kernel_calls: Counter = field(default_factory=Counter)


class GpuTimeline:
    """A trace's GPU activities, ready to be cut into step windows."""

    def __init__(self, activities: list[Activity]):
        self.activities = activities
        self.starts = [a.start for a in activities]
        self.longest = max((a.end - a.start for a in activities), default=0.0)
        self.devices = sorted({a.device for a in activities}, key=str)

    def step(self, start: float, end: float) -> GpuStep:
        """Partition [start, end] on each device's timeline (see the module's rules) and average over devices."""
        first = bisect_left(self.starts, start - self.longest)
        last = bisect_left(self.starts, end)
        window = [a for a in self.activities[first:last] if a.end > start]
        step = GpuStep(devices=len(self.devices))
        for device in self.devices:
            self._partition(step, [a for a in window if a.device == device], start, end)
        n = len(self.devices)
        for counter in (step.categories_us, step.overlapped_us, step.kernel_us):
            for key in counter:
                counter[key] /= n
        for activity in window:
            if activity.start >= start:
                step.kernel_calls[(activity.name, activity.category)] += 1 / n
        return step

    @staticmethod
    def _partition(step: GpuStep, activities: list[Activity], start: float, end: float) -> None:
        edges = []
        for index, activity in enumerate(activities):
            a, b = max(activity.start, start), min(activity.end, end)
            if b > a:
                edges += [(a, 1, index), (b, -1, index)]
                step.kernel_us[(activity.name, activity.category)] += b - a
        edges.sort(key=lambda edge: (edge[0], edge[1]))  # ends before starts at the same moment
        compute: Counter = Counter()
        communication: Counter = Counter()
        cursor = start
        for moment, change, index in edges:
            if moment > cursor:
                length = moment - cursor
                if compute:
                    for category in compute:
                        step.categories_us[category] += length / len(compute)
                    for category in communication:
                        step.overlapped_us[category] += length
                elif communication:
                    for category in communication:
                        step.categories_us[category] += length / len(communication)
                else:
                    step.categories_us[IDLE] += length
                cursor = moment
            activity = activities[index]
            active = communication if activity.communication else compute
            active[activity.category] += change
            if active[activity.category] == 0:
                del active[activity.category]
        if end > cursor:
            step.categories_us[IDLE] += end - cursor
