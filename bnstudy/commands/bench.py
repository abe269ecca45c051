"""``bnstudy bench syncbn|ddp|train|export``: benchmarks that print ratios measured in one run."""

from __future__ import annotations

import argparse
from pathlib import Path

from bnstudy.machine import machine_line

PRECISION_HELP = "autocast type of the forward pass: fp32 or bf16 (auto: bf16 where native) (default: fp32)"


def register(registry) -> None:
    p = registry.bench(
        "syncbn", "DDP step time, plain BN vs SyncBatchNorm over gloo and shared memory (2 procs × 1 thread)"
    )
    p.add_argument("--model", default="resnet", help="model name from bnstudy.models.MODELS (default: resnet)")
    p.add_argument(
        "--width", type=int, help="the model's base width, e.g. 16 as in the main job and the sweep (default: its own)"
    )
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64], help="images per rank (default: 8 64)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and variant (default: 10)")
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of --steps steps of each variant, the variants' steps taken in turn (default: 2)",
    )
    p.add_argument("--precision", default="fp32", help=PRECISION_HELP)
    p.add_argument("--out", type=Path, default=Path("runs/bench/syncbn.json"), help="JSON result path")
    p.set_defaults(func=run_syncbn)

    p = registry.bench("ddp", "images/s: DDP 2 processes x 1 thread vs 1 process x 2 threads, same global batch")
    p.add_argument("--model", default="resnet", help="model name (default: resnet)")
    p.add_argument("--norm", default="bn", help="norm kind (default: bn)")
    p.add_argument("--global-batch", type=int, default=512, help="images per step over all processes (default: 512)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (default: 8)")
    p.add_argument("--precision", default="fp32", help=PRECISION_HELP)
    p.add_argument("--out", type=Path, default=Path("runs/bench/ddp.json"), help="JSON result path")
    p.set_defaults(func=run_ddp)

    p = registry.bench("train", "training images/s, fp32 vs bf16 autocast, 1 process x 2 threads and 2 x 1 (DDP)")
    p.add_argument("--model", default="resnet", help="model name (default: resnet)")
    p.add_argument("--norm", default="bn", help="norm kind (default: bn)")
    p.add_argument("--global-batch", type=int, default=256, help="images per step over all processes (default: 256)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default: 5)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of every variant (default: 2)")
    p.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], help="compared precisions, the first is the baseline"
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench/train.json"), help="JSON result path")
    p.set_defaults(func=run_train)

    p = registry.bench("export", "latency and throughput: torch eager/folded vs onnxruntime unfolded/folded")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default: 2)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/export.json"), help="JSON result (PNG beside it)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also record profiler traces of eager inference, unfolded and folded, beside the JSON",
    )
    p.set_defaults(func=run_export)


def run_syncbn(args: argparse.Namespace) -> int:
    from bnstudy.benchmarks.syncbn import benchmark_syncbn
    from bnstudy.io import check_writable, write_json

    check_writable(args.out)
    result = benchmark_syncbn(
        args.model, tuple(args.batches), args.steps, args.rounds, precision=args.precision, width=args.width
    )
    print(machine_line(result["machine"]))
    print(f"sync BN's CPU kernels: {result['syncbn_kernels']}; DDP's gradients over {result['ddp_transport']}")
    print(
        f"{'images/rank':>11}  {'transport':>9}  {'bn step (ms)':>12}  {'syncbn step (ms)':>16}  {'ratio':>6}  "
        f"{'rounds':>11}  target"
    )
    for row in result["results"]:
        by_round = row["ratio_by_round"]
        target = "" if row["target"] is None else f"≤ {row['target']:.2f} {'met' if row['target_met'] else 'NOT met'}"
        print(
            f"{row['images_per_rank']:>11}  {row['transport']:>9}  {row['bn_step_s'] * 1e3:>12.1f}  "
            f"{row['syncbn_step_s'] * 1e3:>16.1f}  {row['ratio']:>6.3f}  "
            f"{min(by_round):>5.3f}-{max(by_round):<5.3f}  {target}".rstrip()
        )
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


def run_ddp(args: argparse.Namespace) -> int:
    from bnstudy.benchmarks.ddp import benchmark_ddp
    from bnstudy.io import check_writable, write_json

    check_writable(args.out)
    result = benchmark_ddp(args.model, args.norm, args.global_batch, args.steps, args.precision)
    print(machine_line(result["machine"]))
    print(f"1 process x 2 threads: {result['single_process_2_threads_images_per_s']:.0f} img/s")
    for transport, rate in result["ddp_2x1_images_per_s_by_transport"].items():
        chosen = " (auto's choice)" if transport == result["ddp_transport"] else ""
        ratio = result["ratio_by_transport"][transport]
        layout = f"2 processes x 1 thread (DDP, gradients over {transport})"
        print(f"{layout}: {rate:.0f} img/s, {ratio:.3f} x single{chosen}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from bnstudy.benchmarks.train import benchmark_train
    from bnstudy.io import check_writable, write_json

    check_writable(args.out)
    result = benchmark_train(args.model, args.norm, args.global_batch, args.steps, args.rounds, tuple(args.precisions))
    baseline = args.precisions[0]
    print(machine_line(result["machine"]))
    print(f"CPU: {result['bf16_capability']}; DDP's gradients over {result['ddp_transport']}")
    print(f"{'processes x threads':>19}  {'precision':>9}  {'images/s':>8}  {'vs ' + baseline:>8}")
    for row in result["results"]:
        layout = f"{row['processes']} x {row['threads_per_process']}"
        print(f"{layout:>19}  {row['precision']:>9}  {row['images_per_s']:>8.0f}  {row[f'ratio_to_{baseline}']:>8.3f}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from bnstudy.benchmarks.export import (
        benchmark_export,
        plot_export_benchmark,
        print_export_benchmark,
        profile_folding,
    )
    from bnstudy.errors import UserError, check_at_least
    from bnstudy.io import check_writable, write_json

    if args.out.suffix.lower() == ".png":
        raise UserError(f"--out {args.out}: the JSON result needs a name of its own (the PNG goes beside it)")
    check_writable(args.out)
    check_at_least("--threads", args.threads, 1)
    result = benchmark_export(threads=args.threads, quick=args.quick)
    print(machine_line(result["machine"]))
    print_export_benchmark(result)
    write_json(args.out, result)
    png = plot_export_benchmark(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {png}")
    if args.profile:
        unfolded, folded = profile_folding(args.out.parent / "export-traces", threads=args.threads)
        print(f"traces: {unfolded} and {folded}; compare with: bnstudy trace compare {unfolded} {folded}")
    return 0
