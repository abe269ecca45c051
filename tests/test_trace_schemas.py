"""Every trace schema torch.profiler has written since torch 1.9, on small GPU training-step traces the tests write
themselves: the same step spelled as torch 1.9 (``Operator``/``Runtime``/``Kernel``, string thread ids, ``async``
launch flows), torch 2.x (``cpu_op``/``cuda_runtime``/``kernel``, ``ac2g`` flows), nanosecond resolution with
``baseTimeNanoseconds``, launches tied only by flows or only by External id, and the legacy autograd profiler's JSON
array, with and without ProfilerStep markers. CPU and GPU tables are checked to the microsecond."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from bnstudy.commands import main
from bnstudy.traces.attribution import summarize, trace_steps
from bnstudy.traces.cpu_attribution import AUTOGRAD_PREFIX
from bnstudy.traces.gpu_attribution import classify_gpu, kernel_name
from bnstudy.traces.trace_events import KERNEL, MEMCPY, MEMSET, Event, load_trace, normalise

PID, MAIN, AUTOGRAD = 4242, 4242, 4300
COMPUTE_STREAM, NCCL_STREAM = 7, 13

# One training step on a GPU, times in µs from the trace's origin: (thread, name, start, end, is_annotation).
OPS = [
    ("main", "ProfilerStep#3", 0, 1000, True),
    ("main", "aten::copy_", 30, 80, False),
    ("main", "aten::batch_norm", 100, 200, False),
    ("main", "aten::cudnn_batch_norm", 110, 190, False),
    ("main", "aten::conv2d", 200, 300, False),
    ("main", "aten::add_", 300, 350, False),
    ("main", "## backward ##", 400, 900, True),
    ("main", "aten::zero_", 900, 950, False),
    ("autograd", AUTOGRAD_PREFIX + "CudnnBatchNormBackward0", 450, 600, False),
    ("autograd", AUTOGRAD_PREFIX + "torch::autograd::AccumulateGrad", 600, 800, False),
    ("autograd", "c10d::allreduce_", 650, 750, False),
    ("autograd", "nccl:all_reduce", 660, 740, True),
    ("autograd", AUTOGRAD_PREFIX + "ConvolutionBackward0", 800, 880, False),
]
BN_FW = "void cudnn::bn_fw_tr_1C11_kernel_NCHW<float, 512>(float*)"
BN_BW = "void cudnn::bn_bw_1C11_kernel_new<float, 512>(float*)"
GEMM = "volta_sgemm_128x64_nn"
ADD = "void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float>>(int)"
NCCL = "ncclKernel_AllReduce_RING_LL_Sum_float(ncclDevComm*)"
DGRAD = "void cudnn::detail::dgrad_engine<float, 512>(float*)"
LAUNCH, S1, S2 = "cudaLaunchKernel", COMPUTE_STREAM, NCCL_STREAM
# (thread, runtime call, start, end, correlation, GPU kind, GPU name, GPU start, GPU end, stream)
LAUNCHES = [
    ("main", "cudaMemcpyAsync", 40, 50, 1, MEMCPY, "Memcpy HtoD (Pageable -> Device)", 40, 90, S1),
    ("main", LAUNCH, 120, 130, 2, KERNEL, BN_FW, 150, 250, S1),
    ("main", LAUNCH, 210, 220, 3, KERNEL, GEMM, 250, 400, S1),
    ("main", LAUNCH, 310, 320, 4, KERNEL, ADD, 400, 450, S1),
    ("autograd", LAUNCH, 460, 470, 5, KERNEL, BN_BW, 500, 650, S1),
    ("autograd", LAUNCH, 670, 680, 6, KERNEL, NCCL, 680, 900, S2),  # launched inside DDP's c10d::allreduce_
    ("autograd", LAUNCH, 810, 820, 7, KERNEL, DGRAD, 820, 870, S1),  # runs while NCCL does
    ("main", "cudaMemsetAsync", 910, 920, 8, MEMSET, "Memset (Device)", 950, 960, S1),
]
# What the step should come to, in µs.
CPU_EXPECTED = {"bn_forward": 100, "bn_backward": 150, "conv_linear": 180, "ddp_allreduce": 100, "other": 470}
GPU_EXPECTED = {
    "bn_forward": 100,
    "bn_backward": 150,
    "conv_gemm": 200,  # the sgemm, and the dgrad kernel that runs alongside NCCL
    "ddp_allreduce": 170,  # NCCL's 220 µs less the 50 µs hidden under dgrad
    "elementwise": 50,
    "memcpy": 50,
    "memset": 10,
    "idle": 270,
}
GPU_CATEGORIES = {KERNEL: ("Kernel", "kernel"), MEMCPY: ("Memcpy", "gpu_memcpy"), MEMSET: ("Memset", "gpu_memset")}
SCHEMAS = ["torch-1.9", "torch-2", "ns-resolution", "flows-only", "external-id-only", "legacy-array"]


def _innermost_op(thread: str, ts: float) -> int:
    """The index in OPS of the innermost operator of ``thread`` running at ``ts``."""
    candidates = [(end - start, i) for i, (t, _, start, end, _) in enumerate(OPS) if t == thread and start <= ts < end]
    return min(candidates)[1]


def build_trace(schema: str, *, steps: bool = True, origin: float = 1_700_000_000_000_000.0) -> dict | list:
    """The step above as ``schema`` writes it."""
    legacy, old = schema == "legacy-array", schema == "torch-1.9"
    if schema == "ns-resolution":
        origin = 86_400_123.456  # relative to baseTimeNanoseconds, fractional microseconds
    tids = {"main": MAIN, "autograd": AUTOGRAD}
    pid = "CPU functions" if legacy else PID

    def tid(thread: str) -> int | str:
        return str(tids[thread]) if old else tids[thread]

    def ts(t: float) -> float | int:
        return int(origin + t) if old else round(origin + t, 3)

    cpu_category = {"torch-1.9": "Operator"}.get(schema, "cpu_op")
    events: list[dict] = []
    for index, (thread, name, start, end, annotation) in enumerate(OPS):
        if not steps and name.startswith("ProfilerStep"):
            continue
        if old:
            name = name.removeprefix(AUTOGRAD_PREFIX).removesuffix("0")  # torch 1.9: bare node names
        event = {"ph": "X", "name": name, "pid": pid, "tid": tid(thread), "ts": ts(start), "dur": end - start}
        if not legacy:
            event["cat"] = "user_annotation" if annotation and not old else cpu_category
            event["args"] = {"External id": index + 1}
        events.append(event)
    for thread, call, start, end, correlation, kind, gpu_name, gpu_start, gpu_end, stream in LAUNCHES:
        gpu_tid = f"stream {stream}" if old else stream
        gpu = {"ph": "X", "name": gpu_name, "pid": 0, "tid": gpu_tid, "ts": ts(gpu_start), "dur": gpu_end - gpu_start}
        if legacy:
            if kind != KERNEL:
                continue  # the legacy profiler recorded kernels only
            gpu.update(pid="CUDA functions", tid=stream)
            link = {"cat": "cpu_to_cuda", "id": correlation}
            events += [
                gpu,
                {"ph": "s", **link, "pid": pid, "tid": tids[thread], "ts": ts(start)},
                {"ph": "f", **link, "pid": "CUDA functions", "tid": stream, "ts": ts(gpu_start), "bp": "e"},
            ]
            continue
        runtime = {"ph": "X", "name": call, "pid": pid, "tid": tid(thread), "ts": ts(start), "dur": end - start}
        runtime["cat"] = "Runtime" if old else "cuda_runtime"
        gpu["cat"] = GPU_CATEGORIES[kind][0 if old else 1]
        gpu["args"] = {"device": 0, "stream": stream}
        runtime["args"] = {}
        if schema not in ("flows-only", "external-id-only"):
            gpu["args"]["correlation"] = runtime["args"]["correlation"] = correlation
        if schema == "external-id-only":
            gpu["args"]["External id"] = _innermost_op(thread, start) + 1
        events += [runtime, gpu]
        if schema != "external-id-only":
            flow = {"torch-1.9": "async"}.get(schema, "ac2g")
            link = {"cat": flow, "name": flow, "id": correlation}
            events += [
                {"ph": "s", **link, "pid": pid, "tid": tids[thread], "ts": ts(start)},
                {"ph": "f", **link, "pid": 0, "tid": gpu_tid, "ts": ts(gpu_start), "bp": "e"},
            ]
    events.append({"ph": "i", "s": "t", "name": "[memory]", "pid": pid, "tid": MAIN, "ts": ts(5), "args": {"Bytes": 4}})
    events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": MAIN, "args": {"name": "python"}})
    if legacy:
        return events
    trace = {"schemaVersion": 1, "traceEvents": events}
    if schema == "ns-resolution":
        trace.update(displayTimeUnit="ns", baseTimeNanoseconds=1_712_195_000_000_000_000)
    elif not old:
        trace["displayTimeUnit"] = "ms"
    return trace


def write_trace(directory: Path, trace: dict | list, worker: str = "rank0", gz: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{worker}.1.pt.trace.json{'.gz' if gz else ''}"
    text = json.dumps(trace)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


@pytest.mark.parametrize("schema", SCHEMAS)
def test_every_schema_gives_the_same_cpu_and_gpu_tables(schema, tmp_path):
    path = write_trace(tmp_path / schema, build_trace(schema), gz=schema != "legacy-array")
    (step,) = trace_steps(load_trace(path))
    assert step.marked and step.duration_us == pytest.approx(1000, abs=0.01)
    assert sum(step.categories_us.values()) == pytest.approx(1000, abs=0.01)
    for key, us in CPU_EXPECTED.items():
        assert step.categories_us[key] == pytest.approx(us, abs=0.01), key
    assert step.self_us["aten::cudnn_batch_norm"] == pytest.approx(80, abs=0.01)
    assert step.calls["aten::batch_norm"] == 1
    gpu = step.gpu
    assert gpu is not None and gpu.devices == 1
    assert sum(gpu.categories_us.values()) == pytest.approx(1000, abs=0.01)
    if schema == "legacy-array":  # kernels only: the copy and the fill were not recorded
        expected = {**GPU_EXPECTED, "memcpy": 0, "memset": 0, "idle": GPU_EXPECTED["idle"] + 60}
    else:
        expected = GPU_EXPECTED
    for key, us in expected.items():
        assert gpu.categories_us[key] == pytest.approx(us, abs=0.01), key
    assert gpu.overlapped_us["ddp_allreduce"] == pytest.approx(50, abs=0.01)


@pytest.mark.parametrize("schema", ["torch-1.9", "torch-2"])
def test_without_step_markers_the_whole_trace_is_one_window_and_the_summary_says_so(schema, tmp_path, capsys):
    path = write_trace(tmp_path / schema, build_trace(schema, steps=False))
    (step,) = trace_steps(load_trace(path))
    assert not step.marked
    assert step.duration_us == pytest.approx(960 - 30, abs=0.01)  # first operator to last GPU activity
    assert sum(step.categories_us.values()) == pytest.approx(step.duration_us, abs=0.01)
    assert sum(step.gpu.categories_us.values()) == pytest.approx(step.duration_us, abs=0.01)
    summary = summarize(path)
    assert summary["workers"]["rank0"]["step_markers"] is False and summary["mean"]["step_markers"] is False
    assert main(["trace", "summary", str(path)]) == 0
    assert "no ProfilerStep markers around operators in rank0: the whole trace is one window" in capsys.readouterr().out


def test_summary_and_json_carry_both_tables(tmp_path, capsys):
    path = write_trace(tmp_path / "gpu", build_trace("torch-2"))
    assert main(["trace", "summary", str(path), "--top", "3"]) == 0
    text = capsys.readouterr().out
    for needle in ("CPU: the step's thread", "GPU: kernels", "convolution/GEMM", "GPU idle", "top 3 GPU kernels"):
        assert needle in text
    assert re.search(r"overlapped with compute.*\n  DDP gradient all-reduce +0\.050 ms", text)
    assert main(["trace", "summary", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    gpu = summary["mean"]["gpu"]
    assert gpu["categories"]["bn_backward"]["ms"] == pytest.approx(0.150)
    assert gpu["categories"]["idle"]["share"] == pytest.approx(0.27)
    assert gpu["overlapped_ms"]["ddp_allreduce"] == pytest.approx(0.050)
    kernels = {k["name"]: k for k in gpu["top_kernels"]}
    assert kernels["cudnn::bn_bw_1C11_kernel_new<float, 512>"]["category"] == "bn_backward"
    ops = {op["name"]: op for op in summary["mean"]["top_ops"]}
    assert ops["nccl:all_reduce"]["category"] == "ddp_allreduce"
    assert summary["gpu_category_labels"]["idle"] == "GPU idle"


def _cpu_only(tmp_path: Path) -> Path:
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#1", "pid": 1, "tid": 1, "ts": 0, "dur": 1000},
        {"ph": "X", "cat": "cpu_op", "name": "aten::native_batch_norm", "pid": 1, "tid": 1, "ts": 100, "dur": 300},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mkldnn_convolution", "pid": 1, "tid": 1, "ts": 400, "dur": 500},
    ]
    return write_trace(tmp_path / "cpu", {"traceEvents": events})


def test_compare_gpu_against_gpu_and_cpu_against_gpu(tmp_path, capsys):
    gpu_a = write_trace(tmp_path / "a", build_trace("torch-1.9"))
    gpu_b = write_trace(tmp_path / "b", build_trace("torch-2"))
    assert main(["trace", "compare", str(gpu_a), str(gpu_b), "--json"]) == 0
    comparison = json.loads(capsys.readouterr().out)
    assert comparison["device"] is None
    for row in comparison["gpu"]["categories"].values():
        assert row["delta_ms"] == pytest.approx(0, abs=1e-6)
    assert comparison["gpu"]["categories"]["conv_gemm"]["a_ms"] == pytest.approx(0.2)

    cpu = _cpu_only(tmp_path)
    assert main(["trace", "compare", str(cpu), str(gpu_b), "--json"]) == 0
    comparison = json.loads(capsys.readouterr().out)
    assert comparison["gpu"] is None
    device = comparison["device"]
    assert (device["a_device"], device["b_device"]) == ("cpu", "gpu")
    assert device["categories"]["bn_forward"]["a_ms"] == pytest.approx(0.3)  # CPU time of the CPU run
    assert device["categories"]["bn_forward"]["b_ms"] == pytest.approx(0.1)  # GPU time of the GPU run
    assert device["categories"]["conv"]["b_ms"] == pytest.approx(0.2)
    assert main(["trace", "compare", str(cpu), str(gpu_b)]) == 0
    text = capsys.readouterr().out
    assert "on the device that did the work: A's CPU time against B's GPU time" in text
    assert main(["trace", "compare", str(gpu_a), str(gpu_b)]) == 0
    assert "GPU kernels by time" in capsys.readouterr().out


def test_sync_bn_collectives_on_gpu_are_bn_synchronisation(tmp_path):
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#1", "pid": 1, "tid": 1, "ts": 0, "dur": 500},
        {"ph": "X", "cat": "cpu_op", "name": "SyncBatchNorm", "pid": 1, "tid": 1, "ts": 10, "dur": 200},
        {"ph": "X", "cat": "cpu_op", "name": "c10d::allgather_", "pid": 1, "tid": 1, "ts": 50, "dur": 100},
        {"ph": "X", "cat": "user_annotation", "name": "nccl:all_gather", "pid": 1, "tid": 1, "ts": 60, "dur": 80},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1, "tid": 1, "ts": 70, "dur": 5,
         "args": {"correlation": 9}},
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllGather_RING_LL(ncclDevComm*)", "pid": 0, "tid": 20,
         "ts": 100, "dur": 150, "args": {"correlation": 9, "device": 0}},
    ]  # fmt: skip
    (step,) = trace_steps({"traceEvents": events})
    assert step.categories_us["bn_sync"] == pytest.approx(100)
    assert step.gpu.categories_us["bn_sync"] == pytest.approx(150)
    assert step.gpu.categories_us["idle"] == pytest.approx(350)


WELFORD = "at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::WelfordOps<float, float, int>>>"
ATEN = "at::native::"


@pytest.mark.parametrize(
    ("name", "kind", "launched_in", "expected"),
    [
        ("cudnn::bn_fw_tr_1C11_singleread<float, 512, true, 1, 2, 0>", KERNEL, None, "bn_forward"),
        ("cudnn::bn_fw_inf_1C11_kernel_NCHW<float, float, true, 1>", KERNEL, None, "bn_forward"),
        ("cudnn::bn_bw_1C11_singleread<float, 512, true, 1, 2, 0>", KERNEL, "other", "bn_backward"),
        (ATEN + "batch_norm_collect_statistics_kernel<at::native::InvStd, float, int>", KERNEL, None, "bn_forward"),
        (ATEN + "batch_norm_backward_reduce_kernel<float, float, float, int>", KERNEL, None, "bn_backward"),
        (ATEN + "batch_norm_backward_elemt_kernel<float, float, float, int>", KERNEL, None, "bn_backward"),
        (
            ATEN + "elementwise_kernel<128, 2, batch_norm_elementwise()::{lambda()#1}>",
            KERNEL,
            "bn_backward",
            "bn_backward",
        ),
        (WELFORD, KERNEL, "bn_forward", "bn_forward"),
        (WELFORD, KERNEL, "other", "other_kernels"),  # var_mean outside BN
        ("MIOpenBatchNormFwdTrainSpatial", KERNEL, None, "bn_forward"),
        ("MIOpenBatchNormBwdSpatial", KERNEL, None, "bn_backward"),
        ("ncclDevKernel_AllGather_RING_LL", KERNEL, "bn_sync", "bn_sync"),
        ("ncclKernel_AllReduce_RING_LL_Sum_float", KERNEL, "ddp_allreduce", "ddp_allreduce"),
        ("ncclKernel_AllReduce_RING_LL_Sum_float", KERNEL, "other", "other_comm"),
        ("ncclKernel_AllReduce_RING_LL_Sum_float", KERNEL, None, "other_comm"),
        ("volta_scudnn_winograd_128x128_ldg1_ldg4_relu_tile148t_nt_v1", KERNEL, None, "conv_gemm"),
        ("sm80_xmma_fprop_implicit_gemm_tf32f32_tf32f32_f32_nhwckrsc_nchw", KERNEL, "other", "conv_gemm"),
        ("cask_cudnn::computeOffsetsKernel", KERNEL, "conv_linear", "conv_gemm"),
        (ATEN + "vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", KERNEL, "other", "elementwise"),
        (
            ATEN + "vectorized_elementwise_kernel<4, at::native::MulFunctor<float>>",
            KERNEL,
            "ddp_allreduce",
            "ddp_allreduce",
        ),
        ("Memcpy DtoD (Device -> Device)", MEMCPY, "ddp_allreduce", "ddp_allreduce"),
        ("Memcpy HtoD (Pageable -> Device)", MEMCPY, "data_loading", "memcpy"),
        ("Memset (Device)", MEMSET, None, "memset"),
        (
            ATEN + "(anonymous namespace)::softmax_warp_forward<float, float, float, 10, true>",
            KERNEL,
            None,
            "other_kernels",
        ),
    ],
)
def test_gpu_categories(name, kind, launched_in, expected):
    assert classify_gpu(name, kind, launched_in) == expected


def test_kernel_names_lose_void_and_arguments():
    name = "void cudnn::bn_bw_1C11_kernel_new<float, 512>(float, float const*, {lambda(int)#1})"
    assert kernel_name(Event(KERNEL, name, 0, 1, 0, 7)) == "cudnn::bn_bw_1C11_kernel_new<float, 512>"
    copy = "Memcpy HtoD (Pageable -> Device)"
    assert kernel_name(Event(MEMCPY, copy, 0, 1, 0, 7)) == copy


def test_thread_ids_as_strings_and_integers_name_one_thread():
    trace = normalise(build_trace("torch-1.9"))
    assert {op.tid for op in trace.cpu_ops} == {MAIN, AUTOGRAD}
    assert all(event.launch is not None and event.launch[1] in (MAIN, AUTOGRAD) for event in trace.gpu)
    assert {event.tid for event in trace.gpu} == {f"stream {COMPUTE_STREAM}", f"stream {NCCL_STREAM}"}


def test_damaged_events_are_skipped(tmp_path):
    trace = build_trace("torch-2")
    trace["traceEvents"] += [
        7,
        None,
        {"ph": "X", "cat": "cpu_op", "name": "aten::batch_norm", "pid": PID, "tid": MAIN, "ts": "soon", "dur": 5},
        {"ph": "X", "cat": "kernel", "pid": 0, "tid": 7, "ts": 1.0, "dur": 5},  # no name
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "pid": PID, "tid": MAIN, "ts": float("nan"), "dur": 1},
    ]
    (step,) = trace_steps(trace)
    assert step.categories_us["bn_forward"] == pytest.approx(100, abs=0.01)


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnstudy: error: ")
    return lines[0]


def test_traces_bnstudy_cannot_attribute_say_so_in_one_line(tmp_path, capsys):
    empty = write_trace(tmp_path / "empty", {"traceEvents": []})
    assert "holds no events" in _error(["trace", "summary", str(empty)], capsys)
    unknown = [
        {"ph": "X", "cat": "python_function", "name": "train.py(12): main", "pid": 1, "tid": 1, "ts": 0, "dur": 9},
        {"ph": "i", "s": "t", "name": "[memory]", "pid": 1, "tid": 1, "ts": 3},
    ]
    path = write_trace(tmp_path / "unknown", {"traceEvents": unknown})
    message = _error(["trace", "summary", str(path)], capsys)
    assert "2 events but none bnstudy can attribute" in message and "python_function (1)" in message
    gpu_only = [e for e in build_trace("torch-2")["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy")]
    path = write_trace(tmp_path / "gpu-only", {"traceEvents": gpu_only})
    assert "7 GPU activities but no CPU operator events" in _error(["trace", "summary", str(path)], capsys)
    array = tmp_path / "ints" / "rank0.pt.trace.json"
    array.parent.mkdir()
    array.write_text("[1, 2]")
    assert "no traceEvents" in _error(["trace", "summary", str(array)], capsys)
