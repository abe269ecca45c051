"""Figures for the studies, drawn from a StudyResult alone (so a saved result.json can be re-plotted).

Uses matplotlib's object API (no pyplot state): figures render without a display and show inline in Jupyter.
Curves are the mean across seeds with a ±1 std band.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bnstudy.io import save_png
from bnstudy.studies.result import StudyResult, mean_std

NORM_STYLE = {"bn": {"color": "tab:blue", "label": "with BN"}, "none": {"color": "tab:orange", "label": "no BN"}}


def new_figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (6.0, 4.0)) -> tuple[Figure, Any]:
    """A figure of ``rows × cols`` panels, each about ``size`` inches."""
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def band(ax: Axes, curve: dict[str, list[float]], label: str, color: str | None = None) -> None:
    """A per-epoch mean curve (epochs numbered from 1) with a ±1 std band across seeds."""
    mean, std = curve["mean"], curve["std"]
    epochs = range(1, len(mean) + 1)
    (handle,) = ax.plot(epochs, mean, label=label, color=color)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    low = [m - s for m, s in zip(mean, std)]
    if ax.get_yscale() == "log":  # a band edge at or below 0 cannot be drawn: stop it a decade below the mean
        low = [max(lo, m / 10) for lo, m in zip(low, mean)]
    ax.fill_between(epochs, low, [m + s for m, s in zip(mean, std)], color=handle.get_color(), alpha=0.2)


def bars(
    ax: Axes, labels: Sequence[str], stats: Sequence[dict], offset: float = 0.0, width: float = 0.8, **style: Any
) -> None:
    """Bars of ``mean`` with ``std`` error bars."""
    xs = [i + offset for i in range(len(labels))]
    ax.bar(xs, [s["mean"] for s in stats], width, yerr=[s["std"] for s in stats], capsize=3, **style)
    ax.set_xticks(range(len(labels)), labels)


def decorate(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def manual_bn_figures(result: StudyResult) -> dict[str, Figure]:
    hist = result.data["histogram_seed0"]
    c = result.config
    fig, axes = new_figure(1, 3, (4.5, 3.5))
    titles = {
        "before": f"before BN: N({c['hist_mean']:g}, {c['hist_std']:g}²)",
        "normalized": "after normalisation (x̂)",
        "affine": f"after γ = {c['hist_gamma']:g}, β = {c['hist_beta']:g}",
    }
    for ax, (stage, title) in zip(axes[0], titles.items()):
        ax.stairs(hist[stage]["counts"], hist[stage]["edges"], fill=True, alpha=0.7)
        decorate(ax, title, "value", "count")
    example = result.data["worked_example"]
    fig2, axes2 = new_figure(1, 2, (5.5, 3.8))
    ax1, ax2 = axes2[0]
    rows = [f"row {i + 1}" for i in range(len(example["input"]))]
    correct = [r[0] for r in example["layers"][0]["x_hat"]]
    blog = [r[0] for r in example["blog"]["x_hat"]]
    ax1.bar([i - 0.2 for i in range(len(rows))], correct, 0.4, label="batch statistics (correct)")
    ax1.bar([i + 0.2 for i in range(len(rows))], blog, 0.4, label="blog's μ_B, σ²_B")
    ax1.set_xticks(range(len(rows)), rows)
    decorate(ax1, "layer 1, channel 1: x̂", "", "x̂")
    for k, layer in enumerate(example["layers"]):
        ax2.plot(rows, [r[0] for r in layer["relu_out"]], marker="o", label=f"layer {k + 1} (γ={layer['gamma']:g})")
    decorate(ax2, "BN → ReLU output per layer, channel 1", "", "value")
    return {"histograms": fig, "worked_example": fig2}


def modes_figures(result: StudyResult) -> dict[str, Figure]:
    first = result.data["per_seed"][0]
    fig, axes = new_figure(1, 2, (6.0, 4.0))
    ax1, ax2 = axes[0]
    n_rows = len(first["eval_preds"][0])
    for rep, (train, evals) in enumerate(zip(first["train_preds"], first["eval_preds"])):
        xs = [i + 1 + 0.06 * (rep - 2) for i in range(n_rows)]
        ax1.scatter(xs, train, color="tab:red", s=14, label="train mode" if rep == 0 else None)
        ax1.scatter(xs, evals, color="k", marker="_", s=80, label="eval mode" if rep == 0 else None)
    ax1.set_xticks(range(1, n_rows + 1))
    decorate(
        ax1, f"{len(first['train_preds'])} predictions per test row (seed {result.seeds[0]})", "test row", "P(class 1)"
    )
    per_row = [[r["train_std_per_row"][i] for r in result.data["per_seed"]] for i in range(n_rows)]
    bars(ax2, [str(i + 1) for i in range(n_rows)], [mean_std(v) for v in per_row], color="tab:red")
    decorate(ax2, "train-mode prediction std per row (eval mode: 0)", "test row", "std over repeats")
    return {"predictions": fig}


def batch_size_figures(result: StudyResult) -> dict[str, Figure]:
    runs = result.data["runs"]
    fig, axes = new_figure(1, 2, (6.0, 4.0))
    for ax, log in zip(axes[0], (False, True)):
        if log:
            ax.set_yscale("log")
        for bs, run in runs.items():
            band(ax, run["train_loss"]["curve"], f"batch {bs}")
        decorate(ax, "training loss, no BN", "epoch", "BCE loss" + (" (log)" if log else ""))
    fig2, axes2 = new_figure(1, 1, (6.0, 4.0))
    bars(axes2[0][0], list(runs), [run["train_loss"]["final"] for run in runs.values()], color="tab:green")
    decorate(axes2[0][0], f"final training loss after {result.config['epochs']} epochs", "batch size", "BCE loss")
    return {"loss_curves": fig, "final_loss": fig2}


def _bn_vs_none(ax: Axes, comparison: dict, log: bool) -> None:
    if log:
        ax.set_yscale("log")
    for norm, style in NORM_STYLE.items():
        band(ax, comparison[norm]["train_loss"]["curve"], f"{style['label']} (train mode)", style["color"])
        ax.plot(
            range(1, len(comparison[norm]["train_eval_loss"]["curve"]["mean"]) + 1),
            comparison[norm]["train_eval_loss"]["curve"]["mean"],
            color=style["color"],
            linestyle="--",
            label=f"{style['label']} (whole train set, eval mode)",
        )


def bn_vs_nobn_figures(result: StudyResult) -> dict[str, Figure]:
    main = result.data["main"]
    fig, axes = new_figure(1, 2, (6.0, 4.2))
    for ax, log in zip(axes[0], (False, True)):
        _bn_vs_none(ax, main, log)
        decorate(ax, f"deep MLP, batch {main['batch_size']}", "epoch", "BCE loss" + (" (log)" if log else ""))
    grid = result.data["grid"]
    cols = 2
    rows = -(-len(grid) // cols)
    fig2, axes2 = new_figure(rows, cols, (5.0, 3.6))
    for ax, (bs, comparison) in zip(axes2.flat, grid.items()):
        _bn_vs_none(ax, comparison, log=True)
        decorate(ax, f"batch {bs}", "epoch", "BCE loss (log)")
    return {"loss_curves": fig, "batch_size_grid": fig2}


def gradients_figures(result: StudyResult) -> dict[str, Figure]:
    layers = result.summary["layers"]
    fig, axes = new_figure(1, 1, (8.0, 4.2))
    ax = axes[0][0]
    ax.set_yscale("log")
    for k, (norm, style) in enumerate(NORM_STYLE.items()):
        bars(ax, layers, result.data[norm]["init"], offset=0.4 * k - 0.2, width=0.4, **style)
    decorate(ax, "mean |grad| of each layer's weights at initialisation", "layer", "mean |grad| (log)")
    fig2, axes2 = new_figure(1, 2, (6.0, 4.2))
    for ax, (norm, style) in zip(axes2[0], NORM_STYLE.items()):
        ax.set_yscale("log")
        for name, curve in zip(layers, result.data[norm]["training"]):
            band(ax, curve, name)
        decorate(ax, f"{style['label']}: mean |grad| per epoch", "epoch", "mean |grad| (log)")
    ys = [a.get_ylim() for a in axes2[0]]
    for a in axes2[0]:
        a.set_ylim(min(y[0] for y in ys), max(y[1] for y in ys))
    return {"gradients_init": fig, "gradients_training": fig2}


def _metric_grid(curves: dict, title: str) -> Figure:
    fig, axes = new_figure(2, 2, (5.0, 3.6))
    panels = (("train_loss", "training loss"), ("test_loss", "test loss"), ("train_acc", "training accuracy"))
    panels += (("test_acc", "test accuracy"),)
    for ax, (key, label) in zip(axes.flat, panels):
        for norm, style in NORM_STYLE.items():
            band(ax, curves[norm][key]["curve"], style["label"], style["color"])
        decorate(ax, f"{title}: {label}", "epoch", label)
    return fig


def mnist_figures(result: StudyResult) -> dict[str, Figure]:
    return {"curves": _metric_grid(result.data["curves"], "MNIST MLP")}


def cnn_channels_figures(result: StudyResult) -> dict[str, Figure]:
    stats = result.data["channel_statistics"]
    fig, axes = new_figure(1, 2, (4.5, 3.5))
    channels = [str(i) for i in range(len(stats["manual_mean"]))]
    for ax, key, label in zip(axes[0], ("manual_mean", "manual_var"), ("mean", "biased variance")):
        ax.bar(channels, stats[key], color="tab:purple")
        decorate(ax, f"per-channel {label} over (N, H, W)", "channel", label)
    return {"channel_statistics": fig, "training": _metric_grid(result.data["curves"], "seed CNN")}


def qat_fold_figures(result: StudyResult) -> dict[str, Figure]:
    variants = result.summary["variants"]
    labels = [name.replace("_", "\n") for name in variants]
    fig, axes = new_figure(1, 2, (5.5, 3.8))
    panels = (("top1", "top-1 on the test images"), ("images_per_s", "onnxruntime images/s, batch 64"))
    for ax, (metric, title) in zip(axes[0], panels):
        bars(ax, labels, [v[metric] for v in variants.values()], color="tab:green")
        decorate(ax, title, "variant", metric.replace("_", " "))
    return {"variants": fig}


FIGURES: dict[str, Callable[[StudyResult], dict[str, Figure]]] = {
    "manual-bn": manual_bn_figures,
    "modes": modes_figures,
    "batch-size": batch_size_figures,
    "bn-vs-nobn": bn_vs_nobn_figures,
    "gradients": gradients_figures,
    "mnist": mnist_figures,
    "cnn-channels": cnn_channels_figures,
    "qat-fold": qat_fold_figures,
}


def study_figures(result: StudyResult) -> dict[str, Figure]:
    """The figures of ``result``, by file stem."""
    return FIGURES[result.name](result)


def save_figures(figures: dict[str, Figure], directory: str | os.PathLike) -> list[Path]:
    """Write each figure as ``<directory>/<name>.png``, atomically."""
    return [save_png(fig, Path(directory) / f"{name}.png", dpi=110) for name, fig in figures.items()]
