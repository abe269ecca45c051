"""The run directory ``runs/NAME/``, the unit of output every command reads: every file name in it, rank 0's
writer and the reader.

    config.json      all options, versions, world size, backend, device, machine (written with the first epoch)
    metrics.jsonl    one record per epoch
    bn_stats.jsonl   one record per epoch and BN layer: how far ranks' statistics are apart
    checkpoint.pt    the latest complete epoch (see :mod:`bnstudy.training.checkpoint`)
    summary.json     final numbers, written at the end
    tb/              TensorBoard scalars; tb/<label>/ profiler traces (see :mod:`bnstudy.traces.record`)

A directory is a run once it holds a checkpoint: nothing is written before the first epoch ends, and a run that
fails before then takes away what it created (:func:`removed_unless_checkpointed`), so a failed start never leaves a
directory that cannot be resumed or compared.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnstudy.errors import UserError
from bnstudy.io import check_writable, write_json

CONFIG = "config.json"
METRICS = "metrics.jsonl"
BN_STATS = "bn_stats.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
TENSORBOARD = "tb"


def trace_dir(run_dir: str | Path, label: str) -> Path:
    """Where the profiler traces of ``label`` go: one TensorBoard profiler run, one worker per rank."""
    return Path(run_dir) / TENSORBOARD / label


def check_new_run(path: Path) -> None:
    """Refuse to start a run at ``path`` when it is a file, already holds a run or other files, or cannot be
    written."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file; give a directory for the run")
    if (path / CHECKPOINT).exists() or (path / CONFIG).exists():
        raise UserError(f"{path} already holds a run; pass --resume to continue it or choose another --out")
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"--out {path} holds other files, not a run; choose a new or empty directory")
    check_writable(path / CONFIG)


class RunWriter:
    """Rank 0's writer: config, per-epoch JSONL records, TensorBoard scalars and the summary. Nothing touches the
    disk before the first epoch's records arrive; a resumed run then drops records of epochs after its checkpoint
    and rewrites config.json (its epochs may have changed)."""

    def __init__(self, path: Path, resume_epoch: int, config: dict[str, Any]) -> None:
        self.path, self.resume_epoch, self._config = path, resume_epoch, config
        self.tb = None

    def _open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for name in (METRICS, BN_STATS):
            _truncate_jsonl(self.path / name, self.resume_epoch)
        write_json(self.path / CONFIG, self._config)
        from torch.utils.tensorboard import SummaryWriter

        purge = self.resume_epoch + 1 if self.resume_epoch else None
        self.tb = SummaryWriter(str(self.path / TENSORBOARD), purge_step=purge)

    def epoch(self, metrics: dict[str, Any], bn_records: list[dict]) -> None:
        """Append one epoch's metrics and BN statistics records and its TensorBoard scalars."""
        if self.tb is None:
            self._open()
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
        if self.tb is not None:
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


def _first_missing(path: Path) -> Path | None:
    """The outermost directory on the way to ``path`` that does not exist yet (``path`` itself, or a parent)."""
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            return missing
        missing = candidate
    return missing


@contextmanager
def removed_unless_checkpointed(path: Path) -> Iterator[None]:
    """Remove what the block created under ``path`` (the directory and new parents, or new entries of a directory
    that was there) when it fails before ``path`` holds a checkpoint: a run that never finished an epoch is not a
    run. A failure after the first checkpoint keeps everything, for ``--resume``."""
    created = _first_missing(path)
    before = set(os.listdir(path)) if created is None and path.is_dir() else set()
    try:
        yield
    except BaseException:
        if not (path / CHECKPOINT).exists():
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            elif path.is_dir():
                for name in set(os.listdir(path)) - before:
                    target = path / name
                    if target.is_dir():
                        shutil.rmtree(target, ignore_errors=True)
                    else:
                        target.unlink(missing_ok=True)
        raise


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


def read_config(path: str | Path) -> dict | None:
    """config.json of the run at ``path``, or None when there is none."""
    file = Path(path) / CONFIG
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed config.json ({exc.msg})") from None


def read_run(path: str | Path) -> Run:
    """Load a run directory; a one-line error if it is not one."""
    path = Path(path)
    config = read_config(path)
    if config is None:
        raise UserError(f"{path}: not a run directory (no config.json); pass runs/NAME written by train_cifar.py")
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
