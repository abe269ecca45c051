"""Recording torch.profiler traces in the layout TensorBoard's profiler plugin (torch-tb-profiler) reads:
``<run dir>/tb/<label>/<worker>.<ns>.pt.trace.json.gz``, one folder per run and one worker per rank.

Owns the ``record_function`` labels the training loop and inference put around their phases; the attribution
imports them from here. Imports torch only inside functions, so reading traces stays light.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnstudy.io import atomic_write
from bnstudy.training.run_directory import trace_dir

if TYPE_CHECKING:
    import torch

# record_function labels the training loop puts around its phases; they show in TensorBoard's trace view.
FORWARD = "forward"
BACKWARD = "backward"
OPTIMIZER_STEP = "optimizer_step"
DATA_LOADING = "data_loading"

TRACE_FILE = re.compile(r"^(?P<worker>.*?)(\.\d+)?\.pt\.trace\.json(\.gz)?$")  # torch-tb-profiler's pattern
# Kineto prints USDT probe and GPU-count lines on CPU-only machines unless told to be quiet.
QUIET_KINETO = {"KINETO_LOG_LEVEL": "6"}  # above ERROR and USDT (5)
# training_profiler skips this many steps, then warms up for this many, before it records.
SKIPPED_STEPS = 1
WARMUP_STEPS = 1


class _NoProfiler:
    """What :func:`training_profiler` returns when profiling is off: torch's profiler interface, doing nothing."""

    def __enter__(self) -> _NoProfiler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def start(self) -> None:
        """Nothing to start."""

    def step(self) -> None:
        """Nothing to advance."""

    def stop(self) -> None:
        """Nothing to stop."""


def _write_gzipped(source: Path, target: Path) -> None:
    with source.open("rb") as src, gzip.open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


def _trace_writer(directory: Path, worker: str) -> Callable[[Any], None]:
    """An ``on_trace_ready`` handler writing what ``tensorboard_trace_handler(dir, worker, use_gzip=True)`` writes,
    atomically: the TensorBoard plugin loads a run once, so it must never find a half-written file."""

    def write(prof) -> None:
        path = directory / f"{worker}.{time.time_ns()}.pt.trace.json.gz"
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            atomic_write(path, lambda target: _write_gzipped(raw, target))

    return write


def _profiler(directory: Path, worker: str, wait: int, warmup: int, active: int, with_stack: bool):
    for key, value in QUIET_KINETO.items():
        os.environ.setdefault(key, value)
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(
        activities=activities,
        schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=_trace_writer(directory, worker),
        record_shapes=True,
        with_stack=with_stack,
    )


def training_profiler(
    run_dir: str | Path,
    rank: int,
    *,
    enabled: bool,
    wait: int = SKIPPED_STEPS,
    warmup: int = WARMUP_STEPS,
    active: int = 3,
    with_stack: bool = False,
    label: str = "train",
):
    """A profiler for the training loop: use it as a context manager around the loop (or call ``.start()`` and
    ``.stop()``) and call ``.step()`` once after every training step. It skips ``wait`` steps, warms up for
    ``warmup``, records the next ``active`` steps once, and writes
    ``<run_dir>/tb/<label>/rank<rank>.<ns>.pt.trace.json.gz`` (CPU activity, CUDA too when present, input shapes,
    Python stacks with ``with_stack``) when they end, or at stop if the loop ends first; a loop shorter than
    ``wait + warmup + 1`` steps writes nothing. With ``enabled=False`` it is a no-op object.
    Wrap the loop's phases in ``torch.profiler.record_function(FORWARD | BACKWARD | OPTIMIZER_STEP |
    DATA_LOADING)`` so they show as labelled spans in TensorBoard."""
    if not enabled:
        return _NoProfiler()
    return _profiler(trace_dir(run_dir, label), f"rank{rank}", wait, warmup, active, with_stack)


def profile_inference(
    model: torch.nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    run_dir: str | Path,
    label: str,
    *,
    steps: int = 10,
    warmup: int = 2,
) -> Path:
    """Profile ``steps`` eval-mode forward passes (after ``warmup`` unrecorded ones) of ``model`` on
    ``example_input`` and write the trace to ``<run_dir>/tb/<label>/`` as worker ``rank0``; returns that folder.
    Profile an unfolded and a folded model under two labels and ``bnstudy trace compare`` the folders."""
    import torch

    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    directory = trace_dir(run_dir, label)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _profiler(directory, "rank0", 0, warmup, steps, False) as prof:
            for _ in range(warmup + steps):
                with torch.profiler.record_function(FORWARD):
                    model(*inputs)
                prof.step()
    finally:
        model.train(was_training)
    return directory
