"""``bnstudy bench syncbn``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(registry) -> None:
    p = registry.bench("syncbn", "DDP step time, plain BN vs bnstudy SyncBatchNorm (2 procs × 1 thread, gloo)")
    p.add_argument("--model", default="resnet", help="model name from bnstudy.models.MODELS (default: resnet)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64], help="images per rank (default: 8 64)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and norm (default: 10)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of bn and syncbn (default: 2)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/syncbn.json"), help="JSON result path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bnstudy.benchmarks.syncbn import benchmark_syncbn
    from bnstudy.io import write_json

    result = benchmark_syncbn(args.model, tuple(args.batches), args.steps, args.rounds)
    print(f"{'images/rank':>11}  {'bn step (ms)':>12}  {'syncbn step (ms)':>16}  {'ratio':>6}")
    for row in result["results"]:
        print(
            f"{row['images_per_rank']:>11}  {row['bn_step_s'] * 1e3:>12.1f}  {row['syncbn_step_s'] * 1e3:>16.1f}"
            f"  {row['ratio']:>6.3f}"
        )
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0
