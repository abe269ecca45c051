"""Study ``modes``: a trained BN MLP predicts the same test rows repeatedly in train mode and in eval mode.

In train mode BN normalises with the statistics of whatever batch the rows arrive in, so a row's prediction
depends on its batch-mates; in eval mode it uses the fixed running statistics, so it depends on the row alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from bnstudy.data import TabularSplit, toy_classification
from bnstudy.models import small_mlp
from bnstudy.studies.fitting import fit, seeded_model, torch_threads
from bnstudy.studies.result import DEFAULT_SEEDS, Check, StudyResult, choose_params, mean_std

NAME = "modes"


@dataclass(frozen=True)
class Params:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    rows: int = 10
    repeats: int = 5
    companions: int = 22
    precision: str = "fp32"


QUICK = {"epochs": 2}


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Probabilities of class 1."""
    return torch.sigmoid(model(x).squeeze(-1))


def mixed_batches(
    rows: Tensor, pool: Tensor, companions: int, repeats: int, generator: torch.Generator
) -> list[Tensor]:
    """``repeats`` batches, each the same ``rows`` first, followed by ``companions`` random rows from ``pool``:
    the rows to predict stay fixed, their batch-mates change."""
    return [
        torch.cat([rows, pool[torch.randperm(len(pool), generator=generator)[:companions]]]) for _ in range(repeats)
    ]


def repeated_predictions(model: nn.Module, batches: Sequence[Tensor], n_rows: int) -> Tensor:
    """(repeats, n_rows) predictions for the first ``n_rows`` of each batch, in the model's current mode."""
    return torch.stack([predict(model, batch)[:n_rows] for batch in batches])


def compare_modes(model: nn.Module, data: TabularSplit, p: Params, seed: int) -> dict:
    """Predict the first ``rows`` test rows ``repeats`` times in train mode and in eval mode.

    Train-mode prediction runs on a copy, because a train-mode forward also updates BN's running statistics,
    even under ``no_grad``.
    """
    rows, pool = data.x_test[: p.rows], data.x_test[p.rows :]
    batches = mixed_batches(rows, pool, p.companions, p.repeats, torch.Generator().manual_seed(seed))
    train_copy = copy.deepcopy(model).train()
    bn = next(m for m in train_copy.modules() if isinstance(m, nn.BatchNorm1d))
    running_before = bn.running_mean.clone()
    train_preds = repeated_predictions(train_copy, batches, p.rows)
    running_moved = (bn.running_mean - running_before).abs().max().item()
    same_batch = repeated_predictions(train_copy, [batches[0]] * p.repeats, p.rows)
    model.eval()
    eval_preds = repeated_predictions(model, batches, p.rows)
    eval_alone = predict(model, rows)
    return {
        "train_preds": train_preds.tolist(),
        "eval_preds": eval_preds.tolist(),
        "train_std_per_row": train_preds.std(dim=0, unbiased=False).tolist(),
        "train_std_mean": train_preds.std(dim=0, unbiased=False).mean().item(),
        "train_same_batch_std_max": same_batch.std(dim=0, unbiased=False).max().item(),
        "eval_std_max": eval_preds.std(dim=0, unbiased=False).max().item(),
        "eval_alone_vs_in_batch": (eval_preds[0] - eval_alone).abs().max().item(),
        "train_vs_eval_mean_abs": (train_preds - eval_preds).abs().mean().item(),
        "running_mean_moved": running_moved,
    }


def run(seeds: Sequence[int] = DEFAULT_SEEDS, quick: bool | None = None, **overrides) -> StudyResult:
    """Train the BN MLP once per seed, then compare repeated train-mode and eval-mode predictions."""
    p = choose_params(Params(), QUICK, quick, overrides)
    data = toy_classification()
    if p.companions > len(data.x_test) - p.rows:
        raise ValueError(f"companions={p.companions} exceeds the {len(data.x_test) - p.rows} other test rows")
    per_seed = []
    with torch_threads(1):
        for seed in seeds:
            model = seeded_model(lambda: small_mlp("bn"), seed)
            history = fit(
                model, data, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, seed=seed, desc=NAME,
                precision=p.precision,
            )  # fmt: skip
            per_seed.append({"seed": seed, "test_acc": history["test_acc"][-1], **compare_modes(model, data, p, seed)})

    def across(key: str) -> dict:
        return mean_std([r[key] for r in per_seed])

    summary = {
        "test_acc": across("test_acc"),
        "train_mode_prediction_std": across("train_std_mean"),
        "train_mode_same_batch_std_max": across("train_same_batch_std_max"),
        "eval_mode_prediction_std_max": across("eval_std_max"),
        "train_vs_eval_mean_abs_diff": across("train_vs_eval_mean_abs"),
        "eval_alone_vs_in_batch_max_diff": across("eval_alone_vs_in_batch"),
    }
    checks = {
        "train_mode_varies": Check(
            "in train mode the same rows get different predictions when their batch-mates change",
            all(r["train_std_mean"] > 0 for r in per_seed),
            summary["train_mode_prediction_std"],
        ),
        "eval_mode_exactly_constant": Check(
            "in eval mode the predictions do not vary at all (variance exactly zero) across those batches",
            all(r["eval_std_max"] == 0.0 for r in per_seed),
            summary["eval_mode_prediction_std_max"],
        ),
        "train_mode_deterministic_per_batch": Check(
            "train mode is deterministic for an identical batch: the variation comes from the batch, not chance",
            all(r["train_same_batch_std_max"] == 0.0 for r in per_seed),
            summary["train_mode_same_batch_std_max"],
        ),
        "train_forward_updates_running_stats": Check(
            "a train-mode forward under no_grad still moves BN's running statistics",
            all(r["running_mean_moved"] > 0 for r in per_seed),
            [r["running_mean_moved"] for r in per_seed],
        ),
    }
    return StudyResult(NAME, asdict(p), list(seeds), summary, checks, data={"per_seed": per_seed})
