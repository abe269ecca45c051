"""Images/s of DDP with 2 processes × 1 thread, its gradients over each transport, against 1 process × 2 threads at
the same global batch. Every measuring process keeps freed memory as training processes do
(:func:`bnstudy.memory.retain_freed_memory`), so both sides allocate as training would."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from bnstudy.benchmarks.steps import images_per_s
from bnstudy.distributed.collectives import local_transports
from bnstudy.distributed.ddp_gradients import gradient_transport
from bnstudy.distributed.process_group import spawn_gloo
from bnstudy.errors import UserError, check_at_least, check_choice
from bnstudy.machine import describe_machine
from bnstudy.memory import requested_malloc, retain_freed_memory
from bnstudy.models import check_image_model, create_model
from bnstudy.norms import NORM_KINDS, check_norm_batch
from bnstudy.precision import check_precision, resolve_precision

WORLD_SIZE = 2
CPU = torch.device("cpu")


def _ddp_worker(
    rank: int,
    world_size: int,
    model: str,
    norm: str,
    global_batch: int,
    steps: int,
    precision: str,
    transport: str,
    out: str,
) -> None:
    malloc = retain_freed_memory()
    torch.manual_seed(0)
    chosen = resolve_precision(precision, CPU)
    rate = images_per_s(create_model(model, norm), global_batch // world_size, steps, chosen, ddp_transport=transport)
    if rank == 0:
        transport_taken = gradient_transport(requested=transport)
        result = {"per_rank_images_per_s": rate, "ddp_transport": transport_taken, "malloc": malloc}
        Path(out).write_text(json.dumps(result))


def check_ddp_options(model: str, norm: str, global_batch: int, steps: int, precision: str = "fp32") -> None:
    """Refuse options the workers would fail on, before any process is spawned."""
    check_image_model(model)
    check_choice("--norm", norm, NORM_KINDS)
    check_at_least("--steps", steps, 1)
    check_precision(precision, "cpu")
    requested_malloc()
    if global_batch < WORLD_SIZE or global_batch % WORLD_SIZE:
        raise UserError(f"--global-batch must be a positive multiple of {WORLD_SIZE} (one share per process)")
    check_norm_batch(norm, global_batch // WORLD_SIZE, WORLD_SIZE, "images per process (--global-batch / 2)")


def single_process_images_per_s(model: str, norm: str, batch: int, steps: int, precision: str, threads: int) -> float:
    """Throughput of one process with ``threads`` threads (restored afterwards), this one, which from now on keeps
    freed memory."""
    retain_freed_memory()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    try:
        return images_per_s(create_model(model, norm), batch, steps, resolve_precision(precision, CPU))
    finally:
        torch.set_num_threads(before)


class DdpThroughput(NamedTuple):
    """What :func:`ddp_images_per_s` measured: images/s over all processes, the transport DDP's gradients took and
    the workers' allocator setting (:func:`bnstudy.memory.malloc_setting`)."""

    images_per_s: float
    transport: str
    malloc: str


def ddp_images_per_s(
    model: str, norm: str, global_batch: int, steps: int, precision: str, transport: str = "auto"
) -> DdpThroughput:
    """Throughput of :data:`WORLD_SIZE` DDP processes × 1 thread (gloo) sharing ``global_batch``, their gradients
    over ``transport`` (auto | shm | gloo)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ddp.json"
        spawn_gloo(
            _ddp_worker, WORLD_SIZE, model, norm, global_batch, steps, precision, transport, str(path), threads=1
        )
        result = json.loads(path.read_text())
        return DdpThroughput(result["per_rank_images_per_s"] * WORLD_SIZE, result["ddp_transport"], result["malloc"])


def benchmark_ddp(
    model: str = "resnet", norm: str = "bn", global_batch: int = 512, steps: int = 8, precision: str = "fp32"
) -> dict:
    """Throughput of the same global batch in one process with 2 threads and in 2 DDP processes with 1 thread, the
    latter with its gradients over each transport this machine has (what training picks, ``auto``, is reported
    beside them)."""
    check_ddp_options(model, norm, global_batch, steps, precision)
    single = single_process_images_per_s(model, norm, global_batch, steps, precision, threads=WORLD_SIZE)
    measured = {
        transport: ddp_images_per_s(model, norm, global_batch, steps, precision, transport)
        for transport in local_transports()
    }
    by_transport = {transport: ddp.images_per_s for transport, ddp in measured.items()}
    chosen = "shm" if "shm" in by_transport else "gloo"  # auto, for processes on one host
    return {
        "model": model,
        "norm": norm,
        "precision": resolve_precision(precision, CPU).name,
        "global_batch": global_batch,
        "steps": steps,
        "single_process_2_threads_images_per_s": single,
        "ddp_2x1_images_per_s_by_transport": by_transport,
        "ratio_by_transport": {transport: rate / single for transport, rate in by_transport.items()},
        "ddp_transport": chosen,
        "ddp_2x1_images_per_s": by_transport[chosen],
        "ratio": by_transport[chosen] / single,
        "malloc": measured[chosen].malloc,
        "machine": describe_machine(),
    }
