"""Study ``bn-vs-nobn``: the deep 20→64→64→64→32→1 MLP with and without BatchNorm1d, at batch 8 for 50 epochs,
and across batch sizes 8–64 for 30 epochs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial

from bnstudy.data import TabularSplit, toy_classification
from bnstudy.models import deep_mlp
from bnstudy.studies.fitting import torch_threads, train_seeds
from bnstudy.studies.result import DEFAULT_SEEDS, Check, StudyResult, choose_params, history_summary, mean_std

NAME = "bn-vs-nobn"
NORMS = ("bn", "none")


@dataclass(frozen=True)
class Params:
    batch_size: int = 8
    epochs: int = 50
    grid_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    grid_epochs: int = 30
    lr: float = 1e-3
    precision: str = "fp32"


QUICK = {"epochs": 2, "grid_epochs": 1}


def compare(
    data: TabularSplit, seeds: Sequence[int], batch_size: int, epochs: int, lr: float, precision: str = "fp32"
) -> dict:
    """Both variants at one batch size: their histories, and BN's loss over no-BN's per seed, at the end
    (``final``) and summed over all epochs (``mean``: below 1 means BN got there faster). Ratios are given for
    the loss logged during training (train mode) and for the whole training set in eval mode."""
    histories = {
        norm: train_seeds(
            partial(deep_mlp, norm),
            data,
            seeds,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            desc=f"{NAME} {norm}",
            precision=precision,
        )
        for norm in NORMS
    }
    pairs = list(zip(histories["bn"], histories["none"]))

    def ratios(key: str) -> dict:
        return {
            "final": mean_std([bn[key][-1] / no[key][-1] for bn, no in pairs]),
            "mean": mean_std([sum(bn[key]) / sum(no[key]) for bn, no in pairs]),
        }

    return {
        "batch_size": batch_size,
        "epochs": epochs,
        "loss_ratio": {key: ratios(key) for key in ("train_loss", "train_eval_loss")},
        **{norm: history_summary(h) for norm, h in histories.items()},
    }


def run(seeds: Sequence[int] = DEFAULT_SEEDS, quick: bool | None = None, **overrides) -> StudyResult:
    """Train both variants per seed at the seed's batch size, then across the grid of batch sizes."""
    p = choose_params(Params(), QUICK, quick, overrides)
    data = toy_classification()
    with torch_threads(1):
        main = compare(data, seeds, p.batch_size, p.epochs, p.lr, p.precision)
        grid = {str(bs): compare(data, seeds, bs, p.grid_epochs, p.lr, p.precision) for bs in p.grid_batch_sizes}

    def outcome(c: dict) -> dict:
        return {
            "final_train_loss": {norm: c[norm]["train_loss"]["final"] for norm in NORMS},
            "final_train_eval_loss": {norm: c[norm]["train_eval_loss"]["final"] for norm in NORMS},
            "final_test_acc": {norm: c[norm]["test_acc"]["final"] for norm in NORMS},
            "loss_ratio": c["loss_ratio"],
        }

    summary = {"main": outcome(main), "grid": {bs: outcome(c) for bs, c in grid.items()}}
    main_ratio = main["loss_ratio"]["train_loss"]
    findings = {
        "bn_lower_final_loss": Check(
            f"at batch {p.batch_size} after {p.epochs} epochs, BN's training loss is lower (ratio BN / no BN < 1)",
            main_ratio["final"]["mean"] < 1,
            main_ratio["final"],
        ),
        "bn_converges_faster": Check(
            "BN's training loss summed over the epochs is lower (ratio < 1): it gets there faster",
            main_ratio["mean"]["mean"] < 1,
            main_ratio["mean"],
        ),
        "bn_lower_final_loss_eval_mode": Check(
            "the same holds for the whole training set evaluated in eval mode (no batch-statistics noise)",
            main["loss_ratio"]["train_eval_loss"]["final"]["mean"] < 1,
            main["loss_ratio"]["train_eval_loss"]["final"],
        ),
        "bn_lower_loss_every_batch_size": Check(
            f"after {p.grid_epochs} epochs BN's training loss is lower at every batch size of the grid",
            all(c["loss_ratio"]["train_loss"]["final"]["mean"] < 1 for c in grid.values()),
            {bs: c["loss_ratio"]["train_loss"]["final"]["mean"] for bs, c in grid.items()},
        ),
    }
    return StudyResult(NAME, asdict(p), list(seeds), summary, findings=findings, data={"main": main, "grid": grid})
