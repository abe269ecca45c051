"""Images/s of DDP with 2 processes × 1 thread against 1 process × 2 threads at the same global batch."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from bnstudy.benchmarks.steps import training_step_times
from bnstudy.distributed.process_group import spawn_gloo
from bnstudy.errors import UserError, check_at_least, check_choice
from bnstudy.models import check_image_model, create_model
from bnstudy.norms import NORM_KINDS, check_norm_batch

WORLD_SIZE = 2


def _images_per_s(model: nn.Module, batch: int, steps: int) -> float:
    return batch * steps / sum(training_step_times(model, batch, steps))


def _ddp_worker(rank: int, world_size: int, model: str, norm: str, global_batch: int, steps: int, out: str) -> None:
    torch.manual_seed(0)
    rate = _images_per_s(create_model(model, norm), global_batch // world_size, steps)
    if rank == 0:
        Path(out).write_text(json.dumps({"per_rank_images_per_s": rate}))


def check_ddp_options(model: str, norm: str, global_batch: int, steps: int) -> None:
    """Refuse options the workers would fail on, before any process is spawned."""
    check_image_model(model)
    check_choice("--norm", norm, NORM_KINDS)
    check_at_least("--steps", steps, 1)
    if global_batch < WORLD_SIZE or global_batch % WORLD_SIZE:
        raise UserError(f"--global-batch must be a positive multiple of {WORLD_SIZE} (one share per process)")
    check_norm_batch(norm, global_batch // WORLD_SIZE, WORLD_SIZE, "images per process (--global-batch / 2)")


def benchmark_ddp(model: str = "resnet", norm: str = "bn", global_batch: int = 512, steps: int = 8) -> dict:
    """Throughput of the same global batch in one process with 2 threads and in 2 DDP processes with 1 thread."""
    check_ddp_options(model, norm, global_batch, steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    try:
        single = _images_per_s(create_model(model, norm), global_batch, steps)
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ddp.json"
        spawn_gloo(_ddp_worker, WORLD_SIZE, model, norm, global_batch, steps, str(path), threads=1)
        ddp = json.loads(path.read_text())["per_rank_images_per_s"] * WORLD_SIZE
    return {
        "model": model,
        "norm": norm,
        "global_batch": global_batch,
        "steps": steps,
        "single_process_2_threads_images_per_s": single,
        "ddp_2x1_images_per_s": ddp,
        "ratio": ddp / single,
    }
