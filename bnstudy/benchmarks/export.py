"""Inference speed of the exported models: batch-1 latency and batch-256 throughput for torch eager, torch with
BN folded, and onnxruntime on the unfolded and folded ONNX files with graph optimisations disabled and at the
default level, measured in one run beside the machine's fp32 matmul rate."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from bnstudy.edge.deploy_scripts import deploy_module
from bnstudy.edge.fold import fold_batchnorm, randomize_batchnorm
from bnstudy.edge.onnx_export import export_onnx, ort_session
from bnstudy.machine import describe_machine
from bnstudy.models import CifarResNet

INPUT_SHAPE = (3, 32, 32)
THROUGHPUT_BATCH = 256
VARIANTS = (
    "torch eager",
    "torch folded",
    "ort unfolded disabled",
    "ort unfolded default",
    "ort folded disabled",
    "ort folded default",
)
TARGET_SPEEDUP_B1 = 10.0
TARGET_MATMUL_FRACTION = 0.8


def _models() -> dict[str, Callable[[], nn.Module]]:
    import torchvision

    return {"CifarResNet": CifarResNet, "resnet18@32x32": torchvision.models.resnet18}


MATMUL_N = 1024
MATMUL = "fp32 matmul"


def _matmul_runner(n: int = MATMUL_N) -> Callable[[np.ndarray], object]:
    """An n×n fp32 matmul on the current torch threads, timed beside the models so it sees the same load."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda _: a @ b


def matmul_rate(times: list[float], n: int = MATMUL_N) -> dict[str, float]:
    """GFLOP/s of the n×n matmul from its call times: best (the machine's rate) and median."""
    flops = 2 * n**3
    return {
        "n": n,
        "samples": len(times),
        "best_gflops": flops / min(times) / 1e9,
        "median_gflops": flops / statistics.median(times) / 1e9,
    }


def model_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-adds ×2 of one forward pass for one sample (conv and matmul; elementwise ops not counted)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    return counter.get_total_flops()


def _runners(model: nn.Module, folded: nn.Module, unfolded_path: Path, folded_path: Path, threads: int) -> dict:
    def torch_runner(module: nn.Module) -> Callable[[np.ndarray], object]:
        def call(x: np.ndarray) -> object:
            with torch.inference_mode():
                return module(torch.from_numpy(x))

        return call

    def ort_runner(path: Path, level: str) -> Callable[[np.ndarray], object]:
        session = ort_session(path, level, threads)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})

    return {
        "torch eager": torch_runner(model),
        "torch folded": torch_runner(folded),
        "ort unfolded disabled": ort_runner(unfolded_path, "disabled"),
        "ort unfolded default": ort_runner(unfolded_path, "default"),
        "ort folded disabled": ort_runner(folded_path, "disabled"),
        "ort folded default": ort_runner(folded_path, "default"),
    }


def _measure(runners: dict, x: np.ndarray, rounds: int, per_round: int, progress: tqdm) -> dict[str, list[float]]:
    """Per-call seconds of every runner on ``x``, the variants interleaved (see ``deploy/latency.py``)."""
    calls = {name: partial(run, x) for name, run in runners.items()}
    harness = deploy_module("latency")
    return harness.measure_interleaved(calls, rounds=rounds, per_round=per_round, warmup=1, after_block=progress.update)


def benchmark_export(threads: int = 2, quick: bool = False, seed: int = 0) -> dict:
    """Median batch-1 latency and batch-256 throughput per model and variant, an fp32 matmul timed in the same
    rounds, and the targets' ratios."""
    torch.set_num_threads(threads)
    b1_rounds, b1_calls = (2, 10) if quick else (5, 60)
    big_rounds, big_calls = (1, 2) if quick else (3, 2)
    models = _models()
    matmul_times: list[float] = []
    steps = len(models) * (len(VARIANTS) + 1) * (b1_rounds + big_rounds)
    progress = tqdm(total=steps, desc="bench export", unit="step", disable=None)  # None: off without a terminal
    results = []
    for name, build in models.items():
        torch.manual_seed(seed)
        model = randomize_batchnorm(build(), torch.Generator().manual_seed(seed)).eval()
        example = torch.randn(2, *INPUT_SHAPE)
        with tempfile.TemporaryDirectory() as tmp:
            unfolded_path, folded_path = Path(tmp) / "unfolded.onnx", Path(tmp) / "folded.onnx"
            export_onnx(model, example, unfolded_path, fold_bn=False)
            export_onnx(model, example, folded_path, fold_bn=True, count_unfolded=False)
            runners = _runners(model, fold_batchnorm(model, example), unfolded_path, folded_path, threads)
            runners[MATMUL] = _matmul_runner()
            x1 = np.random.default_rng(seed).standard_normal((1, *INPUT_SHAPE), dtype=np.float32)
            xb = np.random.default_rng(seed).standard_normal((THROUGHPUT_BATCH, *INPUT_SHAPE), dtype=np.float32)
            latency = _measure(runners, x1, b1_rounds, b1_calls, progress)
            batch = _measure(runners, xb, big_rounds, big_calls, progress)
        matmul_times += latency.pop(MATMUL) + batch.pop(MATMUL)
        rows = []
        for variant in VARIANTS:
            rows.append(
                {
                    "variant": variant,
                    "latency_b1_ms": statistics.median(latency[variant]) * 1e3,
                    "latency_b1_samples": len(latency[variant]),
                    "throughput_b256_img_s": THROUGHPUT_BATCH / statistics.median(batch[variant]),
                    "throughput_b256_best_img_s": THROUGHPUT_BATCH / min(batch[variant]),
                    "throughput_b256_samples": len(batch[variant]),
                }
            )
        results.append({"model": name, "flops_per_image": model_flops(model, INPUT_SHAPE), "rows": rows})
    progress.close()
    rate = matmul_rate(matmul_times)
    for model in results:
        _add_targets(model, rate["best_gflops"])
    return {
        "threads": threads,
        "quick": quick,
        "input_shape": list(INPUT_SHAPE),
        "throughput_batch": THROUGHPUT_BATCH,
        "matmul": rate,
        "targets": {"speedup_b1": TARGET_SPEEDUP_B1, "matmul_fraction_b256": TARGET_MATMUL_FRACTION},
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "machine": describe_machine(),
        "results": results,
    }


def _add_targets(model: dict, matmul_gflops: float) -> None:
    """GFLOP/s per variant and the two targets' ratios. Throughput against the matmul rate compares best runs on
    both sides: on a shared machine, medians measure the other users' load as much as this one's speed."""
    for row in model["rows"]:
        row["gflops_b256_best"] = row["throughput_b256_best_img_s"] * model["flops_per_image"] / 1e9
        row["matmul_fraction_b256"] = row["gflops_b256_best"] / matmul_gflops
    by_variant = {row["variant"]: row for row in model["rows"]}
    eager = by_variant["torch eager"]["latency_b1_ms"]
    speedup = eager / by_variant["ort folded default"]["latency_b1_ms"]
    fraction = by_variant["ort folded default"]["matmul_fraction_b256"]
    model["targets"] = {
        "speedup_b1_ort_folded_default_vs_torch_eager": speedup,
        "speedup_b1_ort_folded_disabled_vs_torch_eager": eager / by_variant["ort folded disabled"]["latency_b1_ms"],
        "matmul_fraction_b256_ort_folded_default": fraction,
        "speedup_target_met": speedup >= TARGET_SPEEDUP_B1,
        "matmul_fraction_target_met": fraction >= TARGET_MATMUL_FRACTION,
    }


def print_export_benchmark(result: dict) -> None:
    """The benchmark as text tables, one per model, with the targets' ratios."""
    rate = result["matmul"]
    print(
        f"fp32 matmul {rate['n']}×{rate['n']}, {result['threads']} threads, timed between the models' runs: "
        f"{rate['best_gflops']:.1f} GFLOP/s best, {rate['median_gflops']:.1f} median ({rate['samples']} calls)"
    )
    for model in result["results"]:
        print(f"\n{model['model']} ({model['flops_per_image'] / 1e6:.0f} MFLOP/image)")
        header = f"{'variant':<24}{'b1 ms':>9}{'b256 img/s':>12}{'best img/s':>12}{'GFLOP/s':>9}{'of matmul':>11}"
        print(header)
        for row in model["rows"]:
            print(
                f"{row['variant']:<24}{row['latency_b1_ms']:>9.3f}{row['throughput_b256_img_s']:>12.0f}"
                f"{row['throughput_b256_best_img_s']:>12.0f}{row['gflops_b256_best']:>9.1f}{row['matmul_fraction_b256']:>11.0%}"
            )
        t = model["targets"]
        speed_met = "met" if t["speedup_target_met"] else "NOT met"
        fraction_met = "met" if t["matmul_fraction_target_met"] else "NOT met"
        print(
            f"batch-1 speedup of ort folded over torch eager: {t['speedup_b1_ort_folded_default_vs_torch_eager']:.1f}× "
            f"(default), {t['speedup_b1_ort_folded_disabled_vs_torch_eager']:.1f}× (disabled); target "
            f"{result['targets']['speedup_b1']:.0f}× {speed_met}"
        )
        print(
            f"batch-256 ort folded default (best run): {t['matmul_fraction_b256_ort_folded_default']:.0%} of the best "
            "matmul rate; "
            f"target {result['targets']['matmul_fraction_b256']:.0%} {fraction_met}"
        )


def plot_export_benchmark(result: dict, path: str | Path) -> Path:
    """Bar chart: batch-1 latency and batch-256 throughput per variant, one group of bars per model."""
    from matplotlib.figure import Figure

    from bnstudy.io import save_png

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    models = [m["model"] for m in result["results"]]
    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        rows = [next(r for r in m["rows"] if r["variant"] == variant) for m in result["results"]]
        xs = np.arange(len(models)) + (i - (len(VARIANTS) - 1) / 2) * width
        axes[0].bar(xs, [r["latency_b1_ms"] for r in rows], width, label=variant)
        axes[1].bar(xs, [r["throughput_b256_img_s"] for r in rows], width, label=variant)
    for ax, title, unit in (
        (axes[0], "batch-1 latency (median)", "ms"),
        (axes[1], f"batch-{result['throughput_batch']} throughput", "images/s"),
    ):
        ax.set_xticks(np.arange(len(models)), models)
        ax.set_title(f"{title}, {result['threads']} threads")
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    return save_png(fig, path)


def profile_folding(run_dir: str | Path, threads: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """Profiler traces of the default CIFAR network's batch-1 eager inference before and after folding, under
    ``<run_dir>/tb/unfolded`` and ``<run_dir>/tb/folded``, for ``bnstudy trace compare``."""
    from bnstudy.traces.record import profile_inference

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = randomize_batchnorm(CifarResNet(), torch.Generator().manual_seed(seed)).eval()
    example = torch.randn(1, *INPUT_SHAPE)
    folded = fold_batchnorm(model, example)
    return profile_inference(model, example, run_dir, "unfolded"), profile_inference(folded, example, run_dir, "folded")
