"""Public GPU traces nobody here recorded (``/work/shared/data/traces``, see its README; another copy with
``BNSTUDY_TRACES=DIR``): a torch 1.9-era ResNet-50 training trace from a V100 and a 2024 ResNet DDP/NCCL trace with
nanosecond timestamps. Skipped when absent."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import pytest

from bnstudy.data import SHARED_DATA
from bnstudy.traces.attribution import summarize, trace_steps
from bnstudy.traces.cpu_attribution import STEP_MARKER
from bnstudy.traces.trace_events import find_traces, read_trace

TRACES = Path(os.environ.get("BNSTUDY_TRACES", SHARED_DATA / "traces"))
RESNET = ["kineto-resnet50-v100", "hta-resnet-ddp-v100"]


def _trace_file(name: str) -> Path:
    folder = TRACES / name
    if not folder.is_dir():
        pytest.skip(f"public trace {folder} is not here")
    (files,) = find_traces(folder)[1].values()
    return files[0]


@pytest.fixture(scope="module", params=RESNET)
def resnet(request) -> tuple[Path, dict, list]:
    path = _trace_file(request.param)
    started = time.monotonic()
    summary = summarize(path, top=None)
    assert time.monotonic() - started < 60, "a summary should take seconds"
    return path, summary, trace_steps(read_trace(path))


def test_bn_forward_and_backward_show_on_cpu_and_on_gpu(resnet):
    _, summary, _ = resnet
    mean = summary["mean"]
    for key in ("bn_forward", "bn_backward"):
        assert mean["categories"][key]["ms"] > 0, key
        assert mean["gpu"]["categories"][key]["ms"] > 0, key


def test_step_times_are_the_traces_profiler_steps_and_categories_add_up(resnet):
    path, _, steps = resnet
    with gzip.open(path, "rt") as stream:
        events = json.load(stream)["traceEvents"]
    recorded = [e["dur"] for e in sorted(events, key=lambda e: e.get("ts", 0)) if STEP_MARKER.match(str(e.get("name")))]
    assert [s.duration_us for s in steps] == pytest.approx(recorded, abs=0.01)
    for step in steps:
        assert step.marked
        assert sum(step.categories_us.values()) == pytest.approx(step.duration_us, rel=0.03)
        assert sum(step.gpu.categories_us.values()) == pytest.approx(step.duration_us, rel=0.03)


def test_backward_on_the_autograd_thread_is_attributed(resnet):
    _, summary, _ = resnet
    categories = summary["mean"]["categories"]
    assert categories["other"]["share"] < 0.4  # was 81 % before the autograd thread counted
    assert categories["conv_linear"]["ms"] > categories["bn_backward"]["ms"] > 0


def test_ddp_trace_books_nccl_under_ddp_all_reduce():
    path = _trace_file("hta-resnet-ddp-v100")
    mean = summarize(path, top=None)["mean"]
    assert mean["categories"]["ddp_allreduce"]["ms"] > 0
    nccl = [op for op in mean["top_ops"] if op["name"].startswith("nccl:")]
    assert nccl and all(op["category"] == "ddp_allreduce" for op in nccl if op["name"] == "nccl:all_reduce")
    assert sum(op["self_ms"] for op in nccl if op["name"] == "nccl:all_reduce") > 0
    # World size 1: NCCL launches no kernels; DDP's GPU work is its bucket copies and gradient scaling.
    assert mean["gpu"]["categories"]["ddp_allreduce"]["ms"] > 0


def test_cpu_only_trace_without_operators_in_its_step_is_one_window():
    path = _trace_file("hta-cpu-only")
    (step,) = trace_steps(read_trace(path))
    assert not step.marked and step.gpu is None
    assert sum(step.categories_us.values()) == pytest.approx(step.duration_us)
    assert summarize(path)["mean"]["step_markers"] is False
