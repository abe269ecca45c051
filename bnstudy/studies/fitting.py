"""The small training loop the studies share: Adam, seeded shuffling, per-epoch history.

Float targets mean binary classification with one logit (BCE); integer targets mean multi-class (cross-entropy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from bnstudy.data import TabularSplit
from bnstudy.precision import Precision, resolve_precision


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads. The studies' small models train fastest on one thread: thread hand-off
    costs more than their matmuls, and far more when other processes compete for the cores (measured on 2 busy
    cores: seed CNN step 93 ms on 1 thread, 240–640 ms on 2)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def loss_and_correct(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean loss and the number of correct predictions for a batch."""
    if y.is_floating_point():
        logit = logits.squeeze(-1)
        return F.binary_cross_entropy_with_logits(logit, y), ((logit > 0).float() == y).sum()
    return F.cross_entropy(logits, y), (logits.argmax(-1) == y).sum()


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 2048, precision: Precision | None = None
) -> tuple[float, float]:
    """Loss and accuracy in eval mode (BN uses its running statistics), under ``precision``'s autocast."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0.0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        with precision.autocast() if precision else nullcontext():
            loss, right = loss_and_correct(model(xb).float(), yb)
        loss_sum += loss.item() * len(yb)
        correct += right.item()
    model.train(was_training)
    return loss_sum / len(y), correct / len(y)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Index batches of one shuffled epoch; a last batch of one sample is dropped (BN cannot train on it)."""
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    return batches[:-1] if len(batches) > 1 and len(batches[-1]) == 1 else batches


def fit(
    model: nn.Module,
    data: TabularSplit,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    on_epoch_end: Callable[[int], None] | None = None,
    desc: str = "train",
    evaluate_train: bool = True,
    precision: str = "fp32",
) -> dict[str, list[float]]:
    """Train with Adam and return per-epoch ``train_loss``/``train_acc`` (averaged over the epoch's minibatches,
    in train mode, as the seed notebooks logged them), ``train_eval_loss``/``train_eval_acc`` (the whole
    training set in eval mode after the epoch: what the model has learnt, without batch-statistics noise; left
    out with ``evaluate_train`` False, where that pass would cost more than it tells) and ``test_loss``/``test_acc``
    (eval mode, after the epoch). Forward passes run under ``precision``'s autocast (:mod:`bnstudy.precision`; the
    CPU's)."""
    chosen = resolve_precision(precision, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    splits = ("train_eval", "test") if evaluate_train else ("test",)
    history: dict[str, list[float]] = {
        key: [] for key in ("train_loss", "train_acc", *(f"{split}_{m}" for split in splits for m in ("loss", "acc")))
    }
    for epoch in tqdm(range(epochs), desc=desc, leave=False, disable=None):
        model.train()
        loss_sum, correct, seen = 0.0, 0.0, 0
        for idx in shuffled_batches(len(data.y_train), batch_size, generator):
            with chosen.autocast():
                loss, right = loss_and_correct(model(data.x_train[idx]).float(), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += right.item()
            seen += len(idx)
        history["train_loss"].append(loss_sum / seen)
        history["train_acc"].append(correct / seen)
        evaluated = {"train_eval": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
        for split in splits:
            loss, acc = evaluate(model, *evaluated[split], precision=chosen)
            history[f"{split}_loss"].append(loss)
            history[f"{split}_acc"].append(acc)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return history


def seeded_model(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with the global RNG seeded, so a seed fixes the initial weights."""
    torch.manual_seed(seed)
    return build()


def train_seeds(
    build: Callable[[], nn.Module],
    data: TabularSplit,
    seeds: Sequence[int],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    desc: str = "train",
    precision: str = "fp32",
) -> list[dict[str, list[float]]]:
    """One :func:`fit` history per seed; the seed fixes initial weights and shuffling."""
    return [
        fit(
            seeded_model(build, s),
            data,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=s,
            desc=f"{desc} seed {s}",
            precision=precision,
        )  # fmt: skip
        for s in seeds
    ]
