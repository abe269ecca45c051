"""The batch-size sweep: BN, SyncBN and GN at several per-process batch sizes under DDP, each a real torchrun
job, and test accuracy against per-process batch size (Wu & He 2018, figure 1, on CIFAR-10)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from tqdm import tqdm

from bnstudy.errors import UserError
from bnstudy.io import save_png
from bnstudy.training.run_directory import read_summary


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

    def lr(self, batch: int) -> float:
        """Linear scaling rule (Goyal et al. 2017): the learning rate grows with the global batch, base at 256."""
        return self.base_lr * batch * self.nproc / 256


QUICK = SweepPlan(epochs=1, data="synthetic", width=8, train_subset=512, test_subset=500, synthetic_size=2000)


def torchrun_command(nproc: int, launcher_args: list[str]) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N -m bnstudy.training.launcher ARGS`` with this interpreter."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*torchrun, "-m", "bnstudy.training.launcher", *launcher_args]


def run_command(plan: SweepPlan, norm: str, batch: int, out: Path) -> list[str]:
    """The torchrun command line of one sweep point."""
    options = {
        "norm": norm, "batch-size": batch, "lr": f"{plan.lr(batch):.6g}", "epochs": plan.epochs, "data": plan.data,
        "width": plan.width, "seed": plan.seed, "synthetic-size": plan.synthetic_size, "out": out,
        "train-subset": plan.train_subset, "test-subset": plan.test_subset,
    }  # fmt: skip
    args = [item for key, value in options.items() if value is not None for item in (f"--{key}", str(value))]
    return torchrun_command(plan.nproc, args)


def run_sweep(plan: SweepPlan, out: Path) -> dict:
    """Run every (norm, batch) point not already finished under ``out``; returns accuracies by norm and batch."""
    points = [(norm, batch) for norm in plan.norms for batch in plan.batches]
    results: dict[str, dict[int, float]] = {norm: {} for norm in plan.norms}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for norm, batch in tqdm(points, desc="sweep", unit="run"):
        run_dir = out / f"{norm}-b{batch}"
        summary = read_summary(run_dir)
        if summary is None:
            log = out / f"{norm}-b{batch}.log"
            out.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as f:
                done = subprocess.run(
                    run_command(plan, norm, batch, run_dir), stdout=f, stderr=subprocess.STDOUT, env=env
                )
            if done.returncode != 0:
                raise UserError(f"sweep point {norm} batch {batch} failed (exit {done.returncode}); see {log}")
            summary = read_summary(run_dir)
        results[norm][batch] = summary["final_test_acc"]
    return results


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
