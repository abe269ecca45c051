"""Study ``mnist``: the 784→32→32→10 MLP with and without BN, Adam 0.01, batch 32, 10 epochs; loss and
accuracy per epoch on train and test data."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial

from bnstudy.models import mnist_mlp
from bnstudy.studies.fitting import torch_threads, train_seeds
from bnstudy.studies.images import as_split, load_train_test
from bnstudy.studies.result import DEFAULT_SEEDS, Check, StudyResult, choose_params, history_summary, mean_std

NAME = "mnist"
NORMS = ("bn", "none")
SYNTHETIC_SIZES = (10000, 2000)


@dataclass(frozen=True)
class Params:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    train_size: int | None = None
    test_size: int | None = None
    precision: str = "fp32"


QUICK = {"epochs": 1, "train_size": 1000, "test_size": 500}


def run(
    seeds: Sequence[int] = DEFAULT_SEEDS,
    quick: bool | None = None,
    data: str | os.PathLike | None = None,
    **overrides,
) -> StudyResult:
    """Train both variants per seed. ``data``: an MNIST directory (train.npz/test.npz) or torchvision root,
    "synthetic", or None for real MNIST when :func:`bnstudy.data.find_real_data` finds it."""
    p = choose_params(Params(), QUICK, quick, overrides)
    train, test = load_train_test("mnist", data, p.train_size, p.test_size, SYNTHETIC_SIZES)
    split = as_split(train, test)
    with torch_threads(1):
        histories = {
            norm: train_seeds(
                partial(mnist_mlp, norm),
                split,
                seeds,
                epochs=p.epochs,
                batch_size=p.batch_size,
                lr=p.lr,
                desc=norm,
                precision=p.precision,
            )
            for norm in NORMS
        }
    curves = {norm: history_summary(h) for norm, h in histories.items()}
    final = {norm: {key: c["final"] for key, c in curves[norm].items()} for norm in NORMS}
    gap = mean_std([bn["test_acc"][-1] - no["test_acc"][-1] for bn, no in zip(histories["bn"], histories["none"])])
    summary = {
        "data_source": train.source,
        "train_samples": len(train),
        "test_samples": len(test),
        "final": final,
        "best_test_acc": {norm: mean_std([max(h["test_acc"]) for h in histories[norm]]) for norm in NORMS},
        "test_acc_gain_from_bn": gap,
    }
    findings = {
        "bn_higher_test_accuracy": Check(
            f"after {p.epochs} epochs BN's test accuracy is higher (the seed reported about 97% vs 95%)",
            gap["mean"] > 0,
            {norm: final[norm]["test_acc"]["mean"] for norm in NORMS},
        ),
        "bn_lower_train_loss": Check(
            "BN's final training loss is lower",
            final["bn"]["train_loss"]["mean"] < final["none"]["train_loss"]["mean"],
            {norm: final[norm]["train_loss"]["mean"] for norm in NORMS},
        ),
    }
    return StudyResult(NAME, asdict(p), list(seeds), summary, findings=findings, data={"curves": curves})
