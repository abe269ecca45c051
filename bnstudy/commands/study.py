"""``bnstudy study NAME|all``: run the seed experiments over several seeds, write JSON and PNG."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bnstudy.errors import UserError, check_at_least
from bnstudy.io import check_writable
from bnstudy.studies import STUDIES


def register(registry) -> None:
    p = registry.command("study", "run a seed experiment over several seeds; writes <out>/<name>/result.json and PNGs")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "studies:\n" + "\n".join(f"  {info.name:<14} {info.help}" for info in STUDIES.values())
    p.add_argument(
        "name",
        choices=[*STUDIES, "all"],
        metavar="NAME",
        help=f"one of {', '.join(STUDIES)}, or all",
    )
    p.add_argument("--out", type=Path, default=Path("runs/study"), help="output directory (default: runs/study)")
    p.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1 and report mean ± std (default: 3)")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes and epochs, for a smoke run (also $BNSTUDY_QUICK=1)"
    )
    p.add_argument(
        "--data",
        help="for mnist / cnn-channels / qat-fold: a directory with train.npz and test.npz or a torchvision root, or "
        "'synthetic' (default: real data when found, else synthetic)",
    )
    p.add_argument(
        "--precision",
        help="training precision of the studies that train: auto, fp32, bf16 (CPU autocast) (default: fp32)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bnstudy.studies import run_study, save_study

    check_at_least("--seeds", args.seeds, 1)
    if args.precision is not None:
        from bnstudy.precision import check_precision

        check_precision(args.precision, "cpu")
        if args.name != "all" and not STUDIES[args.name].takes_precision:
            raise UserError(f"study {args.name} takes no --precision; drop it")
    names = list(STUDIES) if args.name == "all" else [args.name]
    check_writable(args.out / names[0] / "result.json")
    if args.data is not None:
        if args.name == "all" and args.data != "synthetic":
            raise UserError(
                "--data names one dataset; use it with `study mnist`, `study cnn-channels` or `study qat-fold`, "
                "or pass --data synthetic with `study all`"
            )
        if args.name != "all" and STUDIES[args.name].dataset is None:
            raise UserError(f"study {args.name} uses no image data; drop --data")
    failed = []
    for name in names:
        start = time.perf_counter()
        result = run_study(
            name, seeds=range(args.seeds), quick=True if args.quick else None, data=args.data, precision=args.precision
        )
        save_study(result, args.out)
        failed += [f"{name}: {check}" for check in result.failed_checks()]
        print(result.report())
        print(f"  wrote {args.out / name} in {time.perf_counter() - start:.1f} s")
    if failed:
        print(f"bnstudy: {len(failed)} check(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
