"""``bnstudy compare RUN [RUN ...]``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(registry) -> None:
    p = registry.command("compare", "compare training runs: accuracy, time, throughput, BN divergence; writes a PNG")
    p.add_argument("runs", nargs="+", type=Path, help="run directories (runs/NAME)")
    p.add_argument("--out", type=Path, help="directory for compare.png and compare.json (default: the runs' parent)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bnstudy.io import check_writable, write_json
    from bnstudy.training.compare import comparison_rows, format_table, plot_comparison
    from bnstudy.training.run_directory import read_run

    runs = [read_run(path) for path in args.runs]
    out = args.out or Path(os.path.commonpath([str(p.resolve().parent) for p in args.runs]))
    for name in ("compare.png", "compare.json"):
        check_writable(out / name)
    rows = comparison_rows(runs)
    print(format_table(rows))
    png = plot_comparison(runs, out / "compare.png")
    write_json(out / "compare.json", rows)
    print(f"wrote {png} and {out / 'compare.json'}")
    return 0
