"""Study ``batch-size``: the plain 20→64→32→1 MLP (no BN) trained with different batch sizes for the same number
of epochs. Smaller batches take more optimiser steps per epoch, and noisier ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from bnstudy.data import toy_classification
from bnstudy.models import small_mlp
from bnstudy.studies.fitting import torch_threads, train_seeds
from bnstudy.studies.result import DEFAULT_SEEDS, Check, StudyResult, choose_params, history_summary

NAME = "batch-size"


@dataclass(frozen=True)
class Params:
    epochs: int = 30
    batch_sizes: tuple[int, ...] = (8, 32, 128, 512)
    lr: float = 1e-3
    precision: str = "fp32"


QUICK = {"epochs": 2}


def run(seeds: Sequence[int] = DEFAULT_SEEDS, quick: bool | None = None, **overrides) -> StudyResult:
    """Train the no-BN MLP at each batch size for each seed; training loss per epoch and at the end."""
    p = choose_params(Params(), QUICK, quick, overrides)
    data = toy_classification()
    runs = {}
    with torch_threads(1):
        for bs in p.batch_sizes:
            histories = train_seeds(
                lambda: small_mlp("none"),
                data,
                seeds,
                epochs=p.epochs,
                batch_size=bs,
                lr=p.lr,
                desc=f"{NAME} {bs}",
                precision=p.precision,
            )
            runs[str(bs)] = history_summary(histories)
    final = {bs: r["train_loss"]["final"] for bs, r in runs.items()}
    means = [final[str(bs)]["mean"] for bs in p.batch_sizes]
    summary = {
        "final_train_loss": final,
        "final_test_acc": {bs: r["test_acc"]["final"] for bs, r in runs.items()},
        "steps_per_epoch": {str(bs): -(-len(data.y_train) // bs) for bs in p.batch_sizes},
    }
    findings = {
        "smaller_batch_lower_loss": Check(
            f"after {p.epochs} epochs, the smaller the batch, the lower the training loss (mean over seeds)",
            all(a < b for a, b in zip(means, means[1:])),
            dict(zip(map(str, p.batch_sizes), means)),
        )
    }
    return StudyResult(NAME, asdict(p), list(seeds), summary, findings=findings, data={"runs": runs})
