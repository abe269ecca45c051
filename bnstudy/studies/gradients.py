"""Study ``gradients``: mean |gradient| of each layer's weights in the deep MLP, with and without BN, from one
backward pass at initialisation and averaged over each epoch of training. The spread (largest over smallest
layer) says how unevenly the layers learn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import Tensor, nn

from bnstudy.data import TabularSplit, toy_classification
from bnstudy.models import deep_mlp
from bnstudy.studies.fitting import fit, loss_and_correct, seeded_model, torch_threads
from bnstudy.studies.result import DEFAULT_SEEDS, Check, StudyResult, choose_params, mean_std, mean_std_curves

NAME = "gradients"
NORMS = ("bn", "none")


@dataclass(frozen=True)
class Params:
    probe_batch: int = 32
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    precision: str = "fp32"


QUICK = {"epochs": 2}


class GradientRecorder:
    """Mean |grad| of every Linear/Conv weight, collected by tensor hooks each time backward reaches it and
    averaged over the calls since the last :meth:`take`."""

    def __init__(self, model: nn.Module) -> None:
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.names = [_layer_name(i, m) for i, m in enumerate(layers)]
        self._sums = [0.0] * len(layers)
        self._counts = [0] * len(layers)
        self._handles = [m.weight.register_hook(partial(self._record, i)) for i, m in enumerate(layers)]

    def _record(self, index: int, grad: Tensor) -> None:
        self._sums[index] += grad.abs().mean().item()
        self._counts[index] += 1

    def take(self) -> list[float]:
        """Per-layer averages since the last call, then start afresh."""
        means = [s / c if c else float("nan") for s, c in zip(self._sums, self._counts)]
        self._sums = [0.0] * len(self._sums)
        self._counts = [0] * len(self._counts)
        return means

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _layer_name(index: int, layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return f"linear{index + 1} {layer.in_features}→{layer.out_features}"
    return f"conv{index + 1} {layer.in_channels}→{layer.out_channels}"


def spread(grads: Sequence[float]) -> float:
    """Largest over smallest per-layer mean |grad|: 1 means every layer gets equally large updates."""
    return max(grads) / min(grads)


def probe_gradients(model: nn.Module, x: Tensor, y: Tensor) -> tuple[list[str], list[float]]:
    """Layer names and mean |grad| per layer from one forward/backward on ``(x, y)`` in train mode."""
    recorder = GradientRecorder(model)
    model.train()
    loss, _ = loss_and_correct(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    recorder.remove()
    return recorder.names, recorder.take()


def one_seed(norm: str, data: TabularSplit, seed: int, p: Params) -> dict:
    """Gradients at initialisation on a seeded probe batch, then per-epoch averages over training."""
    model = seeded_model(partial(deep_mlp, norm), seed)
    idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))[: p.probe_batch]
    names, at_init = probe_gradients(model, data.x_train[idx], data.y_train[idx])
    recorder = GradientRecorder(model)
    per_epoch: list[list[float]] = []
    history = fit(
        model,
        data,
        epochs=p.epochs,
        batch_size=p.batch_size,
        lr=p.lr,
        seed=seed,
        on_epoch_end=lambda _: per_epoch.append(recorder.take()),
        desc=f"{NAME} {norm}",
        precision=p.precision,
    )
    recorder.remove()
    return {
        "layers": names,
        "init": at_init,
        "init_spread": spread(at_init),
        "training": per_epoch,
        "training_spread": sum(spread(g) for g in per_epoch) / len(per_epoch),
        "final_train_loss": history["train_loss"][-1],
    }


def run(seeds: Sequence[int] = DEFAULT_SEEDS, quick: bool | None = None, **overrides) -> StudyResult:
    """Per-layer gradient magnitudes with and without BN, at initialisation and over training."""
    p = choose_params(Params(), QUICK, quick, overrides)
    data = toy_classification()
    with torch_threads(1):
        runs = {norm: [one_seed(norm, data, s, p) for s in seeds] for norm in NORMS}
    layers = runs["bn"][0]["layers"]
    per_norm = {
        norm: {
            "init": [mean_std([r["init"][i] for r in rs]) for i in range(len(layers))],
            "init_spread": mean_std([r["init_spread"] for r in rs]),
            "training_spread": mean_std([r["training_spread"] for r in rs]),
            "training": [mean_std_curves([[g[i] for g in r["training"]] for r in rs]) for i in range(len(layers))],
        }
        for norm, rs in runs.items()
    }
    summary = {
        "layers": layers,
        "init_spread": {norm: per_norm[norm]["init_spread"] for norm in NORMS},
        "training_spread": {norm: per_norm[norm]["training_spread"] for norm in NORMS},
        "init_mean_abs_grad": {norm: [s["mean"] for s in per_norm[norm]["init"]] for norm in NORMS},
    }
    findings = {
        "bn_smaller_spread_at_init": Check(
            "at initialisation BN's gradient spread across layers (largest / smallest mean |grad|) is smaller",
            per_norm["bn"]["init_spread"]["mean"] < per_norm["none"]["init_spread"]["mean"],
            summary["init_spread"],
        ),
        "bn_smaller_spread_in_training": Check(
            "averaged over training, BN's gradient spread across layers is smaller",
            per_norm["bn"]["training_spread"]["mean"] < per_norm["none"]["training_spread"]["mean"],
            summary["training_spread"],
        ),
    }
    checks = {
        "hooks_saw_every_layer": Check(
            "the hooks recorded a finite gradient for every layer at every point",
            all(
                torch.isfinite(torch.tensor([r["init"], *r["training"]])).all().item()
                for rs in runs.values()
                for r in rs
            ),
        )
    }
    return StudyResult(NAME, asdict(p), list(seeds), summary, checks, findings, data=per_norm)
