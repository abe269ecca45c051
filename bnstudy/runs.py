"""Reading run directories (runs/NAME/) and comparing them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bnstudy.errors import UserError


@dataclass
class Run:
    """What a training run left in its directory."""

    path: Path
    config: dict
    metrics: list[dict]
    bn_stats: list[dict]

    @property
    def name(self) -> str:
        return self.path.name

    def bn_divergence_per_epoch(self, key: str) -> list[float]:
        """Max over BN layers of ``key`` (e.g. running_mean_max_abs_diff) for each epoch."""
        by_epoch: dict[int, float] = {}
        for record in self.bn_stats:
            by_epoch[record["epoch"]] = max(by_epoch.get(record["epoch"], 0.0), record[key])
        return [by_epoch.get(m["epoch"], 0.0) for m in self.metrics]


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON line ({exc.msg}); the run directory is damaged") from None


def read_run(path: str | Path) -> Run:
    """Load a run directory; a one-line error if it is not one."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path}: not a run directory (no config.json); pass runs/NAME written by train_cifar.py")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed config.json ({exc.msg})") from None
    metrics = _jsonl(path / "metrics.jsonl")
    if not metrics:
        raise UserError(f"{path}: no completed epoch in metrics.jsonl; wait for the run or resume it")
    return Run(path, config, metrics, _jsonl(path / "bn_stats.jsonl"))


def comparison_rows(runs: list[Run]) -> list[dict]:
    """One row per run: accuracy, time, throughput and BN divergence at the last epoch."""
    rows = []
    for run in runs:
        last = run.metrics[-1]
        rows.append(
            {
                "run": run.name,
                "norm": run.config.get("norm"),
                "world_size": run.config.get("world_size"),
                "batch_per_process": run.config.get("batch_size"),
                "epochs": last["epoch"],
                "final_test_acc": last["test_acc"],
                "best_test_acc": max(m["test_acc"] for m in run.metrics),
                "train_time_s": sum(m["epoch_time_s"] for m in run.metrics),
                "images_per_s": sum(m["images_per_s"] for m in run.metrics) / len(run.metrics),
                "running_mean_max_abs_diff": run.bn_divergence_per_epoch("running_mean_max_abs_diff")[-1],
                "batch_mean_spread": run.bn_divergence_per_epoch("batch_mean_spread")[-1],
                "synthetic": run.config.get("synthetic", False),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of :func:`comparison_rows`."""
    header = (
        f"{'run':<20} {'norm':<7} {'procs':>5} {'batch':>5} {'ep':>3} {'final acc':>9} {'best acc':>8} "
        f"{'time s':>7} {'img/s':>7} {'run-mean div':>12} {'batch-mean spread':>17}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['run'][:20]:<20} {r['norm']:<7} {r['world_size']:>5} {r['batch_per_process']:>5} {r['epochs']:>3} "
            f"{r['final_test_acc']:>9.4f} {r['best_test_acc']:>8.4f} {r['train_time_s']:>7.1f} "
            f"{r['images_per_s']:>7.0f} {r['running_mean_max_abs_diff']:>12.3e} {r['batch_mean_spread']:>17.3e}"
        )
    if any(r["synthetic"] for r in rows):
        lines.append("(runs marked synthetic trained on the built-in synthetic set, not CIFAR-10)")
    return "\n".join(lines)
