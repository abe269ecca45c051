"""The batch-size sweep: BN, SyncBN and GN at several per-process batch sizes under DDP, each a real torchrun
job, and test accuracy against per-process batch size (Wu & He 2018, figure 1, on CIFAR-10).

Every point is planned and checked before the first job starts: its options (as :class:`TrainConfig`), the data
and, for a point whose directory already holds a run, that the run is the one asked for. A finished point is reused
only when its recorded configuration equals the requested one, an interrupted one is resumed; one with other
settings is refused, never reported as this sweep's result.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from bnstudy.errors import UserError, check_at_least
from bnstudy.io import check_writable, save_png
from bnstudy.training.checkpoint import load_checkpoint
from bnstudy.training.config import TrainConfig, option_name
from bnstudy.training.run_data import RunData, check_run_fits, load_run_data
from bnstudy.training.run_directory import CHECKPOINT, check_new_run, read_summary

DEFAULT_OUT = Path("runs/sweep")
QUICK_OUT = Path("runs/sweep-quick")  # apart from the full sweep's, so neither ever reuses the other's points


@dataclass(frozen=True)
class SweepPlan:
    """Plain-data description of a sweep; ``quick`` is the CI-sized one, ``full`` the one for real data."""

    norms: tuple[str, ...] = ("bn", "syncbn", "gn")
    batches: tuple[int, ...] = (2, 4, 8, 16, 32)
    nproc: int = 2
    epochs: int = 4
    base_lr: float = 0.2
    data: str = "auto"
    width: int = 16
    train_subset: int | None = 10000
    test_subset: int | None = None
    synthetic_size: int = 20000
    seed: int = 0
    precision: str = "fp32"

    def lr(self, batch: int) -> float:
        """Linear scaling rule (Goyal et al. 2017): the learning rate grows with the global batch, base at 256."""
        return self.base_lr * batch * self.nproc / 256

    def config(self, norm: str, batch: int, out: Path) -> TrainConfig:
        """The training run of one point, in ``out/<norm>-b<batch>``."""
        return replace(
            TrainConfig(),
            out=str(out / f"{norm}-b{batch}"),
            norm=norm,
            batch_size=batch,
            lr=self.lr(batch),
            epochs=self.epochs,
            data=self.data,
            width=self.width,
            seed=self.seed,
            synthetic_size=self.synthetic_size,
            train_subset=self.train_subset,
            test_subset=self.test_subset,
            precision=self.precision,
        )


QUICK = SweepPlan(epochs=1, data="synthetic", width=8, train_subset=512, test_subset=500, synthetic_size=2000)
# The options a point's command line sets; the rest keep TrainConfig's defaults.
POINT_OPTIONS = (
    "norm", "batch_size", "lr", "epochs", "data", "width", "seed", "synthetic_size", "train_subset", "test_subset",
    "precision",
)  # fmt: skip


@dataclass(frozen=True)
class SweepPoint:
    """One (norm, batch) run and what exists of it already: "new", "finished" (reused) or "interrupted" (resumed)."""

    norm: str
    batch: int
    config: TrainConfig
    state: str

    @property
    def out(self) -> Path:
        return Path(self.config.out)


def torchrun_command(nproc: int, launcher_args: list[str]) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N -m bnstudy.training.launcher ARGS`` with this interpreter."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*torchrun, "-m", "bnstudy.training.launcher", *launcher_args]


def run_command(point: SweepPoint, nproc: int) -> list[str]:
    """The torchrun command line of one point: a new run with the point's options (floats as their exact repr, so
    the run records the very config asked for), or ``--resume`` of an interrupted one, which takes its own."""
    if point.state == "interrupted":
        return torchrun_command(nproc, ["--resume", "--out", point.config.out])
    options = [(option_name(name), getattr(point.config, name)) for name in POINT_OPTIONS]
    args = [item for flag, value in options if value is not None for item in (flag, str(value))]
    return torchrun_command(nproc, [*args, "--out", point.config.out])


def recorded_settings(config: TrainConfig, data: RunData, world_size: int) -> dict[str, Any]:
    """What a point's config.json must hold for its run to be this point: its options, the world size and the data
    it actually trained on (``--data auto`` may have meant synthetic data when the run was made)."""
    return {
        **config.settings(),
        "world_size": world_size,
        "data_source": data.description,
        "synthetic": data.synthetic,
    }


def _point_state(config: TrainConfig, wanted: dict[str, Any]) -> str:
    """The point's state: new, finished or interrupted; a UserError when its directory holds something else or a
    run with other settings. A run's settings are read from its checkpoint, the record --resume trusts too."""
    out = Path(config.out)
    if not (out / CHECKPOINT).exists():
        check_new_run(out)
        return "new"
    stored = load_checkpoint(out / CHECKPOINT)["config"]
    recorded = {**TrainConfig.from_dict(stored).settings(), **{k: stored[k] for k in wanted if k in stored}}
    for key, value in wanted.items():
        if recorded.get(key) != value:
            raise UserError(
                f"{out} holds a run with {key}={recorded.get(key)!r}, this sweep asks for {value!r}; pass another "
                "--out, or delete that directory to rerun the point"
            )
    return "finished" if read_summary(out) is not None else "interrupted"


def plan_sweep(plan: SweepPlan, out: Path) -> list[SweepPoint]:
    """Every point of the sweep, checked before any job starts: options, data, batch against the data, and what
    the point's directory already holds."""
    check_at_least("--nproc", plan.nproc, 1)
    if not plan.norms or not plan.batches:
        raise UserError("--norms and --batches need at least one value each")
    check_writable(out / "sweep.json")
    # Batch-major, so that the norms compared at one batch size run next to each other in time (their training
    # times are compared too, and a shared machine's speed drifts over minutes).
    configs = {(norm, batch): plan.config(norm, batch, out) for batch in plan.batches for norm in plan.norms}
    for (norm, batch), config in configs.items():
        with _point_errors(norm, batch):
            config.validate(plan.nproc)
    data = load_run_data(next(iter(configs.values())))  # the same data for every point
    points = []
    for (norm, batch), config in configs.items():
        with _point_errors(norm, batch):
            check_run_fits(config, data, plan.nproc)
        state = _point_state(config, recorded_settings(config, data, plan.nproc))
        points.append(SweepPoint(norm, batch, config, state))
    return points


@contextmanager
def _point_errors(norm: str, batch: int) -> Iterator[None]:
    """Name the point in a check's error: the launcher option it names is set by --norms, --batches, ..."""
    try:
        yield
    except UserError as exc:
        raise UserError(f"sweep point {norm} batch {batch}: {exc}") from None


def run_sweep(points: list[SweepPoint], nproc: int, out: Path) -> dict[str, dict[str, dict[int, float]]]:
    """Run every point that is not finished (its log beside it, ``out/<norm>-b<batch>.log``); returns the final
    test accuracy (``test_acc``) and the training time in seconds (``train_time_s``), each by norm and batch."""
    results: dict[str, dict[str, dict[int, float]]] = {"test_acc": {}, "train_time_s": {}}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for point in tqdm(points, desc="sweep", unit="run"):
        if point.state != "finished":
            log = out / f"{point.out.name}.log"
            out.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as f:
                done = subprocess.run(run_command(point, nproc), stdout=f, stderr=subprocess.STDOUT, env=env)
            if done.returncode != 0:
                raise UserError(
                    f"sweep point {point.norm} batch {point.batch} failed (exit {done.returncode}); see {log}"
                )
        summary = read_summary(point.out)
        if summary is None:  # e.g. a checkpoint of the last epoch, then a crash before summary.json
            raise UserError(f"{point.out} has no summary.json after its run; delete it to rerun the point")
        results["test_acc"].setdefault(point.norm, {})[point.batch] = summary["final_test_acc"]
        results["train_time_s"].setdefault(point.norm, {})[point.batch] = summary["train_time_s"]
    return results


def time_over_bn(train_time_s: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """Each other norm's training time over plain BN's at the same batch size (empty without BN in the sweep)."""
    bn = train_time_s.get("bn", {})
    return {
        norm: {batch: seconds / bn[batch] for batch, seconds in by_batch.items() if batch in bn}
        for norm, by_batch in train_time_s.items()
        if norm != "bn" and bn
    }


def plot_sweep(results: dict[str, dict[int, float]], path: Path, title: str) -> Path:
    """Test accuracy against per-process batch size, one line per norm (the Group Norm paper's figure 1)."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for norm, by_batch in results.items():
        batches = sorted(by_batch)
        ax.plot(batches, [100 * by_batch[b] for b in batches], marker="o", label=norm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("images per process")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)
