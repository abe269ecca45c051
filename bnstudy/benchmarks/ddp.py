"""Images/s of DDP with 2 processes × 1 thread against 1 process × 2 threads at the same global batch."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from bnstudy.benchmarks.steps import training_step_times
from bnstudy.distributed.process_group import spawn_gloo
from bnstudy.models import create_model


def _images_per_s(model: nn.Module, batch: int, steps: int) -> float:
    return batch * steps / sum(training_step_times(model, batch, steps))


def _ddp_worker(rank: int, world_size: int, model: str, norm: str, global_batch: int, steps: int, out: str) -> None:
    torch.manual_seed(0)
    rate = _images_per_s(create_model(model, norm), global_batch // world_size, steps)
    if rank == 0:
        Path(out).write_text(json.dumps({"per_rank_images_per_s": rate}))


def benchmark_ddp(model: str = "resnet", norm: str = "bn", global_batch: int = 512, steps: int = 8) -> dict:
    """Throughput of the same global batch in one process with 2 threads and in 2 DDP processes with 1 thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    try:
        single = _images_per_s(create_model(model, norm), global_batch, steps)
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ddp.json"
        spawn_gloo(_ddp_worker, 2, model, norm, global_batch, steps, str(path), threads=1)
        ddp = json.loads(path.read_text())["per_rank_images_per_s"] * 2
    return {
        "model": model,
        "norm": norm,
        "global_batch": global_batch,
        "steps": steps,
        "single_process_2_threads_images_per_s": single,
        "ddp_2x1_images_per_s": ddp,
        "ratio": ddp / single,
    }
