"""``bnstudy report DIR``: what to look at in the main job's output, one line per finding, each naming its file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bnstudy.errors import UserError

COMPARE = "compare.json"  # bnstudy compare RUN_BN RUN_SYNCBN --out DIR
TRACE_COMPARE = "trace-compare.json"  # bnstudy trace compare RUN_BN RUN_SYNCBN --out DIR/trace-compare.json
EXPORT = "export.json"  # bnstudy export RUN --report DIR/export.json


def register(registry) -> None:
    p = registry.command("report", "the headline findings of a BN vs SyncBN comparison directory (e.g. runs/demo)")
    p.add_argument("directory", type=Path, help=f"a directory holding {COMPARE}, {TRACE_COMPARE}, {EXPORT}")
    p.set_defaults(func=run)


def _load(path: Path) -> object | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON ({exc.msg}); write it again") from None


def accuracy_lines(rows: list[dict], source: Path) -> list[str]:
    """Final test accuracy and rank divergence of the running statistics per run."""
    runs = ", ".join(f"{r['norm']} {100 * r['final_test_acc']:.2f}%" for r in rows)
    lines = [f"test accuracy: {runs}" + (" (synthetic data)" if any(r["synthetic"] for r in rows) else "")]
    if len(rows) == 2:
        delta = 100 * (rows[1]["final_test_acc"] - rows[0]["final_test_acc"])
        lines[0] += f"; {rows[1]['norm']} − {rows[0]['norm']} = {delta:+.2f} points"
    spread = ", ".join(f"{r['norm']} {r['running_mean_max_abs_diff']:.2e}" for r in rows)
    lines.append(f"running_mean max |difference| between ranks: {spread}")
    return [f"{line}  [{source}]" for line in lines]


def sync_line(comparison: dict, source: Path) -> str:
    """BN synchronisation's share of the step in each traced run, and the time each waited for the other ranks in
    shared-memory exchanges (absent from comparisons written before that was told apart)."""
    sync, step = comparison["categories"]["bn_sync"], comparison["step"]
    line = (
        f"BN synchronisation per step: A {sync['a_ms']:.2f} ms of {step['a_ms']:.1f} ({sync['a_share']:.1%}), "
        f"B {sync['b_ms']:.2f} ms of {step['b_ms']:.1f} ({sync['b_share']:.1%})"
    )
    wait = comparison["categories"].get("rank_wait")
    if wait is not None:
        line += (
            f"; waiting for other ranks: A {wait['a_ms']:.2f} ms ({wait['a_share']:.1%}), "
            f"B {wait['b_ms']:.2f} ms ({wait['b_share']:.1%})"
        )
    return f"{line}  [{source}]"


def export_line(report: dict, source: Path) -> str:
    """Fold and onnxruntime parity of the exported model."""
    fold, verify = report["export"]["fold"], report["verify"]
    folded = "not folded" if fold is None else f"{len(fold['folded'])} BN folded, {len(fold['kept'])} kept"
    worst = max((row["max_rel"] for row in verify["rows"]), default=float("nan"))
    bn_nodes = report["export"]["node_counts"].get("BatchNormalization", 0)
    parity = "passed" if verify["passed"] else "FAILED"
    return (
        f"export: {folded}, {bn_nodes} BatchNormalization nodes; onnxruntime parity {parity} "
        f"(max relative error {worst:.1e})  [{source}]"
    )


def run(args: argparse.Namespace) -> int:
    directory = args.directory
    compare_rows, comparison, report = (_load(directory / name) for name in (COMPARE, TRACE_COMPARE, EXPORT))
    if compare_rows is None and comparison is None and report is None:
        raise UserError(f"{directory}: none of {COMPARE}, {TRACE_COMPARE}, {EXPORT}; run bash scripts/main.sh first")
    lines = []
    if compare_rows is not None:
        lines += accuracy_lines(compare_rows, directory / COMPARE)
    if comparison is not None:
        lines.append(sync_line(comparison, directory / TRACE_COMPARE))
    if report is not None:
        lines.append(export_line(report, directory / EXPORT))
    print("\n".join(lines))
    return 0
