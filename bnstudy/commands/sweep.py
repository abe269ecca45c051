"""``bnstudy sweep``: BN vs SyncBN vs GN across per-process batch sizes under DDP."""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path


def register(registry) -> None:
    p = registry.command(
        "sweep",
        "BN, SyncBN and GN at per-process batch sizes 2..32 with 2 processes: "
        "test accuracy vs batch (Group Norm paper, figure 1)",
    )
    p.add_argument("--quick", action="store_true", help="CI size: synthetic data, 1 epoch, tiny model")
    p.add_argument("--norms", nargs="+", help="norms to compare (default: bn syncbn gn)")
    p.add_argument("--batches", type=int, nargs="+", help="images per process (default: 2 4 8 16 32)")
    p.add_argument("--nproc", type=int, help="processes (default: 2)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: 4; quick: 1)")
    p.add_argument("--data", help="auto | synthetic | PATH (default: auto; quick: synthetic)")
    p.add_argument("--train-subset", type=int, help="training images used (default: 10000; quick: 512)")
    p.add_argument("--width", type=int, help="model base width (default: 16; quick: 8)")
    p.add_argument("--precision", help="auto | fp32 | bf16 | fp16 (CUDA), as the launcher's (default: fp32)")
    p.add_argument(
        "--out",
        type=Path,
        help="directory for runs, sweep.json, sweep.png (default: runs/sweep; quick: runs/sweep-quick)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bnstudy.io import write_json
    from bnstudy.training.sweep import (
        DEFAULT_OUT,
        QUICK,
        QUICK_OUT,
        SweepPlan,
        plan_sweep,
        plot_sweep,
        run_sweep,
        time_over_bn,
    )

    plan = QUICK if args.quick else SweepPlan()
    overrides = {
        "norms": args.norms and tuple(args.norms),
        "batches": args.batches and tuple(args.batches),
        "nproc": args.nproc,
        "epochs": args.epochs,
        "data": args.data,
        "train_subset": args.train_subset,
        "width": args.width,
        "precision": args.precision,
    }
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    points = plan_sweep(plan, out)
    reused = [f"{p.norm}-b{p.batch}" for p in points if p.state == "finished"]
    if reused:
        print(f"reusing finished points with the same settings: {', '.join(reused)}")
    results = run_sweep(points, plan.nproc, out)
    accuracy, seconds = results["test_acc"], results["train_time_s"]
    relative = time_over_bn(seconds)
    header = "  ".join(f"{norm:>8}" for norm in plan.norms)
    print(f"{'':>14}  {'test accuracy':^{len(header)}}  {'training time (s)':^{len(header)}}")
    print(f"{'images/process':>14}  {header}  {header}" + "".join(f"  {norm + '/bn':>9}" for norm in relative))
    for batch in plan.batches:
        print(
            f"{batch:>14}  "
            + "  ".join(f"{100 * accuracy[n][batch]:>7.2f}%" for n in plan.norms)
            + "  "
            + "  ".join(f"{seconds[n][batch]:>8.1f}" for n in plan.norms)
            + "".join(f"  {relative[n][batch]:>9.2f}" for n in relative)
        )
    write_json(
        out / "sweep.json",
        {"plan": asdict(plan), "test_acc": accuracy, "train_time_s": seconds, "train_time_over_bn": relative},
    )
    title = f"{plan.nproc} processes, {plan.epochs} epoch(s), data={plan.data}"
    png = plot_sweep(accuracy, out / "sweep.png", title)
    print(f"wrote {out / 'sweep.json'} and {png}")
    return 0
