"""Figures for training runs: curves of a comparison, and the batch-size sweep."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bnstudy.io import atomic_write  # noqa: E402
from bnstudy.runs import Run  # noqa: E402


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_comparison(runs: list[Run], path: Path) -> Path:
    """Train loss, test accuracy, and per-epoch BN divergence across ranks (log scale) for each run."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), layout="constrained")
    panels = [
        (axes[0, 0], "train loss", lambda r: [m["train_loss"] for m in r.metrics], False),
        (axes[0, 1], "test accuracy", lambda r: [m["test_acc"] for m in r.metrics], False),
        (
            axes[1, 0],
            "running_mean: max |rank diff|",
            lambda r: r.bn_divergence_per_epoch("running_mean_max_abs_diff"),
            True,
        ),
        (
            axes[1, 1],
            "batch mean used: max spread over ranks",
            lambda r: r.bn_divergence_per_epoch("batch_mean_spread"),
            True,
        ),
    ]
    for ax, title, values, log in panels:
        for run in runs:
            epochs = [m["epoch"] for m in run.metrics]
            ys = values(run)
            if log:
                ys = [max(y, 1e-12) for y in ys]
            ax.plot(epochs, ys, marker="o", label=f"{run.name} ({run.config.get('norm')})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("BN vs SyncBN: what per-process statistics change")
    return _save(fig, path)


def plot_sweep(results: dict[str, dict[int, float]], path: Path, title: str) -> Path:
    """Test accuracy against per-process batch size, one line per norm (the Group Norm paper's figure 1)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for norm, by_batch in results.items():
        batches = sorted(by_batch)
        ax.plot(batches, [100 * by_batch[b] for b in batches], marker="o", label=norm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("images per process")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
