"""``bnstudy bench ddp``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(registry) -> None:
    p = registry.bench("ddp", "images/s: DDP 2 processes x 1 thread vs 1 process x 2 threads, same global batch")
    p.add_argument("--model", default="resnet", help="model name (default: resnet)")
    p.add_argument("--norm", default="bn", help="norm kind (default: bn)")
    p.add_argument("--global-batch", type=int, default=512, help="images per step over all processes (default: 512)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (default: 8)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/ddp.json"), help="JSON result path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bnstudy.benchmarks.ddp import benchmark_ddp
    from bnstudy.io import write_json

    result = benchmark_ddp(args.model, args.norm, args.global_batch, args.steps)
    print(f"1 process x 2 threads: {result['single_process_2_threads_images_per_s']:.0f} img/s")
    print(f"2 processes x 1 thread (DDP, gloo): {result['ddp_2x1_images_per_s']:.0f} img/s")
    print(f"ratio DDP / single: {result['ratio']:.3f}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0
