"""Training images/s in float32 against mixed precision (bf16 autocast), for 1 process × 2 threads and 2 DDP
processes × 1 thread, measured alternately in one run so that drift in machine load hits both precisions alike."""

from __future__ import annotations

import statistics

import torch
from tqdm import tqdm

from bnstudy.benchmarks.ddp import WORLD_SIZE, check_ddp_options, ddp_images_per_s, single_process_images_per_s
from bnstudy.errors import check_at_least
from bnstudy.machine import describe_machine
from bnstudy.precision import bf16_capability, check_precision

LAYOUTS = ((1, WORLD_SIZE), (WORLD_SIZE, 1))  # (processes, threads per process) on 2 cores


def benchmark_train(
    model: str = "resnet",
    norm: str = "bn",
    global_batch: int = 256,
    steps: int = 5,
    rounds: int = 2,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
) -> dict:
    """Median images/s per (layout, precision) over ``rounds`` alternating rounds, and each precision's ratio to
    the first one's in the same layout."""
    for precision in precisions:
        check_precision(precision, "cpu", "--precisions")
        check_ddp_options(model, norm, global_batch, steps, precision)
    check_at_least("--rounds", rounds, 1)
    rates: dict[tuple[int, str], list[float]] = {(p, name): [] for p, _ in LAYOUTS for name in precisions}
    with tqdm(total=rounds * len(rates), desc="bench train", leave=False) as bar:
        for _ in range(rounds):
            for processes, threads in LAYOUTS:
                for name in precisions:
                    if processes == 1:
                        rate = single_process_images_per_s(model, norm, global_batch, steps, name, threads)
                    else:
                        ddp = ddp_images_per_s(model, norm, global_batch, steps, name)
                        rate = ddp.images_per_s
                    rates[processes, name].append(rate)
                    bar.update()
    rows = []
    for processes, threads in LAYOUTS:
        baseline = statistics.median(rates[processes, precisions[0]])
        for name in precisions:
            median = statistics.median(rates[processes, name])
            rows.append(
                {
                    "processes": processes,
                    "threads_per_process": threads,
                    "precision": name,
                    "images_per_s": median,
                    "samples": rates[processes, name],
                    f"ratio_to_{precisions[0]}": median / baseline,
                }
            )
    return {
        "model": model,
        "norm": norm,
        "global_batch": global_batch,
        "steps": steps,
        "rounds": rounds,
        "bf16_capability": bf16_capability(torch.device("cpu")),
        "ddp_transport": ddp.transport,
        "malloc": ddp.malloc,
        "torch": torch.__version__,
        "machine": describe_machine(),
        "results": rows,
    }
