"""The run directory ``runs/NAME/``, the unit of output every command reads: every file name in it, rank 0's
writer and the reader.

    config.json      all options, versions, world size, backend, device (written when the run starts)
    metrics.jsonl    one record per epoch
    bn_stats.jsonl   one record per epoch and BN layer: how far ranks' statistics are apart
    checkpoint.pt    the latest complete epoch (see :mod:`bnstudy.training.checkpoint`)
    summary.json     final numbers, written at the end
    tb/              TensorBoard scalars; tb/<label>/ profiler traces (see :mod:`bnstudy.traces.record`)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnstudy.errors import UserError
from bnstudy.io import write_json

CONFIG = "config.json"
METRICS = "metrics.jsonl"
BN_STATS = "bn_stats.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
TENSORBOARD = "tb"


def trace_dir(run_dir: str | Path, label: str) -> Path:
    """Where the profiler traces of ``label`` go: one TensorBoard profiler run, one worker per rank."""
    return Path(run_dir) / TENSORBOARD / label


class RunWriter:
    """Rank 0's writer: config, per-epoch JSONL records, TensorBoard scalars and the summary."""

    def __init__(self, path: Path, resume_epoch: int) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        for name in (METRICS, BN_STATS):
            _truncate_jsonl(path / name, resume_epoch)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(path / TENSORBOARD), purge_step=resume_epoch + 1 if resume_epoch else None)

    def config(self, config: dict[str, Any]) -> None:
        write_json(self.path / CONFIG, config)

    def epoch(self, metrics: dict[str, Any], bn_records: list[dict]) -> None:
        """Append one epoch's metrics and BN statistics records and its TensorBoard scalars."""
        epoch = metrics["epoch"]
        self._append(METRICS, [metrics])
        self._append(BN_STATS, [{"epoch": epoch, **r} for r in bn_records])
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.tb.add_scalar(key, value, epoch)
        self.tb.flush()

    def summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json from what the directory now holds (every epoch, including those before a resume)."""
        summary = {**run_summary(read_run(self.path)), **extra}
        write_json(self.path / SUMMARY, summary)
        return summary

    def _append(self, name: str, records: list[dict]) -> None:
        with open(self.path / name, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.tb.close()


def _truncate_jsonl(path: Path, keep_through_epoch: int) -> None:
    """Drop records of epochs after the checkpoint, so a resumed run does not log an epoch twice."""
    if not path.exists():
        return
    lines = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["epoch"] <= keep_through_epoch
    ]
    path.write_text("".join(line + "\n" for line in lines))


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

    @property
    def best_test_acc(self) -> float:
        return max(m["test_acc"] for m in self.metrics)

    @property
    def train_time_s(self) -> float:
        return sum(m["epoch_time_s"] for m in self.metrics)

    @property
    def mean_images_per_s(self) -> float:
        return sum(m["images_per_s"] for m in self.metrics) / len(self.metrics)

    def final_bn_divergence(self, key: str) -> float:
        """Max over BN layers of ``key`` at the last epoch (0 for a model without BN)."""
        return self.bn_divergence_per_epoch(key)[-1]

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
    config_path = path / CONFIG
    if not config_path.is_file():
        raise UserError(f"{path}: not a run directory (no config.json); pass runs/NAME written by train_cifar.py")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed config.json ({exc.msg})") from None
    metrics = _jsonl(path / METRICS)
    if not metrics:
        raise UserError(f"{path}: no completed epoch in metrics.jsonl; wait for the run or resume it")
    return Run(path, config, metrics, _jsonl(path / BN_STATS))


def run_summary(run: Run) -> dict[str, Any]:
    """Final numbers of a run: what summary.json holds and what ``compare`` and ``sweep`` read."""
    config, last = run.config, run.metrics[-1]
    world_size = config.get("world_size", 1)
    return {
        "run": str(run.path),
        "model": config.get("model"),
        "norm": config.get("norm"),
        "world_size": world_size,
        "batch_size_per_process": config.get("batch_size"),
        "global_batch": config.get("batch_size", 0) * world_size,
        "epochs": last["epoch"],
        "data": config.get("data_source"),
        "synthetic": config.get("synthetic", False),
        "final_test_acc": last["test_acc"],
        "best_test_acc": run.best_test_acc,
        "final_test_loss": last["test_loss"],
        "final_train_loss": last["train_loss"],
        "train_time_s": run.train_time_s,
        "mean_images_per_s": run.mean_images_per_s,
        "bn_running_mean_max_abs_diff": run.final_bn_divergence("running_mean_max_abs_diff"),
        "bn_running_var_max_rel_diff": run.final_bn_divergence("running_var_max_rel_diff"),
        "bn_batch_mean_spread": run.final_bn_divergence("batch_mean_spread"),
        "eval_bn": config.get("eval_bn"),
    }


def read_summary(path: str | Path) -> dict[str, Any] | None:
    """summary.json of a finished run, or None when the run has not finished."""
    file = Path(path) / SUMMARY
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{file}: malformed JSON ({exc.msg}); delete the run directory and rerun") from None
