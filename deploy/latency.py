"""The one latency harness: timed calls, variants measured interleaved, and percentile summaries. Standard library
only, so it runs on the device (``deploy/bench.py``, ``deploy/quantize.py``) and in ``bnstudy bench export``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)


def time_calls(call: Callable[[], object], *, warmup: int, calls: int) -> list[float]:
    """Seconds per call of ``call()``, after ``warmup`` untimed calls (allocation, kernel selection, spin-up)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def measure_interleaved(
    calls: Mapping[Key, Callable[[], object]],
    *,
    rounds: int,
    per_round: int | Mapping[Key, int],
    warmup: int = 2,
    prepare: Mapping[Key, Callable[[], None]] | None = None,
    after_block: Callable[[], None] | None = None,
) -> dict[Key, list[float]]:
    """Seconds per call of each variant, the variants alternating block by block (``per_round`` calls each, per
    variant when a mapping) for ``rounds`` rounds, so drift in machine load hits all of them alike.
    ``prepare[key]()`` runs before each of its blocks (e.g. torch's global thread count); ``after_block()`` after
    each block (a progress bar)."""
    times: dict[Key, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            if prepare and key in prepare:
                prepare[key]()
            n = per_round if isinstance(per_round, int) else per_round[key]
            times[key] += time_calls(call, warmup=warmup, calls=n)
            if after_block:
                after_block()
    return times


def latency_summary(seconds: list[float], batch: int) -> dict[str, float]:
    """Per-call p50/p95/mean in ms and images/s at the median, for calls of ``batch`` images each."""
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    median = statistics.median(ordered)
    return {
        "batch": batch,
        "calls": len(ordered),
        "p50_ms": median * 1e3,
        "p95_ms": p95 * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
        "images_per_s": batch / median,
    }
