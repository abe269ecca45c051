"""DDP step time with plain BN vs bnstudy's SyncBatchNorm over each CPU transport (gloo, shared memory),
2 processes × 1 thread, measured in one run with the variants' steps interleaved one by one."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from bnstudy.benchmarks.steps import timed_training_step
from bnstudy.distributed.collectives import local_transports, requested_timeout_s, select_transport
from bnstudy.distributed.ddp_gradients import gradient_transport, requested_ddp_transport
from bnstudy.distributed.process_group import spawn_gloo
from bnstudy.distributed.syncbn import convert_sync_batchnorm
from bnstudy.distributed.syncbn_kernels import cpu_kernels, requested_kernels
from bnstudy.errors import check_at_least
from bnstudy.machine import describe_machine
from bnstudy.memory import requested_malloc, retain_freed_memory
from bnstudy.models import check_image_model, create_model
from bnstudy.norms import check_norm_batch
from bnstudy.precision import check_precision, resolve_precision

# The shared-memory transport's goal per images per rank: SyncBN's step at most this many times plain BN's.
TARGETS = {8: 1.05, 64: 1.03}


def _worker(
    rank: int,
    world_size: int,
    model_name: str,
    width: int | None,
    batches: list[int],
    steps: int,
    rounds: int,
    precision: str,
    out: str,
) -> None:
    malloc = retain_freed_memory()
    chosen = resolve_precision(precision, torch.device("cpu"))
    groups = {}
    for transport in local_transports():  # one group per transport, so both run in the same processes
        groups[transport] = dist.new_group(backend="gloo")
        select_transport(groups[transport], transport)
    results: dict[str, dict[str, list[list[float]]]] = {}
    bar = tqdm(total=len(batches) * rounds, desc="bench syncbn", leave=False, disable=rank != 0)
    for batch in batches:
        torch.manual_seed(0)
        shape = {} if width is None else {"width": width}
        models = {"bn": create_model(model_name, "bn", **shape)}
        for transport, group in groups.items():
            models[transport] = convert_sync_batchnorm(create_model(model_name, "bn", **shape), process_group=group)
        steppers = {name: timed_training_step(model, batch, precision=chosen) for name, model in models.items()}
        times: dict[str, list[list[float]]] = {name: [[] for _ in range(rounds)] for name in steppers}
        for r in range(rounds):
            for i in range(steps):
                for name in step_order(list(steppers), i):
                    times[name][r].append(steppers[name]())
            bar.update()
        results[str(batch)] = times
    bar.close()
    if rank == 0:
        raw = {
            "kernels": cpu_kernels().name,
            "ddp_transport": gradient_transport(),
            "parameters": sum(p.numel() for p in models["bn"].parameters()),
            "malloc": malloc,
            "times": results,
        }
        Path(out).write_text(json.dumps(raw))


def step_order(names: list[str], i: int) -> list[str]:
    """The variants' order in the ``i``-th cycle: each takes one step in turn, a different one first each cycle, so
    that drift in the machine's load (seconds long on a shared VM) and any cost of following another model's step
    hit every variant alike."""
    shift = i % len(names)
    return names[shift:] + names[:shift]


def check_syncbn_options(
    model: str,
    batches: tuple[int, ...],
    steps: int,
    rounds: int,
    world_size: int,
    precision: str = "fp32",
    width: int | None = None,
) -> None:
    """Refuse options, and settings in the environment, the workers would fail on, before any process is spawned
    (the transports of sync BN's exchanges are the bench's to choose, so ``BNSTUDY_SYNCBN_TRANSPORT`` is not read)."""
    check_image_model(model, width)
    check_precision(precision, "cpu")
    requested_kernels()
    requested_malloc()
    requested_ddp_transport()
    requested_timeout_s()
    for name, value in (("--steps", steps), ("--rounds", rounds), ("world size", world_size)):
        check_at_least(name, value, 1)
    for batch in batches:
        check_norm_batch("bn", batch, world_size, "--batches")  # plain BN, the stricter half of the comparison


def benchmark_syncbn(
    model: str = "resnet",
    batches: tuple[int, ...] = (8, 64),
    steps: int = 10,
    rounds: int = 2,
    world_size: int = 2,
    precision: str = "fp32",
    width: int | None = None,
) -> dict:
    """Median DDP step time of plain BN and of SyncBN over each transport, per per-rank batch size, and the
    syncbn/bn ratios, all measured in one run: overall, per round (their spread is the noise a single ratio
    hides), and against the shared-memory transport's targets. ``width``: the model's base width (None: its own)."""
    check_syncbn_options(model, batches, steps, rounds, world_size, precision, width)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.json"
        spawn_gloo(_worker, world_size, model, width, list(batches), steps, rounds, precision, str(raw_path), threads=1)
        raw = json.loads(raw_path.read_text())
    rows = []
    for batch, times in raw["times"].items():
        bn_rounds = times["bn"]
        bn = statistics.median(t for round_times in bn_rounds for t in round_times)
        for transport in local_transports():
            sync_rounds = times[transport]
            sync = statistics.median(t for round_times in sync_rounds for t in round_times)
            target = TARGETS.get(int(batch)) if transport == "shm" else None
            rows.append(
                {
                    "images_per_rank": int(batch),
                    "transport": transport,
                    "bn_step_s": bn,
                    "syncbn_step_s": sync,
                    "ratio": sync / bn,
                    "ratio_by_round": [
                        statistics.median(s) / statistics.median(b) for s, b in zip(sync_rounds, bn_rounds)
                    ],
                    "samples": sum(map(len, sync_rounds)),
                    "target": target,
                    "target_met": None if target is None else sync / bn <= target,
                }
            )
    return {
        "model": model,
        "width": width,
        "parameters": raw["parameters"],
        "world_size": world_size,
        "precision": resolve_precision(precision, torch.device("cpu")).name,
        "threads_per_rank": 1,
        "backend": "gloo",
        "syncbn_kernels": raw["kernels"],
        "ddp_transport": raw["ddp_transport"],
        "malloc": raw["malloc"],
        "torch": torch.__version__,
        "machine": describe_machine(),
        "results": rows,
    }
