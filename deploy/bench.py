"""Inference speed of an exported model on this machine: batch-1 latency (p50/p95) and batch-64 throughput for
onnxruntime fp32 and INT8, each with the fastest session options a grid search finds, and torch eager when torch
and the training run are at hand.

    python deploy/bench.py model.onnx --int8 model.int8.onnx --torch-source runs/NAME --out bench.json

The grid: graph optimisation level (disabled/basic/extended/all) × intra-op threads (1 and --threads) × execution
mode (sequential/parallel), searched separately for batch 1 and batch 64. torch eager gets the same thread choices.
The final measurement alternates the variants round by round (each block after its own warm-up calls), so drift in
machine load hits all of them alike. Writes JSON and, where matplotlib is installed, a bar chart beside it.

torch is imported only for --torch-source (lazily, with bnstudy to rebuild the model from its checkpoint), so the
script runs on the device with onnxruntime and numpy alone; the torch column is then left out.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `deploy` importable from the folder holding it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime as ort

from deploy import latency
from deploy.edge import (
    EXECUTION_MODES,
    OPTIMIZATION_LEVELS,
    ArgumentParser,
    DeployError,
    SessionConfig,
    atomic_write,
    check_writable,
    first_line,
    load_model,
    preprocess,
    write_json,
)

PROG = "bench.py"
BATCHES = (1, 64)
TARGETS = {"int8_vs_fp32_throughput_b64": 1.5, "ort_fp32_vs_torch_latency_b1": 10.0}


def available_cores() -> int:
    """Cores this process may use (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def session_grid(max_threads: int) -> list[SessionConfig]:
    """Every combination of optimisation level, thread count (1 and ``max_threads``) and execution mode."""
    threads = sorted({1, max_threads})
    return [SessionConfig(level, n, mode) for level in OPTIMIZATION_LEVELS for n in threads for mode in EXECUTION_MODES]


@dataclass
class Runner:
    """One way to run the model: ``prepare()`` before a block of calls (torch's global thread count), then calls."""

    variant: str
    options: dict[str, Any]
    call: Callable[[np.ndarray], object]
    prepare: Callable[[], None] = field(default=lambda: None)


def ort_runner(variant: str, path: Path, config: SessionConfig) -> Runner:
    session, spec = load_model(path, config)
    return Runner(variant, asdict(config), lambda x: session.run([spec.output_name], {spec.input_name: x})[0])


def torch_runners(source: Path, thread_choices: Sequence[int]) -> list[Callable[[], Runner]]:
    """torch eager runners (one per thread count) for the model of the checkpoint at ``source``."""
    try:
        import torch

        from bnstudy.errors import UserError
        from bnstudy.training.checkpoint import model_from_checkpoint
    except ImportError as exc:
        raise DeployError(f"--torch-source needs torch and bnstudy ({first_line(exc)}); leave it out here") from None
    try:
        model, _ = model_from_checkpoint(source)
    except UserError as exc:
        raise DeployError(str(exc)) from None

    def call(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    def runner(threads: int) -> Runner:
        return Runner("torch eager", {"threads": threads}, call, lambda: torch.set_num_threads(threads))

    return [lambda n=n: runner(n) for n in thread_choices]


def _search(
    factories: list[Callable[[], Runner]], feeds: dict[int, np.ndarray], calls: dict[int, int]
) -> tuple[list[dict[str, Any]], dict[int, Runner]]:
    """Median ms per call of every candidate and batch size, and the fastest runner per batch size. Candidates are
    built one at a time and dropped unless fastest, so idle sessions' threads do not compete with the one timed."""
    rows, best, best_ms = [], {}, {}
    for make in factories:
        runner = make()
        runner.prepare()
        row: dict[str, Any] = {"options": runner.options}
        for batch, x in feeds.items():
            seconds = latency.time_calls(partial(runner.call, x), warmup=2, calls=calls[batch])
            ms = latency.latency_summary(seconds, batch)["p50_ms"]
            row[f"b{batch}_p50_ms"] = ms
            if ms < best_ms.get(batch, float("inf")):
                best[batch], best_ms[batch] = runner, ms
        rows.append(row)
    return rows, best


def measure_interleaved(
    runners: dict[tuple[str, int], Runner], feeds: dict[int, np.ndarray], calls: dict[int, int], rounds: int
) -> dict[tuple[str, int], list[float]]:
    """Seconds per call for each (variant, batch) runner, alternating variants round by round."""
    return latency.measure_interleaved(
        {key: partial(runner.call, feeds[key[1]]) for key, runner in runners.items()},
        rounds=rounds,
        per_round={key: max(1, calls[key[1]] // rounds) for key in runners},
        prepare={key: runner.prepare for key, runner in runners.items()},
    )


def benchmark(
    model: Path,
    int8: Path | None = None,
    torch_source: Path | None = None,
    *,
    max_threads: int | None = None,
    calls: dict[int, int] | None = None,
    search_calls: dict[int, int] | None = None,
    rounds: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Search session options, then measure batch-1 latency and batch-64 throughput for every variant."""
    max_threads = max_threads or available_cores()
    calls = calls or {1: 300, 64: 30}
    search_calls = search_calls or {1: 30, 64: 4}
    _, spec = load_model(model)
    if int8 is not None and load_model(int8)[1].shape != spec.shape:
        raise DeployError(f"--int8 {int8} takes other inputs than {model}; pass the INT8 version of this model")
    images = np.random.default_rng(seed).integers(0, 256, (max(BATCHES), spec.size[0], spec.size[1], spec.channels))
    feeds = {batch: preprocess(images[:batch].astype(np.uint8), spec) for batch in BATCHES}
    candidates: dict[str, list[Callable[[], Runner]]] = {}
    notes = []
    if torch_source is not None:
        candidates["torch eager"] = torch_runners(torch_source, sorted({1, max_threads}))
    else:
        notes.append("torch eager: not measured (no --torch-source)")
    grid = session_grid(max_threads)
    candidates["ort fp32"] = [lambda c=c: ort_runner("ort fp32", model, c) for c in grid]
    if int8 is not None:
        candidates["ort int8"] = [lambda c=c: ort_runner("ort int8", int8, c) for c in grid]
    search: dict[str, list[dict]] = {}
    best: dict[tuple[str, int], Runner] = {}
    for variant, factories in candidates.items():
        search[variant], fastest = _search(factories, feeds, search_calls)
        best |= {(variant, batch): runner for batch, runner in fastest.items()}
    torch_difference = None
    if torch_source is not None:
        x = feeds[max(BATCHES)]
        ort_out, torch_out = best[("ort fp32", max(BATCHES))].call(x), best[("torch eager", max(BATCHES))].call(x)
        torch_difference = float(np.abs(ort_out - torch_out).max())
    times = measure_interleaved(best, feeds, calls, rounds)
    rows = [
        {"variant": variant, "options": best[(variant, batch)].options} | latency.latency_summary(seconds, batch)
        for (variant, batch), seconds in times.items()
    ]
    return {
        "model": str(model),
        "int8": str(int8) if int8 else None,
        "torch_source": str(torch_source) if torch_source else None,
        "max_threads": max_threads,
        "cores": available_cores(),
        "machine": platform.processor() or platform.machine(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "input_shape": list(spec.shape),
        "rounds": rounds,
        "torch_vs_ort_fp32_max_abs": torch_difference,
        "rows": rows,
        "search": search,
        "ratios": ratios(rows),
        "targets": TARGETS,
        "notes": notes,
    }


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The targets' ratios, where both sides were measured."""
    by = {(row["variant"], row["batch"]): row for row in rows}
    out = {}
    if ("ort int8", 64) in by:
        out["int8_vs_fp32_throughput_b64"] = by[("ort int8", 64)]["images_per_s"] / by[("ort fp32", 64)]["images_per_s"]
        out["int8_vs_fp32_latency_b1"] = by[("ort fp32", 1)]["p50_ms"] / by[("ort int8", 1)]["p50_ms"]
    if ("torch eager", 1) in by:
        out["ort_fp32_vs_torch_latency_b1"] = by[("torch eager", 1)]["p50_ms"] / by[("ort fp32", 1)]["p50_ms"]
        out["ort_fp32_vs_torch_throughput_b64"] = (
            by[("ort fp32", 64)]["images_per_s"] / by[("torch eager", 64)]["images_per_s"]
        )
    return out


def _options_text(options: dict[str, Any]) -> str:
    if "level" not in options:
        return f"{options['threads']} threads"
    return f"{options['level']}, {options['threads']} thr, {options['execution_mode']}"


def print_benchmark(result: dict[str, Any]) -> None:
    print(f"{result['model']}: input {result['input_shape']}, up to {result['max_threads']} threads")
    print(f"{'variant':<13}{'batch':>6}{'p50 ms':>10}{'p95 ms':>10}{'images/s':>11}  fastest options")
    for row in result["rows"]:
        print(
            f"{row['variant']:<13}{row['batch']:>6}{row['p50_ms']:>10.3f}{row['p95_ms']:>10.3f}"
            f"{row['images_per_s']:>11.0f}  {_options_text(row['options'])}"
        )
    for name, value in result["ratios"].items():
        target = result["targets"].get(name)
        verdict = "" if target is None else f" (target {target:g}×: {'met' if value >= target else 'NOT met'})"
        print(f"{name}: {value:.2f}×{verdict}")
    if result["torch_vs_ort_fp32_max_abs"] is not None:
        print(f"torch eager vs ort fp32 logits, batch 64: max |difference| {result['torch_vs_ort_fp32_max_abs']:.2e}")
    for note in result["notes"]:
        print(f"note: {note}")


def plot_benchmark(result: dict[str, Any], path: Path) -> Path | None:
    """Bar chart of batch-1 p50 latency (p95 as whisker) and batch-64 throughput; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, batch in ((left, 1), (right, 64)):
        rows = [row for row in result["rows"] if row["batch"] == batch]
        names = [row["variant"] for row in rows]
        if batch == 1:
            p50 = np.array([row["p50_ms"] for row in rows])
            p95 = np.array([row["p95_ms"] for row in rows])
            bars = ax.bar(names, p50, yerr=[np.zeros_like(p50), p95 - p50], capsize=4, color="tab:blue")
            ax.bar_label(bars, fmt="%.2f", label_type="center", color="white")
            ax.set(ylabel="ms (p50, whisker to p95)", title="batch-1 latency")
        else:
            bars = ax.bar(names, [row["images_per_s"] for row in rows], color="tab:green")
            ax.bar_label(bars, fmt="%.0f", label_type="center", color="white")
            ax.set(ylabel="images/s", title="batch-64 throughput")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{Path(result['model']).name}, up to {result['max_threads']} threads, fastest session options")
    fig.tight_layout()
    path = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="fp32 ONNX model exported by `bnstudy export`")
    p.add_argument("--int8", type=Path, help="its INT8 version from deploy/quantize.py")
    p.add_argument("--torch-source", type=Path, help="run directory or checkpoint: adds torch eager (needs torch)")
    p.add_argument("--threads", type=int, help="most threads to try (default: the cores available)")
    p.add_argument("--out", type=Path, default=Path("runs/deploy/bench.json"), help="JSON result (PNG beside it)")
    p.add_argument("--calls", type=int, nargs=2, default=(300, 30), metavar=("B1", "B64"), help="timed calls")
    p.add_argument("--rounds", type=int, default=3, help="rounds the timed calls are split into (default: 3)")
    p.add_argument("--quick", action="store_true", help="few calls: a smoke run, not a measurement")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.threads is not None and args.threads < 1:
            raise DeployError(f"--threads must be at least 1, got {args.threads}")
        if min(args.calls) < 1 or args.rounds < 1:
            raise DeployError("--calls and --rounds must be at least 1")
        if args.out.suffix.lower() == ".png":
            raise DeployError(f"--out {args.out}: the JSON result needs a name of its own (the PNG goes beside it)")
        if args.out.resolve() in {p.resolve() for p in (args.model, args.int8) if p}:
            raise DeployError(f"--out {args.out} would overwrite an input; choose another file name")
        check_writable(args.out)
        calls = {1: 10, 64: 2} if args.quick else dict(zip(BATCHES, args.calls))
        search_calls = {1: 3, 64: 1} if args.quick else None
        result = benchmark(
            args.model,
            args.int8,
            args.torch_source,
            max_threads=args.threads,
            calls=calls,
            search_calls=search_calls,
            rounds=1 if args.quick else args.rounds,
        )
        write_json(args.out, result)
        png = plot_benchmark(result, args.out.with_suffix(".png"))
    except DeployError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print_benchmark(result)
    print(f"wrote {args.out}" + (f" and {png}" if png else " (no chart: matplotlib is not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
