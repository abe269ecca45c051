"""``bnstudy trace summary|compare|view``: read profiler traces and answer the BN questions from the command line,
or open them in TensorBoard's profiler plugin."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_PATH_HELP = "a trace file, a run directory (runs/NAME) or a TensorBoard run folder (runs/NAME/tb/LABEL)"


def register(registry) -> None:
    p = registry.command("trace", "summarise, compare and view torch.profiler traces")
    sub = p.add_subparsers(dest="trace_command", metavar="ACTION", required=True)

    summary = sub.add_parser(
        "summary",
        help="where a step's time goes, per rank",
        description="where a profiled step's time goes (BN forward/backward/sync, conv/linear, DDP, …) on the CPU "
        "and, for traces with GPU activity, on the GPU (BN kernels, convolution/GEMM, NCCL, idle, …), per rank and "
        "averaged",
    )
    summary.add_argument("path", type=Path, help=_PATH_HELP)
    summary.add_argument(
        "--top", type=int, default=10, help="operators (and GPU kernels) to list by time (default: 10)"
    )
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
    comp.add_argument("--out", type=Path, help="also write the comparison as JSON to this file")
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


def _unmarked_line(summary: dict) -> list[str]:
    unmarked = [name for name, worker in summary["workers"].items() if not worker["step_markers"]]
    if not unmarked:
        return []
    return [
        f"no ProfilerStep markers around operators in {', '.join(unmarked)}: the whole trace is one window "
        '("step"); record with torch.profiler\'s schedule and call prof.step() every step to get per-step times'
    ]


def _table(labels: dict, columns: dict, table: str) -> list[str]:
    """Rows of ``labels`` with ms and share per column, then the step; a column without ``table`` shows dashes."""
    widths = [max(10, len(name) - 5) for name in columns]  # ms field; the share field adds 7
    lines = [
        f"{'':<24}" + "".join(f"{name:>{w + 7}}" for name, w in zip(columns, widths)),
        f"{'category':<24}" + "".join(f"{'ms':>{w}}{'share':>7}" for w in widths),
    ]

    def cells(key: str) -> str:
        text = ""
        for column, w in zip(columns.values(), widths):
            part = column[table] if table == "categories" else column[table] and column[table]["categories"]
            text += f"{part[key]['ms']:>{w}.3f}{part[key]['share']:>7.1%}" if part else f"{'-':>{w}}{'':>7}"
        return text

    for key, label in labels.items():
        lines.append(f"{label:<24}" + cells(key))
    step = "".join(f"{c['step_ms']:>{w}.3f}{1:>7.0%}" for c, w in zip(columns.values(), widths))
    return [*lines, f"{'step':<24}" + step]


def _shorten(name: str, width: int = 100) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def format_summary(summary: dict) -> str:
    """The summary as tables: CPU categories per worker and averaged, GPU categories when the traces have GPU
    activity, then the top operators and kernels (means over workers)."""
    columns = {**summary["workers"], "mean": summary["mean"]}
    steps = {w["steps"] for w in summary["workers"].values()}
    lines = [
        f"trace run {summary['run']}: {len(summary['workers'])} worker(s), "
        f"{'/'.join(map(str, sorted(steps)))} profiled step(s) each; times are per step",
        *_unmarked_line(summary),
        "",
        "CPU: the step's thread and the autograd threads that ran its backward",
        *_table(summary["category_labels"], columns, "categories"),
    ]
    mean = summary["mean"]
    gpu = mean["gpu"]
    if gpu is not None:
        lines += [
            "",
            f"GPU: kernels, copies and fills in the step's window ({gpu['devices']} device(s), mean over devices)",
            *_table(summary["gpu_category_labels"], columns, "gpu"),
        ]
        hidden = {key: ms for key, ms in gpu["overlapped_ms"].items() if ms}
        if hidden:
            lines.append("communication overlapped with compute (hidden, not counted above, mean over workers):")
            for key, ms in hidden.items():
                lines.append(f"  {summary['gpu_category_labels'][key]:<26}{ms:>10.3f} ms")
        else:
            lines.append("communication overlapped with compute: none")
    lines += ["", f"top {len(mean['top_ops'])} operators by self time (mean over workers)"]
    lines.append(f"{'ms':>10}{'share':>7}{'calls':>8}  {'category':<24}operator")
    for op in mean["top_ops"]:
        label = summary["category_labels"][op["category"]]
        lines.append(f"{op['self_ms']:>10.3f}{op['share']:>7.1%}{op['calls']:>8.1f}  {label:<24}{op['name']}")
    if gpu is not None:
        lines += ["", f"top {len(gpu['top_kernels'])} GPU kernels by time (mean over workers)"]
        lines.append(f"{'ms':>10}{'share':>7}{'calls':>8}  {'category':<24}kernel")
        for kernel in gpu["top_kernels"]:
            label = summary["gpu_category_labels"][kernel["category"]]
            lines.append(
                f"{kernel['ms']:>10.3f}{kernel['share']:>7.1%}{kernel['calls']:>8.1f}  {label:<24}"
                f"{_shorten(kernel['name'])}"
            )
    return "\n".join(lines)


def _delta_rows(labels: dict, rows: dict) -> list[str]:
    lines = [f"{'category':<24}{'A ms':>10}{'share':>7}{'B ms':>10}{'share':>7}{'Δ ms':>10}{'Δ':>9}"]
    for key, label in labels.items():
        row = rows[key]
        lines.append(
            f"{label:<24}{row['a_ms']:>10.3f}{row['a_share']:>7.1%}{row['b_ms']:>10.3f}{row['b_share']:>7.1%}"
            f"{row['delta_ms']:>+10.3f}{_pct(row):>9}"
        )
    return lines


def format_comparison(comparison: dict) -> str:
    """CPU categories and top operators of runs A and B (means over workers, per step) with B − A deltas; GPU
    categories and kernels when both have GPU activity; a CPU run against a GPU run on the device that did the
    work."""
    a, b = comparison["a"], comparison["b"]
    lines = [
        f"A: {a['source']} ({a['workers']} worker(s))",
        f"B: {b['source']} ({b['workers']} worker(s))",
        "times are per step, averaged over workers; deltas are B − A, relative to A",
    ]
    for side, run in (("A", a), ("B", b)):
        if not run["step_markers"]:
            lines.append(f'{side} has no ProfilerStep markers around operators: its whole trace is one window ("step")')
    step = comparison["step"]
    step_row = (
        f"{'step':<24}{step['a_ms']:>10.3f}{'':>7}{step['b_ms']:>10.3f}{'':>7}{step['delta_ms']:>+10.3f}{_pct(step):>9}"
    )
    lines += ["", "CPU", *_delta_rows(comparison["category_labels"], comparison["categories"]), step_row]
    gpu, device = comparison["gpu"], comparison["device"]
    if gpu is not None:
        lines += ["", "GPU", *_delta_rows(comparison["gpu_category_labels"], gpu["categories"]), step_row]
        hidden = {key: row for key, row in gpu["overlapped"].items() if row["a_ms"] or row["b_ms"]}
        for key, row in hidden.items():
            label = f"  hidden: {comparison['gpu_category_labels'][key]}"
            lines.append(f"{label:<24}{row['a_ms']:>10.3f}{'':>7}{row['b_ms']:>10.3f}{'':>7}{row['delta_ms']:>+10.3f}")
    if device is not None:
        lines += [
            "",
            f"on the device that did the work: A's {device['a_device'].upper()} time against B's "
            f"{device['b_device'].upper()} time",
            *_delta_rows(device["category_labels"], device["categories"]),
            step_row,
        ]
    lines += ["", "operators by self time (top of A and of B)"]
    lines.append(f"{'A ms':>10}{'B ms':>10}{'Δ ms':>10}{'Δ':>9}  operator")
    for op in comparison["ops"]:
        lines.append(f"{op['a_ms']:>10.3f}{op['b_ms']:>10.3f}{op['delta_ms']:>+10.3f}{_pct(op):>9}  {op['name']}")
    if gpu is not None:
        lines += ["", "GPU kernels by time (top of A and of B)"]
        lines.append(f"{'A ms':>10}{'B ms':>10}{'Δ ms':>10}{'Δ':>9}  kernel")
        for row in gpu["kernels"]:
            lines.append(
                f"{row['a_ms']:>10.3f}{row['b_ms']:>10.3f}{row['delta_ms']:>+10.3f}{_pct(row):>9}  "
                f"{_shorten(row['name'])}"
            )
    return "\n".join(lines)


def run_summary(args: argparse.Namespace) -> int:
    from bnstudy.traces.attribution import summarize

    summary = summarize(args.path, top=_positive_top(args.top))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from bnstudy.io import check_writable, write_json
    from bnstudy.traces.attribution import compare

    top = _positive_top(args.top)
    if args.out:
        check_writable(args.out)
    comparison = compare(args.a, args.b, top=top)
    print(json.dumps(comparison, indent=2) if args.json else format_comparison(comparison))
    if args.out:
        write_json(args.out, comparison)
        print(f"wrote {args.out}", file=sys.stderr if args.json else sys.stdout)
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
