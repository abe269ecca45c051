"""Comparing finished runs (``bnstudy compare``): a table and curves of accuracy, time, throughput and how far
ranks' BN statistics are apart."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from bnstudy.io import save_png
from bnstudy.training.run_directory import Run


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
                "best_test_acc": run.best_test_acc,
                "train_time_s": run.train_time_s,
                "images_per_s": run.mean_images_per_s,
                "running_mean_max_abs_diff": run.final_bn_divergence("running_mean_max_abs_diff"),
                "batch_mean_spread": run.final_bn_divergence("batch_mean_spread"),
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
        name = r["run"][:19] + ("*" if r["synthetic"] else "")
        lines.append(
            f"{name:<20} {r['norm']:<7} {r['world_size']:>5} {r['batch_per_process']:>5} {r['epochs']:>3} "
            f"{r['final_test_acc']:>9.4f} {r['best_test_acc']:>8.4f} {r['train_time_s']:>7.1f} "
            f"{r['images_per_s']:>7.0f} {r['running_mean_max_abs_diff']:>12.3e} {r['batch_mean_spread']:>17.3e}"
        )
    if any(r["synthetic"] for r in rows):
        lines.append("* trained on the built-in synthetic set, not CIFAR-10")
    return "\n".join(lines)


def plot_comparison(runs: list[Run], path: Path) -> Path:
    """Train loss, test accuracy, and per-epoch BN divergence across ranks (log scale) for each run."""
    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2)
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
    return save_png(fig, path)
