"""``bnstudy trace summary|compare|view``: read profiler traces and answer the BN questions from the command line,
or open them in TensorBoard's profiler plugin."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_PATH_HELP = "a trace file, a run directory (runs/NAME) or a TensorBoard run folder (runs/NAME/tb/LABEL)"


def register(registry) -> None:
    p = registry.command("trace", "summarise, compare and view torch.profiler traces")
    sub = p.add_subparsers(dest="trace_command", metavar="ACTION", required=True)

    summary = sub.add_parser(
        "summary",
        help="where a step's time goes, per rank",
        description="where a profiled "
        "step's time goes (BN forward/backward/sync, conv/linear, DDP, …), per rank and averaged",
    )
    summary.add_argument("path", type=Path, help=_PATH_HELP)
    summary.add_argument("--top", type=int, default=10, help="operators to list by self time (default: 10)")
    summary.add_argument("--json", action="store_true", help="print the summary as JSON")
    summary.set_defaults(func=run_summary)

    comp = sub.add_parser(
        "compare",
        help="two trace runs side by side with deltas",
        description="two trace runs side by side, per category and top operator, with deltas B − A",
    )
    comp.add_argument("a", type=Path, help=f"run A: {_PATH_HELP}")
    comp.add_argument("b", type=Path, help=f"run B: {_PATH_HELP}")
    comp.add_argument("--top", type=int, default=10, help="top operators of each run to compare (default: 10)")
    comp.add_argument("--json", action="store_true", help="print the comparison as JSON")
    comp.set_defaults(func=run_compare)

    view = sub.add_parser(
        "view",
        help="open traces in TensorBoard's profiler plugin",
        description="start TensorBoard with torch-tb-profiler on 127.0.0.1 for these traces; Ctrl-C stops it",
    )
    view.add_argument("path", type=Path, help=f"{_PATH_HELP}, or a folder of such runs")
    view.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    view.set_defaults(func=run_view)


def _positive_top(top: int) -> int:
    from bnstudy.errors import check_at_least

    check_at_least("--top", top, 1)
    return top


def _pct(row: dict) -> str:
    """The relative delta of a row; "new" when only B has time there."""
    if row["delta_pct"] is not None:
        return f"{row['delta_pct']:+.1f}%"
    return "new" if row["b_ms"] else ""


def format_summary(summary: dict) -> str:
    """The summary as tables: categories per worker and averaged, then the top operators (means over workers)."""
    labels = summary["category_labels"]
    columns = {**summary["workers"], "mean": summary["mean"]}
    steps = {w["steps"] for w in summary["workers"].values()}
    lines = [
        f"trace run {summary['run']}: {len(summary['workers'])} worker(s), "
        f"{'/'.join(map(str, sorted(steps)))} profiled step(s) each; times are per step",
        "",
        f"{'':<24}" + "".join(f"{name:>17}" for name in columns),
        f"{'category':<24}" + f"{'ms':>10}{'share':>7}" * len(columns),
    ]
    for key, label in labels.items():
        cells = (column["categories"][key] for column in columns.values())
        lines.append(f"{label:<24}" + "".join(f"{c['ms']:>10.3f}{c['share']:>7.1%}" for c in cells))
    lines.append(f"{'step':<24}" + "".join(f"{c['step_ms']:>10.3f}{1:>7.0%}" for c in columns.values()))
    mean = summary["mean"]
    lines += ["", f"top {len(mean['top_ops'])} operators by self time (mean over workers)"]
    lines.append(f"{'ms':>10}{'share':>7}{'calls':>8}  operator")
    for op in mean["top_ops"]:
        lines.append(f"{op['self_ms']:>10.3f}{op['share']:>7.1%}{op['calls']:>8.1f}  {op['name']}")
    return "\n".join(lines)


def format_comparison(comparison: dict) -> str:
    """Categories and top operators of runs A and B (means over workers, per step) with B − A deltas."""
    a, b = comparison["a"], comparison["b"]
    lines = [
        f"A: {a['source']} ({a['workers']} worker(s))",
        f"B: {b['source']} ({b['workers']} worker(s))",
        "times are per step, averaged over workers; deltas are B − A, relative to A",
        "",
        f"{'category':<24}{'A ms':>10}{'share':>7}{'B ms':>10}{'share':>7}{'Δ ms':>10}{'Δ':>9}",
    ]
    for key, label in comparison["category_labels"].items():
        row = comparison["categories"][key]
        lines.append(
            f"{label:<24}{row['a_ms']:>10.3f}{row['a_share']:>7.1%}{row['b_ms']:>10.3f}{row['b_share']:>7.1%}"
            f"{row['delta_ms']:>+10.3f}{_pct(row):>9}"
        )
    step = comparison["step"]
    lines.append(
        f"{'step':<24}{step['a_ms']:>10.3f}{'':>7}{step['b_ms']:>10.3f}{'':>7}{step['delta_ms']:>+10.3f}{_pct(step):>9}"
    )
    lines += ["", "operators by self time (top of A and of B)"]
    lines.append(f"{'A ms':>10}{'B ms':>10}{'Δ ms':>10}{'Δ':>9}  operator")
    for op in comparison["ops"]:
        lines.append(f"{op['a_ms']:>10.3f}{op['b_ms']:>10.3f}{op['delta_ms']:>+10.3f}{_pct(op):>9}  {op['name']}")
    return "\n".join(lines)


def run_summary(args: argparse.Namespace) -> int:
    from bnstudy.traces.attribution import summarize

    summary = summarize(args.path, top=_positive_top(args.top))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from bnstudy.traces.attribution import compare

    comparison = compare(args.a, args.b, top=_positive_top(args.top))
    print(json.dumps(comparison, indent=2) if args.json else format_comparison(comparison))
    return 0


def run_view(args: argparse.Namespace) -> int:
    import signal

    from bnstudy.errors import UserError
    from bnstudy.traces.tensorboard import tensorboard_server

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must lie in 0..65535 (0: a free one), got {args.port}")
    # `kill` (SIGTERM) then stops TensorBoard too, like Ctrl-C, instead of leaving it running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with tensorboard_server(args.path, args.port) as server:
            print(f"TensorBoard profiler view: {server.url}  (Ctrl-C stops it)", flush=True)
            code = server.wait()
            if code:
                raise UserError(f"TensorBoard exited with code {code}: {server.log_error()}")
    except KeyboardInterrupt:
        print("TensorBoard stopped", flush=True)
    return 0
