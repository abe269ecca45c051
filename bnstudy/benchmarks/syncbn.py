"""DDP step time with plain BN vs bnstudy's SyncBatchNorm (2 processes × 1 thread, gloo)."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch

from bnstudy.benchmarks.steps import training_step_times
from bnstudy.distributed.process_group import spawn_gloo
from bnstudy.errors import check_at_least
from bnstudy.models import check_image_model, create_model
from bnstudy.norms import check_norm_batch


def _worker(rank: int, world_size: int, model_name: str, batches: list[int], steps: int, rounds: int, out: str) -> None:
    torch.manual_seed(0)
    results: dict[str, dict[str, list[float]]] = {}
    for batch in batches:
        per_norm: dict[str, list[float]] = {"bn": [], "syncbn": []}
        models = {norm: create_model(model_name, norm).to(memory_format=torch.channels_last) for norm in per_norm}
        for _ in range(rounds):  # alternate so drift in machine load hits both alike
            for norm, model in models.items():
                per_norm[norm] += training_step_times(model, batch, steps)
        results[str(batch)] = per_norm
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def check_syncbn_options(model: str, batches: tuple[int, ...], steps: int, rounds: int, world_size: int) -> None:
    """Refuse options the workers would fail on, before any process is spawned."""
    check_image_model(model)
    for name, value in (("--steps", steps), ("--rounds", rounds), ("world size", world_size)):
        check_at_least(name, value, 1)
    for batch in batches:
        check_norm_batch("bn", batch, world_size, "--batches")  # plain BN, the stricter half of the comparison


def benchmark_syncbn(
    model: str = "resnet", batches: tuple[int, ...] = (8, 64), steps: int = 10, rounds: int = 2, world_size: int = 2
) -> dict:
    """Median DDP step time per norm and per-rank batch size, and the syncbn/bn ratio, measured in one run."""
    check_syncbn_options(model, batches, steps, rounds, world_size)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.json"
        spawn_gloo(_worker, world_size, model, list(batches), steps, rounds, str(raw_path), threads=1)
        raw = json.loads(raw_path.read_text())
    rows = []
    for batch, per_norm in raw.items():
        bn, sync = statistics.median(per_norm["bn"]), statistics.median(per_norm["syncbn"])
        rows.append(
            {
                "images_per_rank": int(batch),
                "bn_step_s": bn,
                "syncbn_step_s": sync,
                "ratio": sync / bn,
                "samples": len(per_norm["bn"]),
            }
        )
    return {
        "model": model,
        "world_size": world_size,
        "threads_per_rank": 1,
        "backend": "gloo",
        "torch": torch.__version__,
        "results": rows,
    }
